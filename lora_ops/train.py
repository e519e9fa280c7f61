"""``lora-ops train CONFIG``: train many LoRA adapters in one job, each on its own data, in one process or under
``torchrun`` (DDP or FSDP2).

Every step's batch holds ``rows_per_adapter`` rows of every adapter; each row runs through the shared frozen base
with its own adapter (``MultiLoRALinear`` + ``grouped_lora``). What makes an adapter trained here equal to the same
adapter trained alone (same config entry, same seed):

- its initial factors and its data stream come from generators seeded with ``(seed, name)`` only, never with its
  position in the list or with the other adapters;
- the loss is a sum over adapters of each adapter's token-mean cross-entropy (``grouped_lora``'s backward then
  gives adapter i exactly the gradient of its own loss);
- gradient clipping, learning rate and AdamW state are per adapter (:class:`AdapterAdamW` works on the stacked
  banks with one norm, one lr and one step count per adapter).

Data parallelism: every rank builds the same global batch and keeps rows ``rank::world``; loss terms are this
rank's sums divided by the *global* token counts, times ``world`` because DDP / FSDP average gradients. FSDP2
shards every decoder layer (frozen base weights and adapter banks together) and the root; banks are sharded along
a feature dimension, so each rank keeps every adapter's slice and the per-adapter norms need one all-reduce.
Mixed precision: ``base_dtype`` (float32 / bfloat16 / float16) is the dtype of the frozen base weights; adapter
banks, their gradients, the optimizer state and the loss are always float32 (``MultiLoRALinear`` runs the LoRA
path in the bank's dtype and adds the delta in the base output's dtype). Gradients are reduced in float32.

Outputs under ``out``: one PEFT adapter folder per adapter (``<out>/<name>/``), ``train_log.jsonl`` (one line per
logged step, per-adapter loss and gradient norm), ``run.json`` (the run's summary), ``checkpoint/`` (written atomically; ``--resume`` continues from
it and gives the same adapters as an uninterrupted run).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from lora_ops import _io
from lora_ops.nn import BASE, AdapterBank, MultiLoRALinear, _conv1d_type, _in_out_features, _matches

__all__ = ["AdapterSpec", "JobConfig", "load_config", "parse_config", "AdapterAdamW", "train", "keep_freed_memory",
           "row_ce_sums", "CHECKPOINT", "LOG_FILE"]

CHECKPOINT = "checkpoint"
LOG_FILE = "train_log.jsonl"
RUN_FILE = "run.json"  # the last run's summary (steps, processes, tokens, time, final losses)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PARALLEL = ("ddp", "fsdp")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------------------------------------------------------
# configuration

@dataclass(frozen=True)
class AdapterSpec:
    name: str
    data: str
    r: int = 8
    alpha: float = 16.0
    targets: Union[Tuple[str, ...], str] = ("q_proj", "v_proj")
    lr: float = 2e-4


@dataclass(frozen=True)
class JobConfig:
    base: str
    out: str
    steps: int
    adapters: Tuple[AdapterSpec, ...]
    seed: int = 0
    rows_per_adapter: int = 4
    max_len: int = 256
    clip: float = 1.0  # per-adapter gradient-norm clip; 0 disables
    weight_decay: float = 0.0
    checkpoint_every: int = 50  # steps between checkpoints (and one at the end)
    log_every: int = 1
    base_dtype: str = "float32"
    parallel: str = "ddp"  # under torchrun: ddp | fsdp
    micro_batch_rows: int = 0  # rows per forward/backward pass (gradients accumulate over a step); 0: all at once

    def fingerprint(self) -> dict:
        """What a checkpoint must agree with to be resumed (``steps`` may grow, paths may move)."""
        keep = ("seed", "rows_per_adapter", "max_len", "clip", "weight_decay", "base_dtype")
        return {**{k: getattr(self, k) for k in keep},
                "adapters": [{k: v for k, v in asdict(a).items() if k != "data"} for a in self.adapters]}


_REQUIRED = ("base", "out", "steps", "adapters")
_ADAPTER_KEYS = {"name", "data", "r", "alpha", "targets", "lr"}


def _int(value, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(value, where: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (positive and value == 0):
        raise ValueError(f"{where} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
    return float(value)


def _str(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a non-empty string, got {value!r}")
    return value


def parse_config(raw: Mapping[str, Any], root: Union[str, os.PathLike, None] = None) -> JobConfig:
    """Checks a config mapping (see the README's schema) and resolves paths relative to ``root``.

    Raises ValueError naming the key for every problem, FileNotFoundError for a missing base folder or dataset.
    Nothing is loaded beyond the datasets' existence.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"config must be a mapping of keys to values, got {type(raw).__name__}")
    fields = set(JobConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"config: unknown key(s) {unknown} (known: {sorted(fields)})")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"config: missing required key(s) {missing}")
    root = Path(root) if root is not None else Path.cwd()
    resolve = lambda p: os.path.normpath(p if Path(p).is_absolute() else root / p)  # noqa: E731

    adapters_raw = raw["adapters"]
    if not isinstance(adapters_raw, list) or not adapters_raw:
        raise ValueError(f"config: adapters must be a non-empty list, got {adapters_raw!r}")
    specs, seen = [], {}
    for i, a in enumerate(adapters_raw):
        where = f"adapters[{i}]"
        if not isinstance(a, Mapping):
            raise ValueError(f"{where} must be a mapping with keys {sorted(_ADAPTER_KEYS)}, got {a!r}")
        unknown = sorted(set(a) - _ADAPTER_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} (known: {sorted(_ADAPTER_KEYS)})")
        for k in ("name", "data"):
            if k not in a:
                raise ValueError(f"{where}: missing required key {k!r}")
        name = _str(a["name"], f"{where}.name")
        if not _NAME.match(name) or name in (CHECKPOINT, BASE):
            raise ValueError(f"{where}.name {name!r} must be letters, digits, '_', '.', '-' (starting with a letter "
                             f"or digit) and not {CHECKPOINT!r}: it names the output folder")
        if name in seen:
            raise ValueError(f"{where}.name: adapter name {name!r} is used twice (also adapters[{seen[name]}])")
        seen[name] = i
        targets = a.get("targets", AdapterSpec.targets)
        if isinstance(targets, str):
            _str(targets, f"{where}.targets")
            try:
                re.compile(targets)
            except re.error as e:
                raise ValueError(f"{where}.targets {targets!r} is not a valid regular expression: {e}") from None
        elif isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets):
            targets = tuple(targets)
        else:
            raise ValueError(f"{where}.targets must be a non-empty list of module names or a regex, got {targets!r}")
        data = resolve(_str(a["data"], f"{where}.data"))
        if not Path(data).is_file():
            raise FileNotFoundError(f"{where}.data: dataset {data} of adapter {name!r} does not exist")
        specs.append(AdapterSpec(name=name, data=data, r=_int(a.get("r", AdapterSpec.r), f"{where}.r", 1),
                                 alpha=_number(a.get("alpha", AdapterSpec.alpha), f"{where}.alpha", positive=True),
                                 targets=targets, lr=_number(a.get("lr", AdapterSpec.lr), f"{where}.lr")))

    base = resolve(_str(raw["base"], "base"))
    if not Path(base).is_dir():
        raise FileNotFoundError(f"base: {base} is not a model folder")
    out = resolve(_str(raw["out"], "out"))
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"out: {out} exists and is not a folder")
    base_dtype = raw.get("base_dtype", JobConfig.base_dtype)
    if base_dtype not in DTYPES:
        raise ValueError(f"base_dtype must be one of {list(DTYPES)}, got {base_dtype!r}")
    parallel = raw.get("parallel", JobConfig.parallel)
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {list(PARALLEL)}, got {parallel!r}")
    return JobConfig(
        base=base, out=out, steps=_int(raw["steps"], "steps", 1), adapters=tuple(specs),
        seed=_int(raw.get("seed", 0), "seed", 0),
        rows_per_adapter=_int(raw.get("rows_per_adapter", JobConfig.rows_per_adapter), "rows_per_adapter", 1),
        max_len=_int(raw.get("max_len", JobConfig.max_len), "max_len", 2),
        clip=_number(raw.get("clip", JobConfig.clip), "clip"),
        weight_decay=_number(raw.get("weight_decay", JobConfig.weight_decay), "weight_decay"),
        checkpoint_every=_int(raw.get("checkpoint_every", JobConfig.checkpoint_every), "checkpoint_every", 0),
        log_every=_int(raw.get("log_every", JobConfig.log_every), "log_every", 1),
        base_dtype=base_dtype, parallel=parallel,
        micro_batch_rows=_int(raw.get("micro_batch_rows", JobConfig.micro_batch_rows), "micro_batch_rows", 0))


def load_config(path: Union[str, os.PathLike]) -> JobConfig:
    """A YAML (``.yaml`` / ``.yml``) or JSON config file; relative paths in it are relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"config {path} is not valid YAML: {e}") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config {path} is not valid JSON: {e}") from None
    return parse_config(raw, path.parent)


# ---------------------------------------------------------------------------------------------------------------
# data: one seeded stream per adapter

def _seed(*parts) -> int:
    """A 63-bit seed from ``parts`` that does not depend on Python's hash randomisation."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def read_rows(path: str, tok, max_len: int) -> List[dict]:
    """Token rows of a JSONL file: ``{"prompt", "answer"}`` (loss on the answer and the end token) or ``{"text"}``
    (loss on every token). Prompts that do not fit lose their start; long texts their end."""
    from lora_ops.recipes.data import read_jsonl

    rows = []
    for i, r in enumerate(read_jsonl(path), 1):
        if isinstance(r, dict) and isinstance(r.get("text"), str) and r["text"]:
            ids = (tok.encode(r["text"]) + [tok.eos_id])[:max_len]
            rows.append({"ids": ids, "loss": [0] + [1] * (len(ids) - 1)})
        elif isinstance(r, dict) and isinstance(r.get("prompt"), str) and isinstance(r.get("answer"), str):
            answer = (tok.encode(r["answer"]) + [tok.eos_id])[: max_len - 1]
            prompt = tok.encode(r["prompt"])[-(max_len - len(answer)):] or [tok.eos_id]
            rows.append({"ids": prompt + answer, "loss": [0] * len(prompt) + [1] * len(answer)})
        else:
            raise ValueError(f"{path}:{i}: a row must be {{\"prompt\": str, \"answer\": str}} or "
                             f"{{\"text\": non-empty str}}, got {str(r)[:80]}")
    if not rows:
        raise ValueError(f"{path}: the dataset has no rows")
    return rows


class DataStream:
    """An adapter's rows in epochs of seeded permutations: step s takes positions ``[s·k, (s+1)·k)`` of the
    stream, so any step's rows are known without replaying the earlier ones (exact resume)."""

    def __init__(self, rows: List[dict], seed: int, name: str, k: int):
        self.rows, self.seed, self.name, self.k = rows, seed, name, k
        self._perms: Dict[int, List[int]] = {}

    def _perm(self, epoch: int) -> List[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(_seed(self.seed, self.name, "data", epoch))
            self._perms = {epoch: torch.randperm(len(self.rows), generator=g).tolist()}
        return self._perms[epoch]

    def batch(self, step: int) -> List[dict]:
        n = len(self.rows)
        return [self.rows[self._perm(j // n)[j % n]] for j in range(step * self.k, (step + 1) * self.k)]


# ---------------------------------------------------------------------------------------------------------------
# model: banks on every targeted layer

def _linear_modules(model: nn.Module):
    types = (nn.Linear,) + _conv1d_type()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, types)]


def attach_banks(model: nn.Module, specs: Sequence[AdapterSpec], seed: int) -> Dict[str, AdapterBank]:
    """Wraps every layer some adapter targets in a ``MultiLoRALinear`` with a float32 trainable bank.

    Adapter i's A factors are drawn (PEFT's default init: Kaiming-uniform, B = 0) from a generator seeded with
    ``(seed, name)``, over its own targeted layers in model order: independent of the other adapters.
    """
    linears = _linear_modules(model)
    init: Dict[str, Dict[str, Tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for spec in specs:
        mine = [(n, m) for n, m in linears if _matches(n, spec.targets)]
        if not mine:
            raise ValueError(f"adapter {spec.name!r}: targets {spec.targets!r} match no nn.Linear of the base model")
        g = torch.Generator().manual_seed(_seed(seed, spec.name, "init"))
        for n, m in mine:
            d_in, d_out, _ = _in_out_features(m)
            a = (torch.rand(spec.r, d_in, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(d_in)
            init.setdefault(n, {})[spec.name] = (a.float(), torch.zeros(d_out, spec.r), spec.alpha / spec.r)
    banks = {}
    for n, m in linears:
        if n not in init:
            continue
        entries = {s.name: init[n].get(s.name, (None, None, 0.0)) for s in specs}
        d_in, d_out, _ = _in_out_features(m)
        bank = AdapterBank.from_adapters(entries, d_in=d_in, d_out=d_out, dtype=torch.float32,
                                         device=m.weight.device, trainable=True)
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, MultiLoRALinear(m, bank))
        banks[n] = bank
    return banks


# ---------------------------------------------------------------------------------------------------------------
# per-adapter AdamW on stacked banks (plain or FSDP-sharded parameters)

def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def _sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor) and any(p.is_shard() for p in t.placements)


def _full(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which ``local`` is this rank's shard laid out like ``param`` (collective under FSDP)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride()).full_tensor()


def _shard_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``full`` laid out like ``param``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return full
    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements).to_local()


class AdapterAdamW:
    """AdamW (decoupled weight decay, torch's update formula) over stacked banks ``[N, ...]`` with one learning
    rate, one step count and one gradient-norm clip per adapter: adapter i's update depends only on its own slice
    ``[i]`` of every bank, exactly as if it were trained alone. Parameters may be FSDP2 DTensors sharded along any
    dimension but 0; the per-adapter norms are then all-reduced."""

    def __init__(self, params: Sequence[nn.Parameter], lrs: Sequence[float], *, clip: float = 1.0,
                 weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.n = len(lrs)
        for p in self.params:
            if p.shape[0] != self.n:
                raise ValueError(f"AdapterAdamW: every parameter must be [N={self.n}, ...], got {list(p.shape)}")
        self.lrs = torch.tensor(list(lrs), dtype=torch.float64)
        self.clip, self.weight_decay, self.betas, self.eps = clip, weight_decay, betas, eps
        self.steps = torch.zeros(self.n, dtype=torch.int64)
        self.exp_avg = [torch.zeros_like(_local(p)) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(_local(p)) for p in self.params]

    def grad_norms(self) -> torch.Tensor:
        """Per-adapter L2 norm of the gradient over every parameter, ``[N]`` float32 (before clipping)."""
        sq = torch.zeros(self.n, dtype=torch.float32, device=_local(self.params[0]).device)
        reduce_over = None
        for p in self.params:
            if p.grad is not None:
                sq += _local(p.grad).float().pow(2).flatten(1).sum(1)
                if _sharded(p.grad):
                    reduce_over = p.grad.device_mesh.get_group()
        if reduce_over is not None:
            dist.all_reduce(sq, group=reduce_over)  # every bank shares the one mesh of the job
        return sq.sqrt()

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One update of every adapter; returns the per-adapter gradient norms before clipping."""
        norms = self.grad_norms()
        coef = torch.ones_like(norms)
        if self.clip:
            coef = (self.clip / (norms + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ formula, per adapter
        self.steps += 1
        b1, b2 = self.betas
        bc1 = 1 - b1 ** self.steps.double()
        bc2_sqrt = (1 - b2 ** self.steps.double()).sqrt()
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            w, g = _local(p), _local(p.grad)
            shape = (self.n,) + (1,) * (w.dim() - 1)
            dev = w.device
            g = g * coef.to(dev, g.dtype).view(shape)
            lr = self.lrs.to(dev, w.dtype).view(shape)
            w.mul_(1 - lr * self.weight_decay)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt.to(dev, w.dtype).view(shape)).add_(self.eps)
            w.sub_(m / denom * (lr / bc1.to(dev, w.dtype).view(shape)))
        return norms

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """Full (unsharded) optimizer state, for a checkpoint (a collective under FSDP)."""
        out = {"steps": self.steps.clone()}
        for i, p in enumerate(self.params):
            out[f"exp_avg.{i}"] = _full(p, self.exp_avg[i])
            out[f"exp_avg_sq.{i}"] = _full(p, self.exp_avg_sq[i])
        return out

    def load_state_tensors(self, state: Mapping[str, torch.Tensor]) -> None:
        self.steps = state["steps"].clone().to(torch.int64)
        for i, p in enumerate(self.params):
            self.exp_avg[i].copy_(_shard_like(p, state[f"exp_avg.{i}"]))
            self.exp_avg_sq[i].copy_(_shard_like(p, state[f"exp_avg_sq.{i}"]))


# ---------------------------------------------------------------------------------------------------------------
# processes: torchrun's environment, DDP / FSDP2 wrapping

def _device(requested: Optional[str]) -> torch.device:
    import lora_ops

    cuda = torch.cuda.is_available() and lora_ops.cuda_built()
    if requested == "cuda" and not cuda:
        raise ValueError("device cuda: CUDA is not available or lora_ops was built without CUDA kernels")
    if requested == "cpu" or not cuda:
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _blocks(model: nn.Module) -> List[nn.Module]:
    """The repeated decoder layers: the largest ``nn.ModuleList`` by parameter count."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return []
    return list(max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters())))


def _parallelize(model: nn.Module, banks: Mapping[str, AdapterBank], parallel: str, device: torch.device):
    """DDP: the whole model (only bank gradients are all-reduced). FSDP2: ``fully_shard`` of every decoder layer
    (its frozen weights and its banks in one group) and of the root; banks are sharded along d_in (A) and d_out
    (B), not along adapters, so every rank holds a slice of every adapter and per-adapter steps stay local."""
    from lora_ops.recipes.train import world

    if world() == 1:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh(device.type, (world(),))
    dims = {}
    for bank in banks.values():
        dims[id(bank.lora_a)], dims[id(bank.lora_b)] = 2, 1

    def placement(p):
        return Shard(dims[id(p)]) if id(p) in dims else None  # None: FSDP's default (dim 0)

    for block in _blocks(model):
        fully_shard(block, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
    return model


# ---------------------------------------------------------------------------------------------------------------
# checkpoints and outputs

def _full_banks(banks: Mapping[str, AdapterBank]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Every bank's whole factors on the CPU (a collective under FSDP: call on every rank)."""
    return {n: (_full(b.lora_a, _local(b.lora_a)).detach().cpu(), _full(b.lora_b, _local(b.lora_b)).detach().cpu())
            for n, b in banks.items()}


def _save_checkpoint(cfg: JobConfig, step: int, banks, opt: AdapterAdamW) -> None:
    from lora_ops.recipes.train import barrier, rank

    tensors = {}
    for n, (a, b) in _full_banks(banks).items():
        tensors[f"bank.{n}.lora_a"], tensors[f"bank.{n}.lora_b"] = a, b
    tensors.update({f"opt.{k}": v.detach().cpu() for k, v in opt.state_tensors().items()})
    if rank() == 0:
        meta = {"step": step, "fingerprint": cfg.fingerprint(), "banks": list(banks)}

        def fill(tmp: Path) -> None:
            _io.atomic_save_safetensors(tmp / "state.safetensors", tensors)
            _io.atomic_write_json(tmp / "meta.json", meta)

        _io.atomic_write_dir(Path(cfg.out) / CHECKPOINT, fill)
    barrier()


def _read_checkpoint(cfg: JobConfig, banks) -> Tuple[int, Dict[str, torch.Tensor]]:
    """(step, tensors) of ``<out>/checkpoint``, after checking that it belongs to this config."""
    folder = Path(cfg.out) / CHECKPOINT
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    want = json.loads(json.dumps(cfg.fingerprint()))
    if meta.get("fingerprint") != want or meta.get("banks") != list(banks):
        raise ValueError(f"--resume: the checkpoint in {folder} was written for a different config (adapters, "
                         "seed, rows_per_adapter, max_len, clip, weight_decay or base_dtype changed)")
    if meta["step"] > cfg.steps:
        raise ValueError(f"--resume: the checkpoint is at step {meta['step']}, beyond steps = {cfg.steps}")
    return int(meta["step"]), _io.load_tensors(folder / "state.safetensors")


def _save_adapters(cfg: JobConfig, banks: Mapping[str, AdapterBank]) -> Dict[str, str]:
    from lora_ops.peft import save_adapter
    from lora_ops.recipes.train import barrier, rank

    full = _full_banks(banks)
    paths = {}
    if rank() == 0:
        plain = {n: AdapterBank(a, b, banks[n].scales.detach().cpu(), banks[n].names, banks[n].ranks)
                 for n, (a, b) in full.items()}
        for spec in cfg.adapters:
            paths[spec.name] = str(save_adapter(plain, spec.name, Path(cfg.out) / spec.name,
                                                base_model_name_or_path=cfg.base))
    barrier()
    return paths


def _append_log(path: Path, entries: Sequence[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for e in entries:
            f.write(json.dumps(e, sort_keys=True) + "\n")


def _truncate_log(path: Path, before_step: int) -> None:
    """Keep the log lines of steps already in the checkpoint (a resumed run logs the later ones again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", -1) < before_step]
    _io.atomic_write_text(path, "".join(line + "\n" for line in kept))


# ---------------------------------------------------------------------------------------------------------------
# the job

def _load_base(path: str, progress: bool):
    from transformers.utils import logging

    from lora_ops.recipes.model import load_model

    shown = logging.is_progress_bar_enabled()
    if not progress:
        logging.disable_progress_bar()  # transformers' own bar while loading weights
    try:
        return load_model(path)
    finally:
        if shown:
            logging.enable_progress_bar()


def _collate(rows: Sequence[dict], pad_id: int, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from lora_ops.recipes.train import collate

    ids, mask, att = collate(rows, pad_id)
    return ids.to(device), mask.to(device), att.to(device)


def row_ce_sums(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, att: torch.Tensor,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row sums ``[B]`` (float32) of the cross-entropy of predicting ``ids[:, 1:]`` where ``mask[:, 1:]`` is on.

    Only the positions that carry loss go through the vocabulary head (a forward pre-hook on the model's output
    embedding selects their hidden states), so the model's ``logits`` come out as one ``[n, vocab]`` block: with a
    large vocabulary the head and its softmax cost as much as several decoder layers, prompt tokens carry no loss,
    and the full ``[B, L, vocab]`` logits (and their zero-filled gradient) are never built. The model still runs its
    own forward (DDP and FSDP hooks included); anything it applies after the head must be elementwise (soft-capping,
    scaling), as in transformers' causal LMs.
    """
    on = mask[:, 1:]
    keep = torch.zeros_like(mask)
    keep[:, :-1] = on
    head = getattr(model, "module", model).get_output_embeddings()  # DDP keeps the model in .module
    hook = head.register_forward_pre_hook(lambda _, args: (args[0][keep],) + tuple(args[1:]))
    try:
        inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": ids}
        logits = model(**inputs, attention_mask=att, use_cache=False).logits
    finally:
        hook.remove()
    ce = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][on], reduction="none")
    rows = on.nonzero(as_tuple=True)[0]
    return torch.zeros(ids.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)


def _loss_sums(model, ids, mask, att, owner: torch.Tensor, n: int) -> torch.Tensor:
    """Per-adapter sums of the token cross-entropy over this rank's rows, ``[N]`` float32 (differentiable)."""
    row = row_ce_sums(model, ids, mask, att)
    return torch.zeros(n, dtype=row.dtype, device=row.device).index_add(0, owner, row)


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory in this process's heap (no mmap per large block, no trimming).

    CPU torch has no caching allocator: every activation of a training step is a fresh multi-MB block, which glibc
    maps anew and returns on free, so each step page-faults (and zero-fills) its activations again; keeping them
    measured ~15 % off a 30-layer SmolLM2-shape step with 16 adapters. The process then holds its peak memory.
    Returns False (and changes nothing) where the C library is not glibc. ``lora-ops train`` calls it unless
    ``--default-malloc`` is given; call it at the start of a training script of your own.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


def _micro_batches(mine: List[int], size: int, total: int, world: int) -> List[List[int]]:
    """This rank's rows in the same number of near-equal chunks on every rank (each of at most ``size`` rows;
    0: one chunk), so that FSDP's and DDP's collectives stay matched; an empty chunk (a rank one row short)
    runs a loss-free pass."""
    most = -(-total // world)
    m = 1 if not size else -(-most // size)
    base, extra = divmod(len(mine), m)
    out, i = [], 0
    for c in range(m):
        j = i + base + (c < extra)
        out.append(mine[i:j])
        i = j
    return out


def _sync(wrapped: nn.Module, last: bool):
    """DDP all-reduces only on a step's last micro-batch (``no_sync`` before it); other models accumulate as is."""
    import contextlib

    return contextlib.nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()


def _postfix(names: Sequence[str], losses: Sequence[float], limit: int = 6) -> str:
    parts = [f"{n}={v:.3f}" for n, v in zip(names[:limit], losses[:limit])]
    if len(names) > limit:
        parts.append(f"... mean={sum(losses) / len(losses):.3f}")
    return " ".join(parts)


def train(cfg: Union[JobConfig, Mapping[str, Any], str, os.PathLike], *, resume: bool = False,
          progress: bool = True, device: Optional[str] = None) -> dict:
    """Runs the job ``cfg`` (a :class:`JobConfig`, a config mapping or a YAML / JSON file); returns a summary
    ``{"adapters": {name: folder}, "log": path, "loss": {name: last loss}, "steps", "tokens", "time_s"}``.

    Under ``torchrun`` it joins the process group (gloo on CPU, nccl on CUDA) and trains with ``cfg.parallel``
    (``ddp`` or ``fsdp``). Every check (config, datasets, targets, an existing checkpoint without ``resume``)
    happens before the first step.
    """
    from lora_ops.recipes.train import barrier, init_distributed, rank, world

    if isinstance(cfg, (str, os.PathLike)):
        cfg = load_config(cfg)
    elif not isinstance(cfg, JobConfig):
        cfg = parse_config(cfg)
    out = Path(cfg.out)
    if (out / CHECKPOINT).is_dir() and not resume:
        raise ValueError(f"out: {out} holds a checkpoint of an earlier run; pass --resume to continue it, or "
                         "choose another out folder")
    dev = _device(device)
    init_distributed()
    w, r = world(), rank()
    n, k = len(cfg.adapters), cfg.rows_per_adapter
    if n * k < w:
        raise ValueError(f"rows_per_adapter: {n} adapters x {k} rows per step cannot be split over {w} processes")

    model, tok = _load_base(cfg.base, progress)
    model.requires_grad_(False)
    model.to(dtype=DTYPES[cfg.base_dtype])
    streams = [DataStream(read_rows(s.data, tok, cfg.max_len), cfg.seed, s.name, k) for s in cfg.adapters]
    banks = attach_banks(model, cfg.adapters, cfg.seed)  # float32 whatever the base dtype (module docstring)
    model.to(dev)
    model.eval()  # the base's own dropout stays off; the LoRA path has none

    start, state = 0, None
    if resume and (out / CHECKPOINT / "meta.json").is_file():
        start, state = _read_checkpoint(cfg, banks)
        with torch.no_grad():
            for name, bank in banks.items():
                bank.lora_a.copy_(state[f"bank.{name}.lora_a"])
                bank.lora_b.copy_(state[f"bank.{name}.lora_b"])
    wrapped = _parallelize(model, banks, cfg.parallel, dev)
    params = [p for bank in banks.values() for p in (bank.lora_a, bank.lora_b)]
    opt = AdapterAdamW(params, [s.lr for s in cfg.adapters], clip=cfg.clip, weight_decay=cfg.weight_decay)
    if state is not None:
        opt.load_state_tensors({k[len("opt."):]: v for k, v in state.items() if k.startswith("opt.")})
    log_path = out / LOG_FILE
    if r == 0:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_path, start) if start else _io.atomic_write_text(log_path, "")
    barrier()

    names = [s.name for s in cfg.adapters]
    owner_all = torch.arange(n).repeat_interleave(k)
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    bar = None
    if progress and r == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", file=sys.stderr, mininterval=0.5)
    t0, tokens, pending, last = time.perf_counter(), 0, [], {}
    for step in range(start, cfg.steps):
        rows = [row for s in streams for row in s.batch(step)]
        counts = torch.zeros(n, dtype=torch.float32)
        for i, row in zip(owner_all.tolist(), rows):
            counts[i] += sum(row["loss"][1:])
        counts = counts.clamp(min=1).to(dev)
        mine = list(range(r, len(rows), w))
        chunks = _micro_batches(mine, cfg.micro_batch_rows, len(rows), w)
        opt.zero_grad()
        sums, step_tokens = torch.zeros(n, device=dev), 0
        for c, chunk in enumerate(chunks):
            part_rows = [rows[j] for j in chunk] or [dict(rows[mine[0]], loss=[0] * len(rows[mine[0]]["ids"]))]
            ids, mask, att = _collate(part_rows, tok.pad_id, dev)
            owner = owner_all[chunk or mine[:1]].to(dev)
            for layer in layers:
                layer.set_adapter_ids(owner)
            part = _loss_sums(wrapped, ids, mask, att, owner, n)
            # every micro-batch divides by the step's token counts, so the accumulated gradient is the whole
            # step's; DDP / FSDP average gradients over ranks, each rank holds its share of the global sum
            with _sync(wrapped, c == len(chunks) - 1):
                ((part / counts).sum() * w).backward()
            sums += part.detach().float()
            step_tokens += int(att.sum()) if chunk else 0
        norms = opt.step()
        tokens += step_tokens
        if (step + 1) % cfg.log_every == 0 or step == cfg.steps - 1:
            stats = torch.cat([sums, torch.tensor([float(step_tokens)], device=dev)])
            if w > 1:
                dist.all_reduce(stats)
            per = (stats[:n] / counts).tolist()
            last = dict(zip(names, per))
            pending.append({"step": step, "loss": last, "grad_norm": dict(zip(names, norms.tolist())),
                            "tokens": int(stats[n]), "time_s": round(time.perf_counter() - t0, 4)})
            if bar is not None:
                bar.set_postfix_str(_postfix(names, per), refresh=False)
        if bar is not None:
            bar.update(1)
        done = step + 1
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
            if r == 0:
                _append_log(log_path, pending)  # the log never runs ahead of the checkpoint
            pending = []
            _save_checkpoint(cfg, done, banks, opt)
    if bar is not None:
        bar.close()
    for layer in layers:
        layer.set_adapter_ids(None)
    elapsed = time.perf_counter() - t0
    total = torch.tensor([float(tokens)], device=dev)
    if w > 1:
        dist.all_reduce(total)
    sharded = any(_sharded(p) for p in params)
    paths = _save_adapters(cfg, banks)
    summary = {"adapters": paths, "log": str(log_path), "loss": last, "steps": cfg.steps, "start": start,
               "tokens": int(total.item()), "time_s": elapsed, "world": w,
               "parallel": cfg.parallel if w > 1 else "none", "banks_sharded": sharded, "device": str(dev.type)}
    if r == 0:
        _io.atomic_write_json(out / RUN_FILE, summary)
    return {**summary, "banks": banks, "model": model}
