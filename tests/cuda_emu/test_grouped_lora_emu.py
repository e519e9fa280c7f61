"""grouped_lora's CUDA launcher and kernels (csrc/cuda/grouped_lora.cu, grouped_lora_kernel.cuh) on the CPU
harness, against lora_ops.reference: every dtype, k = 1..3, odd sizes (scalar tails), aligned (16-byte loads) and
misaligned x, invalid ids, empty batches, and both the split and the unsplit shrink."""

import pytest
import torch

from lora_ops import _emu, reference

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def bank(n, r, d_in, d_out, dtype, gen):
    a = torch.randn(n, r, d_in, generator=gen, dtype=torch.float64) / d_in**0.5
    b = torch.randn(n, d_out, r, generator=gen, dtype=torch.float64) / max(r, 1) ** 0.5
    return a.to(dtype), b.to(dtype)


def check(emu, x, a, b, ids, scales=None, weights=None, check_ids=True):
    y = emu.grouped_lora(x, a, b, ids, scales, weights, check_ids)
    exact = reference.grouped_lora(x.double(), a.double(), b.double(), ids, scales=scales,
                                   weights=None if weights is None else weights.double())
    assert y.dtype == x.dtype and y.shape == exact.shape
    scale = max(exact.abs().max().item(), 1.0) if exact.numel() else 1.0
    err = (y.double() - exact).abs().max().item() if exact.numel() else 0.0
    assert err <= TOL[x.dtype] * scale, (err, x.dtype)
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize(("T", "N", "r", "d_in", "d_out"), [(11, 4, 5, 37, 29), (20, 3, 16, 64, 48)])
def test_forward_matches_reference(emu, dtype, k, T, N, r, d_in, d_out):
    gen = torch.Generator().manual_seed(T * 100 + k)
    a, b = bank(N, r, d_in, d_out, dtype, gen)
    x = torch.randn(T, d_in, generator=gen).to(dtype)
    ids = torch.randint(-1, N, (T, k), generator=gen)
    ids[0] = N - 1  # a row where every slot has the same adapter (a duplicate within the top-k)
    scales = torch.rand(N, generator=gen, dtype=torch.float64).to(torch.float64 if dtype == torch.float64 else torch.float32) + 0.5
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64).to(scales.dtype)
    check(emu, x, a, b, ids if k > 1 else ids[:, 0], scales, weights if k > 1 else weights[:, 0])
    if k == 1:
        check(emu, x, a, b, ids[:, 0])  # no scales, no weights: the null-pointer paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vector_path_and_its_alignment_fallback(emu, dtype):
    gen = torch.Generator().manual_seed(1)
    a, b = bank(3, 8, 64, 40, dtype, gen)
    base = torch.randn(9 * 64 + 1, generator=gen).to(dtype)
    ids = torch.tensor([0, 2, 1, 1, -1, 0, 2, 2, 1])
    vec = 16 // base.element_size()
    cuda_t = "float" if dtype == torch.float32 else "__nv_bfloat16"
    check(emu, base[:-1].view(9, 64), a, b, ids)  # aligned storage, d_in % vec == 0: 16-byte loads
    launches = _emu.take_launches()
    assert any(f"grouped_lora_shrink_kernel<{cuda_t}, float, {vec}>" in s for s in launches), launches
    assert any(f"grouped_lora_expand_kernel<{cuda_t}, float, {vec}>" in s for s in launches), launches
    check(emu, base[1:].view(9, 64), a, b, ids)  # storage offset of one element: misaligned, scalar loads
    launches = _emu.take_launches()
    assert any(f"grouped_lora_shrink_kernel<{cuda_t}, float, 1>" in s for s in launches), launches


@pytest.mark.parametrize("sm_count", [1, 132])
def test_split_and_unsplit_shrink(emu, sm_count):
    # 16 pairs make 2 shrink blocks: enough for one SM (no split), far too few for an H100's 132, where d_in is
    # split over grid.y (the partials are summed in a fixed order by expand).
    _emu.configure(sm_count=sm_count)
    gen = torch.Generator().manual_seed(2)
    a, b = bank(4, 6, 1500, 33, torch.float32, gen)
    x = torch.randn(16, 1500, generator=gen)
    check(emu, x, a, b, torch.randint(-1, 4, (16,), generator=gen))
    shrink = [s for s in _emu.take_launches() if "shrink" in s][0]
    assert f"grid=(2, {1 if sm_count == 1 else 3}, 1)" in shrink, shrink  # 1500 / 512 -> 3 chunks when split


def test_prefill_uniform_blocks(emu):
    # Long runs of one adapter take the shared-adapter (register tile) path of both kernels; a tail block of 3.
    gen = torch.Generator().manual_seed(3)
    a, b = bank(2, 7, 48, 130, torch.float32, gen)
    x = torch.randn(19, 48, generator=gen)
    ids = torch.tensor([1] * 16 + [0] * 3)
    check(emu, x, a, b, ids, scales=torch.tensor([0.5, 2.0]))


def test_invalid_ids_unchecked_read_nothing(emu):
    gen = torch.Generator().manual_seed(4)
    a, b = bank(3, 4, 24, 20, torch.float32, gen)
    x = torch.randn(6, 24, generator=gen)
    ids = torch.tensor([[0, 7], [-5, 1], [3, 3], [2, -1], [100, 2], [-1, -1]])
    y = emu.grouped_lora(x, a, b, ids, None, None, False)
    valid = ids.where((ids >= 0) & (ids < 3), torch.full_like(ids, -1))
    torch.testing.assert_close(y, reference.grouped_lora(x, a, b, valid))
    assert (y[5] == 0).all()
    with pytest.raises(IndexError, match="adapter_ids"):
        emu.grouped_lora(x, a, b, ids, None, None, True)


@pytest.mark.parametrize(("T", "N", "r", "d_out"), [(0, 3, 4, 8), (5, 0, 4, 8), (5, 3, 0, 8), (5, 3, 4, 0)])
def test_empty_shapes(emu, T, N, r, d_out):
    x = torch.randn(T, 16)
    a, b = torch.randn(N, r, 16), torch.randn(N, d_out, r)
    ids = torch.full((T,), -1) if N == 0 else torch.zeros(T, dtype=torch.int64)
    y = emu.grouped_lora(x, a, b, ids, None, None, True)
    assert y.shape == (T, d_out) and (y == 0).all()
    assert _emu.take_launches() == []  # nothing to launch (a zero-sized grid is a launch error on a GPU)


def test_deterministic_in_any_block_order(emu):
    gen = torch.Generator().manual_seed(5)
    a, b = bank(5, 8, 700, 50, torch.float32, gen)
    x = torch.randn(7, 700, generator=gen)
    ids = torch.randint(0, 5, (7, 2), generator=gen)
    y1 = emu.grouped_lora(x, a, b, ids, None, None, True)
    _emu.configure(reverse=True)
    y2 = emu.grouped_lora(x, a, b, ids, None, None, True)
    assert torch.equal(y1, y2)
