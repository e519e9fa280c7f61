"""pytest-benchmark suite over ``lora_ops.benchmarks.model``: one whole-model workload per method.

Default: the quick case (tiny Llama, 4 adapters, prefill). ``LORA_OPS_BENCH_FULL=1``: SmolLM2-135M (the fetched
assets' weights when present, else a random Llama of its config) with 32 adapters of rank 16 on every projection;
``LORA_OPS_BENCH_WORKLOAD=decode|train`` picks the workload. Subtract the ``base`` row from the others for the
LoRA cost; ``lora-ops bench model`` measures that cost from paired runs, which is what the README reports.
"""

import functools
import os
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from lora_ops.benchmarks import model  # noqa: E402

FULL = os.environ.get("LORA_OPS_BENCH_FULL") == "1"
WORKLOAD = os.environ.get("LORA_OPS_BENCH_WORKLOAD", "prefill")
CASE = model.cases(quick=not FULL, workloads=[WORKLOAD], n_adapters=[32 if FULL else 4])[0]


@functools.lru_cache(maxsize=1)
def _fns():
    base, _ = model.build_model(CASE.model, model_dir=model._assets_model_dir() if FULL else None)
    tmp = tempfile.mkdtemp(prefix="bench-model-")
    folders = model.save_adapter_folders(base, CASE.n_adapters, CASE.rank, Path(tmp))
    wl = model.build_workload(base, folders, CASE.n_adapters)
    fns, checks = model.make_fns(CASE, wl)
    model.check_outputs(CASE, checks)  # never time a wrong answer
    return fns


@pytest.mark.parametrize("method", model.METHODS)
def test_model(benchmark, method):
    benchmark.group = CASE.name
    benchmark.extra_info.update(CASE.as_dict(), method=method)
    benchmark(_fns()[method])
