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
