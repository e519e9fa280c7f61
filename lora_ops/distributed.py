"""Tensor parallelism for many adapters: DTensor sharding rules of ``grouped_lora`` (and its backward) and
parallel styles that shard a ``MultiLoRALinear`` together with its adapter bank.

Sharding rules (registered with ``torch.distributed.tensor.experimental.register_sharding`` on import):

============  ======================  ==============  ==============  =========================================
layout        x                       lora_a          lora_b          output  (backward: grad_x, grad_a, grad_b)
============  ======================  ==============  ==============  =========================================
replicated    Replicate               Replicate       Replicate       Replicate  (R, R, R)
column        Replicate               Replicate       Shard(1) d_out  Shard(-1)  (Partial, Partial, Shard(1))
row           Shard(-1) d_in          Shard(2) d_in   Replicate       Partial    (Shard(-1), Shard(2), Partial)
batch         Shard(d), ids Shard(d)  Replicate       Replicate       Shard(d)   (Shard(d), Partial, Partial)
============  ======================  ==============  ==============  =========================================

The row layout's Partial output is reduced together with the base layer's own partial output (one all-reduce for
``base(x) + delta``). ``adapter_ids``, ``scales`` and ``weights`` are replicated (sharded with x in the batch layout).

``ColwiseLoRAParallel`` / ``RowwiseLoRAParallel`` are ``ParallelStyle`` s for ``parallelize_module`` that shard a
``MultiLoRALinear``'s base weight and its bank consistently (as torch's ``ColwiseParallel`` / ``RowwiseParallel`` do
for an ``nn.Linear``); :func:`parallelize_multi_lora` applies them from a ``{module name pattern: "colwise" |
"rowwise"}`` plan.
"""

from __future__ import annotations

from typing import Mapping, Union

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.experimental import register_sharding
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from lora_ops import ops  # noqa: F401  (registers the op's fake implementation and autograd first)
from lora_ops.nn import MultiLoRALinear

__all__ = ["ColwiseLoRAParallel", "RowwiseLoRAParallel", "parallelize_multi_lora"]


def _opt(spec, placement):
    return None if spec is None else placement


@register_sharding(torch.ops.lora_ops.grouped_lora.default)
def _grouped_lora_sharding(x, lora_a, lora_b, adapter_ids, scales=None, weights=None, check_ids=True):
    R, last = Replicate(), x.ndim - 1
    rep = lambda *head: [*head, R, _opt(scales, R), _opt(weights, R), None]  # noqa: E731  (ids, scales, weights)
    rules = [
        ([R], rep(R, R, R)),  # everything replicated
        ([Shard(last)], rep(R, R, Shard(1))),  # column-parallel: d_out sharded
        ([Partial()], rep(Shard(last), Shard(2), R)),  # row-parallel: d_in sharded, partial sums
    ]
    for d in range(last):  # data-parallel over a leading dim: rows sharded with their ids
        rules.append(([Shard(d)], [Shard(d), R, R, Shard(d), _opt(scales, R), _opt(weights, Shard(d)), None]))
    return rules


@register_sharding(torch.ops.lora_ops.grouped_lora_backward.default)
def _grouped_lora_backward_sharding(grad_out, x, lora_a, lora_b, adapter_ids, scales, weights, output_mask):
    R, P, last = Replicate(), Partial(), x.ndim - 1

    def outs(*placements):  # an output not asked for is an empty tensor: call it replicated
        return [p if need else R for p, need in zip(placements, output_mask)]

    def ins(g, xx, a, b, ids=R, w=R):
        return [g, xx, a, b, ids, _opt(scales, R), _opt(weights, w), None]

    rules = [
        (outs(R, R, R, R), ins(R, R, R, R)),
        (outs(P, P, Shard(1), P), ins(Shard(last), R, R, Shard(1))),
        (outs(Shard(last), Shard(2), P, P), ins(R, Shard(last), Shard(2), R)),
    ]
    for d in range(last):
        rules.append((outs(Shard(d), P, P, Shard(d)), ins(Shard(d), Shard(d), R, R, Shard(d), Shard(d))))
    return rules


def _normalized(placement, ndim: int):
    return Shard(placement.dim + ndim) if isinstance(placement, Shard) and placement.dim < 0 else placement


class _LoRAParallel(ParallelStyle):
    """Shared part of the two styles: distribute the base weight and the bank, convert inputs and ids to DTensors
    on the way in, and the output back to a local tensor (or keep the DTensor) on the way out."""

    weight_dim: int  # base.weight [d_out, d_in]: 0 column, 1 row
    bias: object
    lora_a: object
    lora_b: object

    def __init__(self, *, input_layout=None, output_layout=None, use_local_output: bool = True):
        super().__init__()
        self.input_layout = input_layout or self.default_input
        self.output_layout = output_layout or self.default_output
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, mesh) -> nn.Module:
        if not isinstance(module, MultiLoRALinear):
            raise TypeError(f"{type(self).__name__} applies to MultiLoRALinear layers, got {type(module).__name__}")
        if module._transposed or not isinstance(module.base, nn.Linear):
            raise NotImplementedError(f"{type(self).__name__}: only nn.Linear bases are supported (not Conv1D)")
        if module.router is not None:
            raise NotImplementedError(f"{type(self).__name__}: routed layers are not supported; pass adapter_ids")

        def put(owner: nn.Module, name: str, placement) -> None:
            t = getattr(owner, name)
            if t is None:
                return
            d = distribute_tensor(t.detach(), mesh, [placement])
            if isinstance(t, nn.Parameter):
                owner.register_parameter(name, nn.Parameter(d, requires_grad=t.requires_grad))
            else:
                owner.register_buffer(name, d)

        put(module.base, "weight", Shard(self.weight_dim))
        put(module.base, "bias", self.bias)
        put(module.bank, "lora_a", self.lora_a)
        put(module.bank, "lora_b", self.lora_b)
        put(module.bank, "scales", Replicate())
        for p in (module.bank.lora_a, module.bank.lora_b, module.base.weight, module.base.bias):
            if p is not None and p.requires_grad and p.placements == (Replicate(),):
                # a replicated factor's gradient comes out Partial (each rank saw a shard); reduce it right away
                # so every rank holds the full gradient after backward, as for an unsharded parameter
                p.register_hook(lambda g: g.redistribute(placements=[Replicate()]))
        module.register_forward_pre_hook(lambda m, args, kwargs: self._inputs(m, mesh, args, kwargs),
                                         with_kwargs=True)
        module.register_forward_hook(lambda m, args, out: self._output(out))
        return module

    def _inputs(self, module: MultiLoRALinear, mesh, args, kwargs):
        x, *rest = args
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [_normalized(self.input_layout, x.ndim)], run_check=False)
        ids = kwargs.get("adapter_ids", rest[0] if rest else None)
        weights = kwargs.get("weights", rest[1] if len(rest) > 1 else None)
        if ids is None:
            ids, weights = module._ids, module._weights if weights is None else weights
        as_dt = lambda t: t if t is None or isinstance(t, DTensor) else DTensor.from_local(  # noqa: E731
            module.bank.ids(t, device=x.device), mesh, [Replicate()], run_check=False)
        return (x,), {"adapter_ids": as_dt(ids), "weights": as_dt(weights)}

    def _output(self, out: DTensor):
        want = _normalized(self.output_layout, out.ndim)
        if out.placements != (want,):
            out = out.redistribute(placements=[want])
        return out.to_local() if self.use_local_output else out


class ColwiseLoRAParallel(_LoRAParallel):
    """Column-parallel ``MultiLoRALinear``: base weight and ``lora_b`` sharded over d_out, ``lora_a`` replicated;
    input replicated, output sharded on its last dim (local shard returned by default)."""

    weight_dim, bias, lora_a, lora_b = 0, Shard(0), Replicate(), Shard(1)
    default_input, default_output = Replicate(), Shard(-1)


class RowwiseLoRAParallel(_LoRAParallel):
    """Row-parallel ``MultiLoRALinear``: base weight and ``lora_a`` sharded over d_in, ``lora_b`` replicated;
    input sharded on its last dim; the base's and the adapters' partial sums are all-reduced together."""

    weight_dim, bias, lora_a, lora_b = 1, Replicate(), Shard(2), Replicate()
    default_input, default_output = Shard(-1), Replicate()


_STYLES = {"colwise": ColwiseLoRAParallel, "rowwise": RowwiseLoRAParallel}


def parallelize_multi_lora(model: nn.Module, mesh, plan: Mapping[str, Union[str, ParallelStyle]]) -> nn.Module:
    """Tensor-parallel ``MultiLoRALinear`` layers of ``model`` (in place) on a 1-D ``mesh``.

    ``plan``: ``{module name or fnmatch pattern: "colwise" | "rowwise" | ParallelStyle}``, as for torch's
    ``parallelize_module`` (e.g. ``{"model.layers.*.mlp.up_proj": "colwise", "model.layers.*.mlp.down_proj":
    "rowwise"}``). Every matched module must be a ``MultiLoRALinear``. Returns ``model``.
    """
    styles = {}
    for pattern, style in plan.items():
        if isinstance(style, str):
            if style not in _STYLES:
                raise ValueError(f"parallelize_multi_lora: plan[{pattern!r}] must be one of {list(_STYLES)} or a "
                                 f"ParallelStyle, got {style!r}")
            style = _STYLES[style]()
        styles[pattern] = style
    return parallelize_module(model, mesh, styles)
