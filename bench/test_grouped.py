"""pytest-benchmark suite over the grouped-LoRA cases of ``lora_ops.benchmarks.grouped``: the grid of
``lora-ops bench grouped`` (one-factor sweeps around d = 2048, r = 16, T = 256, N = 32, uniform).

Default: the ``--quick`` grid (6 cases). ``LORA_OPS_BENCH_FULL=1``: the full grid (30 cases, gather_bmm included
where the CLI times it). ``LORA_OPS_BENCH_DEVICE=cuda`` runs on the GPU (adding torch._grouped_mm on compute
capability >= 9.0 and lora_ops with check_ids=False); ``LORA_OPS_BENCH_DTYPE=bf16|fp16`` picks the dtype
(default fp32).

Every method times the LoRA delta alone (``peft``: PEFT's LoRA layer with a zero base layer) except ``base``, the
base nn.Linear. Correctness against the whole PEFT model minus its base is checked once per case before timing;
a method that the GPU's torch refuses (grouped_mm with some dtypes) is skipped with the reason.
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
DTYPE = grouped.parse_dtype(os.environ.get("LORA_OPS_BENCH_DTYPE", "fp32"))
ON_DEVICE = DEVICE != "cuda" or torch.cuda.is_available()

CASES = grouped.cases(quick=not FULL)
# (case, method) pairs with a case's methods adjacent, so the one-entry workload cache below builds each case once
PARAMS = [(c, m) for c in CASES for m in grouped.methods_for(c, quick=not FULL, device=DEVICE if ON_DEVICE else "cpu")]


@functools.lru_cache(maxsize=1)
def _workload(case):
    wl = grouped.build_workload(case, device=DEVICE, dtype=DTYPE)
    # raises on a mismatch: never time a wrong answer
    _, skipped = grouped.check_against_peft(wl, grouped.methods_for(case, quick=not FULL, device=DEVICE))
    return wl, skipped


@pytest.mark.parametrize(("case", "method"), PARAMS, ids=[f"{c.name}-{m}" for c, m in PARAMS])
def test_grouped(benchmark, case, method):
    if not ON_DEVICE:
        pytest.skip("LORA_OPS_BENCH_DEVICE=cuda but CUDA is not available")
    wl, skipped = _workload(case)
    if method in skipped:
        pytest.skip(f"{method}: {skipped[method]}")
    benchmark.group = case.name
    benchmark.extra_info.update(case.as_dict(), method=method, n_present=wl.n_present, device=DEVICE,
                                dtype=str(DTYPE), threads=torch.get_num_threads(),
                                measures="base layer" if method == "base" else "LoRA delta")
    benchmark(synchronized(wl.fns()[method], DEVICE))
