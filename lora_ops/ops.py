"""Python entry points of the lora_ops ops: documented signatures, fake (meta) implementations for torch.compile.

Argument checking lives in the C++ op itself (so direct ``torch.ops.lora_ops`` calls are just as safe); the fake
implementations repeat the shape/dtype checks that do not need tensor values, so errors surface while tracing too.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["grouped_lora", "arrow_prototypes", "arrow_route"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def grouped_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    *,
    scales: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """The LoRA delta of a batch in which every row picks its own adapter (or a weighted top-k of adapters).

    ``y[t] = sum_j weights[t, j] * scales[id] * lora_b[id] @ (lora_a[id] @ x[t])`` with ``id = adapter_ids[t, j]``;
    ``-1`` means no adapter (the row's delta is zero).

    Args:
        x: ``[..., d_in]`` float32 / float16 / bfloat16 / float64, any strides.
        lora_a: ``[N, r, d_in]`` (PEFT ``lora_A.weight`` stacked), x's dtype.
        lora_b: ``[N, d_out, r]`` (PEFT ``lora_B.weight`` stacked), x's dtype.
        adapter_ids: int32/int64, ``x.shape[:-1]`` (one adapter per row) or ``x.shape[:-1] + (k,)`` (top-k).
            For one adapter per sequence, expand the per-sequence ids over the sequence dimension.
        scales: ``[N]`` per-adapter scale (``alpha / r``), default 1.
        weights: mixture weights shaped like ``adapter_ids``, default 1.
        check_ids: raise IndexError for ids outside ``[-1, N)`` (one reduction; a host sync on CUDA). With False
            nothing is synchronised and invalid ids contribute nothing (never read out of bounds).

    Returns:
        ``[..., d_out]`` in x's dtype, accumulated in float32 (float64 for float64 inputs).
    """
    return torch.ops.lora_ops.grouped_lora.default(x, lora_a, lora_b, adapter_ids, scales, weights, check_ids)


def _grouped_lora_check(x, lora_a, lora_b, adapter_ids, scales, weights) -> tuple:
    """Value-free checks mirroring csrc/common/grouped_lora_args.cpp; returns the output shape."""
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"grouped_lora: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("grouped_lora: x must have shape [..., d_in], got a 0-d tensor")
    if lora_a.dim() != 3:
        raise ValueError(f"grouped_lora: lora_a must have shape [N, r, d_in], got {list(lora_a.shape)}")
    if lora_b.dim() != 3:
        raise ValueError(f"grouped_lora: lora_b must have shape [N, d_out, r], got {list(lora_b.shape)}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype != x.dtype:
            raise TypeError(f"grouped_lora: {name} has dtype {t.dtype} but x has {x.dtype}")
    if adapter_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"grouped_lora: adapter_ids must be int32 or int64, got {adapter_ids.dtype}")
    n, r, d_in = lora_a.shape
    if d_in != x.shape[-1]:
        raise ValueError(f"grouped_lora: lora_a must have shape [N, r, d_in] with d_in = {x.shape[-1]}, got {list(lora_a.shape)}")
    if lora_b.shape[0] != n or lora_b.shape[2] != r:
        raise ValueError(f"grouped_lora: lora_b must have shape [N, d_out, r] = [{n}, d_out, {r}], got {list(lora_b.shape)}")
    lead = tuple(x.shape[:-1])
    ids_shape = tuple(adapter_ids.shape)
    if not (ids_shape == lead or (len(ids_shape) == len(lead) + 1 and ids_shape[:-1] == lead)):
        raise ValueError(f"grouped_lora: adapter_ids must have shape x.shape[:-1] = {list(lead)} or x.shape[:-1] + [k], got {list(ids_shape)}")
    if weights is not None:
        if tuple(weights.shape) != ids_shape:
            raise ValueError(f"grouped_lora: weights must have the shape of adapter_ids {list(ids_shape)}, got {list(weights.shape)}")
        if not weights.dtype.is_floating_point:
            raise TypeError(f"grouped_lora: weights must be a floating-point tensor, got {weights.dtype}")
    if scales is not None:
        if tuple(scales.shape) != (n,):
            raise ValueError(f"grouped_lora: scales must have shape [N] = [{n}], got {list(scales.shape)}")
        if not scales.dtype.is_floating_point:
            raise TypeError(f"grouped_lora: scales must be a floating-point tensor, got {scales.dtype}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b), ("adapter_ids", adapter_ids), ("weights", weights), ("scales", scales)):
        if t is not None and t.device != x.device:
            raise ValueError(f"grouped_lora: {name} is on {t.device} but x is on {x.device}")
    return lead + (lora_b.shape[1],)


@torch.library.register_fake("lora_ops::grouped_lora")
def _grouped_lora_fake(x, lora_a, lora_b, adapter_ids, scales=None, weights=None, check_ids=True):
    return x.new_empty(_grouped_lora_check(x, lora_a, lora_b, adapter_ids, scales, weights))


# ---- Arrow routing (arXiv 2405.11157) ----


def arrow_prototypes(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """Arrow prototype of every adapter: the unit top right singular vector of ``lora_b[i] @ lora_a[i]``.

    Exact (QR of the factors + an SVD of the small r x r core; no power iterations, no d_out x d_in product).
    The sign of a singular vector is arbitrary; it is fixed so the component of largest magnitude is positive,
    which makes CPU and CUDA agree (routing only uses ``|<x, v>|``). Not differentiable (Arrow is training-free).

    Args:
        lora_a: ``[..., N, r, d_in]`` float32 / float16 / bfloat16 / float64; leading dims (e.g. layers) batched.
        lora_b: ``[..., N, d_out, r]``, lora_a's dtype and leading dims.

    Returns:
        ``[..., N, d_in]`` in lora_a's dtype, computed in float32 (float64 for float64 inputs).
    """
    return torch.ops.lora_ops.arrow_prototypes.default(lora_a, lora_b)


def arrow_route(x: torch.Tensor, prototypes: torch.Tensor, top_k: int, *, temperature: float = 1.0):
    """Arrow routing: per row, the ``top_k`` experts with the largest ``|x . prototypes[i]|`` and softmax weights.

    ``weights = softmax(|logits of the chosen| / temperature)`` over the k chosen only; ids are ordered by
    decreasing logit, equal logits by lower index (deterministic). The pair feeds
    ``grouped_lora(x, lora_a, lora_b, ids, weights=weights)`` directly. Not differentiable: Arrow routes a
    frozen library (training-free), so neither ids nor weights carry gradients.

    Args:
        x: ``[..., d]`` float32 / float16 / bfloat16 / float64.
        prototypes: ``[N, d]`` any of those dtypes (e.g. from ``arrow_prototypes``).
        top_k: experts per row, ``1 <= top_k <= N``.
        temperature: softmax temperature, > 0.

    Returns:
        ``(ids [..., top_k] int64, weights [..., top_k])``; weights are float32 (float64 for a float64 x): the
        logits are computed in that dtype, and grouped_lora accumulates in it anyway.
    """
    return torch.ops.lora_ops.arrow_route.default(x, prototypes, top_k, temperature)


def _arrow_prototypes_check(lora_a, lora_b) -> tuple:
    """Value-free checks mirroring csrc/common/arrow_args.cpp; returns the output shape."""
    if lora_a.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"arrow_prototypes: lora_a must be float32, float16, bfloat16 or float64, got {lora_a.dtype}")
    if lora_b.dtype != lora_a.dtype:
        raise TypeError(f"arrow_prototypes: lora_b has dtype {lora_b.dtype} but lora_a has {lora_a.dtype}")
    if lora_a.dim() < 3:
        raise ValueError(f"arrow_prototypes: lora_a must have shape [..., N, r, d_in], got {list(lora_a.shape)}")
    if (lora_b.dim() != lora_a.dim() or lora_b.shape[:-2] != lora_a.shape[:-2]
            or lora_b.shape[-1] != lora_a.shape[-2]):
        raise ValueError(f"arrow_prototypes: lora_b must have shape [..., N, d_out, r] = "
                         f"{list(lora_a.shape[:-2])} + [d_out, {lora_a.shape[-2]}] to match lora_a "
                         f"{list(lora_a.shape)}, got {list(lora_b.shape)}")
    if lora_b.device != lora_a.device:
        raise ValueError(f"arrow_prototypes: lora_b is on {lora_b.device} but lora_a is on {lora_a.device}")
    return tuple(lora_a.shape[:-2]) + (lora_a.shape[-1],)


@torch.library.register_fake("lora_ops::arrow_prototypes")
def _arrow_prototypes_fake(lora_a, lora_b):
    return lora_a.new_empty(_arrow_prototypes_check(lora_a, lora_b))


@torch.library.register_fake("lora_ops::arrow_route")
def _arrow_route_fake(x, prototypes, top_k, temperature=1.0):
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"arrow_route: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if prototypes.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"arrow_route: prototypes must be float32, float16, bfloat16 or float64, got {prototypes.dtype}")
    if x.dim() < 1:
        raise ValueError("arrow_route: x must have shape [..., d], got a 0-d tensor")
    if prototypes.dim() != 2 or prototypes.shape[1] != x.shape[-1]:
        raise ValueError(f"arrow_route: prototypes must have shape [N, d] with d = {x.shape[-1]}, "
                         f"got {list(prototypes.shape)}")
    if prototypes.device != x.device:
        raise ValueError(f"arrow_route: prototypes is on {prototypes.device} but x is on {x.device}")
    n = prototypes.shape[0]
    if not 1 <= top_k <= n:
        raise ValueError(f"arrow_route: top_k must be in [1, N] = [1, {n}], got {top_k}")
    if not (temperature > 0 and temperature != float("inf")):
        raise ValueError(f"arrow_route: temperature must be a finite number > 0, got {temperature}")
    shape = tuple(x.shape[:-1]) + (top_k,)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(shape, dtype=torch.int64), x.new_empty(shape, dtype=acc)

# ---- autograd: grouped_lora_backward ----


@torch.library.register_fake("lora_ops::grouped_lora_backward")
def _grouped_lora_backward_fake(grad_out, x, lora_a, lora_b, adapter_ids, scales, weights, output_mask):
    out_shape = _grouped_lora_check(x, lora_a, lora_b, adapter_ids, scales, weights)
    if tuple(grad_out.shape) != tuple(out_shape):
        raise ValueError(f"grouped_lora_backward: grad_out must have shape x.shape[:-1] + [d_out] = "
                         f"{list(out_shape)}, got {list(grad_out.shape)}")
    if grad_out.dtype != x.dtype:
        raise TypeError(f"grouped_lora_backward: grad_out has dtype {grad_out.dtype} but x has {x.dtype}")
    need_x, need_a, need_b, need_w = output_mask
    none = lambda: x.new_empty((0,))  # noqa: E731  (one fresh tensor per output: outputs never alias)
    return (
        x.new_empty(x.shape) if need_x else none(),
        lora_a.new_empty(lora_a.shape) if need_a else none(),
        lora_b.new_empty(lora_b.shape) if need_b else none(),
        weights.new_empty(weights.shape) if need_w and weights is not None else none(),
    )


def _grouped_lora_setup_context(ctx, inputs, output):
    x, lora_a, lora_b, adapter_ids, scales, weights, _check_ids = inputs
    ctx.save_for_backward(x, lora_a, lora_b, adapter_ids, scales, weights)


def _grouped_lora_backward(ctx, grad_out):
    """Gradients for x, lora_a, lora_b and weights through ``lora_ops::grouped_lora_backward`` (one op call).

    adapter_ids and check_ids get None; scales cannot be trained through this op (NotImplementedError). The
    backward op is not itself differentiable: double backward is not supported.
    """
    x, lora_a, lora_b, adapter_ids, scales, weights = ctx.saved_tensors
    # torch drops trailing arguments left at their default (None) from needs_input_grad
    needs = [i < len(ctx.needs_input_grad) and ctx.needs_input_grad[i] for i in range(6)]
    if needs[4]:
        raise NotImplementedError("grouped_lora: no gradient for scales; pass scales that do not require grad "
                                  "(fold a trainable scale into lora_b instead)")
    mask = [needs[0], needs[1], needs[2], weights is not None and needs[5]]
    gx, ga, gb, gw = torch.ops.lora_ops.grouped_lora_backward.default(
        grad_out, x, lora_a, lora_b, adapter_ids, scales, weights, mask)
    return (gx if mask[0] else None, ga if mask[1] else None, gb if mask[2] else None, None, None,
            gw if mask[3] else None, None)


torch.library.register_autograd(
    "lora_ops::grouped_lora", _grouped_lora_backward, setup_context=_grouped_lora_setup_context)

# ---------------------------------------------------------------------------------------------------------------
# Merging and low-rank factorisation (csrc/common/lowrank.cpp). Not differentiable: no autograd is registered, and
# calling them on tensors that require grad gives outputs without a graph.

__all__ += ["merge_lowrank", "randomized_svd"]


def merge_lowrank(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    weights: torch.Tensor,
    rank: int,
    *,
    return_singular_values: bool = False,
):
    """Exact rank-``rank`` truncated SVD of ``sum_i weights[..., i] * lora_b[..., i] @ lora_a[..., i]``, computed
    from the factors alone (QR of the stacked factors, SVD of the small ``N*r`` core): the dense ``d_out x d_in``
    matrix is never formed.

    Args:
        lora_a: ``[..., N, r, d_in]`` (leading dims: e.g. every layer of a model in one call).
        lora_b: ``[..., N, d_out, r]``, lora_a's dtype and leading dims.
        weights: ``[N]`` (shared by every leading index) or ``[..., N]``; fold LoRA scales ``alpha / r`` in here.
        rank: output rank; above ``min(d_out, d_in, N*r)`` the exact merge is returned, padded with zeros.
        return_singular_values: also return every singular value of the merge, so a caller can pick the rank by
            energy (e.g. the smallest rank with ``cumsum(s**2) >= 0.9 * sum(s**2)``).

    Returns:
        ``(a [..., rank, d_in], b [..., d_out, rank])`` with ``sqrt(S)`` folded into each factor (so ``b @ a`` is
        the truncation and ``(a**2).sum(-1)`` its singular values), plus ``s [..., min(d_out, d_in, N*r)]``
        (descending) when asked. Output dtype is the input's; fp16/bf16 are computed in fp32, fp64 in fp64.
    """
    a, b, s = torch.ops.lora_ops.merge_lowrank.default(lora_a, lora_b, weights, rank)
    return (a, b, s) if return_singular_values else (a, b)


def randomized_svd(
    m: torch.Tensor,
    rank: int,
    *,
    oversample: int = 10,
    n_iter: int = 2,
    generator: Optional[torch.Generator] = None,
):
    """Randomized truncated SVD (Halko, Martinsson and Tropp) of a batch of matrices.

    Sketch ``Y = m @ Omega`` with ``rank + oversample`` Gaussian columns, ``n_iter`` power iterations with a
    Householder QR after every product with ``m`` or ``m^T``, then the SVD of the small ``Q^T m``.

    Args:
        m: ``[..., M, N]`` float32/float16/bfloat16/float64 (half types computed in fp32).
        rank: number of singular triplets, ``1 <= rank <= min(M, N)``.
        oversample: extra sketch columns (the sketch width is clipped to ``min(M, N)``).
        n_iter: power iterations.
        generator: where the randomness comes from: one 63-bit seed is drawn from it (default: torch's global CPU
            generator), and the op's own test matrices follow from that seed on m's device. The same generator
            state gives the same result.

    Returns:
        ``(U [..., M, rank], S [..., rank], Vh [..., rank, N])`` in m's dtype, S descending.
    """
    seed = _draw_seed(generator)
    return torch.ops.lora_ops.randomized_svd.default(m, rank, oversample, n_iter, seed)


def _draw_seed(generator: Optional[torch.Generator]) -> int:
    device = "cpu" if generator is None else generator.device
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, device=device).item())


def _merge_lowrank_shapes(lora_a, lora_b, weights, rank):
    """Value-free checks mirroring csrc/common/lowrank.cpp; returns (lead, N, r, d_in, d_out)."""
    if lora_a.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"merge_lowrank: lora_a must be float32, float16, bfloat16 or float64, got {lora_a.dtype}")
    if lora_b.dtype != lora_a.dtype:
        raise TypeError(f"merge_lowrank: lora_b has dtype {lora_b.dtype} but lora_a has {lora_a.dtype}")
    if not weights.dtype.is_floating_point:
        raise TypeError(f"merge_lowrank: weights must be a floating-point tensor, got {weights.dtype}")
    if lora_a.dim() < 3:
        raise ValueError(f"merge_lowrank: lora_a must have shape [..., N, r, d_in], got {list(lora_a.shape)}")
    n, r, d_in = lora_a.shape[-3:]
    lead = tuple(lora_a.shape[:-3])
    if lora_b.dim() != lora_a.dim() or tuple(lora_b.shape[:-3]) != lead or lora_b.shape[-3] != n \
            or lora_b.shape[-1] != r:
        raise ValueError(f"merge_lowrank: lora_b must have shape [..., N, d_out, r] matching lora_a "
                         f"{list(lora_a.shape)}, got {list(lora_b.shape)}")
    if weights.dim() < 1 or weights.shape[-1] != n:
        raise ValueError(f"merge_lowrank: weights must have shape [N] or [..., N] with N = {n}, "
                         f"got {list(weights.shape)}")
    w_shape = lead + (n,)
    if weights.dim() > len(w_shape) or any(h not in (1, want) for h, want in zip(reversed(weights.shape),
                                                                                reversed(w_shape))):
        raise ValueError(f"merge_lowrank: weights must have shape [N] or [..., N] broadcastable to "
                         f"{list(w_shape)}, got {list(weights.shape)}")
    if rank < 1:
        raise ValueError(f"merge_lowrank: rank must be >= 1, got {rank}")
    for name, t in (("lora_b", lora_b), ("weights", weights)):
        if t.device != lora_a.device:
            raise ValueError(f"merge_lowrank: {name} is on {t.device} but lora_a is on {lora_a.device}")
    return lead, n, r, d_in, lora_b.shape[-2]


@torch.library.register_fake("lora_ops::merge_lowrank")
def _merge_lowrank_fake(lora_a, lora_b, weights, rank):
    lead, n, r, d_in, d_out = _merge_lowrank_shapes(lora_a, lora_b, weights, rank)
    k = min(d_in, d_out, n * r)
    return (lora_a.new_empty(lead + (rank, d_in)), lora_a.new_empty(lead + (d_out, rank)),
            lora_a.new_empty(lead + (k,)))


torch.library.register_fake("lora_ops::_merge_lowrank_jacobi")(_merge_lowrank_fake)


@torch.library.register_fake("lora_ops::randomized_svd")
def _randomized_svd_fake(m, rank, oversample=10, n_iter=2, seed=0):
    if m.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"randomized_svd: m must be float32, float16, bfloat16 or float64, got {m.dtype}")
    if m.dim() < 2:
        raise ValueError(f"randomized_svd: m must have shape [..., M, N], got {list(m.shape)}")
    rows, cols = m.shape[-2:]
    if not 1 <= rank <= min(rows, cols):
        raise ValueError(f"randomized_svd: rank must be in [1, min(M, N)] = [1, {min(rows, cols)}] for m of shape "
                         f"{list(m.shape)}, got {rank}")
    if oversample < 0:
        raise ValueError(f"randomized_svd: oversample must be >= 0, got {oversample}")
    if n_iter < 0:
        raise ValueError(f"randomized_svd: n_iter must be >= 0, got {n_iter}")
    lead = tuple(m.shape[:-2])
    return m.new_empty(lead + (rows, rank)), m.new_empty(lead + (rank,)), m.new_empty(lead + (rank, cols))


@torch.library.register_fake("lora_ops::_jacobi_svd")
def _jacobi_svd_fake(m, max_sweeps=40):
    if m.dim() == 3 and min(m.shape[-2:]) > 256:
        raise ValueError(f"_jacobi_svd: min(M, N) must be <= 256, got m of shape {list(m.shape)}")
    k = min(m.shape[-2:])
    return m.new_empty(m.shape[0], m.shape[1], k), m.new_empty(m.shape[0], k), m.new_empty(m.shape[0], k, m.shape[2])


# ---- Not differentiable: a clear error at backward time instead of a missing-derivative error deep inside ATen ----


def _not_differentiable(op: str, why: str):
    def backward(ctx, *grads):
        raise NotImplementedError(f"lora_ops.{op} is not differentiable ({why}); call it on detached tensors or "
                                  "under torch.no_grad()")

    torch.library.register_autograd(f"lora_ops::{op}", backward)


# Forward calls with inputs that require grad still work (e.g. merging trainable adapters); only backward raises.
_not_differentiable("merge_lowrank", "it merges frozen adapters")
_not_differentiable("randomized_svd", "no derivative of the randomized range finder is implemented")
_not_differentiable("arrow_prototypes", "Arrow routes a frozen library")
_not_differentiable("arrow_route", "Arrow routing is training-free")
