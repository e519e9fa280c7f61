"""pytest-benchmark suite over lora_ops.benchmarks.merge: PEFT's svd merge vs merge_lowrank on one 2048² layer
(8 adapters, r=16 -> 16), and randomized_svd vs torch.svd_lowrank on 64 matrices of 512² (rank 16, q=26, 2 iterations).
Results are checked before timing (equal merged products; randomized_svd error within 1.1x of torch's).
``LORA_OPS_BENCH_DEVICE=cuda`` runs the SVD cases on the GPU (PEFT's merge stays on the CPU).
"""

import functools
import os

import pytest
import torch

pytest.importorskip("peft")

from lora_ops.benchmarks import merge as bench  # noqa: E402
from lora_ops.benchmarks.timing import synchronized  # noqa: E402

import lora_ops  # noqa: E402

DEVICE = os.environ.get("LORA_OPS_BENCH_DEVICE", "cpu")
D = 2048


@functools.lru_cache(maxsize=1)
def _layer():
    model = bench._peft_with_adapters(bench._OneLinear(D), ["proj"], bench.N_ADAPTERS)
    adapters = bench._adapter_state(model, bench.N_ADAPTERS)
    a = torch.stack([sd["base_model.model.proj.lora_A.weight"] for sd, _ in adapters])
    b = torch.stack([sd["base_model.model.proj.lora_B.weight"] for sd, _ in adapters])
    w = torch.full((bench.N_ADAPTERS,), bench.ALPHA / bench.RANK / bench.N_ADAPTERS)
    call, out = bench._peft_merge_fn(model, bench.N_ADAPTERS, [1 / bench.N_ADAPTERS] * bench.N_ADAPTERS)
    call()
    ma, mb = lora_ops.merge_lowrank(a, b, w, bench.RANK)
    ref = list(bench._products(out["sd"]).values())[0]
    assert bench._max_rel_diff({"p": mb.double() @ ma.double()}, {"p": ref}) < bench.REL_TOL
    return call, a, b, w


@pytest.mark.parametrize("method", ["peft", "lora_ops"])
def test_merge_svd_d2048(benchmark, method):
    call, a, b, w = _layer()
    benchmark.group = f"merge-svd-d{D}-n8-r16"
    if method == "peft":
        benchmark.pedantic(call, rounds=1, iterations=1)
    else:
        benchmark(lambda: lora_ops.merge_lowrank(a, b, w, bench.RANK))


@functools.lru_cache(maxsize=1)
def _matrices():
    return bench.decaying_matrices(64, 512, 512).to(DEVICE)


@pytest.mark.parametrize("method", ["torch_svd_lowrank", "lora_ops"])
def test_randomized_svd(benchmark, method):
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("LORA_OPS_BENCH_DEVICE=cuda but CUDA is not available")
    x = _matrices()
    benchmark.group = "rsvd-b64-512-r16-q26-it2"
    if method == "lora_ops":
        fn = lambda: lora_ops.randomized_svd(x, 16, oversample=10, n_iter=2)  # noqa: E731
    else:
        fn = lambda: torch.svd_lowrank(x, q=26, niter=2)  # noqa: E731
    benchmark(synchronized(fn, DEVICE))
