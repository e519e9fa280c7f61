"""Pure-torch composites of the grouped-LoRA delta that the benchmarks time against ``lora_ops.grouped_lora``.

Every function computes ``y[t] = scales[id] * B[id] @ (A[id] @ x[t])`` with ``id = ids[t]`` (one adapter per row,
``-1`` or any id outside ``[0, N)`` adds nothing) for ``x [T, d_in]``, ``lora_a [N, r, d_in]``,
``lora_b [N, d_out, r]``, ``scales [N]``, and returns ``[T, d_out]`` in x's dtype.

- ``segment_loop_delta``: stable sort by adapter, two matmuls per adapter present, one scatter (the best plain-torch
  composite on CPU);
- ``gather_bmm_delta``: gather A and B per row, two bmm (the naive one);
- ``grouped_mm_delta``: the same sort, then one grouped GEMM for the shrink and one for the expand over all
  adapters (``torch._grouped_mm``, on GPUs of compute capability 9.0 and later). Its index and offset logic is
  written so that any function with ``_grouped_mm``'s 2-D x 3-D contract can stand in, which is how it is tested
  without a GPU (``grouped_mm_loop``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["segment_loop_delta", "gather_bmm_delta", "grouped_mm_delta", "grouped_mm_loop", "grouped_mm_offsets",
           "grouped_mm_unavailable", "GROUPED_MM_MIN_CAPABILITY"]

GROUPED_MM_MIN_CAPABILITY = (9, 0)  # torch._grouped_mm's fast (CUTLASS) path: Hopper and later


def segment_loop_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, ids: torch.Tensor,
                       scales: torch.Tensor) -> torch.Tensor:
    """The best pure-torch composite on CPU: LoRA delta ``[T, d_out]`` of ``x [T, d_in]`` with ``ids [T]``.

    Rows are stably sorted by adapter so each adapter present is one segment: two small GEMMs per segment read
    that adapter's A and B once, and index_add_ scatters the segment's rows back. (Measured faster on CPU than
    writing into a sorted buffer with ``mm(out=...)`` and scattering once.)
    """
    n = lora_a.shape[0]
    order = torch.argsort(ids, stable=True)
    present, counts = torch.unique_consecutive(ids[order], return_counts=True)
    out = x.new_zeros(x.shape[0], lora_b.shape[1])
    s = scales.tolist()
    for i, rows in zip(present.tolist(), order.split(counts.tolist())):
        if 0 <= i < n:
            # the scale goes on the [rows, r] shrink result: r/d_out of the work of scaling the output
            y = (x.index_select(0, rows) @ lora_a[i].T).mul_(s[i]) @ lora_b[i].T
            out.index_add_(0, rows, y)
    return out


def gather_bmm_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, ids: torch.Tensor,
                     scales: torch.Tensor) -> torch.Tensor:
    """The naive composite: gather ``A [T, r, d_in]`` and ``B [T, d_out, r]`` per row, then two bmm.

    Copies T·r·(d_in + d_out) weights per call, which is why it is slow; kept as the known-bad baseline.
    """
    n = lora_a.shape[0]
    valid = (ids >= 0) & (ids < n)
    safe = ids.clamp(0, n - 1)
    h = torch.bmm(lora_a[safe], x.unsqueeze(2))  # [T, r, 1]
    y = torch.bmm(lora_b[safe], h).squeeze(2)  # [T, d_out]
    return y * (scales[safe] * valid)[:, None].to(y.dtype)  # fp32 scales would promote a half y to fp32


def grouped_mm_offsets(ids: torch.Tensor, n_adapters: int) -> tuple:
    """``(order, sorted_key, offs)`` for a grouped GEMM over adapters, without a host sync.

    ``key = ids`` with every invalid id (``-1``, or outside ``[0, N)``) replaced by N, so such rows sort after all
    groups; ``order`` is the stable sort of the rows by key; ``offs [N]`` int32 holds the cumulative end row of each
    adapter's group in the sorted order (``offs[i] = #rows with key <= i``; an absent adapter is an empty group).
    Rows at or after ``offs[-1]`` belong to no group.
    """
    key = torch.where((ids >= 0) & (ids < n_adapters), ids, torch.full_like(ids, n_adapters))
    order = torch.argsort(key, stable=True)
    sorted_key = key.index_select(0, order)
    bounds = torch.arange(1, n_adapters + 1, device=ids.device, dtype=sorted_key.dtype)
    offs = torch.searchsorted(sorted_key, bounds, out_int32=True)
    return order, sorted_key, offs


def grouped_mm_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, ids: torch.Tensor,
                     scales: torch.Tensor, *, mm: Optional[Callable] = None) -> torch.Tensor:
    """The grouped-GEMM composite: sort rows by adapter, shrink ``[T, d_in] x [N, d_in, r]`` and expand
    ``[T, r] x [N, r, d_out]`` as two grouped GEMMs over the same offsets, then scatter back to row order.

    ``mm(a_2d, b_3d, offs=offs)`` defaults to ``torch._grouped_mm``. The scale is applied to the ``[T, r]`` shrink
    result, in its dtype, as PEFT does. Rows of invalid ids are outside every group and come out zero. Every step
    runs on the device (no ``.tolist()``, no host sync), like a serving path would.
    """
    mm = torch._grouped_mm if mm is None else mm
    n = lora_a.shape[0]
    order, sorted_key, offs = grouped_mm_offsets(ids, n)
    in_group = sorted_key < n
    h = mm(x.index_select(0, order), lora_a.transpose(1, 2), offs=offs)  # [T, r]
    h = h * scales.index_select(0, sorted_key.clamp_max(n - 1)).to(h.dtype)[:, None]
    y = mm(h, lora_b.transpose(1, 2), offs=offs)  # [T, d_out]
    y = torch.where(in_group[:, None], y, torch.zeros((), dtype=y.dtype, device=y.device))  # rows in no group
    return torch.empty_like(y).index_copy_(0, order, y)


def grouped_mm_loop(a: torch.Tensor, b: torch.Tensor, *, offs: torch.Tensor) -> torch.Tensor:
    """Plain-torch stand-in for ``torch._grouped_mm(a, b, offs=offs)`` in its 2-D x 3-D form: rows
    ``offs[g-1]:offs[g]`` of ``a [M, K]`` times ``b[g] [K, N]``; rows after ``offs[-1]`` are left zero (the real
    op leaves them undefined). For tests of the composite's index logic on machines without the real op."""
    out = a.new_zeros(a.shape[0], b.shape[2])
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = a[start:end] @ b[g]
        start = end
    return out


def grouped_mm_unavailable(device: str | torch.device) -> Optional[str]:
    """Why the ``torch._grouped_mm`` composite is not timed on ``device``, or None when it is.

    It is timed on CUDA devices of compute capability >= 9.0 with a torch that has ``torch._grouped_mm``; CPU runs
    skip it (torch's CPU version is a fallback loop, not what a user would pick).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return f"GPU only (device is {device.type})"
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    cap = tuple(torch.cuda.get_device_capability(device))
    if cap < GROUPED_MM_MIN_CAPABILITY:
        need = ".".join(map(str, GROUPED_MM_MIN_CAPABILITY))
        return f"needs compute capability >= {need} (device has {cap[0]}.{cap[1]})"
    return None
