"""randomized_svd: accuracy against torch.svd_lowrank and the exact SVD, reproducibility, shapes, checks."""

import pytest
import torch

import lora_ops
from lora_ops.ops import randomized_svd


def decaying(batch, m, n, decay=0.7, noise=1e-3, dtype=torch.float32, seed=0):
    """Matrices with singular values decay**i plus a little noise: the case randomized SVD is for."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(batch, m, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(batch, n, k, generator=g, dtype=torch.float64))[0]
    s = decay ** torch.arange(k, dtype=torch.float64)
    x = (u * s) @ v.mT + noise * torch.randn(batch, m, n, generator=g, dtype=torch.float64) / (m * n) ** 0.25
    return x.to(dtype)


def recon_error(m, u, s, vh):
    return ((u.double() * s.double().unsqueeze(-2)) @ vh.double() - m.double()).flatten(-2).norm(dim=-1)


@pytest.mark.parametrize(("m", "n"), [(96, 80), (64, 120)])
def test_error_within_10_percent_of_torch_svd_lowrank(m, n):
    x = decaying(8, m, n)
    rank, oversample, n_iter = 8, 6, 2
    u, s, vh = randomized_svd(x, rank, oversample=oversample, n_iter=n_iter, generator=torch.Generator().manual_seed(1))
    ours = recon_error(x, u, s, vh).mean()
    torch.manual_seed(1)
    tu, ts, tv = torch.svd_lowrank(x, q=rank + oversample, niter=n_iter)
    theirs = recon_error(x, tu[..., :rank], ts[..., :rank], tv[..., :rank].mT).mean()
    best = torch.linalg.svdvals(x.double())[..., rank:].pow(2).sum(-1).sqrt().mean()  # Eckart-Young optimum
    assert ours <= 1.1 * theirs, (ours.item(), theirs.item())
    assert ours <= 1.5 * best


def test_exact_on_low_rank_input():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 6, generator=g) @ torch.randn(3, 6, 40, generator=g)  # rank 6
    u, s, vh = randomized_svd(x, 6, oversample=4, n_iter=1)
    ref = torch.linalg.svdvals(x)[..., :6]
    torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-5)
    assert (recon_error(x, u, s, vh) <= 1e-5 * x.flatten(-2).norm(dim=-1)).all()
    eye = torch.eye(6).expand(3, 6, 6)
    torch.testing.assert_close(u.mT @ u, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(vh @ vh.mT, eye, atol=1e-5, rtol=0)
    assert (s[..., :-1] >= s[..., 1:]).all()


def test_reproducible_with_a_generator_and_the_global_seed():
    x = decaying(2, 40, 30)
    r1 = randomized_svd(x, 4, generator=torch.Generator().manual_seed(7))
    r2 = randomized_svd(x, 4, generator=torch.Generator().manual_seed(7))
    r3 = randomized_svd(x, 4, generator=torch.Generator().manual_seed(8), n_iter=0)
    for p, q in zip(r1, r2):
        assert torch.equal(p, q)
    assert not torch.equal(r1[0], r3[0])
    torch.manual_seed(3)
    g1 = randomized_svd(x, 4, n_iter=0)
    torch.manual_seed(3)
    g2 = randomized_svd(x, 4, n_iter=0)
    assert torch.equal(g1[0], g2[0])


def test_op_is_deterministic_in_its_seed():
    x = decaying(2, 30, 20)
    a = torch.ops.lora_ops.randomized_svd(x, 3, 5, 1, 42)
    b = torch.ops.lora_ops.randomized_svd(x, 3, 5, 1, 42)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize(("shape", "rank", "oversample", "n_iter"), [
    ((2, 3, 20, 12), 4, 10, 2),  # leading dims; sketch clipped to min(M, N) = 12
    ((12, 20), 12, 0, 0),         # full rank, no oversampling, no power iteration
    ((1, 5, 1), 1, 3, 1),
    ((0, 8, 8), 2, 2, 1),         # empty batch
])
def test_shapes(shape, rank, oversample, n_iter):
    x = torch.randn(shape)
    u, s, vh = randomized_svd(x, rank, oversample=oversample, n_iter=n_iter)
    lead, (m, n) = shape[:-2], shape[-2:]
    assert u.shape == (*lead, m, rank) and s.shape == (*lead, rank) and vh.shape == (*lead, rank, n)
    if x.numel() and rank == min(m, n):  # the whole range is sketched: exact
        assert (recon_error(x, u, s, vh) <= 1e-4 * x.flatten(-2).norm(dim=-1)).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    x = decaying(2, 40, 32, dtype=dtype)
    u, s, vh = randomized_svd(x, 4, generator=torch.Generator().manual_seed(0))
    assert u.dtype == s.dtype == vh.dtype == dtype
    ref = torch.linalg.svdvals(x.double())[..., :4]
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-6}[dtype]
    torch.testing.assert_close(s.double(), ref, rtol=tol, atol=tol)


def test_bad_arguments():
    x = torch.randn(10, 8)
    cases = [
        ((torch.randn(5), 2), {}, ValueError, "m must have shape"),
        ((x, 0), {}, ValueError, "rank must be in"),
        ((x, 9), {}, ValueError, "rank must be in"),
        ((x, 2), {"oversample": -1}, ValueError, "oversample must be >= 0"),
        ((x, 2), {"n_iter": -1}, ValueError, "n_iter must be >= 0"),
        ((x.long(), 2), {}, TypeError, "m must be float32"),
    ]
    for args, kw, err, msg in cases:
        with pytest.raises(err, match=msg):
            randomized_svd(*args, **kw)


def test_opcheck():
    torch.library.opcheck(torch.ops.lora_ops.randomized_svd.default, (decaying(3, 20, 16), 4, 5, 2, 123))


def test_exported():
    assert lora_ops.randomized_svd is randomized_svd
