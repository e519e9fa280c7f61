"""What every recipe does first: get the data and the base model, and train LoRAs the same way."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple


import torch

from lora_ops.recipes import data as data_mod
from lora_ops.recipes.model import TinyConfig, load_model, pretrained_base

__all__ = ["Setup", "BaseSpec", "prepare", "lora_config"]


@dataclass
class BaseSpec:
    """The synthetic data sizes and the tiny base (ignored parts when --data / --model are given)."""

    seed: int = 0
    n_train: int = 400  # per task
    n_valid: int = 16
    n_test: int = 64
    n_general: int = 4000
    tiny: TinyConfig = field(default_factory=TinyConfig)
    pretrain_steps: int = 1500
    pretrain_batch: int = 64
    max_len: int = 48
    # LoRA placement and implementation for every adapter a recipe trains (train.LoRAConfig.layers / .backend)
    lora_layers: Optional[Tuple[int, ...]] = None
    lora_backend: str = "peft"


@dataclass
class Setup:
    data: data_mod.Dataset
    model: torch.nn.Module
    tok: object
    max_len: int
    source: dict


def prepare(spec: BaseSpec, *, data_dir=None, model_dir=None, cache_dir=None, progress: bool = True) -> Setup:
    """Loads ``data_dir`` (else generates the synthetic set) and ``model_dir`` (else the cached tiny base).

    The tiny base is cached under ``cache_dir`` (default ``$LORA_OPS_CACHE`` or ``results/.cache``).
    """
    torch.manual_seed(spec.seed)
    if data_dir:
        ds = data_mod.load_dir(data_dir)
    else:
        ds = data_mod.synthetic(spec.seed, spec.n_train, spec.n_valid, spec.n_test, spec.n_general)
    if model_dir:
        model, tok = load_model(model_dir)
        max_len = min(spec.max_len * 4, getattr(model.config, "max_position_embeddings", 512))
    else:
        cache = Path(cache_dir or os.environ.get("LORA_OPS_CACHE") or Path("results") / ".cache")
        model, tok = pretrained_base(ds.general, cache, tiny=spec.tiny, steps=spec.pretrain_steps,
                                     batch_size=spec.pretrain_batch, seed=spec.seed, progress=progress)
        max_len = spec.max_len
    for p in model.parameters():
        p.requires_grad_(False)
    source = {"data": str(data_dir) if data_dir else f"synthetic(seed={spec.seed})",
              "model": str(model_dir) if model_dir else f"tiny-llama {spec.tiny}"}
    return Setup(ds, model, tok, max_len, source)


def lora_config(spec: BaseSpec, r: int, alpha: float, dropout: float = 0.0):
    """The LoRA of a recipe: rank, alpha and dropout from the recipe, placement and backend from ``spec``."""
    from lora_ops.recipes.train import LoRAConfig

    return LoRAConfig(r, alpha, dropout, layers=spec.lora_layers, backend=spec.lora_backend)
