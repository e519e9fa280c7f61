"""PEFT interop: load PEFT LoRA adapters into per-layer ``AdapterBank`` s, save one back, and ``accelerate`` a
``PeftModel`` so that its ``adapter_names=`` mixed batches run through ``lora_ops.grouped_lora``.

Only plain LoRA on linear layers (``nn.Linear`` and GPT-2's ``Conv1D``, i.e. ``fan_in_fan_out``) is supported;
every PEFT feature that would change the math (DoRA, LoRA bias, embedding / conv LoRA, other PEFT types and LoRA
variants, extra trained modules) raises ``NotImplementedError`` naming it rather than giving different outputs.
"""

from __future__ import annotations

import math
import operator
import os
import re
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from lora_ops import _io, ops
from lora_ops.nn import AdapterBank, MultiLoRALinear, add_delta, lora_input

__all__ = ["load_adapters", "save_adapter", "accelerate", "deaccelerate", "merge_adapters"]

_PREFIX = "base_model.model."  # PEFT's prefix of module names in saved adapters
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)\.(?:(?P<adapter>[^.]+)\.)?weight$")

# Config switches that select math we do not implement (value must be falsy / default to be accepted).
_UNSUPPORTED_CONFIG = {
    "use_dora": "DoRA (use_dora=True)",
    "lora_bias": "LoRA bias (lora_bias=True)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora=True)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "PEFT's Arrow variant (arrow_config)",
    "velora_config": "VeLoRA (velora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on nn.Parameters (target_parameters)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
}


def _pattern_value(patterns: Mapping[str, Any], module: str, default):
    # PEFT matches rank_pattern / alpha_pattern keys as regexes against a suffix of the module name.
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_config(config: Mapping[str, Any], where: str) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper().replace("PEFTTYPE.", "")
    if peft_type != "LORA":
        raise NotImplementedError(f"{where}: PEFT type {peft_type} is not supported (only LORA)")
    for key, feature in _UNSUPPORTED_CONFIG.items():
        if config.get(key):
            raise NotImplementedError(f"{where}: {feature} is not supported by lora_ops")
    init = config.get("init_lora_weights")
    if init == "mica":
        raise NotImplementedError(f"{where}: the MiCA variant (init_lora_weights='mica') is not supported")


def _adapter_from_dir(path: Union[str, os.PathLike]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor, float]]:
    """``{module_name: (A, B, scale)}`` of one PEFT adapter folder (module names without PEFT's prefix)."""
    state, config = _io.read_peft_adapter_dir(path)
    _check_config(config, str(path))
    # Named features first (a folder with embedding LoRA also holds the full embedding weight, for example).
    for key in state:
        if "lora_embedding_" in key:
            raise NotImplementedError(f"{path}: embedding LoRA ({key}) is not supported")
        if "lora_magnitude_vector" in key:
            raise NotImplementedError(f"{path}: DoRA ({key}) is not supported")
        if re.search(r"\.lora_B\.(.+\.)?bias$", key):
            raise NotImplementedError(f"{path}: LoRA bias ({key}) is not supported")
    pairs: Dict[str, Dict[str, torch.Tensor]] = OrderedDict()
    for key, tensor in state.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise NotImplementedError(f"{path}: tensor {key!r} is not a LoRA A/B weight (unsupported PEFT feature)")
        module = m.group("module")
        module = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
        if tensor.dim() != 2:
            raise NotImplementedError(f"{path}: {key} has shape {list(tensor.shape)}: conv LoRA is not supported")
        pairs.setdefault(module, {})[m.group("which")] = tensor
    if not pairs:
        raise ValueError(f"{path}: the adapter holds no LoRA weights")
    out = OrderedDict()
    rslora = bool(config.get("use_rslora", False))
    for module, ab in pairs.items():
        for which in "AB":
            if which not in ab:
                raise ValueError(f"{path}: missing key {_PREFIX}{module}.lora_{which}.weight")
        a, b = ab["A"], ab["B"]
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"{path}: shape mismatch: {_PREFIX}{module}.lora_A.weight is {list(a.shape)} but "
                             f"lora_B.weight is {list(b.shape)} (ranks differ)")
        r = a.shape[0]
        cfg_r = _pattern_value(config.get("rank_pattern"), module, config.get("r", r))
        if cfg_r != r:
            raise ValueError(f"{path}: {_PREFIX}{module}.lora_A.weight has rank {r} but the config says r={cfg_r}")
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        out[module] = (a, b, alpha / math.sqrt(r) if rslora else alpha / r)
    return out


def _peft_lora_layers(model: nn.Module):
    """(module_name, layer) of every PEFT LoRA layer, names without PEFT's wrapper prefix."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield (name[len(_PREFIX):] if name.startswith(_PREFIX) else name), module


def _check_peft_layer(name: str, layer, adapter: str) -> None:
    from peft.tuners.lora import Linear

    if adapter in getattr(layer, "lora_embedding_A", {}):
        raise NotImplementedError(f"{name}: embedding LoRA (adapter {adapter!r}) is not supported")
    if not isinstance(layer, Linear):
        raise NotImplementedError(f"{name}: LoRA on {type(layer).__name__} layers is not supported (only Linear)")
    if layer.use_dora.get(adapter, False):
        raise NotImplementedError(f"{name}: DoRA (adapter {adapter!r}) is not supported")
    if getattr(layer, "lora_bias", {}).get(adapter, False) or layer.lora_B[adapter].bias is not None:
        raise NotImplementedError(f"{name}: LoRA bias (adapter {adapter!r}) is not supported")
    if adapter in getattr(layer, "lora_variant", {}):
        variant = type(layer.lora_variant[adapter]).__name__
        raise NotImplementedError(f"{name}: LoRA variant {variant} (adapter {adapter!r}) is not supported")


def _adapters_from_model(model: nn.Module, names: Optional[Sequence[str]]):
    """``(adapter names, {module: {adapter: (A, B, scale)}})`` of a PeftModel holding several adapters."""
    cfgs = getattr(model, "peft_config", {})
    names = list(names) if names is not None else list(cfgs)
    for n in names:
        if n not in cfgs:
            raise KeyError(f"load_adapters: the model has no adapter {n!r} (adapters: {list(cfgs)})")
        cfg = cfgs[n]
        _check_config(cfg.to_dict() if hasattr(cfg, "to_dict") else vars(cfg), f"adapter {n!r}")
    per_module: Dict[str, Dict[str, Tuple]] = OrderedDict()
    for module, layer in _peft_lora_layers(model):
        for n in names:
            if n in layer.lora_A or n in getattr(layer, "lora_embedding_A", {}):
                _check_peft_layer(module, layer, n)
                per_module.setdefault(module, {})[n] = (layer.lora_A[n].weight, layer.lora_B[n].weight,
                                                       layer.scaling[n])
    return names, per_module


def load_adapters(source: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], Mapping[str, Any], nn.Module],
                  names: Optional[Sequence[str]] = None, *, dtype: Optional[torch.dtype] = None, device=None,
                  trainable: bool = False) -> Dict[str, AdapterBank]:
    """``{module_name: AdapterBank}`` from PEFT adapter folders or a ``PeftModel`` holding several adapters.

    ``source``: one folder, a list of folders (adapter names = folder names unless ``names`` is given), a mapping
    ``{name: folder}``, or a ``PeftModel`` (``names`` selects adapters; default all). Module names are those of the
    base model (``model.layers.0.self_attn.q_proj``), as ``lora_ops.nn.wrap`` expects. Every bank holds every
    adapter in the same order; an adapter that does not target a module has rank 0 there (zeros: exact).
    Ranks and alphas may differ per adapter and per module (rank_pattern / alpha_pattern); rsLoRA scales by
    ``alpha / sqrt(r)``. Raises NotImplementedError for unsupported PEFT features, ValueError for missing keys or
    shape mismatches (naming the key).
    """
    if isinstance(source, nn.Module):
        names, per_module = _adapters_from_model(source, names)
    else:
        if isinstance(source, (str, os.PathLike)):
            source = [source]
        if isinstance(source, Mapping):
            folders = OrderedDict((str(k), v) for k, v in source.items())
        else:
            folders = list(source)
            keys = list(names) if names is not None else [Path(p).name for p in folders]
            if len(keys) != len(folders) or len(set(keys)) != len(keys):
                raise ValueError(f"load_adapters: need one distinct name per folder, got {keys}")
            folders = OrderedDict(zip(keys, folders))
        names = list(folders)
        per_module = OrderedDict()
        for n, folder in folders.items():
            for module, entry in _adapter_from_dir(folder).items():
                per_module.setdefault(module, {})[n] = entry
    banks = OrderedDict()
    for module, entries in per_module.items():
        adapters = OrderedDict((n, entries.get(n, (None, None, 0.0))) for n in names)
        try:
            banks[module] = AdapterBank.from_adapters(adapters, dtype=dtype, device=device, trainable=trainable)
        except ValueError as e:
            raise ValueError(f"load_adapters: module {module}: {e}") from None
    return banks


def _banks_of(source) -> Dict[str, AdapterBank]:
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, nn.Module):
        banks = {}
        for name, m in source.named_modules():
            if isinstance(m, MultiLoRALinear):
                banks[name] = m.bank
        if not banks:
            raise ValueError("save_adapter: the model has no MultiLoRALinear layers")
        return banks
    raise TypeError(f"save_adapter: expected {{module_name: AdapterBank}} or a wrapped model, got {type(source).__name__}")


def save_adapter(banks_or_model, name: str, path: Union[str, os.PathLike],
                 base_model_name_or_path: Optional[str] = None, *, fan_in_fan_out: Optional[bool] = None) -> Path:
    """Write adapter ``name`` of ``{module_name: AdapterBank}`` (or of a wrapped model) as a PEFT adapter folder.

    The folder (``adapter_model.safetensors`` + ``adapter_config.json``) appears atomically and loads with
    ``PeftModel.from_pretrained``. Each module is saved at the adapter's own rank; when ranks or scales differ
    between modules they go to ``rank_pattern`` / ``alpha_pattern`` (alpha = scale · r). ``fan_in_fan_out``
    (GPT-2 ``Conv1D`` bases; LoRA factors have the same layout either way) defaults to what a wrapped model's
    layers say, else False.
    """
    banks = _banks_of(banks_or_model)
    if fan_in_fan_out is None:
        fan_in_fan_out = isinstance(banks_or_model, nn.Module) and any(
            m._transposed for m in banks_or_model.modules() if isinstance(m, MultiLoRALinear))
    state, ranks, alphas = {}, {}, {}
    for module, bank in banks.items():
        i = bank.index(name)
        if i < 0:
            raise ValueError("save_adapter: name must be an adapter, not the base model")
        if bank.ranks[i] == 0:
            continue  # this adapter does not touch the module
        a, b, s = bank.adapter(i)
        state[f"{_PREFIX}{module}.lora_A.weight"] = a
        state[f"{_PREFIX}{module}.lora_B.weight"] = b
        ranks[module], alphas[module] = a.shape[0], s * a.shape[0]
    if not state:
        raise ValueError(f"save_adapter: adapter {name!r} has weights in no module")
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    anchored = lambda m: "^" + re.escape(m)  # noqa: E731  (a full name: PEFT matches patterns on a suffix)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {anchored(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {anchored(m): v for m, v in alphas.items() if v != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    return _io.write_peft_adapter_dir(path, state, config)


# --------------------------------------------------------------------------------------------------------------
# accelerate: PEFT's mixed batch through grouped_lora


class _Stacked:
    """What accelerate keeps per PEFT LoRA layer: the adapters' order, scales and which of them grouped_lora
    reproduces exactly (no variant, no LoRA bias), valid while the adapter set is unchanged; and the factors stacked
    once for calls without gradients, valid while the weights are unchanged (checked separately, so a training step,
    whose weights change every step, never pays for that copy)."""

    def __init__(self, layer):
        self.names = tuple(layer.lora_A.keys())
        self.scaling = dict(layer.scaling)
        self.params = [p for n in self.names for p in (layer.lora_A[n].weight, layer.lora_B[n].weight)]
        self.index = {n: i for i, n in enumerate(self.names)}
        self.routed = None  # (key, ids, used adapters) of the last batch composition (see route)
        variants = getattr(layer, "lora_variant", {})
        self.plain = frozenset(n for n in self.names if n not in variants and layer.lora_B[n].bias is None)
        self.dropout = {n: getattr(layer.lora_dropout[n], "p", 0.0) if isinstance(layer.lora_dropout[n], nn.Dropout)
                        else 0.0 for n in self.names}
        self.equal_ranks = len({p.shape[0] for p in self.params[::2]}) == 1
        self.stamp, self.stack = None, None

    def current(self, layer) -> bool:
        # runs for every LoRA layer of every forward (of every decoding step): no Python loop over the adapters
        return tuple(layer.lora_A.keys()) == self.names and layer.scaling == self.scaling

    def values(self) -> tuple:
        """(A [N, r, d_in], B [N, d_out, r], scales [N]), detached: restacked when a weight was loaded into (its
        version moves) or moved (its storage changes). The stamp is compared with C-level maps: a Python loop over
        the 2N parameters cost about as much as the grouped_lora call itself at decode shapes."""
        stamp = _stamp(self.params)
        if stamp != self.stamp:
            with torch.no_grad():
                bank = AdapterBank.from_adapters(OrderedDict(
                    (n, (a, b, self.scaling[n])) for n, a, b in zip(self.names, self.params[::2], self.params[1::2])))
            self.stack, self.stamp = (bank.lora_a.data, bank.lora_b.data, bank.scales), stamp
        return self.stack

    def differentiable(self) -> tuple:
        """The same stack built by autograd-tracked ops, so gradients reach PEFT's own parameters (training): one
        ``stack`` per factor when the ranks agree (the usual case: one node each way), zero-padding otherwise."""
        a, b = self.params[::2], self.params[1::2]
        if not self.equal_ranks:
            r = max(t.shape[0] for t in a)
            a = [nn.functional.pad(t, (0, 0, 0, r - t.shape[0])) for t in a]
            b = [nn.functional.pad(t, (0, r - t.shape[1])) for t in b]
        scales = torch.tensor([float(self.scaling[n]) for n in self.names], dtype=a[0].dtype, device=a[0].device)
        return torch.stack(a), torch.stack(b), scales

    def route(self, adapter_names: List[str], x: torch.Tensor):
        """(ids expanded over x's leading dims, set of adapters used) of this batch composition: built once, then
        reused by every later call with the same names and shape (each decoding step, each repeated batch). The key
        holds inference mode: an inference tensor cannot be saved for a backward."""
        lead = x.shape[:-1]
        key = (tuple(adapter_names), lead, x.device, torch.is_inference_mode_enabled())
        if self.routed is None or self.routed[0] != key:
            ids = torch.tensor([self.index.get(n, -1) for n in adapter_names], dtype=torch.int64, device=x.device)
            ids = ids.reshape((-1,) + (1,) * (len(lead) - 1)).expand(lead)
            self.routed = (key, ids, {n for n in adapter_names if n in self.index})
        return self.routed[1], self.routed[2]


_VERSION = operator.attrgetter("_version")


def _stamp(params) -> tuple:
    return list(map(torch.Tensor.data_ptr, params)), list(map(_VERSION, params))


def _stacked(layer) -> _Stacked:
    st = layer.__dict__.get("_lora_ops_bank")
    if st is None or not st.current(layer):
        st = _Stacked(layer)
        layer._lora_ops_bank = st
    return st


def _fast_path_ok(layer, st: _Stacked, used: set) -> bool:
    """Whether grouped_lora gives exactly PEFT's result for this call (else PEFT's own method runs)."""
    if not used <= st.plain:
        return False  # LoRA variants (DoRA, ...) and LoRA bias: PEFT's code
    # PEFT samples dropout per adapter sub-batch: keep its exact behaviour in training
    return not layer.training or all(st.dropout[n] == 0 for n in used)


def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: List[str], **kwargs: Any) -> torch.Tensor:
    """Drop-in for PEFT's ``Linear._mixed_batch_forward``: one ``grouped_lora`` call instead of a loop over adapters."""
    st = _stacked(self)
    ids, used = st.route(adapter_names, x)
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in st.params))
    if not used or not _fast_path_ok(self, st, used):
        return self._lora_ops_original_mixed(x, *args, adapter_names=adapter_names, **kwargs)
    for k in ("alora_offsets",):  # variant-only arguments PEFT strips before calling the base layer
        kwargs.pop(k, None)
    result = self.base_layer(x, *args, **kwargs)
    # inference: the cached copy; training: a fresh differentiable stack (same adapter order, so the same ids),
    # so gradients reach PEFT's parameters
    lora_a, lora_b, scales = st.differentiable() if grad else st.values()
    # ids come from the bank's own index: always valid, so no range check (and no reduction) is needed
    delta = ops.grouped_lora(lora_input(x, lora_a.dtype), lora_a, lora_b, ids, scales=scales, check_ids=False)
    return add_delta(result, delta)


def accelerate(peft_model: nn.Module) -> nn.Module:
    """Route ``peft_model(..., adapter_names=[...])`` mixed batches through ``lora_ops.grouped_lora`` (in place).

    Every PEFT LoRA ``Linear`` layer gets its ``_mixed_batch_forward`` replaced; its adapters are stacked into a
    bank on first use and restacked whenever adapters are added, removed or their weights change. Calls without
    ``adapter_names`` are untouched (PEFT's own forward). Cases grouped_lora would not reproduce exactly fall back
    to PEFT per call: LoRA variants (DoRA...), LoRA bias, dropout in training mode. Calls that need gradients stack
    the factors differentiably, so gradients reach PEFT's parameters through grouped_lora's backward. Returns the
    model. Idempotent.
    """
    from peft.tuners.lora import Linear

    n = 0
    for _, layer in _peft_lora_layers(peft_model):
        if not isinstance(layer, Linear):
            continue  # embeddings / convs keep PEFT's path
        # keyed on the method in place, not on the saved original: whoever removed ours (a toggle that pops it to
        # compare with PEFT's path) gets it back, and a second call never wraps ours in ours
        if getattr(layer.__dict__.get("_mixed_batch_forward"), "__func__", None) is not _mixed_batch_forward:
            layer._lora_ops_original_mixed = layer._mixed_batch_forward
            layer._mixed_batch_forward = types.MethodType(_mixed_batch_forward, layer)
        n += 1
    if n == 0:
        raise ValueError("accelerate: the model has no PEFT LoRA Linear layers")
    return peft_model


def deaccelerate(peft_model: nn.Module) -> nn.Module:
    """Undo ``accelerate``: PEFT's own ``_mixed_batch_forward`` again on every layer (cached banks dropped)."""
    for _, layer in _peft_lora_layers(peft_model):
        original = layer.__dict__.pop("_lora_ops_original_mixed", None)
        if original is not None:
            layer.__dict__.pop("_mixed_batch_forward", None)  # the instance attribute shadowed the class method
            layer.__dict__.pop("_lora_ops_bank", None)
    return peft_model


def merge_adapters(adapters, weights=None, method: str = "svd", *, out=None, **kwargs):
    """Merges PEFT adapters (folders or ``(state_dict, config)`` pairs) into one, like PEFT's
    ``add_weighted_adapter``; see :func:`lora_ops.merge.merge_peft_adapters` for the methods and options.

    Returns ``(state_dict, config)``; with ``out`` the merged adapter is also written there as a PEFT adapter folder
    (atomically).
    """
    from lora_ops._io import write_peft_adapter_dir
    from lora_ops.merge import merge_peft_adapters

    state_dict, config = merge_peft_adapters(adapters, weights, method, **kwargs)
    if out is not None:
        write_peft_adapter_dir(out, state_dict, config)
    return state_dict, config
