"""Shared test data: adapter banks, id distributions, and the error metric used against the references."""

from __future__ import annotations

import torch

DISTRIBUTIONS = ("same", "uniform", "zipf", "distinct", "all_none", "mixed_none")


def make_ids(dist: str, shape: tuple, n: int, *, generator=None, device="cpu") -> torch.Tensor:
    """Adapter ids of `shape` drawn from a named distribution over n adapters (-1 = no adapter)."""
    numel = 1
    for s in shape:
        numel *= s
    g = generator
    if dist == "same":
        ids = torch.full((numel,), n // 2, dtype=torch.int64)
    elif dist == "uniform":
        ids = torch.randint(0, n, (numel,), generator=g)
    elif dist == "zipf":
        p = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.1
        ids = torch.multinomial(p, numel, replacement=True, generator=g)
    elif dist == "distinct":
        ids = torch.randperm(max(n, numel), generator=g)[:numel] % n
    elif dist == "all_none":
        ids = torch.full((numel,), -1, dtype=torch.int64)
    elif dist == "mixed_none":
        ids = torch.randint(-1, n, (numel,), generator=g)
    else:
        raise ValueError(dist)
    return ids.reshape(shape).to(device)


def make_bank(n: int, r: int, d_in: int, d_out: int, dtype=torch.float32, device="cpu"):
    """A bank of n adapters, scaled so deltas stay O(1) whatever the sizes."""
    a = torch.randn(n, r, d_in, dtype=torch.float64) / d_in**0.5
    b = torch.randn(n, d_out, r, dtype=torch.float64) / max(r, 1) ** 0.5
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


# Error allowed per dtype, relative to the output's scale (max |exact|, at least 1).
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_to_exact(out: torch.Tensor, exact: torch.Tensor, same_dtype_ref: torch.Tensor | None = None):
    """out vs the float64 answer: within TOL[dtype] of the output scale, and for half types no worse than 2x the
    error of a plain torch computation in the same dtype (+ the tolerance), flash-attention style."""
    assert out.shape == exact.shape, (out.shape, exact.shape)
    scale = max(exact.abs().max().item(), 1.0) if exact.numel() else 1.0
    err = (out.double() - exact.double()).abs().max().item() if exact.numel() else 0.0
    assert err <= TOL[out.dtype] * scale, f"max error {err:.3e} > {TOL[out.dtype]:.1e} * {scale:.3g} ({out.dtype})"
    if same_dtype_ref is not None and exact.numel():
        ref_err = (same_dtype_ref.double() - exact.double()).abs().max().item()
        assert err <= 2 * ref_err + TOL[out.dtype] * scale * 0.1, f"kernel error {err:.3e} vs torch's {ref_err:.3e}"
