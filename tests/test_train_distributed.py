"""`lora-ops train` under torchrun: 2 CPU processes (gloo) with DDP and with FSDP2 give the single-process adapters."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch.distributed as dist  # noqa: E402

from lora_ops import train as job  # noqa: E402
from lora_ops._io import load_tensors  # noqa: E402
from tests.train_job_support import ADAPTERS, make_setup, write_config  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
STEPS = 4


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_dist")
    setup = make_setup(root)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = job.train(write_config(setup, root / "single", steps=STEPS), progress=False)
    finally:
        torch.set_num_threads(n)
    return setup, summary


def _torchrun(cfg, *flags):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lora_ops.cli", "train", str(cfg), "--no-progress", "--threads", "1", "--device", "cpu", *flags]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("trained 3 adapters") == 1  # rank 0 reports, once


@pytest.mark.parametrize("parallel, micro", [("ddp", 0), ("fsdp", 0), ("ddp", 2)])
def test_two_processes_match_one(single, tmp_path, parallel, micro):
    """DDP straight through; FSDP2 in two launches (2 steps, then --resume to 4), which also checks that sharded
    banks and optimizer state are gathered into the checkpoint and sharded again on resume; DDP with micro-batches
    of 2 of each rank's 3 rows (gradients accumulate under ``no_sync``, one all-reduce per step)."""
    setup, one = single
    extra = {"micro_batch_rows": micro} if micro else {}
    if parallel == "fsdp":
        _torchrun(write_config(setup, tmp_path / parallel, steps=STEPS // 2, parallel=parallel, **extra))
    _torchrun(write_config(setup, tmp_path / parallel, steps=STEPS, parallel=parallel, **extra), "--resume")
    run = json.loads((tmp_path / parallel / "run.json").read_text())
    assert run["world"] == 2 and run["parallel"] == parallel
    assert run["banks_sharded"] == (parallel == "fsdp")
    assert run["start"] == (STEPS // 2 if parallel == "fsdp" else 0)
    if parallel == "ddp":
        assert run["tokens"] == one["tokens"]  # every row trained once over the two processes
    for spec in ADAPTERS:
        want = load_tensors(Path(one["adapters"][spec["name"]]) / "adapter_model.safetensors")
        got = load_tensors(tmp_path / parallel / spec["name"] / "adapter_model.safetensors")
        assert set(got) == set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5, msg=key)
        assert run["loss"][spec["name"]] == pytest.approx(one["loss"][spec["name"]], rel=1e-5)
