"""Cross-cutting input checks for every op: mixed devices, overlapping strides, gradients where unsupported."""

import pytest
import torch

import lora_ops
from lora_ops import reference


def _bank(n=3, r=2, d_in=8, d_out=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, d_in, generator=g), torch.randn(n, d_out, r, generator=g)


@pytest.mark.parametrize("call,name", [
    (lambda a, b: lora_ops.merge_lowrank(a, b.to("meta"), torch.ones(3), 2), "lora_b"),
    (lambda a, b: lora_ops.merge_lowrank(a, b, torch.ones(3, device="meta"), 2), "weights"),
    (lambda a, b: lora_ops.arrow_prototypes(a, b.to("meta")), "lora_b"),
    (lambda a, b: lora_ops.arrow_route(torch.randn(4, 8), torch.randn(3, 8, device="meta"), 2), "prototypes"),
    (lambda a, b: lora_ops.grouped_lora(torch.randn(4, 8), a, b, torch.zeros(4, dtype=torch.long, device="meta")),
     "adapter_ids"),
])
def test_mixed_devices_name_the_argument(call, name):
    a, b = _bank()
    with pytest.raises(ValueError, match=f"{name} is on meta"):
        call(a, b)


def _overlapping(rows, cols, step, seed=0):
    """A [rows, cols] view whose rows overlap in memory (row stride < cols)."""
    base = torch.randn(rows * step + cols, generator=torch.Generator().manual_seed(seed))
    return base.as_strided((rows, cols), (step, 1))


def test_overlapping_strides_equal_contiguous_copies():
    a, b = _bank(4, 3, 16, 10)
    x = _overlapping(9, 16, 5)
    ids = torch.tensor([0, 1, 2, 3, -1, 0, 1, 2, 3])
    torch.testing.assert_close(lora_ops.grouped_lora(x, a, b, ids), lora_ops.grouped_lora(x.contiguous(), a, b, ids))
    protos = lora_ops.arrow_prototypes(a, b)
    got, want = lora_ops.arrow_route(x, protos, 2), lora_ops.arrow_route(x.contiguous(), protos, 2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    m = _overlapping(12, 10, 3)
    u, s, vh = lora_ops.randomized_svd(m, 3, generator=torch.Generator().manual_seed(1))
    u2, s2, vh2 = lora_ops.randomized_svd(m.contiguous(), 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(s, s2)
    a_ov = _overlapping(4 * 3, 16, 7).reshape(4, 3, 16)
    ma, mb = lora_ops.merge_lowrank(a_ov, b, torch.ones(4), 4)
    ca, cb = lora_ops.merge_lowrank(a_ov.contiguous(), b, torch.ones(4), 4)
    torch.testing.assert_close(mb @ ma, cb @ ca, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op", ["merge_lowrank", "randomized_svd", "arrow_prototypes", "arrow_route"])
def test_non_differentiable_ops_raise_at_backward(op):
    a, b = _bank()
    a.requires_grad_()
    if op == "merge_lowrank":
        out = lora_ops.merge_lowrank(a, b, torch.ones(3), 2)[0]
    elif op == "randomized_svd":
        out = lora_ops.randomized_svd(a[0].T @ b[0].T, 2)[1]  # [8, 6] matrix of rank 2
    elif op == "arrow_prototypes":
        out = lora_ops.arrow_prototypes(a, b)
    else:
        out = lora_ops.arrow_route(a[0], torch.randn(3, 8), 2)[1]
    # The forward works with trainable inputs (e.g. merging adapters that are being trained) ...
    assert out.requires_grad
    # ... and backward says clearly that the op has no derivative, instead of failing deep inside ATen.
    with pytest.raises(NotImplementedError, match=f"lora_ops.{op} is not differentiable"):
        out.sum().backward()
    with torch.no_grad():
        assert not lora_ops.merge_lowrank(a, b, torch.ones(3), 2)[0].requires_grad


def test_grouped_lora_scales_requiring_grad_raise():
    a, b = _bank()
    with pytest.raises(NotImplementedError, match="scales"):
        out = lora_ops.grouped_lora(torch.randn(4, 8), a, b, torch.tensor([0, 1, 2, -1]),
                                    scales=torch.ones(3, requires_grad=True))
        out.sum().backward()


def test_reference_grads_agree_on_inf_free_random_case():
    # The autograd reference used by the fuzz tests agrees with the op on a plain case (sanity of the harness).
    a, b = _bank()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    ids = torch.tensor([0, 2, -1, 1, 0])
    gy = torch.randn(5, 6, dtype=torch.float64)
    got = torch.autograd.grad(lora_ops.grouped_lora(x, a64, b64, ids), (x, a64, b64), gy)
    want = torch.autograd.grad(reference.grouped_lora(x, a64, b64, ids), (x, a64, b64), gy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
