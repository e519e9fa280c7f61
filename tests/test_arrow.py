"""Arrow ops against their references: arrow_prototypes (exact top right singular vector of B A) and arrow_route
(|x . v|, top-k with lowest-index ties, softmax over the chosen); bad arguments; opcheck; torch.compile."""

import pytest
import torch

import lora_ops
from lora_ops import reference
from tests.conftest import DEVICES
from tests.helpers import make_bank

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def sign_invariant_error(p: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-vector max |p - ±ref| (the sign of a singular vector is arbitrary), ``[..., N]``."""
    p, ref = p.double(), ref.double()
    return torch.minimum((p - ref).abs().amax(-1), (p + ref).abs().amax(-1))


# ---- arrow_prototypes ----


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 8, 64, 48), (3, 16, 200, 130), (4, 1, 33, 7), (2, 12, 10, 40), (3, 6, 4, 5)])
def test_prototypes_match_dense_svd(device, shape):
    n, r, d_in, d_out = shape  # includes r = 1, d_in < r, and d_out < r
    a, b = make_bank(n, r, d_in, d_out, device=device)
    p = lora_ops.arrow_prototypes(a, b)
    ref = reference.arrow_prototypes(a, b)
    assert p.shape == (n, d_in) and p.dtype == torch.float32
    assert sign_invariant_error(p.cpu(), ref.cpu()).max() <= 1e-5
    assert torch.allclose(p.double().norm(dim=-1).cpu(), torch.ones(n, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_prototypes_sign_is_deterministic(device):
    a, b = make_bank(6, 8, 40, 24, device=device)
    p = lora_ops.arrow_prototypes(a, b)
    pivot = p.gather(-1, p.abs().argmax(-1, keepdim=True))
    assert (pivot > 0).all()
    # flipping the sign of a factor flips B A but not the prototype
    torch.testing.assert_close(lora_ops.arrow_prototypes(-a, b), p, atol=1e-6, rtol=0)
    torch.testing.assert_close(lora_ops.arrow_prototypes(a, -b), p, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_prototypes_batched_over_layers(device):
    layers = 3
    a, b = make_bank(layers * 4, 8, 32, 20, device=device)
    a, b = a.view(layers, 4, 8, 32), b.view(layers, 4, 20, 8)
    p = lora_ops.arrow_prototypes(a, b)
    assert p.shape == (layers, 4, 32)
    for layer in range(layers):
        torch.testing.assert_close(p[layer], lora_ops.arrow_prototypes(a[layer], b[layer]), atol=1e-6, rtol=0)
    assert sign_invariant_error(p.cpu(), reference.arrow_prototypes(a, b).cpu()).max() <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prototypes_dtypes(device, dtype):
    a, b = make_bank(4, 8, 48, 32, dtype, device)
    p = lora_ops.arrow_prototypes(a, b)
    assert p.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert sign_invariant_error(p.cpu(), reference.arrow_prototypes(a, b).cpu()).max() <= tol


@pytest.mark.parametrize("device", DEVICES)
def test_prototypes_of_degenerate_adapters(device):
    # identical adapters (merging a model with itself) and a rank-1 adapter padded with zero rows
    a, b = make_bank(1, 4, 30, 20, device=device)
    a2, b2 = torch.cat([a, a]), torch.cat([b, b])
    p = lora_ops.arrow_prototypes(a2, b2)
    assert torch.equal(p[0], p[1])
    a3, b3 = a.clone(), b.clone()
    a3[:, 1:] = 0
    b3[:, :, 1:] = 0
    p3 = lora_ops.arrow_prototypes(a3, b3)
    expected = a3[0, 0] / a3[0, 0].norm()  # B A = b a^T: its right singular vector is a / |a|
    assert sign_invariant_error(p3[0:1].cpu(), expected[None].cpu()).max() <= 1e-6
    assert lora_ops.arrow_prototypes(a[:0], b[:0]).shape == (0, 30)


# ---- arrow_route ----


def check_route(x, protos, k, temperature=1.0):
    ids, w = lora_ops.arrow_route(x, protos, k, temperature=temperature)
    ref_ids, ref_w = reference.arrow_route(x, protos, k, temperature=temperature)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert ids.dtype == torch.int64 and w.dtype == acc
    assert ids.shape == w.shape == (*x.shape[:-1], k)
    assert torch.equal(ids.cpu(), ref_ids.cpu())
    torch.testing.assert_close(w.cpu(), ref_w.cpu(), atol=1e-6 if acc == torch.float32 else 1e-12, rtol=1e-5)
    return ids, w


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(37, 5, 64), (256, 64, 128), (9, 1, 3), (3, 100, 17)])
@pytest.mark.parametrize("k", ["1", "3", "N"])
def test_route_matches_reference(device, shape, k):
    t, n, d = shape
    k = n if k == "N" else min(int(k), n)
    x = torch.randn(t, d, device=device)
    protos = torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=-1)
    ids, w = check_route(x, protos, k)
    torch.testing.assert_close(w.sum(-1).cpu(), torch.ones(t), atol=1e-6, rtol=0)
    assert (w[..., :-1] >= w[..., 1:]).all()  # ordered by decreasing logit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.05, 0.5, 1.0, 7.0])
def test_route_temperature(device, temperature):
    x = torch.randn(2, 5, 32, device=device, dtype=torch.float64)
    protos = torch.randn(12, 32, device=device, dtype=torch.float64)
    check_route(x, protos, 4, temperature)


@pytest.mark.parametrize("device", DEVICES)
def test_route_ties_pick_the_lowest_index(device):
    d = 8
    # small integers: every dot product is exact in any summation order, so the ties below are exact ties
    base = torch.randint(-3, 4, (3, d)).double()
    # experts 1, 3, 4 and 6 have the same |logit| for every row (3 and 6 with flipped sign), 0 / 2 / 5 differ
    protos = torch.stack([base[1], base[0], base[2], -base[0], base[0], base[2] * 0.5, -base[0]]).to(device)
    x = torch.randint(-4, 5, (10, d)).double().to(device)
    for k in range(1, 8):
        ids, w = check_route(x, protos, k)
    ids, w = lora_ops.arrow_route(x, protos, 7)
    for t in range(10):
        order = ids[t].tolist()
        tied = [i for i in order if i in (1, 3, 4, 6)]
        assert tied == [1, 3, 4, 6], order
    # all-zero input: every logit ties at 0, ids are 0..k-1 and weights uniform
    ids, w = lora_ops.arrow_route(torch.zeros(4, d, device=device), protos.float(), 3)
    assert ids.tolist() == [[0, 1, 2]] * 4
    torch.testing.assert_close(w.cpu(), torch.full((4, 3), 1 / 3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_route_dtypes_and_mixed_prototype_dtype(device, dtype):
    x = torch.randn(3, 11, 40, device=device).to(dtype)
    protos = torch.randn(9, 40, device=device)  # fp32 prototypes routing any x dtype
    check_route(x, protos, 3)
    check_route(x, protos.to(dtype), 2)


@pytest.mark.parametrize("device", DEVICES)
def test_route_empty_and_strided(device):
    protos = torch.randn(6, 16, device=device)
    ids, w = lora_ops.arrow_route(torch.randn(0, 16, device=device), protos, 2)
    assert ids.shape == w.shape == (0, 2)
    ids, w = lora_ops.arrow_route(torch.randn(2, 0, 3, 16, device=device), protos, 6)
    assert ids.shape == (2, 0, 3, 6)
    x = torch.randn(20, 40, device=device)[::2, ::2][:, :16]  # [10, 16], strided in both dims
    assert not x.is_contiguous()
    check_route(x, protos, 3)
    check_route(x, protos.T.contiguous().T, 3)


def test_route_nan_is_visible():
    protos = torch.randn(5, 8)
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    ids, w = lora_ops.arrow_route(x, protos, 2)
    assert torch.isnan(w[1]).all() and not torch.isnan(w[[0, 2]]).any()
    assert ids[1].tolist() == [0, 1]  # every logit of row 1 is NaN: ranked first, lowest index first


@pytest.mark.parametrize("device", DEVICES)
def test_route_feeds_grouped_lora(device):
    n, r, d_in, d_out, k = 10, 8, 48, 36, 3
    a, b = make_bank(n, r, d_in, d_out, device=device)
    scales = torch.rand(n, device=device) + 0.5
    protos = lora_ops.arrow_prototypes(a, b)
    x = torch.randn(4, 9, d_in, device=device)
    ids, w = lora_ops.arrow_route(x, protos, k, temperature=0.7)
    y = lora_ops.grouped_lora(x, a, b, ids, scales=scales, weights=w)
    ref = reference.arrow_dense(x.reshape(-1, d_in).double(), a, b, scales, protos, k, temperature=0.7)
    torch.testing.assert_close(y.reshape(-1, d_out).double().cpu(), ref.cpu(), atol=2e-5, rtol=2e-5)


# ---- bad arguments ----


def test_route_bad_arguments():
    x, protos = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="top_k"):
        lora_ops.arrow_route(x, protos, 0)
    with pytest.raises(ValueError, match="top_k"):
        lora_ops.arrow_route(x, protos, 6)
    with pytest.raises(ValueError, match="temperature"):
        lora_ops.arrow_route(x, protos, 2, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        lora_ops.arrow_route(x, protos, 2, temperature=float("nan"))
    with pytest.raises(ValueError, match="prototypes"):
        lora_ops.arrow_route(x, torch.randn(5, 7), 2)
    with pytest.raises(ValueError, match="prototypes"):
        lora_ops.arrow_route(x, torch.randn(5, 8, 1), 2)
    with pytest.raises(TypeError, match="x must be"):
        lora_ops.arrow_route(x.long(), protos, 2)
    with pytest.raises(TypeError, match="prototypes"):
        lora_ops.arrow_route(x, protos.int(), 2)
    with pytest.raises(ValueError, match="x must"):
        lora_ops.arrow_route(torch.tensor(1.0), protos, 2)


def test_prototypes_bad_arguments():
    a, b = make_bank(3, 4, 10, 6)
    with pytest.raises(ValueError, match="lora_a"):
        lora_ops.arrow_prototypes(a[0], b[0])
    with pytest.raises(ValueError, match="lora_b"):
        lora_ops.arrow_prototypes(a, b[:2])
    with pytest.raises(ValueError, match="lora_b"):
        lora_ops.arrow_prototypes(a, b[..., :3])
    with pytest.raises(TypeError, match="lora_b"):
        lora_ops.arrow_prototypes(a, b.double())
    with pytest.raises(TypeError, match="lora_a"):
        lora_ops.arrow_prototypes(a.int(), b.int())
    with pytest.raises(ValueError, match="rank"):
        lora_ops.arrow_prototypes(a[:, :0], b[..., :0])


# ---- opcheck / compile ----


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    a, b = make_bank(4, 3, 24, 10, device=device)
    torch.library.opcheck(torch.ops.lora_ops.arrow_prototypes.default, (a, b))
    torch.library.opcheck(torch.ops.lora_ops.arrow_prototypes.default, (a.view(2, 2, 3, 24), b.view(2, 2, 10, 3)))
    x, protos = torch.randn(2, 7, 24, device=device), torch.randn(4, 24, device=device)
    torch.library.opcheck(torch.ops.lora_ops.arrow_route.default, (x, protos, 2, 0.5))
    torch.library.opcheck(torch.ops.lora_ops.arrow_route.default, (x.double(), protos, 4, 1.0))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    a, b = make_bank(6, 4, 32, 16, device=device)
    protos = lora_ops.arrow_prototypes(a, b)

    def arrow(x):
        ids, w = lora_ops.arrow_route(x, protos, 3, temperature=0.5)
        return lora_ops.grouped_lora(x, a, b, ids, weights=w)

    x = torch.randn(2, 9, 32, device=device)
    compiled = torch.compile(arrow, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), arrow(x))
