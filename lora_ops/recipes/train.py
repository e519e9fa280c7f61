"""The one training loop of the recipes, usable unchanged under ``torchrun`` (DDP, gloo on CPU).

Data parallelism is exact by construction: every rank draws the same *global* batch from a generator seeded with
``(seed, step)`` and keeps rows ``rank::world``; every loss term is a sum over the rank's rows divided by the
count over the *global* batch (tokens or rows), times ``world`` because DDP averages gradients. The gradient is
therefore the single-process gradient of the same global batch, up to float summation order (the test checks
2 processes against 1).

LoRA adapters are PEFT modules (``peft.get_peft_model``) on a private copy of the base, or (``LoRAConfig.backend =
"lora_ops"``, the real testbed's choice) ``lora_ops.nn.MultiLoRALinear`` layers holding one trainable adapter each,
so the forward and backward go through ``grouped_lora``. Either way the adapter's state dict uses PEFT's keys and
checkpoints are PEFT adapter folders written atomically through ``lora_ops._io``.

Two switches for real models (both off by default, so the tiny testbed's numbers do not move):
:func:`answer_head_only` computes the LM head only at answer positions during training (the vocabulary projection
of every prompt position is most of a step's head cost and none of its loss), and :func:`adapter_cache` keeps
trained adapters in a folder keyed by a hash of everything that determines them, so recipes that train the same
LoRA share it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lora_ops._io import write_peft_adapter_dir
from lora_ops.recipes.data import SEP, Example

__all__ = ["TrainConfig", "LoRAConfig", "fit", "lm_loss", "encode_text", "encode_example", "collate",
           "add_lora", "lora_state_dict", "save_lora", "train_lora", "rank", "world", "barrier",
           "init_distributed", "token_ce", "lr_factor", "prompt_ids", "answer_ce_sum", "answer_head_only",
           "adapter_cache", "LoRAModel"]

_ANSWER_ONLY = False
_ADAPTER_CACHE: Optional[dict] = None  # {"dir": Path, "salt": str} while adapter_cache() is active


@contextlib.contextmanager
def answer_head_only(enabled: bool = True):
    """Within the block, training losses apply the LM head to answer positions only (same loss up to rounding)."""
    global _ANSWER_ONLY
    saved, _ANSWER_ONLY = _ANSWER_ONLY, enabled
    try:
        yield
    finally:
        _ANSWER_ONLY = saved


@contextlib.contextmanager
def adapter_cache(folder, salt: str):
    """Within the block, :func:`train_lora` reuses adapters from ``folder`` (``salt`` names the base model, e.g.
    its weights' checksum); adapters trained with a custom loss or extra rows are cached only if the loss is a
    ``functools.partial`` of a named function (its name and arguments enter the key)."""
    global _ADAPTER_CACHE
    saved, _ADAPTER_CACHE = _ADAPTER_CACHE, {"dir": Path(folder), "salt": salt}
    try:
        yield
    finally:
        _ADAPTER_CACHE = saved


# ---------------------------------------------------------------------------------------------------------------
# distributed helpers: all no-ops in a single process

def init_distributed() -> bool:
    """Joins the process group torchrun describes (gloo on CPU, nccl on CUDA); False when not under torchrun."""
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return True
    return False


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world() > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# rows: token ids + which positions carry loss

def encode_text(tok, text: str, max_len: int) -> dict:
    """An LM row: every token (and the closing end-of-text) is predicted."""
    ids = (tok.encode(text) + [tok.eos_id])[:max_len]
    return {"ids": ids, "loss": [0] + [1] * (len(ids) - 1)}


def prompt_ids(tok, prompt: str) -> List[int]:
    """The ids a model reads before an answer: a chat model's template (the prompt as the user's turn, then the
    assistant's turn opened), else ``prompt + SEP`` (the synthetic testbed's format)."""
    chat = getattr(tok, "tok", None)  # HFTokenizer wraps a transformers tokenizer
    if chat is not None and getattr(chat, "chat_template", None):
        ids = chat.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
        return list(ids)
    return tok.encode(prompt + SEP)


def encode_example(tok, ex: Example, max_len: int) -> dict:
    """A task row: only the answer and the closing end-of-text are predicted; long prompts lose their start."""
    prompt = prompt_ids(tok, ex.prompt)
    answer = tok.encode(ex.answer) + [tok.eos_id]
    prompt = prompt[-max(1, max_len - len(answer)):]
    ids = (prompt + answer)[:max_len]
    return {"ids": ids, "loss": ([0] * len(prompt) + [1] * len(answer))[:max_len], "task": ex.task}


def collate(rows: Sequence[dict], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [B, L], loss_mask [B, L] bool, attention_mask [B, L]) with right padding."""
    length = max(len(r["ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    loss = torch.zeros((len(rows), length), dtype=torch.bool)
    att = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["ids"])
        ids[i, :n] = torch.tensor(r["ids"])
        loss[i, :n] = torch.tensor(r["loss"], dtype=torch.bool)
        att[i, :n] = 1
    return ids, loss, att


def token_ce(logits: torch.Tensor, ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy ``[B, L-1]`` of predicting ``ids[:, 1:]``, zero where ``loss_mask[:, 1:]`` is off."""
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")
    return ce * loss_mask[:, 1:]


def _loss_tokens(rows: Sequence[dict]) -> int:
    return max(1, sum(sum(r["loss"][1:]) for r in rows))


def lm_loss(model, mine: Dict[str, List[dict]], everyone: Dict[str, List[dict]], key: str = "task"
            ) -> Tuple[torch.Tensor, dict]:
    """Token-mean cross-entropy of the rows under ``key`` over the global batch (this rank's share of the sum).

    Task rows carry their loss mask on the answer, general-text rows on every token, so one function serves both.
    """
    ids, mask, att = collate(mine[key], 0)  # padding is masked out of attention and loss: its id is irrelevant
    total = answer_ce_sum(model, ids, mask, att) / _loss_tokens(everyone[key])
    return total, {"ce": total.detach()}


def _causal_lm(model):
    """The transformers causal LM inside a PEFT / LoRAModel wrapper; None under DDP (its forward must be called)."""
    if hasattr(model, "module") and not isinstance(model, LoRAModel):
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(inner, "get_decoder") and hasattr(inner, "get_output_embeddings")):
        return None
    return inner


def decoder_and_head(model):
    """(decoder, LM head) of the model when :func:`answer_head_only` is on and they can be called apart; else
    None (then call the model itself)."""
    inner = _causal_lm(model) if _ANSWER_ONLY else None
    return None if inner is None else (inner.get_decoder(), inner.get_output_embeddings())


def answer_ce_sum(model, ids: torch.Tensor, mask: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy over the positions ``mask[:, 1:]`` marks (``token_ce(...).sum()``).

    Under :func:`answer_head_only` (and outside DDP) the decoder's last hidden states are gathered at those
    positions first and only they go through the LM head: the same value up to float rounding.
    """
    parts = decoder_and_head(model)
    if parts is None:
        return token_ce(model(input_ids=ids, attention_mask=att).logits, ids, mask).sum()
    hidden = parts[0](input_ids=ids, attention_mask=att).last_hidden_state
    keep = mask[:, 1:]
    logits = parts[1](hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), ids[:, 1:][keep], reduction="sum")


# ---------------------------------------------------------------------------------------------------------------
# the loop

@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup: int = 20
    schedule: str = "cosine"  # cosine | linear | constant (after linear warm-up)
    clip: float = 1.0
    eval_every: int = 0  # 0: no evaluation during training
    seed: int = 0
    desc: str = "train"


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return 1.0
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.schedule == "linear":
        return max(0.0, 1.0 - frac)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    raise ValueError(f"TrainConfig.schedule must be cosine, linear or constant, got {cfg.schedule!r}")


def fit(model: torch.nn.Module, params: Sequence[torch.nn.Parameter],
        make_batch: Callable[[int, torch.Generator], Dict[str, List[dict]]],
        loss_fn: Callable, cfg: TrainConfig, *, eval_fn: Optional[Callable[[torch.nn.Module], dict]] = None,
        progress: bool = True) -> List[dict]:
    """Trains ``params`` of ``model`` for ``cfg.steps`` AdamW steps; returns the log (one dict per logged step).

    ``make_batch(step, generator)`` returns the global batch as ``{kind: rows}`` (e.g. task and general rows);
    each list is split over ranks. ``loss_fn(model, my_rows, all_rows)`` returns ``(loss, stats)`` with ``loss``
    this rank's share of the global-batch mean. Under torchrun the
    model is wrapped in DistributedDataParallel; ``eval_fn(model)`` runs every ``cfg.eval_every`` steps on every rank
    (it is deterministic, so ranks agree).
    """
    init_distributed()
    w, r = world(), rank()
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("fit: no trainable parameters")
    wrapped = model
    if w > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    model.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    log: List[dict] = []
    steps = range(cfg.steps)
    bar = None
    if progress and r == 0:
        from tqdm import tqdm

        bar = steps = tqdm(steps, desc=cfg.desc, file=sys.stderr, leave=False, mininterval=1.0)
    for step in steps:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        everyone = make_batch(step, gen)
        for kind, rows in everyone.items():
            if len(rows) % w:
                raise ValueError(f"fit: {len(rows)} {kind!r} rows per batch do not split over {w} processes")
        mine = {kind: rows[r::w] for kind, rows in everyone.items()}
        loss, stats = loss_fn(wrapped, mine, everyone)
        opt.zero_grad(set_to_none=True)
        (loss * w).backward()  # DDP averages gradients over ranks; each rank holds its share of the global mean
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip) if cfg.clip else torch.tensor(0.0)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == cfg.steps - 1 or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            values = torch.stack([loss.detach()] + [v.detach().reshape(()) for v in stats.values()]).float()
            if w > 1:
                dist.all_reduce(values)
            entry = {"step": step, "loss": float(values[0]), "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0]}
            entry.update({k: float(v) for k, v in zip(stats, values[1:])})
            if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                model.eval()
                with torch.no_grad():
                    entry["eval"] = eval_fn(model)
                model.train()
            log.append(entry)
            if bar is not None:
                bar.set_postfix(loss=f"{entry['loss']:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return log


# ---------------------------------------------------------------------------------------------------------------
# LoRA adapters through PEFT

@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # PEFT lora_dropout on the LoRA input during training (the Modular LLMs paper: 0.05)
    targets: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # decoder layers that get adapters (None: all). Adapting only the top layers of a deep model means the
    # backward stops there: on a CPU that is most of a training step saved.
    layers: Optional[Tuple[int, ...]] = None
    backend: str = "peft"  # peft | lora_ops (MultiLoRALinear / grouped_lora)


class _OneAdapter:
    """Router of a one-adapter ``MultiLoRALinear``: adapter 0 on every token (-1, the base, while disabled)."""

    def __init__(self):
        self.id = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full(x.shape[:-1], self.id, dtype=torch.int64, device=x.device)


class LoRAModel(torch.nn.Module):
    """A causal LM whose targeted Linears are ``lora_ops.nn.MultiLoRALinear`` with one trainable adapter
    (``"default"``, on every token), with the bits of PEFT's interface the recipes use."""

    def __init__(self, lm: torch.nn.Module, scale: float, router: _OneAdapter):
        super().__init__()
        self.lm = lm
        self.scale = scale
        self._router = router

    def forward(self, *args, **kwargs):
        return self.lm(*args, **kwargs)

    def get_base_model(self):
        return self.lm

    @contextlib.contextmanager
    def disable_adapter(self):
        saved, self._router.id = self._router.id, -1
        try:
            yield
        finally:
            self._router.id = saved

    def lora_layers(self):
        from lora_ops import nn as lnn

        return list(lnn.multi_lora_layers(self.lm))


def _targeted(name: str, lcfg: LoRAConfig) -> bool:
    if not any(name == t or name.endswith("." + t) for t in lcfg.targets):
        return False
    if lcfg.layers is None:
        return True
    parts = name.split(".")
    idx = [int(parts[i + 1]) for i in range(len(parts) - 1) if parts[i] == "layers" and parts[i + 1].isdigit()]
    return bool(idx) and idx[0] in lcfg.layers


def _lora_ops_model(base, lcfg: LoRAConfig) -> LoRAModel:
    from lora_ops import nn as lnn

    lm = copy.deepcopy(base)
    banks = {name: lnn.AdapterBank.new(m, ["default"], lcfg.r, lcfg.alpha)
             for name, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and _targeted(name, lcfg)}
    if not banks:
        raise ValueError(f"LoRAConfig: targets {lcfg.targets} / layers {lcfg.layers} match no Linear of the model")
    router = _OneAdapter()
    lnn.wrap(lm, banks, lora_dropout=lcfg.dropout, router=router)
    return LoRAModel(lm, lcfg.alpha / lcfg.r, router)


def add_lora(base: torch.nn.Module, lcfg: LoRAConfig, seed: int, init: Optional[Dict[str, torch.Tensor]] = None):
    """A model around a private copy of ``base`` with one fresh adapter (seeded), or one loaded from ``init``
    (a PEFT state dict): a PEFT model, or a :class:`LoRAModel` for ``backend="lora_ops"``."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    if not 0.0 <= lcfg.dropout < 1.0:
        raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {lcfg.dropout!r}")
    if lcfg.backend not in ("peft", "lora_ops"):
        raise ValueError(f"LoRAConfig.backend must be 'peft' or 'lora_ops', got {lcfg.backend!r}")
    torch.manual_seed(seed)  # PEFT initialises A from the global generator (and dropout draws from it)
    if lcfg.backend == "lora_ops":
        model = _lora_ops_model(base, lcfg)
        if init is not None:
            _load_lora_ops(model, init)
        return model
    config = LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, target_modules=list(lcfg.targets),
                        layers_to_transform=list(lcfg.layers) if lcfg.layers is not None else None,
                        lora_dropout=lcfg.dropout, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), config)
    if init is not None:
        result = set_peft_model_state_dict(model, init)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"add_lora: init has keys the model lacks: {result.unexpected_keys[:3]}")
    return model


def _peft_key(name: str, which: str) -> str:
    return f"base_model.model.{name}.lora_{which}.weight"


def _load_lora_ops(model: LoRAModel, state: Dict[str, torch.Tensor]) -> None:
    from lora_ops import nn as lnn

    with torch.no_grad():
        for name, m in model.lm.named_modules():
            if isinstance(m, lnn.MultiLoRALinear):
                key = _peft_key(name, "A")
                if key not in state:
                    raise ValueError(f"add_lora: init lacks {key}")
                m.bank.lora_a[0].copy_(state[key])
                m.bank.lora_b[0].copy_(state[_peft_key(name, "B")])


def lora_state_dict(model) -> Dict[str, torch.Tensor]:
    """The adapter's factors under PEFT's keys (``base_model.model.<module>.lora_A.weight`` / ``lora_B``)."""
    if isinstance(model, LoRAModel):
        from lora_ops import nn as lnn

        out = {}
        for name, m in model.lm.named_modules():
            if isinstance(m, lnn.MultiLoRALinear):
                out[_peft_key(name, "A")] = m.bank.lora_a[0].detach().clone()
                out[_peft_key(name, "B")] = m.bank.lora_b[0].detach().clone()
        return out
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _peft_config(model, lcfg: Optional[LoRAConfig] = None) -> dict:
    if isinstance(model, LoRAModel):
        names = sorted({k[len("base_model.model."):-len(".lora_A.weight")].rsplit(".", 1)[1]
                        for k in lora_state_dict(model) if k.endswith("lora_A.weight")})
        r = next(m.bank.rank for m in model.lora_layers())
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": model.scale * r,
                "target_modules": names, "bias": "none", "lora_dropout": 0.0,
                "layers_to_transform": None if lcfg is None or lcfg.layers is None else list(lcfg.layers)}
    config = model.peft_config["default"].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def save_lora(peft_model, path) -> None:
    """PEFT adapter folder (adapter_model.safetensors + adapter_config.json), written atomically by rank 0."""
    if rank() == 0:
        write_peft_adapter_dir(path, lora_state_dict(peft_model), _peft_config(peft_model))
    barrier()


def train_lora(base, tok, examples: Sequence[Example], cfg: TrainConfig, lcfg: LoRAConfig, *, max_len: int = 64,
               init: Optional[Dict[str, torch.Tensor]] = None, loss_fn: Optional[Callable] = None,
               extra_rows: Optional[Callable[[torch.Generator], List[dict]]] = None, save_to=None,
               valid: Optional[Sequence[Example]] = None,
               progress: bool = True) -> Tuple[Dict[str, torch.Tensor], List[dict]]:
    """Trains one LoRA on ``examples``; returns (PEFT state dict, log).

    ``loss_fn`` (default: answer cross-entropy) receives the PEFT model and the batch ``{"task": rows}``, plus
    ``{"general": extra_rows(gen)}`` when given (general-text rows for I-LoRA's routing losses).
    """
    if not examples:
        raise ValueError("train_lora: no training examples")
    key = _cache_key(examples, cfg, lcfg, max_len, init, loss_fn, extra_rows)
    cached = _cache_load(key)
    if cached is not None:
        state, log = cached
        if save_to is not None and rank() == 0:
            model = add_lora(base, lcfg, cfg.seed, state)
            write_peft_adapter_dir(save_to, state, _peft_config(model))
        barrier()
        return state, log
    model = add_lora(base, lcfg, cfg.seed, init)
    rows = [encode_example(tok, e, max_len) for e in examples]

    def make_batch(step, gen):
        batch = {"task": [rows[i] for i in torch.randint(len(rows), (cfg.batch_size,), generator=gen).tolist()]}
        if extra_rows is not None:
            batch["general"] = extra_rows(gen)
        return batch

    fn = loss_fn or lm_loss
    trainable = [p for n, p in model.named_parameters() if "lora_" in n]
    eval_fn = None
    if valid:
        from lora_ops.recipes.eval import evaluate

        def eval_fn(m):
            return evaluate(m, tok, valid, max_len=max_len)
    log = fit(model, trainable, make_batch, fn, cfg, eval_fn=eval_fn, progress=progress)
    if save_to is not None:
        save_lora(model, save_to)
    state = lora_state_dict(model)
    _cache_store(key, state, log)
    return state, log


# ---------------------------------------------------------------------------------------------------------------
# the adapter cache (see adapter_cache)

def _cache_key(examples, cfg: TrainConfig, lcfg: LoRAConfig, max_len: int, init, loss_fn, extra_rows
               ) -> Optional[str]:
    """A hash of everything that determines a trained adapter, or None when it cannot be known (no cache, a
    custom loss that is not a partial of a named function, extra rows drawn by a closure)."""
    if _ADAPTER_CACHE is None or extra_rows is not None or world() > 1:
        return None
    if loss_fn is None:
        loss = "lm_loss"
    elif isinstance(loss_fn, functools.partial) and not loss_fn.args:
        loss = [loss_fn.func.__module__, loss_fn.func.__qualname__, sorted(loss_fn.keywords.items())]
    else:
        return None
    h = hashlib.sha256()
    settings = {k: v for k, v in vars(cfg).items() if k not in ("desc", "eval_every")}
    h.update(json.dumps({"salt": _ADAPTER_CACHE["salt"], "train": settings, "lora": vars(lcfg), "max_len": max_len,
                         "loss": loss, "v": 1}, sort_keys=True, default=str).encode())
    for e in examples:
        h.update(json.dumps([e.task, e.prompt, e.answer]).encode() + b"\n")
    for k in sorted(init or {}):
        h.update(k.encode() + init[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def _cache_load(key: Optional[str]):
    if key is None:
        return None
    folder = _ADAPTER_CACHE["dir"] / f"lora-{key}"
    if not (folder / "log.json").is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter.safetensors")), json.loads((folder / "log.json").read_text())


def _cache_store(key: Optional[str], state: Dict[str, torch.Tensor], log: List[dict]) -> None:
    if key is None or rank() != 0:
        return
    from safetensors.torch import save_file

    from lora_ops._io import atomic_write_dir

    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter.safetensors"))
        (tmp / "log.json").write_text(json.dumps(log, default=float))

    folder = _ADAPTER_CACHE["dir"] / f"lora-{key}"
    if not folder.exists():
        atomic_write_dir(folder, fill)
