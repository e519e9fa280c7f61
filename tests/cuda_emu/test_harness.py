"""The harness itself: a correct kernel runs, and each class of bug it exists for is reported."""

import os
import subprocess
import sys

import pytest
import torch

from lora_ops import _emu


def test_correct_kernel_runs(emu):
    out = torch.zeros(128)
    emu._selftest(out, 0)
    # block sum 0..63 = 2016, warp sum of lanes 0..31 = 496, ballot of odd lanes = 0xaaaaaaaa
    assert (out == 2016 + 496 + 1).all()
    assert _emu.take_launches() == ["lora_ops::emu_selftest::good_kernel grid=(2, 1, 1) block=(64, 1, 1) smem=0"]


@pytest.mark.parametrize(("case", "message"), [
    (1, "__syncthreads at line [0-9]+ reached by 32 of 64 threads \\(32 exited before it\\)"),
    (2, "__shfl_xor_sync \\(mask 0xffffffff\\) in warp 0, lane 0: lane 16 of the mask has exited"),
    (3, "__shfl_xor_sync \\(mask 0xffffffff\\) in warp 0, lane 16: lane 0 of the mask has exited"),
])
def test_divergence_is_reported(emu, case, message):
    with pytest.raises(RuntimeError, match=message):
        emu._selftest(torch.zeros(128), case)


def test_reverse_order_gives_the_same_result(emu):
    _emu.configure(reverse=True)
    out = torch.zeros(128)
    emu._selftest(out, 0)
    assert (out == 2016 + 496 + 1).all()


@pytest.mark.skipif(not _emu.sanitized(), reason="needs the harness built with ASan (LORA_OPS_EMU_SANITIZE=1)")
def test_out_of_bounds_read_is_reported():
    code = "import torch; from lora_ops import _emu; _emu.load(); torch.ops.lora_ops_emu._selftest(torch.zeros(128), 4)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ)
    assert run.returncode != 0 and "heap-buffer-overflow" in run.stderr, run.stderr[-2000:]
