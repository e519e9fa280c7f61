"""pytest-benchmark suite over ``lora_ops.benchmarks.model``: a whole Llama forward on a mixed-adapter batch.

Default: the quick case (hidden 512, 2 layers, 32 adapters of rank 16 on q/k/v/o/gate/up/down, 16 sequences x 32
tokens, every sequence its own adapter). ``LORA_OPS_BENCH_FULL=1``: hidden 1024, 4 layers.
``LORA_OPS_BENCH_DEVICE=cuda`` runs on the GPU. Subtract the ``base`` row from the others for the LoRA cost.
"""

import functools
import os

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from lora_ops.benchmarks import model  # noqa: E402
from lora_ops.benchmarks.timing import synchronized  # noqa: E402
from lora_ops.peft import accelerate, deaccelerate  # noqa: E402

FULL = os.environ.get("LORA_OPS_BENCH_FULL") == "1"
DEVICE = os.environ.get("LORA_OPS_BENCH_DEVICE", "cpu")
CASE = model.cases(quick=not FULL)[0]


@functools.lru_cache(maxsize=1)
def _workload():
    wl = model.build_workload(CASE, device=DEVICE)
    fns = wl.fns()
    wl.peft_logits = fns["peft"]()
    return wl


@pytest.mark.parametrize("method", model.METHODS)
def test_model(benchmark, method):
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("LORA_OPS_BENCH_DEVICE=cuda but CUDA is not available")
    wl = _workload()
    fns = wl.fns()
    (deaccelerate if method == "peft" else accelerate)(wl.peft_model)
    if method in ("accelerated", "wrapped"):
        diff = (fns[method]() - wl.peft_logits).abs().max().item()
        assert diff <= model.ABS_TOL, f"{method} differs from PEFT by {diff:.3e}"  # never time a wrong answer
    benchmark.group = CASE.name
    benchmark.extra_info.update(CASE.as_dict(), method=method, device=DEVICE, threads=torch.get_num_threads())
    benchmark(synchronized(fns[method], DEVICE))
