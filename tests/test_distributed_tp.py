"""Tensor parallelism (lora_ops.distributed): 2 CPU processes (gloo) equal one process, forward and gradients.

The checks run in tests/tp_worker.py under torchrun, in a subprocess with a timeout (a hung collective cannot
stall the suite): every layout of grouped_lora's sharding rules (replicated, column, row, batch; top-k ids with
weights and -1 rows), a column-parallel + row-parallel MultiLoRALinear MLP with per-sequence ids, and a tiny
transformers Llama with banks on all seven projections under a Megatron-style plan (logits and bank gradients).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def test_two_process_tensor_parallel_equals_one_process():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "tests" / "tp_worker.py")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    assert "tensor parallel: all checks passed" in done.stdout


def test_plan_names_a_known_style():
    from torch import nn

    from lora_ops.distributed import parallelize_multi_lora

    with pytest.raises(ValueError, match="colwise"):
        parallelize_multi_lora(nn.Linear(2, 2), None, {"up": "columnwise"})
