"""arrow_route's selection kernel and the Jacobi SVD kernel (with merge_lowrank / randomized_svd built on it) on
the CPU harness."""

import pytest
import torch

from lora_ops import _emu, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("T", "N", "d", "k"), [(13, 5, 17, 5), (9, 70, 8, 33), (1, 1, 4, 1)])
def test_route_matches_reference(emu, dtype, T, N, d, k):
    gen = torch.Generator().manual_seed(T * N)
    x = torch.randn(T, d, generator=gen, dtype=torch.float64).to(dtype)
    protos = torch.randn(N, d, generator=gen, dtype=torch.float64).to(dtype)
    ids, w = emu.arrow_route(x, protos, k, 0.7)
    ref_ids, ref_w = reference.arrow_route(x, protos, k, temperature=0.7)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w.to(w.dtype))
    assert any("arrow_route_kernel" in s for s in _emu.take_launches())


def test_route_ties_and_nan(emu):
    base = torch.randint(-3, 4, (3, 8)).double()  # small integers: exact dot products, exact ties
    protos = torch.stack([base[1], base[0], base[2], -base[0], base[0], base[2] * 0.5, -base[0]])
    x = torch.randint(-4, 5, (40, 8)).double()
    x[3, 2] = float("nan")
    for k in (1, 3, 7):
        ids, w = emu.arrow_route(x, protos, k, 1.0)
        ref_ids, ref_w = reference.arrow_route(x, protos, k)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(w, ref_w, equal_nan=True)
    assert torch.isnan(w[3]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 20, 7), (2, 7, 20), (1, 33, 33), (2, 5, 1), (1, 1, 1)])
def test_jacobi_matches_cpu_twin(emu, dtype, shape):
    x = torch.randn(shape, dtype=dtype)
    x[0, :, -1] = x[0, :, 0]  # rank-deficient
    u, s, vh = emu._jacobi_svd(x, 40)
    cu, cs, cvh = torch.ops.lora_ops._jacobi_svd(x)  # the same pair schedule on one thread
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    ref = torch.linalg.svdvals(x.double())
    assert ((s.double() - ref).abs() <= tol * ref[:, :1].clamp_min(1e-30)).all()
    torch.testing.assert_close(s, cs, atol=tol * 10 * max(ref.max().item(), 1.0), rtol=0)
    recon = (u.double() * s.double()[:, None, :]) @ vh.double()
    assert ((recon - x.double()).abs().max() <= tol * 10 * max(x.abs().max().item(), 1.0))


def test_jacobi_degenerate_cases(emu):
    x = torch.randn(4, 9, 6)
    x[0] = 0
    x[1, :, 2] = 0
    x[2, 4, 1] = float("nan")
    u, s, vh = emu._jacobi_svd(x, 40)
    eye = torch.eye(6)
    for i in (0, 1, 3):
        torch.testing.assert_close(u[i].T @ u[i], eye, atol=1e-5, rtol=0)  # zero values: completed U
    assert torch.isnan(s[2]).all() and not (vh[2] == 0).all(-1).any()  # NaN: still a permutation
    _, s, _ = emu._jacobi_svd(torch.randn(2, 24, 16), 1)
    assert torch.isnan(s).all()  # not converged after one sweep: reported


def test_jacobi_at_its_size_limit(emu):
    x = torch.randn(1, 256, 256, dtype=torch.float64) @ torch.diag(torch.linspace(1, 2, 256, dtype=torch.float64))
    u, s, vh = emu._jacobi_svd(x, 40)
    torch.testing.assert_close(s, torch.linalg.svdvals(x), atol=1e-10, rtol=0)
    assert [s for s in _emu.take_launches() if "jacobi" in s] == [
        "lora_ops::jacobi::jacobi_svd_block<double> grid=(1, 1, 1) block=(256, 1, 1) smem=2048"]
    with pytest.raises(ValueError, match="must be <= 256"):
        emu._jacobi_svd(torch.randn(1, 257, 257), 40)


def test_merge_lowrank_and_randomized_svd(emu):
    gen = torch.Generator().manual_seed(9)
    a = torch.randn(2, 3, 4, 40, generator=gen) / 40**0.5
    b = torch.randn(2, 3, 30, 4, generator=gen)
    w = torch.randn(3, generator=gen)
    ea, eb, es = emu.merge_lowrank(a, b, w, 5)
    ca, cb, cs = torch.ops.lora_ops.merge_lowrank(a, b, w, 5)
    torch.testing.assert_close(ea, ca, atol=1e-4, rtol=1e-4)  # same factors: one sign convention
    torch.testing.assert_close(eb, cb, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(es, cs, atol=1e-4, rtol=1e-4)
    m = torch.randn(2, 50, 6, generator=gen, dtype=torch.float64) @ torch.randn(2, 6, 40, generator=gen,
                                                                                   dtype=torch.float64)
    u, s, vh = emu.randomized_svd(m, 6, 4, 2, 0)
    torch.testing.assert_close((u * s[:, None, :]) @ vh, m, atol=1e-9, rtol=0)
    assert any("jacobi_svd_block" in line for line in _emu.take_launches())
