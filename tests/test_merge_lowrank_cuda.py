"""merge_lowrank and its Jacobi core SVD on CUDA: the CPU checks, against the float64 reference and the CPU op."""

import pytest
import torch

import lora_ops

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and lora_ops.cuda_built()),
                                reason="needs a CUDA device and lora_ops built with CUDA")

from test_merge_lowrank import TOL, bank, dense_truncation, rel_error  # noqa: E402


@pytest.mark.parametrize("shape", [((), 3, 4, 33, 17, 5), ((7, 4), 8, 16, 256, 192, 16), ((2,), 20, 16, 512, 512, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_lowrank_cuda(shape, dtype):
    lead, n, r, d_in, d_out, rank = shape
    a, b = bank(lead, n, r, d_in, d_out, dtype)
    w = torch.randn(n)
    ma, mb, s = lora_ops.merge_lowrank(a.cuda(), b.cuda(), w.cuda(), rank, return_singular_values=True)
    assert ma.is_cuda and ma.dtype == dtype
    assert rel_error(ma.cpu(), mb.cpu(), dense_truncation(a, b, w, rank)[0]) <= TOL[dtype]
    _, _, s_cpu = lora_ops.merge_lowrank(a, b, w, rank, return_singular_values=True)
    torch.testing.assert_close(s.cpu().float(), s_cpu.float(), rtol=TOL[dtype] * 10, atol=TOL[dtype] * s_cpu.float().max())


def test_degenerate_cuda():
    a1, b1 = bank((), 1, 4, 64, 48)
    a, b = a1.expand(4, 4, 64).contiguous().cuda(), b1.expand(4, 48, 4).contiguous().cuda()
    ma, mb = lora_ops.merge_lowrank(a, b, torch.tensor([0.5, 0.5, -0.25, -0.75], device="cuda"), 4)
    assert (mb @ ma).norm().item() <= 1e-5 * (b1[0] @ a1[0]).norm().item()
    ma, mb = lora_ops.merge_lowrank(a, b, torch.ones(4, device="cuda"), 4)
    assert rel_error(ma.cpu(), mb.cpu(), dense_truncation(a.cpu(), b.cpu(), torch.ones(4), 4)[0]) <= 1e-5


@pytest.mark.parametrize("shape", [(3, 20, 7), (2, 7, 20), (64, 128, 128), (4, 256, 256), (2, 300, 256)])
def test_jacobi_svd_cuda_matches_cpu_twin(shape):
    x = torch.randn(shape)
    u, s, vh = torch.ops.lora_ops._jacobi_svd(x.cuda())
    ref = torch.linalg.svdvals(x.double())
    assert ((s.cpu().double() - ref).abs() <= 1e-5 * ref[:, :1]).all()
    recon = (u.double() * s.double()[:, None, :]) @ vh.double()
    assert ((recon.cpu() - x.double()).flatten(1).norm(dim=1) <= 1e-5 * x.double().flatten(1).norm(dim=1)).all()


def test_jacobi_svd_cuda_limits_and_convergence():
    with pytest.raises(ValueError, match="must be <= 256"):
        torch.ops.lora_ops._jacobi_svd(torch.randn(1, 300, 280, device="cuda"))
    _, s, _ = torch.ops.lora_ops._jacobi_svd(torch.randn(2, 24, 16, device="cuda"), max_sweeps=1)
    assert torch.isnan(s).all()
    u, s, _ = torch.ops.lora_ops._jacobi_svd(torch.zeros(2, 6, 4, device="cuda"))
    torch.testing.assert_close(u.mT @ u, torch.eye(4, device="cuda").expand(2, 4, 4))


def test_merge_lowrank_cuda_same_factors_as_cpu():
    a, b = bank((2,), 4, 3, 24, 20)
    w = torch.randn(4)
    ca, cb = lora_ops.merge_lowrank(a.cuda(), b.cuda(), w.cuda(), 6)
    la, lb = lora_ops.merge_lowrank(a, b, w, 6)
    torch.testing.assert_close(ca.cpu(), la, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cb.cpu(), lb, atol=1e-4, rtol=1e-4)


def test_opcheck_cuda():
    a, b = bank((2,), 3, 4, 16, 12)
    torch.library.opcheck(torch.ops.lora_ops.merge_lowrank.default, (a.cuda(), b.cuda(), torch.rand(3).cuda(), 5))
    torch.library.opcheck(torch.ops.lora_ops._jacobi_svd.default, (torch.randn(3, 9, 5).cuda(),))


