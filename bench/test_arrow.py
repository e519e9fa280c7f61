"""pytest-benchmark suite over the Arrow cases of ``lora_ops.benchmarks.arrow`` (d = 2048, r = 16, T = 256, k = 4).

Default: E in {8, 64}. ``LORA_OPS_BENCH_FULL=1`` adds E = 128. ``LORA_OPS_BENCH_DEVICE=cuda`` runs on the GPU.
``peft`` rows time PEFT's whole Arrow layer (base + routed delta): subtract the ``base`` row of the same group.
``prototypes-*`` rows time the prototype computation for all experts. Correctness against PEFT is checked once per
case before timing.
"""

import functools
import os

import pytest
import torch

pytest.importorskip("peft")

from lora_ops.benchmarks import arrow  # noqa: E402
from lora_ops.benchmarks.timing import synchronized  # noqa: E402

FULL = os.environ.get("LORA_OPS_BENCH_FULL") == "1"
DEVICE = os.environ.get("LORA_OPS_BENCH_DEVICE", "cpu")
CASES = arrow.cases(quick=not FULL)
METHODS = arrow.METHODS + ("prototypes-peft", "prototypes-lora_ops")
PARAMS = [(c, m) for c in CASES for m in METHODS]


@functools.lru_cache(maxsize=1)
def _workload(case):
    wl = arrow.build_workload(case, device=DEVICE)
    arrow.check_against_peft(wl)  # raises on a mismatch: never time a wrong answer
    return wl


def _prototype_fn(wl, method):
    import lora_ops

    if method == "prototypes-lora_ops":
        return lambda: lora_ops.arrow_prototypes(wl.lora_a, wl.lora_b)
    layer = wl.peft_layer
    router = layer.lora_arrow[arrow.ROUTER]

    def peft_build():
        router._protos_ready = False
        router.build_prototypes(layer.lora_A, layer.lora_B)

    return peft_build


@pytest.mark.parametrize(("case", "method"), PARAMS, ids=[f"{c.name}-{m}" for c, m in PARAMS])
def test_arrow(benchmark, case, method):
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("LORA_OPS_BENCH_DEVICE=cuda but CUDA is not available")
    wl = _workload(case)
    benchmark.group = case.name
    benchmark.extra_info.update(case.as_dict(), method=method, device=DEVICE, threads=torch.get_num_threads())
    if method.startswith("prototypes-"):
        fn = _prototype_fn(wl, method)
        with torch.inference_mode():
            benchmark(synchronized(fn, DEVICE))
        arrow.check_against_peft(wl)  # restores the exact prototypes the forward timings route with
    else:
        benchmark(synchronized(wl.fns()[method], DEVICE))
