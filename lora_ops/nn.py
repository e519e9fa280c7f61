"""Modules for models that serve or train many LoRA adapters at once: ``AdapterBank``, ``MultiLoRALinear``, ``wrap``.

A wrapped layer computes ``base(x) + grouped_lora(dropout(x), bank, ids)``: every row of the batch picks its own
adapter (``-1`` = base model only) or a weighted top-k mixture of adapters (router output). Ids reach a layer in
one of three ways, first match wins: the ``adapter_ids=`` argument of ``forward``; ids set on the layer (or on the
whole model) with ``set_adapter_ids`` / the ``adapter_ids(model, ids)`` context; the layer's ``router``.
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from lora_ops import ops

__all__ = [
    "AdapterBank",
    "MultiLoRALinear",
    "wrap",
    "set_adapter_ids",
    "adapter_ids",
    "reference_op",
    "per_adapter_loss",
    "BASE",
]

BASE = "__base__"  # PEFT's name for "no adapter" in mixed batches; id -1

Ids = Union[torch.Tensor, Sequence[Union[int, str, None]]]


_op_override: Optional[Callable[..., torch.Tensor]] = None


@contextlib.contextmanager
def reference_op():
    """Inside the block, ``MultiLoRALinear`` uses the pure-torch ``lora_ops.reference.grouped_lora`` (slow, but
    differentiable through plain autograd): for debugging gradients against the op's own backward."""
    from lora_ops import reference

    global _op_override
    saved = _op_override
    _op_override = lambda *args, check_ids=True, **kwargs: reference.grouped_lora(*args, **kwargs)  # noqa: E731
    try:
        yield
    finally:
        _op_override = saved


def _conv1d_type():
    # transformers' GPT-2 style Conv1D (weight [d_in, d_out], y = x @ W + b); optional dependency.
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a test/bench extra
        return ()
    return (Conv1D,)


def _in_out_features(base: nn.Module) -> Tuple[int, int, bool]:
    """(d_in, d_out, weight_is_transposed) of an ``nn.Linear`` or a transformers ``Conv1D``."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if isinstance(base, _conv1d_type()):
        d_in, d_out = base.weight.shape
        return d_in, d_out, True
    raise TypeError(f"base must be an nn.Linear or a transformers Conv1D, got {type(base).__name__}")


class AdapterBank(nn.Module):
    """N LoRA adapters of one layer, stacked: ``lora_a [N, r, d_in]``, ``lora_b [N, d_out, r]``, ``scales [N]``.

    An ``nn.Module`` (not a plain container) so that the factors follow ``model.to(...)``, show up in
    ``model.parameters()`` for an optimizer and in ``state_dict()``. ``lora_a`` / ``lora_b`` are parameters
    (``requires_grad`` = ``trainable``), ``scales`` a buffer. Adapters of lower rank are zero-padded up to ``r``:
    exact in the forward, and in training the padded rows/columns get exactly zero gradient (a padded row of A only
    meets a zero column of B and vice versa), so they stay zero. ``ranks[i]`` is adapter i's own rank (0 = the
    adapter does not touch this layer).
    """

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor, names: Sequence[str],
                 ranks: Optional[Sequence[int]] = None, *, trainable: bool = False):
        super().__init__()
        if lora_a.dim() != 3 or lora_b.dim() != 3:
            raise ValueError(f"AdapterBank: lora_a must be [N, r, d_in] and lora_b [N, d_out, r], got "
                             f"{list(lora_a.shape)} and {list(lora_b.shape)}")
        n, r, _ = lora_a.shape
        if lora_b.shape[0] != n or lora_b.shape[2] != r:
            raise ValueError(f"AdapterBank: lora_b must have shape [{n}, d_out, {r}], got {list(lora_b.shape)}")
        names = list(names)
        if len(names) != n or len(set(names)) != n:
            raise ValueError(f"AdapterBank: names must be {n} distinct names, got {names}")
        if BASE in names:
            raise ValueError(f"AdapterBank: {BASE!r} is reserved for the base model and cannot name an adapter")
        if tuple(scales.shape) != (n,):
            raise ValueError(f"AdapterBank: scales must have shape [{n}], got {list(scales.shape)}")
        self.names: List[str] = names
        self.ranks: List[int] = [r] * n if ranks is None else [int(v) for v in ranks]
        if len(self.ranks) != n or any(not 0 <= v <= r for v in self.ranks):
            raise ValueError(f"AdapterBank: ranks must be {n} values in [0, {r}], got {self.ranks}")
        self.lora_a = nn.Parameter(lora_a, requires_grad=trainable)
        self.lora_b = nn.Parameter(lora_b, requires_grad=trainable)
        self.register_buffer("scales", scales.to(lora_a.dtype))

    @classmethod
    def from_adapters(cls, adapters: Mapping[str, Tuple[Optional[torch.Tensor], Optional[torch.Tensor], float]], *,
                      d_in: Optional[int] = None, d_out: Optional[int] = None, dtype=None, device=None,
                      trainable: bool = False) -> "AdapterBank":
        """Stack ``{name: (A [r_i, d_in], B [d_out, r_i], scale_i)}`` of mixed ranks, zero-padded to the largest.

        ``(None, None, scale)`` marks an adapter that does not touch this layer (all zeros; then ``d_in`` and
        ``d_out`` must be known from another adapter or given).
        """
        if not adapters:
            raise ValueError("AdapterBank.from_adapters: adapters is empty")
        for name, (a, b, _) in adapters.items():
            if (a is None) != (b is None):
                raise ValueError(f"AdapterBank.from_adapters: adapter {name!r} has only one of A and B")
            if a is None:
                continue
            if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
                raise ValueError(f"AdapterBank.from_adapters: adapter {name!r} needs A [r, d_in] and B [d_out, r], "
                                 f"got {list(a.shape)} and {list(b.shape)}")
            for what, want, got in (("d_in", d_in, a.shape[1]), ("d_out", d_out, b.shape[0])):
                if want is not None and want != got:
                    raise ValueError(f"AdapterBank.from_adapters: adapter {name!r} has {what} = {got}, expected {want}")
            d_in, d_out = a.shape[1], b.shape[0]
            dtype = dtype or a.dtype
            device = device or a.device
        if d_in is None or d_out is None:
            raise ValueError("AdapterBank.from_adapters: no adapter has weights and d_in / d_out were not given")
        dtype = dtype or torch.get_default_dtype()
        ranks = [0 if a is None else a.shape[0] for a, _, _ in adapters.values()]
        r = max(max(ranks), 1)
        n = len(adapters)
        lora_a = torch.zeros(n, r, d_in, dtype=dtype, device=device)
        lora_b = torch.zeros(n, d_out, r, dtype=dtype, device=device)
        for i, (a, b, _) in enumerate(adapters.values()):
            if a is not None:
                lora_a[i, : a.shape[0]] = a.detach().to(dtype=dtype, device=device)
                lora_b[i, :, : b.shape[1]] = b.detach().to(dtype=dtype, device=device)
        scales = torch.tensor([float(s) for _, _, s in adapters.values()], dtype=dtype, device=device)
        return cls(lora_a, lora_b, scales, list(adapters), ranks, trainable=trainable)

    @classmethod
    def new(cls, layer: nn.Module, names: Sequence[str], rank: int, alpha: float, *, use_rslora: bool = False,
            trainable: bool = True) -> "AdapterBank":
        """Fresh adapters for ``layer`` (``nn.Linear`` / ``Conv1D``) initialised like PEFT's default: A like an
        ``nn.Linear`` weight (Kaiming-uniform), B = 0, scale ``alpha / rank`` (rsLoRA: ``alpha / sqrt(rank)``)."""
        d_in, d_out, _ = _in_out_features(layer)
        w = layer.weight
        a = torch.empty(len(names), rank, d_in, dtype=w.dtype, device=w.device)
        for i in range(len(names)):
            nn.init.kaiming_uniform_(a[i], a=5 ** 0.5)
        b = torch.zeros(len(names), d_out, rank, dtype=w.dtype, device=w.device)
        scale = alpha / (rank ** 0.5 if use_rslora else rank)
        return cls(a, b, torch.full((len(names),), scale, device=w.device), names, trainable=trainable)

    @property
    def rank(self) -> int:
        return self.lora_a.shape[1]

    @property
    def d_in(self) -> int:
        return self.lora_a.shape[2]

    @property
    def d_out(self) -> int:
        return self.lora_b.shape[1]

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: Union[str, int, None]) -> int:
        """Position of adapter ``name`` (an int is checked and returned; ``None`` / ``"__base__"`` give -1)."""
        if name is None or name == BASE:
            return -1
        if isinstance(name, int):
            if not -1 <= name < len(self.names):
                raise IndexError(f"adapter index {name} out of range for a bank of {len(self.names)} adapters")
            return name
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no adapter named {name!r} in this bank (adapters: {self.names})") from None

    def adapter(self, name: Union[str, int]) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """(A [r_i, d_in], B [d_out, r_i], scale) of one adapter, at its own rank (views of the bank)."""
        i = self.index(name)
        if i < 0:
            raise KeyError("the base model has no adapter factors")
        r = self.ranks[i]
        return self.lora_a[i, :r], self.lora_b[i, :, :r], float(self.scales[i])

    def delta_weight(self, name: Union[str, int]) -> torch.Tensor:
        """``scale · B · A`` of one adapter, ``[d_out, d_in]``, computed in float32 (float64 for float64 banks)."""
        a, b, s = self.adapter(name)
        dt = torch.float64 if a.dtype == torch.float64 else torch.float32
        return s * (b.detach().to(dt) @ a.detach().to(dt))

    def ids(self, names: Ids, device=None) -> torch.Tensor:
        """Adapter names / indices (``None`` or ``"__base__"`` = -1) as an int64 tensor; tensors pass through."""
        if isinstance(names, torch.Tensor):
            return names
        return torch.tensor([self.index(v) for v in names], dtype=torch.int64, device=device)

    def extra_repr(self) -> str:
        return f"n={len(self)}, r={self.rank}, d_in={self.d_in}, d_out={self.d_out}, names={self.names}"


def add_delta(result: torch.Tensor, delta: torch.Tensor, *, owned: bool = False) -> torch.Tensor:
    """``result + delta`` in result's dtype; in place when no autograd graph is recorded, or when ``owned`` says
    that nothing saved ``result`` for backward (a plain ``nn.Linear`` output: its backward keeps the input and the
    weight only). In place saves an allocation of the layer's whole output, a sizeable share of the LoRA cost on
    CPU, where every fresh tensor of that size is page-faulted in again."""
    delta = delta.to(result.dtype)
    if torch.compiler.is_compiling():
        return result + delta  # dynamo cannot trace the mode checks; inductor fuses the add anyway
    if (owned and result.dtype == delta.dtype and not result._is_view()) or torch.is_inference_mode_enabled() or not (
            torch.is_grad_enabled() and (result.requires_grad or delta.requires_grad)):
        return result.add_(delta)
    return result + delta


def lora_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as grouped_lora's input next to factors of ``dtype``: cast outside autocast (a bf16 model may carry fp32
    factors), left as is under autocast for x's device, where the op casts x and the factors to the autocast dtype
    like ``nn.Linear`` (a cast to the factors' fp32 first would only add two copies of x)."""
    if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(dtype)


Router = Callable[[torch.Tensor], Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]]


class MultiLoRALinear(nn.Module):
    """``base(x) + grouped_lora(dropout(x), bank, ids)``: a linear layer serving every adapter of ``bank`` at once.

    ``base`` is an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2; its weight is ``[d_in, d_out]``, so merging
    transposes the delta). Ids, first match wins: ``forward(x, adapter_ids=...)``; ids set with
    ``set_adapter_ids`` (or model-wide with ``lora_ops.nn.adapter_ids(model, ids)``); ``router(x)`` returning
    ``ids [..., k]`` or ``(ids [..., k], weights [..., k])``. Ids may be ``x.shape[:-1]`` (per token),
    ``x.shape[:-1] + (k,)`` (top-k), or a prefix of ``x.shape[:-1]`` such as ``[B]`` for ``x [B, S, d]``
    (one adapter per sequence, broadcast). Names (``str``) are accepted in lists and mapped through the bank.

    Dropout (``lora_dropout`` p) is applied to the LoRA input only and only in training, one sample of x shared
    by all adapters (PEFT applies each adapter's dropout to the rows that use it: the same distribution).
    """

    def __init__(self, base: nn.Module, bank: AdapterBank, *, lora_dropout: float = 0.0,
                 router: Optional[Router] = None, check_ids: bool = True):
        super().__init__()
        d_in, d_out, self._transposed = _in_out_features(base)
        if (bank.d_in, bank.d_out) != (d_in, d_out):
            raise ValueError(f"MultiLoRALinear: bank is {bank.d_in} -> {bank.d_out} but base is {d_in} -> {d_out}")
        self.base = base
        self.bank = bank
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.router = router
        self.check_ids = check_ids
        self._ids: Optional[torch.Tensor] = None
        self._weights: Optional[torch.Tensor] = None
        self.merged_index: Optional[int] = None

    @property
    def in_features(self) -> int:
        return self.bank.d_in

    @property
    def out_features(self) -> int:
        return self.bank.d_out

    @property
    def weight(self) -> torch.Tensor:  # some model code reads layer.weight (dtype / device probes)
        return self.base.weight

    def set_adapter_ids(self, ids: Optional[Ids], weights: Optional[torch.Tensor] = None) -> None:
        """Ids (and optional top-k weights) used by the following forwards; ``None`` clears them."""
        self._ids = None if ids is None else self.bank.ids(ids)
        self._weights = weights

    def _resolve(self, x: torch.Tensor, adapter_ids, weights):
        if adapter_ids is None and self._ids is not None:
            adapter_ids, weights = self._ids, self._weights if weights is None else weights
        if adapter_ids is None and self.router is not None:
            routed = self.router(x)
            adapter_ids, weights = routed if isinstance(routed, tuple) else (routed, weights)
        if adapter_ids is None:
            raise ValueError("MultiLoRALinear: no adapter_ids: pass adapter_ids=, call set_adapter_ids(ids), use "
                             "`with lora_ops.nn.adapter_ids(model, ids)`, or set a router (-1 = base model only)")
        ids = self.bank.ids(adapter_ids, device=x.device).to(x.device)
        lead = tuple(x.shape[:-1])
        if ids.dim() < len(lead) and tuple(ids.shape) == lead[: ids.dim()]:
            # one id per sequence (or per leading index): broadcast over the remaining leading dims
            view = tuple(ids.shape) + (1,) * (len(lead) - ids.dim())
            ids = ids.reshape(view).expand(lead)
            if weights is not None:
                raise ValueError("MultiLoRALinear: weights need ids of shape x.shape[:-1] + (k,), not per-sequence ids")
        return ids, weights

    def forward(self, x: torch.Tensor, adapter_ids: Optional[Ids] = None,
                weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x ``[..., d_in]`` -> ``[..., d_out]``."""
        result = self.base(x)
        if self.merged_index is not None:
            if adapter_ids is not None or self._ids is not None:
                ids, _ = self._resolve(x, adapter_ids, weights)
                if bool((ids != self.merged_index).any()):
                    raise ValueError(f"MultiLoRALinear: adapter {self.bank.names[self.merged_index]!r} is merged "
                                     "into the base weight; call unmerge() before serving other adapter_ids")
            return result
        ids, weights = self._resolve(x, adapter_ids, weights)
        bank = self.bank
        op = _op_override or ops.grouped_lora
        h = lora_input(self.lora_dropout(x), bank.lora_a.dtype)
        delta = op(h, bank.lora_a, bank.lora_b, ids, scales=bank.scales, weights=weights,
                                 check_ids=self.check_ids)
        return add_delta(result, delta, owned=type(self.base) is nn.Linear)

    @torch.no_grad()
    def merge(self, name_or_index: Union[str, int]) -> None:
        """Fold one adapter's ``scale · B · A`` into the base weight; forwards then return ``base(x)`` only."""
        if self.merged_index is not None:
            raise RuntimeError(f"MultiLoRALinear: adapter {self.bank.names[self.merged_index]!r} is already merged; "
                               "unmerge() first")
        i = self.bank.index(name_or_index)
        if i < 0:
            raise ValueError("MultiLoRALinear.merge: the base model has nothing to merge")
        self._add_delta(i, 1.0)
        self.merged_index = i

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapter again (the same fp32 delta, so the weight returns to fp32 rounding)."""
        if self.merged_index is None:
            return
        self._add_delta(self.merged_index, -1.0)
        self.merged_index = None

    def _add_delta(self, i: int, sign: float) -> None:
        w = self.base.weight
        delta = self.bank.delta_weight(i)
        if self._transposed:
            delta = delta.T
        w.copy_((w.to(delta.dtype) + sign * delta).to(w.dtype))

    def extra_repr(self) -> str:
        return f"transposed_base={self._transposed}, merged={self.merged_index}, router={self.router is not None}"


def _matches(name: str, target_modules: Union[str, Sequence[str], None]) -> bool:
    # PEFT's convention: a string is a regex matched against the whole module name; a list matches exact names
    # or name suffixes on a "." boundary.
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


BankSource = Union[Mapping[str, AdapterBank], Callable[[str, nn.Module], Optional[AdapterBank]]]


def wrap(model: nn.Module, adapters: BankSource, target_modules: Union[str, Sequence[str], None] = None, *,
         lora_dropout: float = 0.0, router: Optional[Router] = None, check_ids: bool = True) -> nn.Module:
    """Replace targeted ``nn.Linear`` / ``Conv1D`` layers of ``model`` (in place) by ``MultiLoRALinear``.

    ``adapters``: ``{module_name: AdapterBank}`` (what ``lora_ops.peft.load_adapters`` returns; module names as in
    ``model.named_modules()``), or a callable ``(module_name, layer) -> AdapterBank | None``. ``target_modules``:
    a list of names (exact or ``.``-suffix match) or a regex string (full match), like PEFT; default: every module
    that ``adapters`` has a bank for. Every bank of a mapping must find its module (ValueError otherwise).
    Returns ``model``; set ids for all wrapped layers with ``adapter_ids(model, ids)`` or ``set_adapter_ids``.
    """
    linear_types = (nn.Linear,) + _conv1d_type()
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, linear_types) or not _matches(name, target_modules):
            continue
        if isinstance(adapters, Mapping):
            bank = adapters.get(name)
        else:
            bank = adapters(name, module)
        if bank is None:
            continue
        layer = MultiLoRALinear(module, bank, lora_dropout=lora_dropout, router=router, check_ids=check_ids)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        replaced.append(name)
    if isinstance(adapters, Mapping):
        missing = sorted(set(adapters) - set(replaced))
        if missing:
            raise ValueError(f"wrap: no targeted nn.Linear/Conv1D named {missing[0]!r} in the model "
                             f"({len(missing)} bank(s) unused: {missing[:4]})")
    if not replaced:
        raise ValueError(f"wrap: target_modules={target_modules!r} matched no nn.Linear/Conv1D with an adapter bank")
    return model


def multi_lora_layers(model: nn.Module) -> Iterator[MultiLoRALinear]:
    return (m for m in model.modules() if isinstance(m, MultiLoRALinear))


def set_adapter_ids(model: nn.Module, ids: Optional[Ids], weights: Optional[torch.Tensor] = None) -> None:
    """Set (``None``: clear) the ids of every ``MultiLoRALinear`` in ``model``; ``[B]`` ids are broadcast per layer."""
    layers = list(multi_lora_layers(model))
    if not layers:
        raise ValueError("set_adapter_ids: the model has no MultiLoRALinear layers (call lora_ops.nn.wrap first)")
    for layer in layers:
        layer.set_adapter_ids(ids, weights)


@contextlib.contextmanager
def adapter_ids(model: nn.Module, ids: Ids, weights: Optional[torch.Tensor] = None):
    """``with adapter_ids(model, ids): model(input_ids)`` — every wrapped layer uses ``ids``; restored afterwards."""
    layers = list(multi_lora_layers(model))
    saved = [(layer._ids, layer._weights) for layer in layers]
    set_adapter_ids(model, ids, weights)
    try:
        yield model
    finally:
        for layer, (i, w) in zip(layers, saved):
            layer._ids, layer._weights = i, w


def per_adapter_loss(row_losses: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``Σ_i mean(row_losses[ids == i])`` over the adapters present (``-1`` rows are ignored).

    Training many adapters in one batch with this loss gives every adapter exactly the gradient it would get from
    training alone on its own rows with a mean loss (a plain mean over the whole batch would scale adapter i's
    gradient by its share of the rows). ``row_losses [B]``, ``ids [B]`` (one adapter per sequence).
    """
    if row_losses.shape != ids.shape:
        raise ValueError(f"per_adapter_loss: row_losses {list(row_losses.shape)} and ids {list(ids.shape)} differ")
    present = ids[ids >= 0].unique()
    if present.numel() == 0:
        return row_losses.sum() * 0
    one_hot = (ids[None, :] == present[:, None]).to(row_losses.dtype)  # [n_present, B]
    return ((one_hot @ row_losses) / one_hot.sum(1)).sum()
