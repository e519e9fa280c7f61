"""The CUDA kernels' own source run on the CPU harness (lora_ops/_emu.py). Built once per machine (torch's
extension cache); skipped where the CUDA toolkit's headers are missing. .ci/run runs this folder a second time with
the harness built under ASan/UBSan (LORA_OPS_EMU_SANITIZE=1, libasan and libstdc++ preloaded)."""

import os

import pytest
import torch

from lora_ops import _emu


@pytest.fixture(scope="session")
def emu():
    if _emu.cuda_include_dir() is None:
        pytest.skip("the CUDA toolkit's headers (cuda_fp16.h) are not installed")
    if _emu.sanitized() and "libasan" not in os.environ.get("LD_PRELOAD", ""):
        pytest.fail("LORA_OPS_EMU_SANITIZE=1 needs LD_PRELOAD of libasan and libstdc++ (see .ci/run's cuda_emu)")
    _emu.load()
    return torch.ops.lora_ops_emu


@pytest.fixture(autouse=True)
def _fresh(emu):
    _emu.configure()  # an H100's 132 SMs, natural order
    _emu.take_launches()
    yield
    _emu.configure()
