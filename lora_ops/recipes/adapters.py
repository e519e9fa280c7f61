"""Adapters as factors, and a base model with several of them combined per layer (for evaluation and timing).

A trained PEFT adapter becomes ``{module_path: Factors(a [r, d_in], b [d_out, r], scale)}``; :func:`combine` returns a
copy of the base model whose targeted Linear layers add a combination of N adapters' outputs:

- ``mean``: ``(1/N) Σ_i s_i B_i A_i x`` (average of outputs = average of products, exactly a rank N·r LoRA);
- ``weighted``: ``Σ_i w_i s_i B_i A_i x`` with fixed weights (normalised to sum 1);
- ``similarity``: per-token weights ``softmax_i(|⟨x, v_i⟩| / T)`` where ``v_i`` is the unit top right singular vector
  of ``B_i A_i`` at that layer (input–prototype similarity, as in Arrow with k = N);
- ``maxpool``: element-wise max-by-magnitude over the N expert outputs ``s_i B_i A_i x``.

Each mode runs through ``lora_ops.grouped_lora`` (all N adapters of a row in one call: ids ``[T, N]`` with weights, or
rows repeated N times for max pooling) or through a plain Python loop over the adapters (``backend="loop"``), so the
recipes can time one against the other. The multi-adapter modules of ``lora_ops.nn`` cover serving; this small
module is the recipes' own so they do not depend on them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import nn

__all__ = ["Factors", "factors_from_peft", "peft_from_factors", "combine", "MixedLoRALinear", "top_right_singular",
           "adapter_from_dense", "dense"]

MODES = ("mean", "weighted", "similarity", "maxpool")


@dataclass
class Factors:
    a: torch.Tensor  # [r, d_in]
    b: torch.Tensor  # [d_out, r]
    scale: float

    def delta(self) -> torch.Tensor:
        """Dense ``scale · B A`` ``[d_out, d_in]``."""
        return self.scale * (self.b.double() @ self.a.double()).to(self.a.dtype)


Adapter = Dict[str, Factors]


def factors_from_peft(state: Mapping[str, torch.Tensor], scale: float) -> Adapter:
    """PEFT state dict (``...<module>.lora_A.weight`` / ``lora_B.weight``) → factors keyed by the base module path."""
    out: Adapter = {}
    for key, a in state.items():
        if not key.endswith("lora_A.weight"):
            continue
        path = key[: -len(".lora_A.weight")]
        if path.startswith("base_model.model."):
            path = path[len("base_model.model."):]
        b = state[key.replace("lora_A.weight", "lora_B.weight")]
        out[path] = Factors(a.detach().float(), b.detach().float(), float(scale))
    if not out:
        raise ValueError("factors_from_peft: the state dict has no lora_A/lora_B weights")
    return out


def peft_from_factors(adapter: Adapter, alpha: float) -> Dict[str, torch.Tensor]:
    """The PEFT state dict of an adapter whose every factor pair has ``scale == alpha / r``.

    Factors with another scale are rescaled into B (exact), so any adapter can be saved under one ``lora_alpha``.
    """
    state = {}
    for path, f in adapter.items():
        r = f.a.shape[0]
        state[f"base_model.model.{path}.lora_A.weight"] = f.a.contiguous()
        state[f"base_model.model.{path}.lora_B.weight"] = (f.b * (f.scale / (alpha / r))).contiguous()
    return state


def top_right_singular(delta: torch.Tensor) -> torch.Tensor:
    """Unit top right singular vector ``[d_in]`` of a dense delta (sign irrelevant: used through |⟨x, v⟩|)."""
    _, _, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return vh[0].to(delta.dtype)


class MixedLoRALinear(nn.Module):
    """``base(x)`` plus a combination of N LoRA deltas; see the module docstring for the modes."""

    def __init__(self, base: nn.Linear, factors: Sequence[Factors], mode: str = "mean",
                 weights: Optional[Sequence[float]] = None, temperature: float = 1.0, backend: str = "lora_ops"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"MixedLoRALinear: mode must be one of {MODES}, got {mode!r}")
        if backend not in ("lora_ops", "loop"):
            raise ValueError(f"MixedLoRALinear: backend must be 'lora_ops' or 'loop', got {backend!r}")
        if not factors:
            raise ValueError("MixedLoRALinear: factors is empty")
        self.base, self.mode, self.backend, self.temperature = base, mode, backend, temperature
        n = len(factors)
        r = max(f.a.shape[0] for f in factors)
        d_out, d_in = base.weight.shape
        a = torch.zeros(n, r, d_in)
        b = torch.zeros(n, d_out, r)
        for i, f in enumerate(factors):  # mixed ranks: zero padding is exact
            a[i, : f.a.shape[0]] = f.a
            b[i, :, : f.b.shape[1]] = f.b
        self.register_buffer("lora_a", a.to(base.weight.dtype))
        self.register_buffer("lora_b", b.to(base.weight.dtype))
        self.register_buffer("scales", torch.tensor([f.scale for f in factors], dtype=base.weight.dtype))
        w = torch.full((n,), 1.0 / n) if weights is None else torch.tensor(list(weights), dtype=torch.float32)
        if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"MixedLoRALinear: weights must be {n} non-negative numbers with a positive sum")
        self.register_buffer("mix", (w / w.sum()).to(base.weight.dtype))
        if mode == "similarity":
            protos = torch.stack([top_right_singular(f.delta()) for f in factors])
            self.register_buffer("protos", protos.to(base.weight.dtype))

    def _row_weights(self, x2: torch.Tensor) -> torch.Tensor:
        if self.mode == "similarity":
            return torch.softmax((x2 @ self.protos.T).abs() / self.temperature, dim=-1)
        return self.mix.expand(x2.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        x2 = x.reshape(-1, x.shape[-1])
        n = self.lora_a.shape[0]
        if self.mode == "maxpool":
            outs = self._each(x2)  # [T, N, d_out]
            # A running where() over the N (few) experts: much faster on CPU than argmax + gather over a strided
            # size-N dimension; ties keep the earlier expert, as argmax would.
            delta = outs[:, 0]
            for i in range(1, n):
                delta = torch.where(outs[:, i].abs() > delta.abs(), outs[:, i], delta)
        else:
            w = self._row_weights(x2)
            if self.backend == "lora_ops":
                from lora_ops import grouped_lora

                ids = torch.arange(n).expand(x2.shape[0], n)
                delta = grouped_lora(x2, self.lora_a, self.lora_b, ids, scales=self.scales, weights=w.contiguous())
            else:
                delta = 0
                for i in range(n):
                    delta = delta + w[:, i:i + 1] * self.scales[i] * ((x2 @ self.lora_a[i].T) @ self.lora_b[i].T)
        return y + delta.reshape(*x.shape[:-1], -1).to(y.dtype)

    def _each(self, x2: torch.Tensor) -> torch.Tensor:
        """Every adapter's output for every row: ``[T, N, d_out]``."""
        n = self.lora_a.shape[0]
        if self.backend == "lora_ops":
            from lora_ops import grouped_lora

            xs = x2.unsqueeze(1).expand(-1, n, -1).reshape(-1, x2.shape[-1])
            ids = torch.arange(n).repeat(x2.shape[0])
            return grouped_lora(xs, self.lora_a, self.lora_b, ids, scales=self.scales).reshape(x2.shape[0], n, -1)
        return torch.stack([self.scales[i] * ((x2 @ self.lora_a[i].T) @ self.lora_b[i].T) for i in range(n)], 1)


def combine(base: nn.Module, adapters: Sequence[Adapter], mode: str = "mean", *,
            weights: Optional[Sequence[float]] = None, temperature: float = 1.0,
            backend: str = "lora_ops") -> nn.Module:
    """A copy of ``base`` whose Linear layers named in the adapters combine their N deltas (base untouched)."""
    if not adapters:
        return copy.deepcopy(base).eval()
    paths = set(adapters[0])
    for i, ad in enumerate(adapters[1:], 1):
        if set(ad) != paths:
            raise ValueError(f"combine: adapter {i} targets other modules than adapter 0")
    model = copy.deepcopy(base)
    for path in sorted(paths):
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        linear = getattr(parent, name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"combine: {path} is a {type(linear).__name__}, not nn.Linear")
        setattr(parent, name, MixedLoRALinear(linear, [ad[path] for ad in adapters], mode, weights, temperature,
                                              backend))
    return model.eval()


def adapter_from_dense(deltas: Mapping[str, torch.Tensor], rank: Optional[int]) -> Adapter:
    """Rank-``rank`` factors (scale 1, ``sqrt(S)`` in each factor) of dense per-module deltas by truncated SVD.

    ``rank=None`` keeps every module's full rank (an exact factorisation).
    """
    out: Adapter = {}
    for path, d in deltas.items():
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        rank_ = rank or s.shape[0]
        k = min(rank_, s.shape[0])
        root = s[:k].sqrt()
        a = torch.zeros(rank_, d.shape[1], dtype=torch.float64)
        b = torch.zeros(d.shape[0], rank_, dtype=torch.float64)
        a[:k] = root[:, None] * vh[:k]
        b[:, :k] = u[:, :k] * root[None, :]
        out[path] = Factors(a.to(d.dtype), b.to(d.dtype), 1.0)
    return out


def dense(adapter: Adapter) -> Dict[str, torch.Tensor]:
    return {path: f.delta() for path, f in adapter.items()}
