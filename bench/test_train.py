"""pytest-benchmark suite over the training-step cases of ``lora_ops.benchmarks.train`` (d = 2048, N = 8, r = 16).

Default: T = 256, uniform ids, without gather_bmm. ``LORA_OPS_BENCH_FULL=1``: T in {256, 1024}, uniform and Zipf,
gather_bmm included. ``LORA_OPS_BENCH_DEVICE=cuda`` runs on the GPU. Every LoRA method's gradients are checked
against the segment loop's once per case before timing.
"""

import functools
import os

import pytest
import torch

from lora_ops.benchmarks import train
from lora_ops.benchmarks.timing import synchronized

FULL = os.environ.get("LORA_OPS_BENCH_FULL") == "1"
DEVICE = os.environ.get("LORA_OPS_BENCH_DEVICE", "cpu")

CASES = train.cases(quick=not FULL)
PARAMS = [(c, m) for c in CASES for m in train.methods_for(c, quick=not FULL)]


@functools.lru_cache(maxsize=1)
def _workload(case):
    wl = train.build_workload(case, device=DEVICE)
    train.check_grads(wl, train.methods_for(case, quick=not FULL))  # never time a wrong answer
    return wl


@pytest.mark.parametrize(("case", "method"), PARAMS, ids=[f"{c.name}-{m}" for c, m in PARAMS])
def test_train_step(benchmark, case, method):
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("LORA_OPS_BENCH_DEVICE=cuda but CUDA is not available")
    wl = _workload(case)
    benchmark.group = case.name
    benchmark.extra_info.update(case.as_dict(), method=method, device=DEVICE, threads=torch.get_num_threads(),
                                measures="base layer fwd+bwd" if method == "base" else "LoRA delta fwd+bwd")
    benchmark(synchronized(wl.fns()[method], DEVICE))
