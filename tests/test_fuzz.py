"""Property-based fuzzing of the ops against lora_ops.reference (hypothesis, bounded example counts)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_ops
from lora_ops import reference
from tests.helpers import TOL

FUZZ = settings(max_examples=1000, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def grouped_lora_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    lead = tuple(draw(st.lists(st.integers(0, 6), min_size=1, max_size=3)))
    n = draw(st.integers(0, 6))
    r = draw(st.integers(0, 9))
    d_in = draw(st.integers(1, 40))
    d_out = draw(st.integers(1, 70))
    k = draw(st.sampled_from([None, 1, 2, 4]))
    ids_shape = lead + ((k,) if k else ())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_in, 3 if draw(st.booleans()) else 1, generator=g)[..., 0]  # strided when 3
    a = torch.randn(n, r, d_in, generator=g) / max(d_in, 1) ** 0.5
    b = torch.randn(n, d_out, r, generator=g)
    ids = torch.randint(-1, max(n, 0), ids_shape, generator=g) if n else torch.full(ids_shape, -1)
    ids = ids.to(draw(st.sampled_from([torch.int32, torch.int64])))
    scales = torch.rand(n, generator=g) if draw(st.booleans()) else None
    weights = torch.rand(ids_shape, generator=g) if draw(st.booleans()) else None
    return x.to(dtype), a.to(dtype), b.to(dtype), ids, scales, weights


@FUZZ
@given(grouped_lora_case())
def test_grouped_lora_matches_reference(case):
    x, a, b, ids, scales, weights = case
    out = lora_ops.grouped_lora(x, a, b, ids, scales=scales, weights=weights)
    exact = reference.grouped_lora(x, a, b, ids, scales=scales, weights=weights, compute_dtype=torch.float64)
    assert out.shape == exact.shape and out.dtype == x.dtype
    if exact.numel():
        scale = max(exact.abs().max().item(), 1.0)
        assert (out.double() - exact.double()).abs().max().item() <= TOL[x.dtype] * scale


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(1, 5), st.integers(1, 4), st.integers(-(2**40), 2**40))
def test_grouped_lora_unchecked_ids_never_read_out_of_bounds(t, n, bad):
    # Any id outside [0, N) contributes exactly nothing when unchecked, and raises IndexError when checked.
    x, a, b = torch.randn(t, 8), torch.randn(n, 3, 8), torch.randn(n, 5, 3)
    ids = torch.full((t,), bad)
    out = lora_ops.grouped_lora(x, a, b, ids, check_ids=False)
    if 0 <= bad < n:
        torch.testing.assert_close(out, lora_ops.grouped_lora(x, a, b, ids))
    else:
        assert torch.equal(out, torch.zeros(t, 5))
        if bad != -1:
            with pytest.raises(IndexError, match="adapter_ids"):
                lora_ops.grouped_lora(x, a, b, ids)


@st.composite
def merge_case(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    n, r = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    d_in, d_out = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    a = torch.randn(*lead, n, r, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(*lead, n, d_out, r, generator=g, dtype=torch.float64)
    if draw(st.booleans()):  # identical adapters: the near-collinear case
        a, b = a[..., :1, :, :].expand_as(a).clone(), b[..., :1, :, :].expand_as(b).clone()
    w = torch.randn(n, generator=g, dtype=torch.float64)
    rank = draw(st.integers(1, n * r + 2))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return a.to(dtype), b.to(dtype), w.to(dtype), rank


@FUZZ
@given(merge_case())
def test_merge_lowrank_matches_dense_svd(case):
    a, b, w, rank = case
    got_a, got_b = lora_ops.merge_lowrank(a, b, w, rank)
    ref_a, ref_b, ref_s = reference.merge_lowrank(a, b, w, rank)
    assert got_a.shape == ref_a.shape and got_b.shape == ref_b.shape
    # Products are sign/rotation invariant. A truncation is unique only where the cut falls in a spectral gap.
    k = min(rank, ref_s.shape[-1])
    s = torch.cat([ref_s, ref_s.new_zeros(*ref_s.shape[:-1], 1)], -1)
    gap = (s[..., k - 1] - s[..., k]) if k > 0 else s[..., 0]
    scale = max(ref_s.max().item() if ref_s.numel() else 0.0, 1.0)
    if bool((gap > 1e-3 * scale).all()):
        err = ((got_b.double() @ got_a.double()) - ref_b @ ref_a).abs().max().item()
        assert err <= (1e-4 if a.dtype == torch.float32 else 1e-9) * scale


@FUZZ
@given(st.integers(1, 3), st.integers(2, 20), st.integers(2, 20), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_randomized_svd_exact_on_low_rank(batch, m, n, rank, seed):
    # A matrix of rank <= the requested rank is recovered exactly (the sketch spans its range).
    g = torch.Generator().manual_seed(seed)
    k = min(rank, m, n)
    mat = torch.randn(batch, m, k, generator=g, dtype=torch.float64) @ torch.randn(batch, k, n, generator=g,
                                                                                    dtype=torch.float64)
    u, s, vh = lora_ops.randomized_svd(mat, k, generator=torch.Generator().manual_seed(seed))
    _, ref_s, _ = reference.randomized_svd(mat, k)
    torch.testing.assert_close(s, ref_s, atol=1e-8 * max(ref_s.max().item(), 1.0), rtol=1e-6)
    torch.testing.assert_close((u * s[..., None, :]) @ vh, mat, atol=1e-8 * max(ref_s.max().item(), 1.0), rtol=0)


@FUZZ
@given(st.integers(1, 5), st.integers(1, 12), st.integers(1, 30), st.integers(1, 4), st.integers(0, 2**31 - 1),
       st.sampled_from([torch.float32, torch.float64]), st.booleans())
def test_arrow_ops_match_reference(n, r, d, k, seed, dtype, ties):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, r, d, generator=g, dtype=dtype)
    b = torch.randn(n, d + 3, r, generator=g, dtype=dtype)
    protos = lora_ops.arrow_prototypes(a, b)
    ref = reference.arrow_prototypes(a, b)
    # Sign-invariant, and only where the top singular value is separated (else the vector is not unique).
    top2 = torch.linalg.svdvals((b.double() @ a.double()))[:, :2]
    sep = top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0)
    ok = sep > 1e-2 * top2[:, 0]
    cos = (protos.double() * ref.double()).sum(-1).abs()
    assert bool((cos[ok] > 1 - 1e-4).all())
    k = min(k, n)
    x = torch.randn(7, d, generator=g, dtype=dtype)
    if ties:
        x = x.round()  # integer-valued rows produce exact ties
        protos = protos.sign()
    ids, w = lora_ops.arrow_route(x, protos, k, temperature=0.5)
    ref_ids, ref_w = reference.arrow_route(x, protos, k, temperature=0.5)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w.double(), ref_w.double(), atol=1e-5, rtol=1e-5)


@FUZZ
@given(grouped_lora_case())
def test_grouped_lora_backward_matches_reference(case):
    x, a, b, ids, scales, weights = case
    if x.dtype in (torch.float16, torch.bfloat16) or x.numel() == 0:
        x, a, b = x.float(), a.float(), b.float()  # half-precision grads are covered with tolerances elsewhere
    inputs = [x.clone().requires_grad_(), a.clone().requires_grad_(), b.clone().requires_grad_()]
    w = weights.clone().requires_grad_() if weights is not None else None
    out = lora_ops.grouped_lora(*inputs, ids, scales=scales, weights=w)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    wrt = inputs + ([w] if w is not None else [])
    got = torch.autograd.grad(out, wrt, gy, allow_unused=True)
    ref_inputs = [t.detach().double().requires_grad_() for t in wrt]
    ref_w = ref_inputs[3] if w is not None else None
    ref_out = reference.grouped_lora(*ref_inputs[:3], ids, scales=scales, weights=ref_w, compute_dtype=torch.float64)
    if ref_out.requires_grad:
        want = torch.autograd.grad(ref_out, ref_inputs, gy.double(), allow_unused=True)
    else:  # nothing routed to any adapter (empty batch, N = 0, all -1): every gradient is zero
        want = [None] * len(ref_inputs)
    for g, r, t in zip(got, want, wrt):
        r = torch.zeros_like(t, dtype=torch.float64) if r is None else r
        g = torch.zeros_like(r) if g is None else g
        assert g.shape == t.shape
        if r.numel():
            scale = max(r.abs().max().item(), 1.0)
            # each gradient comes back in its input's dtype (fp32 weights next to fp64 x, say)
            assert (g.double() - r).abs().max().item() <= TOL[t.dtype] * scale
