"""pytest-benchmark suite over the grouped-LoRA cases of ``lora_ops.benchmarks.grouped`` (d = 2048).

Default: N in {4, 128}, uniform ids (a few seconds per test). ``LORA_OPS_BENCH_FULL=1``: N in {1, 4, 32, 128},
uniform and Zipf, gather_bmm included up to N = 32. ``LORA_OPS_BENCH_DEVICE=cuda`` runs on the GPU.

``peft`` rows time PEFT's whole layer (base + LoRA); subtract the ``base`` row of the same group for its LoRA part.
The other methods time the LoRA delta alone. Correctness against PEFT is checked once per case before timing.
"""

import functools
import os

import pytest
import torch

pytest.importorskip("peft")

from lora_ops.benchmarks import grouped  # noqa: E402  (after the skip: it needs peft at run time)
from lora_ops.benchmarks.timing import synchronized  # noqa: E402

FULL = os.environ.get("LORA_OPS_BENCH_FULL") == "1"
DEVICE = os.environ.get("LORA_OPS_BENCH_DEVICE", "cpu")

CASES = grouped.cases(d=(2048,), n_adapters=(1, 4, 32, 128) if FULL else (4, 128),
                      dists=("uniform", "zipf") if FULL else ("uniform",))
# (case, method) pairs with a case's methods adjacent, so the one-entry workload cache below builds each case once
PARAMS = [(c, m) for c in CASES for m in grouped.methods_for(c, quick=not FULL)]


@functools.lru_cache(maxsize=1)
def _workload(case):
    wl = grouped.build_workload(case, device=DEVICE)
    grouped.check_against_peft(wl, grouped.methods_for(case))  # raises on a mismatch: never time a wrong answer
    return wl


@pytest.mark.parametrize(("case", "method"), PARAMS, ids=[f"{c.name}-{m}" for c, m in PARAMS])
def test_grouped(benchmark, case, method):
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("LORA_OPS_BENCH_DEVICE=cuda but CUDA is not available")
    wl = _workload(case)
    benchmark.group = case.name
    benchmark.extra_info.update(case.as_dict(), method=method, n_present=wl.n_present, device=DEVICE,
                                threads=torch.get_num_threads(),
                                measures="base + LoRA" if method == "peft" else
                                "base layer" if method == "base" else "LoRA delta")
    benchmark(synchronized(wl.fns()[method], DEVICE))
