"""The recipes' base model: a tiny Llama pre-trained on the general corpus and cached, or any local causal LM.

The tiny base is built from a ``transformers.LlamaConfig`` with a seed, trained with :func:`train.fit` on the general
corpus and cached in a folder named after a hash of everything that determines it (config, corpus, steps, seed), so
a second run loads it instead of training again. The folder is written atomically (``save_pretrained`` into a
temporary folder that is renamed into place): an interrupted run never leaves a half-written base. Nothing is ever
downloaded: ``--model DIR`` must point at a folder that ``transformers`` loads with ``local_files_only=True``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import torch

from lora_ops._io import atomic_write_dir, atomic_write_json
from lora_ops.recipes.data import CharTokenizer

__all__ = ["TinyConfig", "build_tiny_llama", "pretrained_base", "load_model", "HFTokenizer", "TARGET_MODULES"]

# Every Linear of a Llama block: the LoRA targets used by the recipes (PEFT names).
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TinyConfig:
    hidden: int = 96
    layers: int = 3
    heads: int = 4
    intermediate: int = 192
    max_len: int = 64


def build_tiny_llama(vocab_size: int, cfg: TinyConfig, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                         num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         intermediate_size=cfg.intermediate, max_position_embeddings=cfg.max_len,
                         pad_token_id=CharTokenizer.PAD, eos_token_id=CharTokenizer.EOS, bos_token_id=None,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


class HFTokenizer:
    """Adapts a local ``transformers`` tokenizer to the recipes' interface (encode without specials, eos, pad)."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else 0
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([i for i in ids if i not in (self.pad_id, self.eos_id)], skip_special_tokens=True)


def _cache_key(tiny: TinyConfig, general: Sequence[str], steps: int, seed: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"tiny": asdict(tiny), "steps": steps, "seed": seed, "v": 1}, sort_keys=True).encode())
    for line in general:
        h.update(line.encode("utf-8") + b"\n")
    return h.hexdigest()[:16]


def load_model(path) -> Tuple[torch.nn.Module, object]:
    """(model, tokenizer) from a folder: a cached tiny base (``tokenizer.json`` of type char) or any local HF LM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {path}: not a folder")
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    model.eval()
    char_tok = path / "char_tokenizer.json"
    if char_tok.is_file():
        return model, CharTokenizer.load(char_tok)
    return model, HFTokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))


def pretrained_base(general: Sequence[str], cache_dir, *, tiny: TinyConfig = TinyConfig(), steps: int = 1500,
                    batch_size: int = 64, lr: float = 3e-3, seed: int = 0, progress: bool = True):
    """The tiny base pre-trained on ``general`` (loaded from ``cache_dir`` when an identical one was cached)."""
    from lora_ops.recipes import train

    if not general:
        raise ValueError("pretrained_base: the general corpus is empty (a data folder needs general.jsonl to "
                         "pre-train the tiny base; or pass --model)")
    folder = Path(cache_dir) / f"tiny-llama-{_cache_key(tiny, general, steps, seed)}"
    if (folder / "char_tokenizer.json").is_file():
        return load_model(folder)
    tok = CharTokenizer.default()
    model = build_tiny_llama(tok.vocab_size, tiny, seed)
    texts = list(general)
    cfg = train.TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=min(100, steps // 10),
                            schedule="cosine", seed=seed, eval_every=0, desc="pre-train base")
    rows = [train.encode_text(tok, t, tiny.max_len) for t in texts]

    def make_batch(step, rng):
        return {"text": [rows[i] for i in torch.randint(len(rows), (cfg.batch_size,), generator=rng).tolist()]}

    loss = functools.partial(train.lm_loss, key="text")
    log = train.fit(model, list(model.parameters()), make_batch, loss, cfg, progress=progress)
    model.eval()
    if train.rank() == 0:
        def fill(tmp: Path) -> None:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tok.save(tmp / "char_tokenizer.json")
            atomic_write_json(tmp / "pretrain_log.json", {"tiny": asdict(tiny), "steps": steps, "seed": seed,
                                                          "final_loss": log[-1]["loss"] if log else None})

        atomic_write_dir(folder, fill)
    train.barrier()
    return model, tok
