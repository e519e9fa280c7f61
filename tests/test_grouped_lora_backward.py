"""grouped_lora's backward (register_autograd + lora_ops::grouped_lora_backward) against autograd through the
pure-torch reference: grads for x, lora_a, lora_b and weights over dtypes, top-k, distributions, odd sizes, ranks,
empty batches, strided inputs; gradcheck in float64; opcheck of both ops; a compiled training step.

Tolerances (relative to each gradient's scale, max |exact|, at least 1 — see tests.helpers.TOL): float32 2e-5
against a float64 reference; float16 2e-3 and bfloat16 1.6e-2 against float64, and no worse than twice the error of
the same reference computed by torch in that dtype's float32 accumulation path (flash-attention style).
"""

import pytest
import torch

import lora_ops
from lora_ops import reference
from tests.conftest import DEVICES
from tests.helpers import DISTRIBUTIONS, TOL, make_bank, make_ids

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def grads_of(fn, x, a, b, weights, grad_out):
    """(dx, dA, dB, dw) of ``(fn(x, a, b, weights) * grad_out).sum()``, None where weights is None."""
    leaves = [t.detach().requires_grad_() for t in (x, a, b)]
    w = None if weights is None else weights.detach().requires_grad_()
    out = fn(*leaves, w)
    inputs = leaves + ([w] if w is not None else [])
    g = reference._grads(out, inputs, grad_out)
    return tuple(g) + ((None,) if w is None else ())


def assert_grads_close(got, exact, dtype, same_dtype=None):
    names = ("grad_x", "grad_lora_a", "grad_lora_b", "grad_weights")
    for i, (name, g, e) in enumerate(zip(names, got, exact)):
        if e is None:
            assert g is None
            continue
        assert g.shape == e.shape, (name, g.shape, e.shape)
        if e.numel() == 0:
            continue
        # weights' gradient is in weights' dtype (float32 here), computed from half inputs: the inputs' tolerance
        tol = TOL[dtype]
        scale = max(e.abs().max().item(), 1.0)
        err = (g.double() - e.double()).abs().max().item()
        assert err <= tol * scale, f"{name}: max error {err:.3e} > {tol:.1e} * {scale:.3g} ({dtype})"
        if same_dtype is not None:
            ref_err = (same_dtype[i].double() - e.double()).abs().max().item()
            assert err <= 2 * ref_err + 0.1 * tol * scale, f"{name}: error {err:.3e} vs torch's {ref_err:.3e}"


def run_case(device, dtype, lead, k, n, r, d_in, d_out, dist="uniform", with_scales=True, with_weights=True, seq_len=1,
             x_transform=None):
    x = torch.randn(*lead, d_in, device=device, dtype=dtype)
    if x_transform is not None:
        x = x_transform(x)
    a, b = make_bank(n, r, d_in, d_out, dtype, device)
    # seq_len > 1: ids drawn per sequence of seq_len rows along the first dimension (prefill runs)
    ids = make_ids(dist, (lead[0] // seq_len, *lead[1:]) + ((k,) if k else ()), n, device=device)
    ids = ids.repeat_interleave(seq_len, 0)
    scales = torch.rand(n, device=device) + 0.5 if with_scales else None
    weights = torch.rand(ids.shape, device=device) if with_weights else None
    grad_out = torch.randn(*lead, d_out, device=device, dtype=dtype)

    got = grads_of(lambda x, a, b, w: lora_ops.grouped_lora(x, a, b, ids, scales=scales, weights=w),
                   x, a, b, weights, grad_out)
    for g, t in zip(got, (x, a, b, weights)):
        if g is not None:
            assert g.dtype == t.dtype and g.device == t.device

    def ref(compute_dtype, cast):
        def fn(x, a, b, w):
            return reference.grouped_lora(x, a, b, ids, scales=scales, weights=w, compute_dtype=compute_dtype)
        args = [t.to(cast) for t in (x, a, b)]
        return grads_of(fn, *args, weights, grad_out.to(cast))

    exact = ref(torch.float64, torch.float64)
    same = ref(None, dtype) if dtype in (torch.float16, torch.bfloat16) else None
    assert_grads_close(got, exact, dtype, same)
    return got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [None, 1, 3])
@pytest.mark.parametrize("shape", [(37, 5, 3, 67, 45), (70, 3, 16, 128, 96), (9, 2, 1, 1, 1)])
def test_grads_match_reference(device, dtype, k, shape):
    t, n, r, d_in, d_out = shape
    run_case(device, dtype, (t,), k, n, r, d_in, d_out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("k", [None, 3])
def test_distributions(device, dist, k):
    run_case(device, torch.float32, (70,), k, 8, 16, 96, 80, dist=dist)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("r", [1, 7, 64])
def test_ranks(device, r):
    run_case(device, torch.float32, (33,), None, 4, r, 130, 70)


@pytest.mark.parametrize("device", DEVICES)
def test_large_groups_and_many_tiny_groups(device):
    # Training-like long groups (the multithreaded-GEMM path) and a decode batch where every row differs.
    run_case(device, torch.float32, (300,), None, 3, 8, 64, 48, dist="same")
    run_case(device, torch.float32, (200,), 2, 150, 4, 40, 24, dist="distinct")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [None, 2])
@pytest.mark.parametrize("layout", [(256, 64, "distinct"), (200, 1, "zipf")])
def test_long_groups_blas_path(device, dtype, k, layout):
    # Prefill runs (one sequence per adapter) and a scattered training batch: groups of >= 32 pairs (CPU BLAS path).
    t, seq_len, dist = layout
    run_case(device, dtype, (t,), k, 4, 16, 72, 40, dist=dist, seq_len=seq_len)


@pytest.mark.parametrize("device", DEVICES)
def test_defaults_non_contiguous_and_3d(device):
    run_case(device, torch.float32, (17,), 2, 4, 5, 19, 23, with_scales=False, with_weights=False)

    def strided(x):  # the same values at stride 2 along every dim: a non-contiguous [3, 20, 32] x
        y = torch.zeros(6, 40, 64, device=device, dtype=x.dtype)
        y[::2, ::2, ::2] = x
        view = y[::2, ::2, ::2]
        assert not view.is_contiguous()
        return view

    run_case(device, torch.float32, (3, 20), None, 6, 4, 32, 24, dist="mixed_none", x_transform=strided)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_empty_batch(device, lead):
    got = run_case(device, torch.float32, lead, 2, 3, 4, 16, 8)
    assert torch.equal(got[1], torch.zeros(3, 4, 16, device=device))  # no rows: zero grads for every adapter


@pytest.mark.parametrize("device", DEVICES)
def test_absent_adapters_get_exactly_zero(device):
    x = torch.randn(30, 24, device=device)
    a, b = make_bank(6, 4, 24, 16, device=device)
    ids = torch.tensor([0, 2, -1] * 10, device=device)
    ids3 = torch.stack([ids, ids.roll(1), torch.full_like(ids, -1)], dim=1)
    for i in (ids, ids3):
        ga, gb = grads_of(lambda x, a, b, w: lora_ops.grouped_lora(x, a, b, i), x, a, b, None,
                          torch.randn(30, 16, device=device))[1:3]
        for absent in (1, 3, 4, 5):
            assert torch.equal(ga[absent], torch.zeros_like(ga[absent]))
            assert torch.equal(gb[absent], torch.zeros_like(gb[absent]))
        assert ga[0].abs().max() > 0 and gb[2].abs().max() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_unchecked_invalid_ids_get_nothing(device):
    x = torch.randn(8, 16, device=device)
    a, b = make_bank(3, 4, 16, 8, device=device)
    bad = torch.tensor([0, 3, -2, 2**62, 1, -(2**62), 2, -1], device=device)
    valid = torch.where((bad >= 0) & (bad < 3), bad, torch.full_like(bad, -1))
    go = torch.randn(8, 8, device=device)
    got = grads_of(lambda x, a, b, w: lora_ops.grouped_lora(x, a, b, bad, check_ids=False), x, a, b, None, go)
    want = grads_of(lambda x, a, b, w: lora_ops.grouped_lora(x, a, b, valid), x, a, b, None, go)
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    assert got[0][[1, 2, 3, 5, 7]].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_only_requested_grads_and_scales_not_trainable(device):
    x = torch.randn(10, 12, device=device, requires_grad=True)
    a, b = make_bank(3, 2, 12, 5, device=device)
    ids = make_ids("uniform", (10,), 3, device=device)
    b.requires_grad_()
    out = lora_ops.grouped_lora(x, a, b, ids)
    gx, gb = torch.autograd.grad(out.sum(), (x, b))
    assert gx.shape == x.shape and gb.shape == b.shape
    # the backward op itself: not-requested outputs are empty tensors
    res = torch.ops.lora_ops.grouped_lora_backward.default(torch.ones(10, 5, device=device), x.detach(), a, b, ids,
                                                           None, None, [False, True, False, True])
    assert [t.shape for t in res] == [(0,), a.shape, (0,), (0,)]
    s = torch.ones(3, device=device, requires_grad=True)
    with pytest.raises(NotImplementedError, match="scales"):
        lora_ops.grouped_lora(x, a, b, ids, scales=s).sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_backward_op_rejects_bad_grad_out(device):
    x = torch.randn(4, 6, device=device)
    a, b = make_bank(2, 2, 6, 3, device=device)
    ids = torch.zeros(4, dtype=torch.int64, device=device)
    op = torch.ops.lora_ops.grouped_lora_backward.default
    with pytest.raises(ValueError, match="grad_out"):
        op(torch.ones(4, 4, device=device), x, a, b, ids, None, None, [True] * 4)
    with pytest.raises(TypeError, match="grad_out"):
        op(torch.ones(4, 3, device=device, dtype=torch.float64), x, a, b, ids, None, None, [True] * 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [None, 2])
def test_gradcheck_float64(device, k):
    x = torch.randn(7, 5, device=device, dtype=torch.float64, requires_grad=True)
    a, b = make_bank(3, 2, 5, 4, torch.float64, device)
    a.requires_grad_(), b.requires_grad_()
    ids = make_ids("mixed_none", (7,) + ((k,) if k else ()), 3, device=device)
    w = torch.rand(ids.shape, device=device, dtype=torch.float64, requires_grad=True)
    s = torch.rand(3, device=device, dtype=torch.float64) + 0.5
    fn = lambda x, a, b, w: lora_ops.grouped_lora(x, a, b, ids, scales=s, weights=w)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, a, b, w))
    assert torch.autograd.gradcheck(lambda x, a, b: lora_ops.grouped_lora(x, a, b, ids), (x, a, b))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64_equal_sequences(device):
    # three 32-row sequences with one adapter each: the CPU forward's batched-sequence path
    x = torch.randn(3, 32, 3, device=device, dtype=torch.float64, requires_grad=True)
    a, b = make_bank(2, 2, 3, 2, torch.float64, device)
    a.requires_grad_(), b.requires_grad_()
    ids = torch.tensor([1, 0, 1], device=device)[:, None].expand(3, 32)
    w = torch.rand(3, 32, device=device, dtype=torch.float64, requires_grad=True)
    s = torch.rand(2, device=device, dtype=torch.float64) + 0.5
    fn = lambda x, a, b, w: lora_ops.grouped_lora(x, a, b, ids, scales=s, weights=w)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, a, b, w))
    # only some gradients requested (the backward skips the products nobody needs)
    assert torch.autograd.gradcheck(lambda x: lora_ops.grouped_lora(x, a.detach(), b.detach(), ids, scales=s), (x,))
    assert torch.autograd.gradcheck(lambda b: lora_ops.grouped_lora(x.detach(), a.detach(), b, ids), (b,))


@pytest.mark.parametrize("device", DEVICES)
def test_equal_sequences_grads_match_reference(device):
    # four 40-row sequences, two sharing an adapter (their dA / dB add up), float32 against the reference's autograd
    x = torch.randn(4, 40, 24, device=device, requires_grad=True)
    a, b = make_bank(3, 8, 24, 40, torch.float32, device)
    a.requires_grad_(), b.requires_grad_()
    ids = torch.tensor([2, 0, 2, 1], device=device)[:, None].expand(4, 40)
    w = torch.rand(4, 40, device=device, requires_grad=True)
    s = torch.rand(3, device=device) + 0.5
    go = torch.randn(4, 40, 40, device=device)
    got = torch.autograd.grad(lora_ops.grouped_lora(x, a, b, ids, scales=s, weights=w), (x, a, b, w), go)
    want = torch.autograd.grad(reference.grouped_lora(x, a, b, ids, scales=s, weights=w), (x, a, b, w), go)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward_with_grad_and_backward_op(device):
    x = torch.randn(11, 24, device=device, requires_grad=True)
    a, b = make_bank(4, 3, 24, 10, device=device)
    a.requires_grad_(), b.requires_grad_()
    ids = make_ids("mixed_none", (11, 2), 4, device=device)
    w = torch.rand(11, 2, device=device, requires_grad=True)
    s = torch.rand(4, device=device)
    torch.library.opcheck(torch.ops.lora_ops.grouped_lora.default, (x, a, b, ids, s, w, True))
    torch.library.opcheck(torch.ops.lora_ops.grouped_lora.default, (x, a, b, ids[:, 0], None, None, False))
    go = torch.randn(11, 10, device=device)
    xd, ad, bd, wd = (t.detach() for t in (x, a, b, w))
    for mask in ([True] * 4, [True, False, True, False], [False, True, False, False]):
        torch.library.opcheck(torch.ops.lora_ops.grouped_lora_backward.default, (go, xd, ad, bd, ids, s, wd, mask))
    torch.library.opcheck(torch.ops.lora_ops.grouped_lora_backward.default,
                          (go, xd, ad, bd, ids[:, 0], None, None, [True] * 4))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_training_step(device):
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16).to(device)
    a0, b0 = make_bank(4, 8, 32, 16, device=device)
    scales = torch.full((4,), 0.5, device=device)

    def step(x, ids, a, b):
        y = lin(x) + lora_ops.grouped_lora(x, a, b, ids, scales=scales)
        loss = y.square().mean()
        return torch.autograd.grad(loss, (x, a, b))

    compiled = torch.compile(step, backend="inductor")
    for shape in ((2, 9), (3, 5)):
        x = torch.randn(*shape, 32, device=device, requires_grad=True)
        ids = make_ids("mixed_none", shape, 4, device=device)
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        for got, want in zip(compiled(x, ids, a, b), step(x, ids, a, b)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_reference_backward_matches_autograd_through_reference():
    # reference.grouped_lora_backward is the op-level reference the CUDA tests compare against.
    x = torch.randn(13, 10, dtype=torch.float64)
    a, b = make_bank(3, 4, 10, 6, torch.float64)
    ids = make_ids("mixed_none", (13, 2), 3)
    w, s, go = torch.rand(13, 2, dtype=torch.float64), torch.rand(3, dtype=torch.float64), torch.randn(13, 6, dtype=torch.float64)
    got = reference.grouped_lora_backward(go, x, a, b, ids, scales=s, weights=w)
    want = torch.ops.lora_ops.grouped_lora_backward.default(go, x, a, b, ids, s, w, [True] * 4)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)
