"""Pure-torch references of every lora_ops op: the ground truth the kernels are tested against.

They favour clarity over speed and compute in float64 when asked (``compute_dtype``), so tests can measure the
kernels' error and the reference's own error against the same exact answer.
"""

from __future__ import annotations

from typing import Optional

import torch


def grouped_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    *,
    scales: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """y[t] = sum_j weights[t, j] * scales[id] * B[id] @ (A[id] @ x[t]) over slots j with id = adapter_ids[t, j] != -1.

    Shapes: x [..., d_in], lora_a [N, r, d_in], lora_b [N, d_out, r], adapter_ids x.shape[:-1] or x.shape[:-1] + [k],
    weights like adapter_ids, scales [N]. Returns [..., d_out] in x's dtype (computed in ``compute_dtype``, default
    float32 for half types and x's dtype otherwise).
    """
    dt = compute_dtype or (torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
    n, _, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    lead = x.shape[:-1]
    k = 1 if adapter_ids.dim() == x.dim() - 1 else adapter_ids.shape[-1]
    ids = adapter_ids.reshape(lead.numel(), k)
    xs = x.reshape(-1, d_in).to(dt)
    w = torch.ones(ids.shape, dtype=dt, device=x.device) if weights is None else weights.reshape(ids.shape).to(dt)
    s = torch.ones(n, dtype=dt, device=x.device) if scales is None else scales.to(dt)
    a, b = lora_a.to(dt), lora_b.to(dt)
    y = torch.zeros(xs.shape[0], d_out, dtype=dt, device=x.device)
    for j in range(k):
        for i in ids[:, j].unique().tolist():
            if not 0 <= i < n:  # -1 (and, with check_ids=False, any invalid id) adds nothing
                continue
            rows = (ids[:, j] == i).nonzero().squeeze(1)
            h = xs[rows] @ a[i].T
            y[rows] += (s[i] * w[rows, j, None]) * (h @ b[i].T)
    return y.reshape(*lead, d_out).to(x.dtype)


def arrow_prototypes(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """Unit top right singular vector of each dense ``lora_b @ lora_a`` (``[..., N, d_out, d_in]`` formed
    explicitly), in float64, sign fixed so the component of largest magnitude is positive.

    Shapes: lora_a ``[..., N, r, d_in]``, lora_b ``[..., N, d_out, r]``; returns ``[..., N, d_in]`` float64.
    """
    delta = lora_b.double() @ lora_a.double()
    v = torch.linalg.svd(delta, full_matrices=False).Vh[..., 0, :]
    pivot = v.gather(-1, v.abs().argmax(-1, keepdim=True))
    return torch.where(pivot < 0, -v, v)


def arrow_route(x: torch.Tensor, prototypes: torch.Tensor, top_k: int, *, temperature: float = 1.0):
    """logits = |x @ prototypes.T|; the top_k largest per row (equal logits: lower index first, via a stable
    descending sort); softmax over the chosen with ``temperature``. Returns (ids int64, weights) ``[..., top_k]``,
    weights in float64 for a float64 x and float32 otherwise."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = (x.to(dt) @ prototypes.to(dt).T).abs()
    values, ids = torch.sort(logits, dim=-1, descending=True, stable=True)
    values, ids = values[..., :top_k], ids[..., :top_k]
    return ids, torch.softmax(values / temperature, dim=-1)


def arrow_dense(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                prototypes: torch.Tensor, top_k: int, *, temperature: float = 1.0) -> torch.Tensor:
    """Arrow's LoRA delta computed the way PEFT does: every expert for every row (einsum), then a softmax over
    the top-k logits with the others masked to -inf. Shapes: x ``[T, d_in]`` -> ``[T, d_out]`` in x's dtype."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(dt)
    logits = (xs @ prototypes.to(dt).T).abs()
    ids, _ = arrow_route(x, prototypes, top_k, temperature=temperature)
    masked = torch.full_like(logits, float("-inf")).scatter(-1, ids, logits.gather(-1, ids))
    coeff = torch.softmax(masked / temperature, dim=-1)  # [T, N], zero outside the top-k
    y = torch.einsum("tf,erf,eor->teo", xs, lora_a.to(dt), lora_b.to(dt)) * scales.to(dt)[None, :, None]
    return torch.einsum("te,teo->to", coeff, y).to(x.dtype)

def grouped_lora_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    *,
    scales: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> tuple:
    """(grad_x, grad_lora_a, grad_lora_b, grad_weights) of ``(grouped_lora(...) * grad_out).sum()``, by autograd
    through the reference above (grad_weights is None without weights). Shapes and dtypes are the inputs'."""
    leaves = [t.detach().requires_grad_() for t in (x, lora_a, lora_b)]
    w = None if weights is None else weights.detach().requires_grad_()
    with torch.enable_grad():
        y = grouped_lora(*leaves, adapter_ids, scales=scales, weights=w, compute_dtype=compute_dtype)
    return _grads(y, leaves + ([w] if w is not None else []), grad_out) + ((None,) if w is None else ())


def _grads(y: torch.Tensor, inputs: list, grad_out: torch.Tensor) -> tuple:
    """torch.autograd.grad with zeros for inputs y does not depend on (e.g. every id is -1)."""
    if not y.requires_grad:
        return tuple(torch.zeros_like(t) for t in inputs)
    return torch.autograd.grad(y, inputs, grad_out, allow_unused=True, materialize_grads=True)


def merge_lowrank(lora_a: torch.Tensor, lora_b: torch.Tensor, weights: torch.Tensor, rank: int):
    """Dense reference of ``lora_ops.merge_lowrank``: form ``M = sum_i w_i B_i A_i`` ([..., d_out, d_in]), full SVD,
    keep ``rank`` triplets with ``sqrt(S)`` in each factor. Returns ``(a [..., rank, d_in], b [..., d_out, rank],
    s [..., min(d_out, d_in, N*r)])`` in float64 (singular vectors are unique only up to sign/rotation: compare
    products ``b @ a``). Ranks above the matrix's are padded with zeros, as the op does."""
    a, b = lora_a.double(), lora_b.double()
    w = weights.double()
    m = torch.einsum("...n,...nor,...nri->...oi", w.expand(*a.shape[:-3], a.shape[-3]), b, a)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = min(rank, s.shape[-1])
    root = s[..., :k].sqrt()
    out_a = torch.zeros(*m.shape[:-2], rank, m.shape[-1], dtype=torch.float64)
    out_b = torch.zeros(*m.shape[:-2], m.shape[-2], rank, dtype=torch.float64)
    out_a[..., :k, :] = root[..., :, None] * vh[..., :k, :]
    out_b[..., :, :k] = u[..., :, :k] * root[..., None, :]
    n_r = lora_a.shape[-3] * lora_a.shape[-2]
    return out_a, out_b, s[..., : min(n_r, s.shape[-1])]


def randomized_svd(m: torch.Tensor, rank: int):
    """The exact truncated SVD that ``lora_ops.randomized_svd`` approximates: ``(U [..., M, rank], S [..., rank],
    Vh [..., rank, N])`` of ``m`` in float64 (for matrices of rank <= ``rank`` the two agree up to rounding)."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return u[..., :, :rank], s[..., :rank], vh[..., :rank, :]
