"""grouped_lora forward against the pure-torch reference: shapes, dtypes, distributions, top-k, errors, opcheck."""

import pytest
import torch

import lora_ops
from lora_ops import reference
from tests.conftest import DEVICES
from tests.helpers import DISTRIBUTIONS, assert_close_to_exact, make_bank, make_ids

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def run_case(device, dtype, lead, k, n, r, d_in, d_out, dist="uniform", with_scales=True, with_weights=True, seq_len=1):
    x = torch.randn(*lead, d_in, device=device, dtype=dtype)
    a, b = make_bank(n, r, d_in, d_out, dtype, device)
    # seq_len > 1: ids drawn per sequence of seq_len rows along the first dimension (prefill runs)
    ids = make_ids(dist, (lead[0] // seq_len, *lead[1:]) + ((k,) if k else ()), n, device=device)
    ids = ids.repeat_interleave(seq_len, 0)
    scales = torch.rand(n, device=device) + 0.5 if with_scales else None
    weights = torch.rand(ids.shape, device=device) if with_weights else None
    out = lora_ops.grouped_lora(x, a, b, ids, scales=scales, weights=weights)
    exact = reference.grouped_lora(x, a, b, ids, scales=scales, weights=weights, compute_dtype=torch.float64)
    same = None
    if dtype in (torch.float16, torch.bfloat16):
        same = reference.grouped_lora(x, a, b, ids, scales=scales, weights=weights, compute_dtype=dtype)
    assert out.dtype == dtype and out.device == x.device
    assert_close_to_exact(out, exact.to(torch.float64), same)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [None, 1, 3])
@pytest.mark.parametrize("shape", [(37, 5, 3, 67, 45), (64, 7, 16, 128, 200), (9, 2, 1, 1, 1), (20, 3, 33, 257, 31)])
def test_matches_reference(device, dtype, k, shape):
    t, n, r, d_in, d_out = shape
    run_case(device, dtype, (t,), k, n, r, d_in, d_out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("k", [None, 3])
def test_distributions(device, dist, k):
    run_case(device, torch.float32, (70,), k, 8, 16, 96, 80, dist=dist)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("r", [1, 8, 64, 256])
def test_ranks(device, r):
    run_case(device, torch.float32, (33,), None, 4, r, 130, 70)


@pytest.mark.parametrize("device", DEVICES)
def test_long_segments_and_many_adapters(device):
    # Prefill-like runs of one adapter (split over threads) and a decode batch where every row differs.
    run_case(device, torch.float32, (1000,), None, 3, 16, 64, 48, dist="same")
    run_case(device, torch.float32, (300,), None, 300, 4, 64, 48, dist="distinct")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [None, 2])
@pytest.mark.parametrize("layout", [(256, 64, "distinct"), (256, 32, "uniform"), (200, 1, "uniform")])
def test_long_groups_blas_path(device, dtype, k, layout):
    # Groups of >= 32 pairs take the CPU BLAS path: whole runs of consecutive rows (one sequence per adapter, used
    # in place), groups of several runs and scattered training-batch groups (gathered), top-k slots sharing rows.
    t, seq_len, dist = layout
    run_case(device, dtype, (t,), k, 4, 16, 72, 40, dist=dist, seq_len=seq_len)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_outside_long_groups_are_zero_filled(device, dtype):
    # The CPU kernel does not zero its output up front: k = 1 long groups write their rows whole (a 40-row run in
    # place, two 40-row scattered groups by a scatter). Rows of invalid ids and of a short group must still come out
    # exact; NaN-filled memory freed just before makes a row that nobody wrote visible.
    ids = torch.tensor([0] * 40 + [-1] * 5 + [1, 2] * 40 + [3] * 5 + [-1] * 4, device=device)
    x = torch.randn(len(ids), 24, device=device, dtype=dtype)
    a, b = make_bank(4, 8, 24, 40, dtype, device)
    want = reference.grouped_lora(x, a, b, ids, compute_dtype=torch.float64)
    for _ in range(3):
        torch.full((len(ids), 40), float("nan"), device=device, dtype=dtype)  # freed at once
        out = lora_ops.grouped_lora(x, a, b, ids)
        assert not out.isnan().any()
        assert out[40:45].abs().max() == 0 and out[-4:].abs().max() == 0
        assert_close_to_exact(out, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("seq_ids", [[2, 0, 2, 1], [1, 1, 3, 0], [0, -1, 1, 2], [3, 3, 3, 3]])
def test_equal_sequences_one_adapter_each(device, dtype, seq_ids):
    # [B, S, d] with one adapter per sequence of >= 32 rows: on CPU two batched GEMMs over the sequences (fp32 /
    # fp64, every id valid); a sequence without adapter must stay exactly zero (the general path takes it).
    n_seq, seq_len = len(seq_ids), 40
    x = torch.randn(n_seq, seq_len, 24, device=device, dtype=dtype)
    a, b = make_bank(4, 8, 24, 40, dtype, device)
    ids = torch.tensor(seq_ids, device=device)[:, None].expand(n_seq, seq_len)
    scales = torch.rand(4, device=device) + 0.5
    for weights in (None, torch.rand(n_seq, seq_len, device=device)):
        out = lora_ops.grouped_lora(x, a, b, ids, scales=scales, weights=weights)
        want = reference.grouped_lora(x, a, b, ids, scales=scales, weights=weights, compute_dtype=torch.float64)
        assert_close_to_exact(out, want)
        for s, i in enumerate(seq_ids):
            if i < 0:
                assert out[s].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_defaults_without_scales_or_weights(device):
    run_case(device, torch.float32, (17,), 2, 4, 5, 19, 23, with_scales=False, with_weights=False)


@pytest.mark.parametrize("device", DEVICES)
def test_3d_and_non_contiguous(device):
    x = torch.randn(3, 40, 5, 64, device=device)[:, ::2, :, ::2]  # [3, 20, 5, 32], non-contiguous
    assert not x.is_contiguous()
    a, b = make_bank(6, 4, 32, 24, device=device)
    ids = make_ids("mixed_none", (3, 20, 5), 6, device=device)
    ids = ids.transpose(0, 2).contiguous().transpose(0, 2)  # non-contiguous ids too
    out = lora_ops.grouped_lora(x, a, b, ids)
    assert out.shape == (3, 20, 5, 24)
    assert_close_to_exact(out, reference.grouped_lora(x, a, b, ids, compute_dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_sequence_level_ids_broadcast(device):
    # One adapter per sequence, expanded over the sequence dimension (a stride-0 view).
    x = torch.randn(4, 50, 32, device=device)
    a, b = make_bank(3, 8, 32, 16, device=device)
    seq_ids = torch.tensor([2, -1, 0, 2], device=device)
    out = lora_ops.grouped_lora(x, a, b, seq_ids[:, None].expand(4, 50))
    for s, i in enumerate(seq_ids.tolist()):
        expect = torch.zeros(50, 16, device=device) if i < 0 else x[s] @ a[i].T @ b[i].T
        torch.testing.assert_close(out[s], expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_int32_ids_equal_int64(device):
    x = torch.randn(25, 16, device=device)
    a, b = make_bank(5, 4, 16, 12, device=device)
    ids = make_ids("mixed_none", (25, 2), 5, device=device)
    torch.testing.assert_close(lora_ops.grouped_lora(x, a, b, ids.int()), lora_ops.grouped_lora(x, a, b, ids), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_empty_batches(device, lead):
    x = torch.randn(*lead, 16, device=device)
    a, b = make_bank(3, 4, 16, 8, device=device)
    ids = torch.zeros(lead, dtype=torch.int64, device=device)
    out = lora_ops.grouped_lora(x, a, b, ids)
    assert out.shape == (*lead, 8)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_bank_and_zero_rank(device):
    x = torch.randn(6, 16, device=device)
    a, b = make_bank(0, 4, 16, 8, device=device)
    out = lora_ops.grouped_lora(x, a, b, torch.full((6,), -1, device=device))
    assert torch.equal(out, torch.zeros(6, 8, device=device))
    a, b = make_bank(2, 0, 16, 8, device=device)
    out = lora_ops.grouped_lora(x, a, b, torch.ones(6, dtype=torch.int64, device=device))
    assert torch.equal(out, torch.zeros(6, 8, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_unchecked_invalid_ids_contribute_nothing(device):
    x = torch.randn(8, 16, device=device)
    a, b = make_bank(3, 4, 16, 8, device=device)
    bad = torch.tensor([0, 3, -2, 2**62, 1, -(2**62), 2, -1], device=device)
    out = lora_ops.grouped_lora(x, a, b, bad, check_ids=False)
    valid = torch.where((bad >= 0) & (bad < 3), bad, torch.full_like(bad, -1))
    torch.testing.assert_close(out, lora_ops.grouped_lora(x, a, b, valid), atol=0, rtol=0)
    assert out[[1, 2, 3, 5, 7]].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_propagate(device):
    x = torch.randn(4, 16, device=device)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    a, b = make_bank(2, 4, 16, 8, device=device)
    out = lora_ops.grouped_lora(x, a, b, torch.tensor([0, 1, 0, -1], device=device))
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all() and not torch.isfinite(out[2]).all()
    assert torch.equal(out[3], torch.zeros(8, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(11, 24, device=device)
    a, b = make_bank(4, 3, 24, 10, device=device)
    ids = make_ids("mixed_none", (11, 2), 4, device=device)
    args = (x, a, b, ids, torch.rand(4, device=device), torch.rand(11, 2, device=device), True)
    torch.library.opcheck(torch.ops.lora_ops.grouped_lora.default, args)
    torch.library.opcheck(torch.ops.lora_ops.grouped_lora.default, (x, a, b, ids[:, 0], None, None, False))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    x = torch.randn(2, 9, 32, device=device)
    a, b = make_bank(4, 8, 32, 16, device=device)
    ids = make_ids("mixed_none", (2, 9), 4, device=device)
    lin = torch.nn.Linear(32, 16).to(device)

    def layer(x, ids):
        return lin(x) + lora_ops.grouped_lora(x, a, b, ids, scales=torch.full((4,), 0.5, device=device))

    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x, ids), layer(x, ids))
    x2, ids2 = torch.randn(3, 5, 32, device=device), make_ids("uniform", (3, 5), 4, device=device)
    torch.testing.assert_close(compiled(x2, ids2), layer(x2, ids2))
