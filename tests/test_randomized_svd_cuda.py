"""randomized_svd on CUDA: error vs torch.svd_lowrank, reproducibility, opcheck."""

import pytest
import torch

import lora_ops

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and lora_ops.cuda_built()),
                                reason="needs a CUDA device and lora_ops built with CUDA")

from test_randomized_svd import decaying, recon_error  # noqa: E402


def test_randomized_svd_cuda():
    x = decaying(16, 96, 80)
    u, s, vh = lora_ops.randomized_svd(x.cuda(), 8, oversample=6, n_iter=2,
                                       generator=torch.Generator("cuda").manual_seed(0))
    assert u.is_cuda
    torch.manual_seed(0)
    tu, ts, tv = torch.svd_lowrank(x, q=14, niter=2)
    ours = recon_error(x, u.cpu(), s.cpu(), vh.cpu()).mean()
    assert ours <= 1.1 * recon_error(x, tu[..., :8], ts[..., :8], tv[..., :8].mT).mean()
    again = lora_ops.randomized_svd(x.cuda(), 8, oversample=6, n_iter=2,
                                    generator=torch.Generator("cuda").manual_seed(0))
    assert torch.equal(again[0], u)


def test_opcheck_cuda():
    torch.library.opcheck(torch.ops.lora_ops.randomized_svd.default, (torch.randn(2, 20, 16).cuda(), 4, 5, 2, 1))
