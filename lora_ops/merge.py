"""Merging LoRA adapters: on stacked factors (:func:`merge`) and on PEFT adapters (:func:`merge_peft_adapters`).

Three different things get called "averaging adapters"; they give different adapters and stay distinct here:

============  ==========================================  =============================================  ==========
space         what is combined                            methods                                        rank out
============  ==========================================  =============================================  ==========
factors       ``A_i`` and ``B_i`` separately              ``linear``, ``ties``, ``dare_linear``,         r
              (``B = sum w_i B_i``, ``A = sum w_i A_i``)  ``dare_ties``, ``magnitude_prune``
products      the deltas ``B_i A_i`` exactly, low-rank    ``cat`` (all of it, rank N*r), ``svd``         N*r / rank
              (never formed densely)                      (its exact truncation, :func:`merge_lowrank`)
dense ΔW      ``d_out x d_in`` deltas entry by entry      ``max_pool``, ``iterative_max``,               rank
              (then back to low rank by SVD)              ``ties_svd``, ``dare_linear_svd``,
                                                          ``dare_ties_svd``, ``magnitude_prune_svd``
============  ==========================================  =============================================  ==========

Averaging factors is not averaging products (``(B1 + B2)(A1 + A2) / 4`` has cross terms ``B1 A2``); it is cheap and
it is what several papers do on purpose:

=====================================  ====================================================================
work                                   kind of averaging
=====================================  ====================================================================
PEFT ``add_weighted_adapter``          factors (``linear``, ``ties``, ``dare_*``, ``magnitude_prune``),
                                       products (``cat``, ``svd``), dense ΔW (``*_svd`` variants)
Towards Modular LLMs (Mu routing)      factors: uniform average of every expert's A and of every B
Seeded LoRA                            factors: adapters trained from one shared seed, so A and B align
                                       and averaging them approximates averaging products
Mixture-of-LoRAs (MoA)                 none at inference (a router picks one adapter per sequence);
                                       merged baselines are compared on products
I-LoRA                                 dense ΔW: each new delta truncated by SVD energy, folded into the
                                       running merge by element-wise max magnitude (``iterative_max``)
=====================================  ====================================================================

Weights and scales follow PEFT: adapter i enters as ``weights[i] * scales[i] * B_i A_i``. For factor-space
methods the factor weights are ``sqrt(|w_i s_i|)`` on B and ``sign(w_i s_i) sqrt(|w_i s_i|)`` on A, so a merge
of one adapter reproduces it. Every merged adapter is returned with scale 1 (PEFT writes ``lora_alpha = r``).
Random pruning (``dare_*``) draws from ``generator`` (default: torch's global generator) in PEFT's order.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from lora_ops.ops import merge_lowrank

__all__ = [
    "METHODS", "FACTOR_METHODS", "PRODUCT_METHODS", "DENSE_METHODS", "merge", "merge_peft_adapters",
    "truncate_by_energy",
]

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRODUCT_METHODS = ("cat", "svd")
DENSE_METHODS = ("max_pool", "iterative_max", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = FACTOR_METHODS + PRODUCT_METHODS + DENSE_METHODS
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd",
                  "dare_ties_svd", "magnitude_prune_svd")


# ---------------------------------------------------------------------------------------------------------------
# Element-wise combinations of N stacked tensors [N, ...] (task-vector arithmetic), shared by factor and dense ΔW
# methods.

def _bcast(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape + (1,) * (t.dim() - w.dim()))


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """Each t[i] with all but its int(density * numel) largest-magnitude entries zeroed."""
    if density >= 1:
        return t
    flat = t.reshape(t.shape[0], -1)
    k = int(density * flat.shape[1])
    mask = torch.zeros_like(flat)
    mask.scatter_(1, flat.abs().topk(k, dim=1).indices, 1.0)
    return (flat * mask).reshape(t.shape)


def _keep_random(t: torch.Tensor, density: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """DARE: each entry kept with probability density and rescaled by 1/density (one draw per adapter, in order)."""
    if density >= 1:
        return t
    kept = [x * torch.bernoulli(torch.full_like(x, density), generator=generator) for x in t]
    return torch.stack(kept) / density


def _sign_consensus_sum(t: torch.Tensor, w: torch.Tensor, majority: str) -> torch.Tensor:
    """TIES' disjoint merge: per entry, the weighted mean over adapters whose sign agrees with the majority sign
    (majority by total mass of the unweighted entries, or by count with ``majority='frequency'``)."""
    sign = t.sign()
    if majority == "total":
        mass = t.sum(0)
    elif majority == "frequency":
        mass = sign.sum(0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority!r}")
    agree = sign == torch.where(mass >= 0, 1.0, -1.0).to(t.dtype)
    return (t * _bcast(w, t) * agree).sum(0) / agree.sum(0).clamp(min=1)


def _combine(method: str, t: torch.Tensor, w: torch.Tensor, density: Optional[float], majority: str,
             generator: Optional[torch.Generator]) -> torch.Tensor:
    """sum / ties / dare / magnitude-prune combination of t [N, ...] with weights w [N]."""
    base = method[:-4] if method.endswith("_svd") else method
    if base in ("linear", "svd"):
        return (t * _bcast(w, t)).sum(0)
    if base == "magnitude_prune":
        t = _keep_largest(t, density)
        return (t * _bcast(w, t)).sum(0)
    if base == "ties":
        return _sign_consensus_sum(_keep_largest(t, density), w, majority)
    if base == "dare_linear":
        t = _keep_random(t, density, generator)
        return (t * _bcast(w, t)).sum(0)
    if base == "dare_ties":
        return _sign_consensus_sum(_keep_random(t, density, generator), w, majority)
    raise ValueError(f"unknown combination {method!r}")


def _max_magnitude(t: torch.Tensor) -> torch.Tensor:
    """Entry-wise the element of largest |.| over dim 0, sign kept (first one on ties)."""
    idx = t.abs().argmax(0, keepdim=True)
    return t.gather(0, idx).squeeze(0)


# ---------------------------------------------------------------------------------------------------------------
# Low-rank helpers

def _dense_to_lowrank(delta: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of dense [..., d_out, d_in] deltas as (a [..., rank, d_in], b [..., d_out, rank]), sqrt(S)
    in each factor, zero-padded when rank exceeds min(d_out, d_in)."""
    u, s, vh = torch.linalg.svd(delta.float() if delta.dtype in (torch.float16, torch.bfloat16) else delta,
                                full_matrices=False)
    t = min(rank, s.shape[-1])
    root = s[..., :t].sqrt()
    b = u[..., :t] * root.unsqueeze(-2)
    a = root.unsqueeze(-1) * vh[..., :t, :]
    if t < rank:
        b = torch.nn.functional.pad(b, (0, rank - t))
        a = torch.nn.functional.pad(a, (0, 0, 0, rank - t))
    return a.to(delta.dtype), b.to(delta.dtype)


def truncate_by_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest k with ``sum(s[:k]**2) >= energy * sum(s**2)`` for singular values s (descending), at least 1."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    e = s.double().pow(2)
    total = e.sum()
    if total == 0:
        return 1
    k = int((e.cumsum(0) < energy * total * (1 - 1e-12)).sum().item()) + 1
    return min(k, s.numel())


def _products(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Dense weighted deltas w_i * B_i @ A_i: [N, d_out, d_in] (computed in fp32 for half inputs)."""
    dt = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
    return w.to(dt)[:, None, None] * (b.to(dt) @ a.to(dt))


def _iterative_max(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, energy: float) -> torch.Tensor:
    """I-LoRA's merge as a dense delta: adapters in order, each truncated to the leading singular components that
    hold ``energy`` of its squared spectrum (exactly, from its factors), then folded into the running merge by
    element-wise max magnitude."""
    merged = None
    for i in range(a.shape[0]):
        ai, bi, s = merge_lowrank(a[i : i + 1], b[i : i + 1], w[i : i + 1], a.shape[1], return_singular_values=True)
        k = truncate_by_energy(s, energy)
        dt = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
        delta = bi[:, :k].to(dt) @ ai[:k].to(dt)
        merged = delta if merged is None else _max_magnitude(torch.stack([merged, delta]))
    return merged


# ---------------------------------------------------------------------------------------------------------------
# Merging stacked factors of one layer

def _check_method(method: str, density: Optional[float]) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if method in _NEEDS_DENSITY:
        if density is None:
            raise ValueError(f"method {method!r} needs density (fraction of entries kept, in [0, 1])")
        if not 0 <= density <= 1:
            raise ValueError(f"density must be in [0, 1], got {density}")


def merge(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    weights: Optional[Union[torch.Tensor, Sequence[float]]] = None,
    method: str = "svd",
    *,
    scales: Optional[Union[torch.Tensor, Sequence[float]]] = None,
    rank: Optional[int] = None,
    density: Optional[float] = None,
    majority_sign_method: str = "total",
    energy: float = 0.8,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merges the N adapters of one layer into one; the result's delta is ``b @ a`` (scale 1).

    Args:
        lora_a: ``[N, r, d_in]`` (mixed ranks: zero-pad to the largest r; exact for every method but the factor
            ones, which need equal ranks anyway).
        lora_b: ``[N, d_out, r]``.
        weights: ``[N]`` merge weights (default: all 1; a plain average is ``1/N``). Negative weights subtract.
        method: one of :data:`METHODS` (see the module docstring for which space each works in).
        scales: ``[N]`` LoRA scales ``alpha_i / r_i`` (default 1).
        rank: output rank of ``svd`` and the dense methods (default r); ``cat`` gives N*r, factor methods r.
        density: fraction of entries kept by ``ties``/``dare_*``/``magnitude_prune`` (and their ``_svd`` forms).
        majority_sign_method: ``"total"`` or ``"frequency"`` for the TIES sign election.
        energy: fraction of each delta's squared singular values ``iterative_max`` keeps (I-LoRA's default 0.8).
        generator: randomness of ``dare_*``.

    Returns:
        ``(a [r_out, d_in], b [d_out, r_out])`` in lora_a's dtype.
    """
    _check_method(method, density)
    if lora_a.dim() != 3 or lora_b.dim() != 3 or lora_a.shape[0] != lora_b.shape[0] \
            or lora_a.shape[1] != lora_b.shape[2]:
        raise ValueError(f"merge: lora_a must be [N, r, d_in] and lora_b [N, d_out, r], got {list(lora_a.shape)} "
                         f"and {list(lora_b.shape)}")
    n, r = lora_a.shape[0], lora_a.shape[1]
    if n == 0:
        raise ValueError("merge: need at least one adapter (N = 0)")
    w = _as_vector(weights, n, "weights", lora_a)
    s = _as_vector(scales, n, "scales", lora_a)
    if rank is not None and rank < 1:
        raise ValueError(f"merge: rank must be >= 1, got {rank}")
    rank = rank or r
    ws = w * s  # the weight each delta B_i A_i enters with

    if method in FACTOR_METHODS:
        # PEFT's split of w_i s_i over the two factors: the sign rides on A only, so B_i A_i gets w_i s_i exactly.
        wb = ws.abs().sqrt()
        wa = wb * torch.where(ws >= 0, 1.0, -1.0).to(ws.dtype)
        a = _combine(method, lora_a, wa.to(lora_a.dtype), density, majority_sign_method, generator)
        b = _combine(method, lora_b, wb.to(lora_b.dtype), density, majority_sign_method, generator)
        return a.to(lora_a.dtype), b.to(lora_b.dtype)
    if method == "cat":
        a = (lora_a * _bcast(ws.to(lora_a.dtype), lora_a)).reshape(n * r, -1)
        return a, lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], n * r)
    if method == "svd":
        return merge_lowrank(lora_a, lora_b, ws, rank)
    if method == "max_pool":
        delta = _max_magnitude(_products(lora_a, lora_b, ws))
    elif method == "iterative_max":
        delta = _iterative_max(lora_a, lora_b, ws, energy)
    else:  # ties_svd, dare_*_svd, magnitude_prune_svd: PEFT's dense variants
        # as PEFT: the scaled deltas are pruned and elect the signs; the merge weights apply after that
        deltas = _products(lora_a, lora_b, s)
        delta = _combine(method, deltas, w.to(deltas.dtype), density, majority_sign_method, generator)
    a, b = _dense_to_lowrank(delta, rank)
    return a.to(lora_a.dtype), b.to(lora_b.dtype)


def _as_vector(v, n: int, name: str, like: torch.Tensor) -> torch.Tensor:
    if v is None:
        return torch.ones(n, dtype=torch.float64)
    t = torch.as_tensor(v, dtype=torch.float64).detach().cpu() if not isinstance(v, torch.Tensor) \
        else v.detach().to("cpu", torch.float64)
    if t.shape != (n,):
        raise ValueError(f"merge: {name} must have one value per adapter ({n}), got shape {list(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"merge: {name} must be finite, got {t.tolist()}")
    return t.to(like.device)


# ---------------------------------------------------------------------------------------------------------------
# PEFT adapters (folders or state dicts)

# Keys as saved by PEFT (``...q_proj.lora_A.weight``) or taken from a live model (``...lora_A.default.weight``).
_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                  r"(?:\.(?P<adapter>[^.]+))?(?P<weight>\.weight)?$")

AdapterLike = Union[str, os.PathLike, Tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]]


def _load(adapter: AdapterLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    if isinstance(adapter, (str, os.PathLike)):
        from lora_ops._io import read_peft_adapter_dir

        sd, cfg = read_peft_adapter_dir(adapter)
        return dict(sd), dict(cfg)
    if isinstance(adapter, tuple) and len(adapter) == 2:
        return dict(adapter[0]), dict(adapter[1])
    raise TypeError(f"merge_peft_adapters: each adapter must be a folder path or a (state_dict, config) pair, "
                    f"got {type(adapter).__name__}")


def _pattern_value(patterns: Mapping[str, Any], module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name it ends with (as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scale(config: Mapping[str, Any], module: str, r: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _modules(sd: Mapping[str, torch.Tensor], where: str) -> Dict[str, Dict[str, Tuple[str, torch.Tensor]]]:
    """module name -> {"A"/"B": (output key, tensor)}; every other key is an error (DoRA, modules_to_save)."""
    out: Dict[str, Dict[str, Tuple[str, torch.Tensor]]] = {}
    for key, t in sd.items():
        m = _KEY.match(key)
        if m is None:
            raise NotImplementedError(f"merge_peft_adapters: {where} has key {key!r}, which is not a LoRA factor "
                                      "(DoRA magnitudes, biases and modules_to_save cannot be merged)")
        kind = m["kind"]
        out_key = f"{m['module']}.{kind}" + (".weight" if kind in ("lora_A", "lora_B") else "")
        out.setdefault(m["module"], {})[kind[-1]] = (out_key, t)
    for module, ab in out.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"merge_peft_adapters: {where} has only lora_{''.join(ab)} for module {module!r}")
    return out


# A batch of layers padded to a common shape may hold at most this many times the elements of the layers
# themselves; beyond that (e.g. an embedding's vocabulary-sized factor among attention layers) layers of one shape
# are batched separately.
_MAX_PAD_FACTOR = 3.0


def _pad_to(t: torch.Tensor, shape: tuple) -> torch.Tensor:
    pad = []
    for have, want in zip(reversed(t.shape), reversed(shape)):
        pad += [0, want - have]
    return torch.nn.functional.pad(t, pad)


def _svd_batches(module_names: List[str], bank) -> List[List[str]]:
    """Module names grouped into merge_lowrank calls: one per adapter count N (all of a model's layers when every
    adapter covers every module), split by shape only when padding would waste too much."""
    by_n: Dict[tuple, List[str]] = {}
    shapes = {}
    for name in module_names:
        a, b, _, _, _ = bank(name)
        shapes[name] = (a.shape[0], a.shape[1], a.shape[2], b.shape[1], a.dtype)
        by_n.setdefault((a.shape[0], a.dtype), []).append(name)
    batches = []
    for names in by_n.values():
        real = sum(shapes[m][1] * (shapes[m][2] + shapes[m][3]) for m in names)
        r, d_in, d_out = (max(shapes[m][i] for m in names) for i in (1, 2, 3))
        if len(names) * r * (d_in + d_out) <= _MAX_PAD_FACTOR * real:
            batches.append(names)
        else:
            by_shape: Dict[tuple, List[str]] = {}
            for m in names:
                by_shape.setdefault(shapes[m], []).append(m)
            batches.extend(by_shape.values())
    return batches


def merge_peft_adapters(
    adapters: Sequence[AdapterLike],
    weights: Optional[Sequence[float]] = None,
    method: str = "svd",
    *,
    rank: Optional[int] = None,
    density: Optional[float] = None,
    majority_sign_method: str = "total",
    energy: float = 0.8,
    generator: Optional[torch.Generator] = None,
    progress: Optional[Callable[[Iterable], Iterable]] = None,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Merges PEFT LoRA adapters into one, like ``PeftModel.add_weighted_adapter`` but from files/state dicts.

    Args:
        adapters: PEFT adapter folders (``adapter_model.safetensors`` + ``adapter_config.json``) or
            ``(state_dict, config)`` pairs (e.g. ``get_peft_model_state_dict`` and ``peft_config.to_dict()``).
        weights: one weight per adapter (default all 1, PEFT's convention: 1/N for an average).
        method: one of :data:`METHODS`. ``svd`` merges all layers in a single batched :func:`merge_lowrank` call
            (zero-padded to a common shape, which is exact; split by shape when padding would triple the work).
        rank: output rank for ``svd`` and the dense methods (default: the largest adapter rank, as PEFT).
        density, majority_sign_method, energy, generator: as in :func:`merge`.
        progress: wraps the iterable of layer groups (e.g. ``tqdm``); called with the list of module names.

    Returns:
        ``(state_dict, config)`` of the merged adapter in PEFT's saved format (keys without adapter name), with
        ``r = lora_alpha = output rank`` (scale 1), ready for :func:`lora_ops._io.write_peft_adapter_dir`.
        A module present in only some adapters is merged from those (as PEFT does).
    """
    _check_method(method, density)
    if len(adapters) == 0:
        raise ValueError("merge_peft_adapters: need at least one adapter")
    loaded = [_load(a) for a in adapters]
    w = [1.0] * len(loaded) if weights is None else [float(x) for x in weights]
    if len(w) != len(loaded):
        raise ValueError(f"merge_peft_adapters: got {len(w)} weights for {len(loaded)} adapters")
    if not all(math.isfinite(x) for x in w):
        raise ValueError(f"merge_peft_adapters: weights must be finite, got {w}")
    if len(loaded) == 1:
        method = "linear"  # PEFT's rule: one adapter can only be rescaled
    configs = [cfg for _, cfg in loaded]
    for i, cfg in enumerate(configs):
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"merge_peft_adapters: adapter {i} is a {cfg.get('peft_type')} adapter, not LoRA")
        if cfg.get("use_dora"):
            raise NotImplementedError(f"merge_peft_adapters: adapter {i} uses DoRA, which cannot be merged this way")
    per_adapter = [_modules(sd, f"adapter {i}") for i, (sd, _) in enumerate(loaded)]
    module_names = list(dict.fromkeys(name for mods in per_adapter for name in mods))
    ranks = [t.shape[0] for mods in per_adapter for (_, t) in (ab["A"] for ab in mods.values())]
    max_rank = max(ranks)
    if method in FACTOR_METHODS and len(set(ranks)) > 1:
        raise ValueError(f"merge_peft_adapters: method {method!r} needs every adapter to have the same rank, got "
                         f"ranks {sorted(set(ranks))} (use cat, svd or a dense method)")
    if rank is not None and rank < 1:
        raise ValueError(f"merge_peft_adapters: rank must be >= 1, got {rank}")
    out_rank = {"cat": None}.get(method, rank or max_rank)

    # One bank per module: the adapters that have it, zero-padded to the largest rank among them.
    def bank(name):
        present = [i for i, mods in enumerate(per_adapter) if name in mods]
        a_list = [per_adapter[i][name]["A"][1] for i in present]
        b_list = [per_adapter[i][name]["B"][1] for i in present]
        r = max(x.shape[0] for x in a_list)
        dt = a_list[0].dtype
        a = torch.stack([torch.nn.functional.pad(x.to(dt), (0, 0, 0, r - x.shape[0])) for x in a_list])
        b = torch.stack([torch.nn.functional.pad(x.to(dt), (0, r - x.shape[1])) for x in b_list])
        scales = [_scale(configs[i], name, per_adapter[i][name]["A"][1].shape[0]) for i in present]
        keys = (per_adapter[present[0]][name]["A"][0], per_adapter[present[0]][name]["B"][0])
        return a, b, [w[i] for i in present], scales, keys

    out: Dict[str, torch.Tensor] = {}
    wrap = progress or (lambda items: items)
    if method == "svd":
        for names in wrap(_svd_batches(module_names, bank)):
            banks = [bank(name) for name in names]
            n, r = banks[0][0].shape[0], max(x[0].shape[1] for x in banks)
            d_in, d_out = max(x[0].shape[2] for x in banks), max(x[1].shape[1] for x in banks)
            # Zero-padding r, d_in and d_out is exact (zero rows/columns add nothing to B A): every layer of the
            # group goes through one merge_lowrank call, then each is cut back to its own shape.
            a = torch.stack([_pad_to(x[0], (n, r, d_in)) for x in banks])
            b = torch.stack([_pad_to(x[1], (n, d_out, r)) for x in banks])
            ws = torch.tensor([[wi * si for wi, si in zip(x[2], x[3])] for x in banks], dtype=torch.float64)
            ma, mb = merge_lowrank(a, b, ws, out_rank)
            for (a0, b0, _, _, keys), ai, bi in zip(banks, ma, mb):
                out[keys[0]] = ai[:, : a0.shape[2]].contiguous()
                out[keys[1]] = bi[: b0.shape[1]].contiguous()
    elif method == "cat":
        # unpadded, so mixed ranks give rank sum(r_i) as in PEFT (a padded bank would carry zero components)
        for names in wrap([[name] for name in module_names]):
            for name in names:
                present = [i for i, mods in enumerate(per_adapter) if name in mods]
                a_list = [per_adapter[i][name]["A"][1] for i in present]
                scales = [w[i] * _scale(configs[i], name, x.shape[0]) for i, x in zip(present, a_list)]
                keys = (per_adapter[present[0]][name]["A"][0], per_adapter[present[0]][name]["B"][0])
                out[keys[0]] = torch.cat([x * si for x, si in zip(a_list, scales)])
                out[keys[1]] = torch.cat([per_adapter[i][name]["B"][1] for i in present], dim=1)
    else:
        for names in wrap([[name] for name in module_names]):
            for name in names:
                a, b, ww, ss, keys = bank(name)
                ma, mb = merge(a, b, ww, method, scales=ss, rank=out_rank, density=density,
                               majority_sign_method=majority_sign_method, energy=energy, generator=generator)
                out[keys[0]], out[keys[1]] = ma.contiguous(), mb.contiguous()

    new_rank = next(iter(out.values())).shape[0] if method != "cat" else \
        max(t.shape[0] for k, t in out.items() if k.endswith(("lora_A.weight", "lora_embedding_A")))
    config = dict(configs[0])
    targets = [c.get("target_modules") for c in configs]
    if all(isinstance(t, (list, tuple, set)) for t in targets):
        config["target_modules"] = sorted(set().union(*[set(t) for t in targets]))
    elif all(isinstance(t, str) for t in targets) and len(set(targets)) > 1:
        config["target_modules"] = "|".join(f"({t})" for t in targets)
    config.update(r=new_rank, lora_alpha=new_rank, use_rslora=False, alpha_pattern={}, rank_pattern={})
    if method == "cat":  # ranks can differ per module (modules missing from some adapters): record each
        pattern = {name: out[per_adapter[next(i for i, m in enumerate(per_adapter) if name in m)][name]["A"][0]]
                   .shape[0] for name in module_names}
        pattern = {k: v for k, v in pattern.items() if v != new_rank}
        config.update(rank_pattern=pattern, alpha_pattern=dict(pattern))
    return out, config
