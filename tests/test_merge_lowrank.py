"""merge_lowrank (and the CUDA backend's Jacobi core SVD, run on CPU) against a dense float64 SVD truncation."""

import pytest
import torch

import lora_ops
from lora_ops.ops import merge_lowrank

OPS = {
    "lapack": torch.ops.lora_ops.merge_lowrank.default,  # the CPU backend
    "jacobi": torch.ops.lora_ops._merge_lowrank_jacobi.default,  # the CUDA backend's algorithm, on CPU
}
# b @ a vs the float64 truncation, relative to the truncation's Frobenius norm (or the inputs' scale when it is 0)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def dense_truncation(a, b, w, rank):
    """The float64 reference: form sum_i w_i B_i A_i densely, SVD, keep `rank` components."""
    w = w.double().expand(*a.shape[:-2])
    delta = torch.einsum("...n,...nor,...nri->...oi", w, b.double(), a.double())
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    t = min(rank, s.shape[-1])
    return (u[..., :t] * s[..., None, :t]) @ vh[..., :t, :], s


def rel_error(a, b, ref, scale=None):
    err = (b.double() @ a.double() - ref).flatten(-2).norm(dim=-1)
    denom = ref.flatten(-2).norm(dim=-1) if scale is None else torch.full_like(err, scale)
    return (err / denom.clamp_min(1e-300)).max().item()


def bank(lead, n, r, d_in, d_out, dtype=torch.float32):
    a = torch.randn(*lead, n, r, d_in, dtype=torch.float64) / d_in**0.5
    b = torch.randn(*lead, n, d_out, r, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


SHAPES = [  # (lead, N, r, d_in, d_out, rank)
    ((), 3, 4, 33, 17, 5),
    ((2, 3), 4, 2, 16, 40, 3),
    ((5,), 2, 8, 9, 6, 4),      # d_out, d_in < N*r: k = min(d_out, d_in)
    ((), 1, 1, 1, 1, 1),
    ((2,), 3, 4, 20, 24, 30),   # rank > N*r: the exact merge padded with zeros
    ((1,), 8, 16, 64, 64, 16),  # the benchmark's adapter count and rank
]


@pytest.mark.parametrize("impl", OPS)
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_matches_dense_truncation_fp32(impl, shape):
    lead, n, r, d_in, d_out, rank = shape
    a, b = bank(lead, n, r, d_in, d_out)
    w = torch.randn(n)
    ma, mb, s = OPS[impl](a, b, w, rank)
    ref, ref_s = dense_truncation(a, b, w, rank)
    k = min(d_in, d_out, n * r)
    assert ma.shape == (*lead, rank, d_in) and mb.shape == (*lead, d_out, rank) and s.shape == (*lead, k)
    assert ma.dtype == mb.dtype == s.dtype == torch.float32
    assert rel_error(ma, mb, ref) <= TOL[torch.float32]
    torch.testing.assert_close(s.double(), ref_s[..., :k], rtol=1e-5, atol=1e-5 * ref_s.max().item())
    if rank > k:
        assert (ma[..., k:, :] == 0).all() and (mb[..., k:] == 0).all()
    # sqrt(S) in each factor: row norms of a^2 are the kept singular values
    t = min(rank, k)
    torch.testing.assert_close((ma[..., :t, :].double() ** 2).sum(-1), s[..., :t].double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close((mb[..., :t].double() ** 2).sum(-2), s[..., :t].double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", OPS)
def test_per_layer_weights(impl):
    a, b = bank((3,), 4, 3, 12, 10)
    w = torch.randn(3, 4)
    ma, mb, _ = OPS[impl](a, b, w, 4)
    assert rel_error(ma, mb, dense_truncation(a, b, w, 4)[0]) <= TOL[torch.float32]


@pytest.mark.parametrize("impl", OPS)
def test_float64(impl):
    a, b = bank((2,), 3, 4, 20, 15, torch.float64)
    w = torch.randn(3, dtype=torch.float64)
    ma, mb, _ = OPS[impl](a, b, w, 6)
    assert ma.dtype == torch.float64
    assert rel_error(ma, mb, dense_truncation(a, b, w, 6)[0]) <= TOL[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", OPS)
def test_half_inputs_computed_in_fp32(impl, dtype):
    a, b = bank((2,), 4, 4, 32, 24, dtype)
    w = torch.rand(4)
    ma, mb, s = OPS[impl](a, b, w, 8)
    assert ma.dtype == mb.dtype == s.dtype == dtype
    ref = dense_truncation(a, b, w, 8)[0]  # from the same rounded inputs: only the output rounding remains
    assert rel_error(ma, mb, ref) <= TOL[dtype]


# ----- rank-deficient and near-collinear inputs -----------------------------------------------------------------

@pytest.mark.parametrize("impl", OPS)
def test_identical_adapters(impl):
    a1, b1 = bank((), 1, 4, 30, 20)
    a, b = a1.expand(5, 4, 30).clone(), b1.expand(5, 20, 4).clone()
    w = torch.rand(5)
    ma, mb, s = OPS[impl](a, b, w, 4)  # the merge has rank 4 exactly
    assert rel_error(ma, mb, dense_truncation(a, b, w, 4)[0]) <= TOL[torch.float32]
    assert (s[4:] <= 1e-5 * s[0]).all()  # the other 16 singular values vanish


@pytest.mark.parametrize("impl", OPS)
def test_near_collinear_adapters(impl):
    a1, b1 = bank((), 1, 4, 30, 20)
    a = a1 + 1e-4 * torch.randn(6, 4, 30)
    b = b1 + 1e-4 * torch.randn(6, 20, 4)
    w = torch.rand(6)
    for rank in (4, 8):
        ma, mb, _ = OPS[impl](a, b, w, rank)
        assert rel_error(ma, mb, dense_truncation(a, b, w, rank)[0]) <= TOL[torch.float32]


@pytest.mark.parametrize("impl", OPS)
def test_zero_adapters_and_zero_weights(impl):
    a, b = bank((), 3, 4, 16, 12)
    ma, mb, s = OPS[impl](torch.zeros_like(a), b, torch.ones(3), 4)
    assert (mb @ ma == 0).all() and (s == 0).all()
    ma, mb, s = OPS[impl](a, b, torch.zeros(3), 4)
    assert (mb @ ma == 0).all() and (s == 0).all()
    a[1].zero_()  # one zero adapter among others: the rest merges exactly
    w = torch.randn(3)
    ma, mb, _ = OPS[impl](a, b, w, 8)
    assert rel_error(ma, mb, dense_truncation(a, b, w, 8)[0]) <= TOL[torch.float32]


@pytest.mark.parametrize("impl", OPS)
def test_weights_summing_to_zero_cancel(impl):
    a1, b1 = bank((), 1, 4, 16, 12)
    a, b = a1.expand(3, 4, 16).clone(), b1.expand(3, 12, 4).clone()
    ma, mb, s = OPS[impl](a, b, torch.tensor([0.5, 0.5, -1.0]), 4)
    scale = (b1[0] @ a1[0]).norm().item()
    assert (mb.double() @ ma.double()).norm().item() <= 1e-5 * scale
    assert s.max().item() <= 1e-5 * scale


def test_empty_batch():
    a, b = bank((0,), 3, 4, 16, 12)
    ma, mb, s = merge_lowrank(a, b, torch.ones(3), 4, return_singular_values=True)
    assert ma.shape == (0, 4, 16) and mb.shape == (0, 12, 4) and s.shape == (0, 12)


def test_python_entry_point():
    a, b = bank((), 2, 3, 10, 8)
    out = merge_lowrank(a, b, torch.ones(2), 3)
    assert len(out) == 2 and lora_ops.merge_lowrank is merge_lowrank


# ----- the Jacobi SVD itself ------------------------------------------------------------------------------------

JACOBI_SHAPES = [(3, 20, 7), (2, 7, 20), (4, 16, 16), (1, 1, 1), (2, 5, 1), (1, 33, 33), (2, 128, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", JACOBI_SHAPES, ids=[str(s) for s in JACOBI_SHAPES])
def test_jacobi_svd_matches_lapack(shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    x[0, :, -1] = x[0, :, 0]  # a repeated column: rank-deficient
    u, s, vh = torch.ops.lora_ops._jacobi_svd(x)
    k = min(shape[1:])
    assert u.shape == (shape[0], shape[1], k) and s.shape == (shape[0], k) and vh.shape == (shape[0], k, shape[2])
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    ref = torch.linalg.svdvals(x.double())
    assert ((s.double() - ref).abs() <= tol * ref[:, :1]).all()
    assert (s[:, :-1] >= s[:, 1:]).all()  # descending
    recon = (u.double() * s.double()[:, None, :]) @ vh.double()
    assert ((recon - x.double()).flatten(1).norm(dim=1) <= tol * x.double().flatten(1).norm(dim=1)).all()
    eye = torch.eye(k, dtype=torch.float64)
    assert ((vh.double() @ vh.double().mT - eye).abs().max() <= 10 * tol)


def assert_orthonormal_columns(u, tol):
    eye = torch.eye(u.shape[-1], dtype=torch.float64)
    assert (u.double().mT @ u.double() - eye).abs().max().item() <= tol


def test_jacobi_svd_of_zero_matrix():
    u, s, vh = torch.ops.lora_ops._jacobi_svd(torch.zeros(2, 6, 4))
    assert (s == 0).all()
    assert_orthonormal_columns(u, 1e-6)  # completed like LAPACK's, not left zero
    torch.testing.assert_close(vh @ vh.mT, torch.eye(4).expand(2, 4, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jacobi_svd_zero_singular_values_complete_u(dtype):
    x = torch.randn(3, 9, 6, dtype=dtype)
    x[:, :, 1] = 0  # exactly zero columns: exactly zero singular values
    x[1, :, 4] = 0
    x[2] = 0
    x[2, 3, 2] = 5.0  # rank one, its direction is a unit vector
    u, s, vh = torch.ops.lora_ops._jacobi_svd(x)
    assert (s[0, -1] == 0) and (s[1, -2:] == 0).all() and (s[2, 1:] == 0).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_orthonormal_columns(u, tol)
    torch.testing.assert_close((u * s[:, None, :]) @ vh, x, atol=tol * 10, rtol=0)


@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_jacobi_svd_fp32_extreme_scales(scale):
    # The Gram sums are formed in double: fp32 squares would overflow above ~1.8e19 and underflow below ~1e-19.
    x = torch.randn(2, 12, 5, dtype=torch.float64)
    u, s, vh = torch.ops.lora_ops._jacobi_svd((x * scale).float())
    ref = torch.linalg.svdvals(x)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert ((s.double() / scale - ref).abs() <= 1e-5 * ref[:, :1]).all()
    assert_orthonormal_columns(u, 1e-5)


def test_jacobi_svd_nan_keeps_a_permutation():
    x = torch.randn(2, 8, 5)
    x[0, 3, 2] = float("nan")
    u, s, vh = torch.ops.lora_ops._jacobi_svd(x)
    assert torch.isnan(s[0]).all()  # NaN spreads through the rotations: no finite answer for that matrix
    assert not (vh[0] == 0).all(-1).any()  # every output row got a column: positions are a permutation
    ref = torch.linalg.svdvals(x[1].double())
    assert ((s[1].double() - ref).abs() <= 1e-5 * ref[0]).all()  # the other matrix is unaffected


def test_jacobi_svd_unconverged_reports_nan():
    x = torch.randn(3, 24, 16, dtype=torch.float64)
    _, s, _ = torch.ops.lora_ops._jacobi_svd(x, max_sweeps=1)  # a random 16-column matrix needs several sweeps
    assert torch.isnan(s).all()
    _, s, _ = torch.ops.lora_ops._jacobi_svd(x)
    assert torch.isfinite(s).all()


def test_jacobi_svd_argument_limits():
    with pytest.raises(ValueError, match="min\\(M, N\\) must be <= 256"):
        torch.ops.lora_ops._jacobi_svd(torch.randn(1, 300, 257))
    with pytest.raises(ValueError, match="max_sweeps must be in"):
        torch.ops.lora_ops._jacobi_svd(torch.randn(1, 4, 4), max_sweeps=0)


def test_merge_lowrank_one_sign_convention():
    # LAPACK and Jacobi cores flip singular vectors independently; the factors themselves must agree, with every
    # column of b's largest-magnitude entry positive (what CUDA returns too).
    a, b = bank((3,), 4, 3, 24, 20)
    w = torch.randn(4)
    la, lb = OPS["lapack"](a, b, w, 6)[:2]
    ja, jb = OPS["jacobi"](a, b, w, 6)[:2]
    torch.testing.assert_close(ja, la, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(jb, lb, atol=1e-4, rtol=1e-4)
    pivot = lb.gather(-2, lb.abs().argmax(-2, keepdim=True))
    assert (pivot > 0).all()


# ----- argument checks and opcheck ------------------------------------------------------------------------------

def test_bad_arguments():
    a, b = bank((), 3, 4, 16, 12)
    w = torch.ones(3)
    cases = [
        ((a[0], b[0], w, 4), ValueError, "lora_a must have shape"),
        ((a, b.transpose(1, 2), w, 4), ValueError, "lora_b must have shape"),
        ((a, b, torch.ones(2), 4), ValueError, "weights must have shape"),
        ((a, b, torch.ones(3, 3), 4), ValueError, "weights must have shape"),
        ((a, b, w, 0), ValueError, "rank must be >= 1"),
        ((a.long(), b.long(), w, 4), TypeError, "lora_a must be float32"),
        ((a, b.double(), w, 4), TypeError, "lora_b has dtype"),
        ((a, b, torch.ones(3, dtype=torch.int64), 4), TypeError, "weights must be a floating-point"),
    ]
    for args, err, msg in cases:
        with pytest.raises(err, match=msg):
            merge_lowrank(*args)
        with pytest.raises(err, match=msg):  # the fake impl raises the same while tracing
            with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
                merge_lowrank(*[mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in args])


@pytest.mark.parametrize("op", ["merge_lowrank", "_merge_lowrank_jacobi"])
def test_opcheck(op):
    a, b = bank((2,), 3, 4, 16, 12)
    torch.library.opcheck(getattr(torch.ops.lora_ops, op).default, (a, b, torch.rand(3), 5))
    torch.library.opcheck(getattr(torch.ops.lora_ops, op).default, (a.half(), b.half(), torch.rand(2, 3), 20))


def test_opcheck_jacobi_svd():
    torch.library.opcheck(torch.ops.lora_ops._jacobi_svd.default, (torch.randn(3, 9, 5),))


def test_torch_compile():
    a, b = bank((2,), 3, 4, 16, 12)
    w = torch.rand(3)
    compiled = torch.compile(lambda a, b, w: merge_lowrank(a, b, w, 4), backend="aot_eager", fullgraph=True)
    ca, cb = compiled(a, b, w)
    ea, eb = merge_lowrank(a, b, w, 4)
    torch.testing.assert_close(cb @ ca, eb @ ea)
