"""Shared set-up of the `lora-ops train` tests: a tiny random Llama folder, three datasets and config files."""

import copy
import json
import random
from pathlib import Path

# Three adapters that differ in everything per-adapter: rank, alpha, targets (list / regex), lr, data format.
ADAPTERS = [
    {"name": "add3", "data": "add3.jsonl", "r": 2, "alpha": 4, "targets": ["q_proj", "v_proj"], "lr": 1e-2},
    {"name": "add7", "data": "add7.jsonl", "r": 4, "alpha": 8, "targets": ["q_proj", "o_proj", "down_proj"],
     "lr": 5e-3},
    {"name": "words", "data": "words.jsonl", "r": 3, "alpha": 3, "targets": r".*mlp\.(up|gate)_proj", "lr": 2e-2},
]


def make_setup(root: Path) -> dict:
    """Saves the base model folder and the datasets under ``root``; returns their paths."""
    from lora_ops.recipes.data import CharTokenizer
    from lora_ops.recipes.model import TinyConfig, build_tiny_llama

    tok = CharTokenizer.default()
    model = build_tiny_llama(tok.vocab_size, TinyConfig(hidden=32, layers=2, heads=4, intermediate=64, max_len=64),
                             seed=0)
    base = root / "base"
    model.save_pretrained(str(base))
    tok.save(base / "char_tokenizer.json")
    rng = random.Random(0)
    for spec in ADAPTERS:
        with open(root / spec["data"], "w") as f:
            for i in range(12):
                if spec["name"] == "words":
                    row = {"text": " ".join(rng.choice(["cat", "dog", "emu", "yak"]) for _ in range(rng.randint(2, 6)))}
                else:
                    row = {"prompt": f"{i} + {spec['name'][-1]} =", "answer": str(i + int(spec["name"][-1]))}
                f.write(json.dumps(row) + "\n")
    return {"root": root, "base": str(base)}


def write_config(setup: dict, out: Path, *, steps: int, adapters=None, suffix=".json", change=None, **extra) -> Path:
    """A config file next to ``out`` (datasets referenced relative to the data folder, as a user would)."""
    cfg = {"base": setup["base"], "out": str(out), "steps": steps, "seed": 0, "rows_per_adapter": 2, "max_len": 24,
           "checkpoint_every": 0,
           "adapters": [dict(a, data=str(Path(setup["root"]) / a["data"])) for a in copy.deepcopy(adapters or ADAPTERS)]}
    cfg.update(extra)
    if change is not None:
        change(cfg)
    path = Path(str(out) + "_config" + suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        path.write_text(json.dumps(cfg))
    else:
        import yaml

        path.write_text(yaml.safe_dump(cfg))
    return path
