"""grouped_lora_backward's CUDA launcher and kernels (pairs, dx, the split segment reduction and its ordered
sum) on the CPU harness, against autograd through lora_ops.reference."""

import pytest
import torch

from lora_ops import _emu, reference

TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def grads(emu, x, a, b, ids, scales, weights, dy, mask=(True, True, True, True)):
    return emu.grouped_lora_backward(dy, x, a, b, ids, scales, weights, list(mask))


def assert_close(got, exact, dtype):
    scale = max(exact.abs().max().item(), 1.0) if exact.numel() else 1.0
    err = (got.double() - exact).abs().max().item() if exact.numel() else 0.0
    assert err <= TOL[dtype] * scale, (err, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("T", "k", "N", "r", "d_in", "d_out"), [(9, 2, 4, 5, 37, 21), (300, 1, 2, 17, 24, 40)])
def test_backward_matches_reference(emu, dtype, T, k, N, r, d_in, d_out):
    # (300, 1, 2, ...): 150 pairs per adapter -> each segment is cut in parts (split segment reduction);
    # 17 ranks = a full 16-rank chunk + a tail of 1. Rows of the first shape repeat an adapter within their top-k
    # and hold absent (-1) slots; adapter N - 1 of it has no pairs at all (its gradient must be zero).
    gen = torch.Generator().manual_seed(T + k)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    a = (torch.randn(N, r, d_in, generator=gen, dtype=torch.float64) / d_in**0.5).to(dtype)
    b = (torch.randn(N, d_out, r, generator=gen, dtype=torch.float64) / r**0.5).to(dtype)
    x = torch.randn(T, d_in, generator=gen).to(dtype)
    dy = torch.randn(T, d_out, generator=gen).to(dtype)
    ids = torch.randint(-1, N - (k > 1), (T, k), generator=gen)
    if k > 1:
        ids[0] = 1  # duplicate id within a row
    scales = (torch.rand(N, generator=gen, dtype=torch.float64) + 0.5).to(acc)
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64).to(acc)
    if k == 1:
        ids, weights = ids[:, 0], weights[:, 0]
    got = grads(emu, x, a, b, ids, scales, weights, dy)
    exact = reference.grouped_lora_backward(dy.double(), x.double(), a.double(), b.double(), ids, scales=scales,
                                            weights=weights.double())
    for g, e in zip(got, exact):
        assert g.shape == e.shape
        assert_close(g, e, dtype)
    if k > 1:
        assert (got[1][N - 1] == 0).all() and (got[2][N - 1] == 0).all()
    launches = _emu.take_launches()
    split = any("segment_reduce" in s for s in launches)
    assert split == (T == 300), launches


def test_output_mask_and_invalid_ids(emu):
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(3, 4, 20, generator=gen), torch.randn(3, 12, 4, generator=gen)
    x, dy = torch.randn(5, 20, generator=gen), torch.randn(5, 12, generator=gen)
    ids = torch.tensor([0, 9, -1, 2, -7])  # unchecked: invalid ids contribute nothing
    gx, ga, gb, gw = grads(emu, x, a, b, ids, None, None, dy, (True, False, True, False))
    valid = torch.tensor([0, -1, -1, 2, -1])
    ex, _, eb, _ = reference.grouped_lora_backward(dy, x, a, b, valid)
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gb, eb)
    assert ga.shape == (0,) and gw.shape == (0,)
    assert not any("lora_bwd_segment_kernel" in s and "grid=(3" in s for s in _emu.take_launches()[1:2])


@pytest.mark.parametrize(("T", "N", "r"), [(0, 3, 4), (4, 0, 4), (4, 2, 0)])
def test_empty(emu, T, N, r):
    x, dy = torch.randn(T, 8), torch.randn(T, 6)
    a, b = torch.randn(N, r, 8), torch.randn(N, 6, r)
    ids = torch.full((T,), -1) if N == 0 else torch.zeros(T, dtype=torch.int64)
    gx, ga, gb, gw = grads(emu, x, a, b, ids, None, torch.ones(T), dy)
    assert (gx == 0).all() and (ga == 0).all() and (gb == 0).all() and (gw == 0).all()
    assert _emu.take_launches() == []


def test_split_reduction_is_deterministic(emu):
    gen = torch.Generator().manual_seed(8)
    a, b = torch.randn(1, 16, 40, generator=gen), torch.randn(1, 30, 16, generator=gen)
    x, dy = torch.randn(700, 40, generator=gen), torch.randn(700, 30, generator=gen)
    ids = torch.zeros(700, dtype=torch.int64)  # N = 1: the case the split exists for
    first = grads(emu, x, a, b, ids, None, None, dy)
    assert any("segment_reduce" in s for s in _emu.take_launches())
    _emu.configure(reverse=True)
    second = grads(emu, x, a, b, ids, None, None, dy)
    for f, s in zip(first, second):
        assert torch.equal(f, s)
    exact = reference.grouped_lora_backward(dy.double(), x.double(), a.double(), b.double(), ids)
    for f, e in zip(first[:3], exact[:3]):
        assert_close(f, e, torch.float32)
