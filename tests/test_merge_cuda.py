"""lora_ops.merge methods on CUDA tensors give the CPU results."""

import pytest
import torch

import lora_ops

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and lora_ops.cuda_built()),
                                reason="needs a CUDA device and lora_ops built with CUDA")

from lora_ops.merge import merge  # noqa: E402
from test_merge_lowrank import bank  # noqa: E402


@pytest.mark.parametrize("method", ["linear", "cat", "svd", "max_pool", "iterative_max", "ties"])
def test_merge_methods_cuda_match_cpu(method):
    a, b = bank((), 3, 4, 32, 24)
    w = [0.5, 0.2, 0.3]
    ca, cb = merge(a.cuda(), b.cuda(), w, method, density=0.5, rank=4)
    ea, eb = merge(a, b, w, method, density=0.5, rank=4)
    torch.testing.assert_close((cb @ ca).cpu(), eb @ ea, rtol=1e-4, atol=1e-5)
