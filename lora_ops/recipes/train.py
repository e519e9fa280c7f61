"""The one training loop of the recipes, usable unchanged under ``torchrun`` (DDP, gloo on CPU).

Data parallelism is exact by construction: every rank draws the same *global* batch from a generator seeded with
``(seed, step)`` and keeps rows ``rank::world``; every loss term is a sum over the rank's rows divided by the
count over the *global* batch (tokens or rows), times ``world`` because DDP averages gradients. The gradient is
therefore the single-process gradient of the same global batch, up to float summation order (the test checks
2 processes against 1).

LoRA adapters are PEFT modules (``peft.get_peft_model``) on a private copy of the base; checkpoints are PEFT
adapter folders written atomically through ``lora_ops._io``.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lora_ops._io import write_peft_adapter_dir
from lora_ops.recipes.data import SEP, Example

__all__ = ["TrainConfig", "LoRAConfig", "fit", "lm_loss", "encode_text", "encode_example", "collate",
           "add_lora", "lora_state_dict", "save_lora", "train_lora", "rank", "world", "barrier",
           "init_distributed", "token_ce", "lr_factor", "prompt_ids"]


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
    logits = model(input_ids=ids, attention_mask=att).logits
    total = token_ce(logits, ids, mask).sum() / _loss_tokens(everyone[key])
    return total, {"ce": total.detach()}


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


def add_lora(base: torch.nn.Module, lcfg: LoRAConfig, seed: int, init: Optional[Dict[str, torch.Tensor]] = None):
    """A PEFT model around a private copy of ``base`` with one fresh adapter (seeded), or one loaded from ``init``."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    if not 0.0 <= lcfg.dropout < 1.0:
        raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {lcfg.dropout!r}")
    torch.manual_seed(seed)  # PEFT initialises A from the global generator (and dropout draws from it)
    config = LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, target_modules=list(lcfg.targets),
                        lora_dropout=lcfg.dropout, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), config)
    if init is not None:
        result = set_peft_model_state_dict(model, init)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"add_lora: init has keys the model lacks: {result.unexpected_keys[:3]}")
    return model


def lora_state_dict(peft_model) -> Dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def save_lora(peft_model, path) -> None:
    """PEFT adapter folder (adapter_model.safetensors + adapter_config.json), written atomically by rank 0."""
    if rank() == 0:
        config = peft_model.peft_config["default"].to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        write_peft_adapter_dir(path, lora_state_dict(peft_model), config)
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
    return lora_state_dict(model), log
