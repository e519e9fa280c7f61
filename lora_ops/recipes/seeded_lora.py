"""Seeded LoRA: domain experts grown from one seed LoRA and combined by averaging their outputs, with ablations.

Procedure (interpretations are listed in docs/papers.md):

1. A *seed* LoRA is trained on a 10 % subset of the pooled training data (ablation 1 varies the subset: a random
   subset, a subset from one domain only, or a subset balanced over domains; all the same size).
2. One *expert* per domain starts from the seed's weights (A and B) and is trained on its domain's data.
3. The experts are combined, without any fine-tuning afterwards, by averaging their outputs at every adapted layer:
   ``(1/N) Σ_i s_i B_i A_i x``, which is exactly one LoRA of rank N·r (concatenated factors). Ablation 2 replaces
   the average by a data-size-weighted average, by per-token input–prototype similarity weights, or by element-wise
   max-by-magnitude over the expert outputs (see :mod:`lora_ops.recipes.adapters`).

Ablation 1's single-domain seed is rotated over the domains (each domain seeds once; the rotations are averaged).
The data-size weighting of ablation 2 is run only when the domains differ in size (otherwise it is the mean).

Baselines, on the method's budget (the seed's steps plus the N experts' steps): experts trained from a fresh
initialisation (each for its expert steps plus 1/N of the seed steps) and averaged the same way; one LoRA trained on
all data for the whole budget. Metrics: accuracy on training tasks and zero-shot accuracy / loss on
held-out tasks, task interference (each task's accuracy with its domain's expert alone minus with the combination),
and the inference time of each aggregation through ``lora_ops.grouped_lora`` vs a plain loop over experts.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lora_ops.recipes import adapters as ad
from lora_ops.recipes import eval as ev
from lora_ops.recipes import results as res
from lora_ops.recipes import train
from lora_ops.recipes.common import BaseSpec, lora_config, prepare
from lora_ops.recipes.data import Example
from lora_ops.recipes.model import TinyConfig

__all__ = ["SeededConfig", "quick_config", "seed_subset", "run"]

SEED_KINDS = ("random", "domain", "balanced")
AGGREGATIONS = ("mean", "weighted", "similarity", "maxpool")


@dataclass
class SeededConfig:
    base: BaseSpec = field(default_factory=lambda: BaseSpec(tiny=TinyConfig(64, 2, 4, 128), pretrain_steps=800))
    tasks: Optional[Tuple[str, ...]] = None  # default: every training task
    r: int = 8
    alpha: float = 16.0
    seed_fraction: float = 0.1
    seed_steps: int = 200
    expert_steps: int = 200
    multitask_steps: Optional[int] = None  # default: seed_steps + expert_steps × number of domains
    batch_size: int = 32
    lr: float = 1e-2
    temperature: float = 0.1  # for similarity weights: |⟨x, v⟩| of unit v is small, so a sharp softmax
    timing_reps: int = 10
    timing_rows: int = 64  # test rows of the whole-model aggregation timing
    layer_timing_size: Tuple[int, int] = (1024, 256)  # (d, tokens) of the single-layer timing at a realistic width
    seed: int = 0


def quick_config() -> SeededConfig:
    return SeededConfig(base=BaseSpec(tiny=TinyConfig(64, 2, 4, 128), pretrain_steps=200, n_train=200, n_test=32,
                                      n_general=2000),
                        tasks=("rev", "sort", "inc", "max", "get", "up"), seed_steps=40, expert_steps=60,
                        timing_reps=5)


def seed_subset(pool: Sequence[Example], kind: str, fraction: float, domains: Sequence[str], seed: int,
                domain_of) -> List[Example]:
    """The seed LoRA's training rows: ``round(fraction·len(pool))`` rows drawn as ``kind`` says.

    ``random``: uniform over the pool; ``domain``: only from ``domains[0]`` (all of it if it is smaller; the recipe
    rotates ``domains`` so that each domain seeds once); ``balanced``: the same number from every domain.
    """
    if kind not in SEED_KINDS:
        raise ValueError(f"seed_subset: kind must be one of {SEED_KINDS}, got {kind!r}")
    n = max(1, round(fraction * len(pool)))
    rng = random.Random(seed)
    if kind == "random":
        return rng.sample(list(pool), n)
    if kind == "domain":
        rows = [e for e in pool if domain_of(e) == domains[0]]
        return rng.sample(rows, min(n, len(rows)))
    per = max(1, n // len(domains))
    out = []
    for d in domains:
        rows = [e for e in pool if domain_of(e) == d]
        out += rng.sample(rows, min(per, len(rows)))
    return out


def _average_results(runs: Sequence[Dict[str, dict]]) -> Dict[str, dict]:
    """Per task, the mean of every numeric field over ``runs`` (e.g. the rotations of the domain seed)."""
    out = {}
    for task in runs[0]:
        out[task] = {k: sum(r[task][k] for r in runs) / len(runs) for k, v in runs[0][task].items()
                     if isinstance(v, (int, float)) and k != "n"}
        out[task]["n"] = runs[0][task]["n"]
    return out


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def run(cfg: SeededConfig, out_dir, *, data_dir=None, model_dir=None, cache_dir=None, progress: bool = True) -> dict:
    t0 = time.time()
    out = Path(out_dir)
    setup = prepare(cfg.base, data_dir=data_dir, model_dir=model_dir, cache_dir=cache_dir, progress=progress)
    data, tok, base = setup.data, setup.tok, setup.model
    tasks = list(cfg.tasks) if cfg.tasks else data.train_tasks
    dom = {e.task: (e.domain or e.task) for e in data.train + data.test}
    pool = [e for e in data.train if e.task in tasks]
    domains = sorted({dom[t] for t in tasks})
    held_out = data.held_out_tasks
    test = [e for e in data.test if e.task in tasks or e.task in held_out]
    lcfg = lora_config(cfg.base, cfg.r, cfg.alpha)
    scale = cfg.alpha / cfg.r
    counter = iter(range(10_000))

    def fit_lora(rows, steps, tag, init=None):
        tcfg = train.TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup=steps // 10,
                                 seed=cfg.seed + 1000 * next(counter), desc=tag)
        state, _ = train.train_lora(base, tok, rows, tcfg, lcfg, max_len=setup.max_len, init=init,
                                    save_to=out / "adapters" / tag, progress=progress)
        return state

    def experts_from(init, tag):
        return [fit_lora([e for e in pool if dom[e.task] == d], cfg.expert_steps, f"{tag}/{d}", init)
                for d in domains]

    def score(model):
        return ev.evaluate(model, tok, test, max_len=setup.max_len)

    results: Dict[str, dict] = {"base": score(base)}
    seeds, experts = {}, {}
    # the seeded method's budget is the seed's steps plus N experts' steps: the baselines get the same total
    total = cfg.seed_steps + cfg.expert_steps * len(domains)
    budgets = {"seeded experts (seed + N experts)": total,
               "scratch experts (N experts)": (cfg.expert_steps + round(cfg.seed_steps / len(domains)))
               * len(domains),
               "multi-task LoRA": cfg.multitask_steps or total}
    for kind in SEED_KINDS:
        # the single-domain seed is rotated: each domain seeds once and the rotations are averaged
        order = [domains[i:] + domains[:i] for i in range(len(domains))] if kind == "domain" else [domains]
        for doms in order:
            key = kind if kind != "domain" else f"domain={doms[0]}"
            subset = seed_subset(pool, kind, cfg.seed_fraction, doms, cfg.seed, lambda e: dom[e.task])
            seeds[key] = fit_lora(subset, cfg.seed_steps, f"seed-{key}")
            experts[key] = [ad.factors_from_peft(s, scale) for s in experts_from(seeds[key], f"experts-{key}")]
    scratch_steps = cfg.expert_steps + round(cfg.seed_steps / len(domains))
    experts["scratch"] = [ad.factors_from_peft(fit_lora([e for e in pool if dom[e.task] == d], scratch_steps,
                                                        f"experts-scratch/{d}"), scale) for d in domains]
    multitask = ad.factors_from_peft(fit_lora(pool, budgets["multi-task LoRA"], "multitask"), scale)

    sizes = [sum(dom[e.task] == d for e in pool) for d in domains]
    kw = {"weighted": {"weights": sizes}, "similarity": {"temperature": cfg.temperature}}
    # weighting by data size is the plain mean when every domain is the same size: then it is not run
    skipped = {"weighted": f"every domain has {sizes[0]} training rows: weights by data size equal the mean"} \
        if len(set(sizes)) == 1 else {}
    results["seed only (random)"] = score(ad.combine(base, [ad.factors_from_peft(seeds["random"], scale)]))
    results["multi-task LoRA"] = score(ad.combine(base, [multitask]))
    results["scratch experts, mean"] = score(ad.combine(base, experts["scratch"], "mean"))
    for kind in SEED_KINDS:
        if kind != "domain":
            results[f"seeded ({kind}), mean"] = score(ad.combine(base, experts[kind], "mean"))
            continue
        rotations = {d: score(ad.combine(base, experts[f"domain={d}"], "mean")) for d in domains}
        results["seeded (domain), mean"] = _average_results(list(rotations.values()))
        for d, r in rotations.items():
            results[f"seeded (domain={d}), mean"] = r
    for agg in AGGREGATIONS[1:]:
        if agg not in skipped:
            results[f"seeded (random), {agg}"] = score(ad.combine(base, experts["random"], agg,
                                                                 **kw.get(agg, {})))

    alone = {}  # each task scored with its own domain's expert
    for kind in ("random", "scratch"):
        alone[kind] = {}
        for d, expert in zip(domains, experts[kind]):
            rows = [e for e in test if e.task in tasks and dom[e.task] == d]
            alone[kind].update(ev.evaluate(ad.combine(base, [expert]), tok, rows, max_len=setup.max_len))
    interference = {
        "seeded (random), mean": {t: alone["random"][t]["acc"] - results["seeded (random), mean"][t]["acc"]
                                  for t in tasks},
        "scratch experts, mean": {t: alone["scratch"][t]["acc"] - results["scratch experts, mean"][t]["acc"]
                                  for t in tasks},
    }
    timing = time_aggregations(base, experts["random"], tok, test, setup.max_len, kw, cfg.timing_reps,
                               cfg.timing_rows)
    layer_timing = time_layer_aggregations(cfg.layer_timing_size, len(domains), cfg.r, cfg.timing_reps)
    summary = {name: {"train_acc": ev.mean_accuracy(r, tasks), "heldout_acc": ev.mean_accuracy(r, held_out),
                      "heldout_loss": sum(r[t]["loss"] for t in held_out) / max(1, len(held_out))}
               for name, r in results.items()}
    payload = {"recipe": "seeded-lora", "config": _jsonable(asdict(cfg)), "source": setup.source, "tasks": tasks,
               "held_out": held_out, "domains": domains, "results": results, "summary": summary,
               "expert_alone": alone, "interference": interference, "timing": timing,
               "budgets": budgets, "domain_sizes": dict(zip(domains, sizes)), "skipped": skipped,
               "layer_timing": layer_timing,
               "seconds": time.time() - t0}
    if train.rank() == 0:
        write(payload, out)
    return payload


def time_aggregations(base, experts, tok, test, max_len, kw, reps, n_rows: int = 64) -> dict:
    """Forward time of the combined model per aggregation, lora_ops vs a plain loop, on one fixed batch."""
    from lora_ops.benchmarks.timing import time_fn

    rows = [train.encode_example(tok, e, max_len) for e in test[:n_rows]]
    ids, _, att = train.collate(rows, 0)
    out = {}
    for agg in AGGREGATIONS:
        models = {b: ad.combine(base, experts, agg, backend=b, **kw.get(agg, {})) for b in ("lora_ops", "loop")}
        with torch.no_grad():
            logits = {b: m(input_ids=ids, attention_mask=att).logits for b, m in models.items()}
            entry = {"max_abs_diff": float((logits["lora_ops"] - logits["loop"]).abs().max()),
                     "tokens": int(ids.numel())}
            for b, m in models.items():
                t = time_fn(lambda m=m: m(input_ids=ids, attention_mask=att), warmup=2, reps=reps)
                entry[f"{b}_ms"] = t.median_ms
                entry[f"{b}_iqr_ms"] = t.iqr_ms
        entry["speedup"] = entry["loop_ms"] / entry["lora_ops_ms"]
        out[agg] = entry
    return out


def time_layer_aggregations(size: Tuple[int, int], n: int, r: int, reps: int) -> dict:
    """The same comparison on one ``d × d`` layer with random experts (the tiny model's layers are too small for
    the kernels to matter): forward time per aggregation, lora_ops vs loop."""
    from lora_ops.benchmarks.timing import time_fn

    d, tokens = size
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(d, d, bias=False)
    experts = [ad.Factors(torch.randn(r, d, generator=g) / d ** 0.5, torch.randn(d, r, generator=g) / r ** 0.5, 2.0)
               for _ in range(n)]
    x = torch.randn(tokens, d, generator=g)
    out = {}
    for agg in AGGREGATIONS:
        kw = {"weights": list(range(1, n + 1))} if agg == "weighted" else {}
        layers = {b: ad.MixedLoRALinear(base, experts, agg, backend=b, **kw) for b in ("lora_ops", "loop")}
        with torch.no_grad():
            entry = {"d": d, "tokens": tokens, "n": n, "r": r,
                     "max_abs_diff": float((layers["lora_ops"](x) - layers["loop"](x)).abs().max())}
            for b, layer in layers.items():
                entry[f"{b}_ms"] = time_fn(lambda layer=layer: layer(x), warmup=2, reps=reps).median_ms
        entry["speedup"] = entry["loop_ms"] / entry["lora_ops_ms"]
        out[agg] = entry
    return out


def markdown(p: dict) -> str:
    tasks, held = p["tasks"], p["held_out"]
    names = list(p["results"])
    lines = ["# Seeded LoRA reproduction", "",
             f"data: {p['source']['data']}; model: {p['source']['model']}; domains: {', '.join(p['domains'])}; "
             f"{p['seconds']:.0f} s", "", "## Summary", ""]
    rows = [[n, p["summary"][n]["train_acc"], p["summary"][n]["heldout_acc"], p["summary"][n]["heldout_loss"]]
            for n in names]
    lines.append(res.markdown_table(["model", "mean acc (training tasks)", "zero-shot acc (held-out)",
                                     "held-out answer loss"], rows))
    if p.get("budgets"):
        lines += ["Training steps: " + "; ".join(f"{k} {v}" for k, v in p["budgets"].items())
                  + ". Seeded (domain) is the mean over the rotations (each domain seeds once)."
                  + "".join(f" Not run: {k} ({v})." for k, v in p.get("skipped", {}).items()), ""]
    lines += ["## Per-task accuracy", ""]
    cols = tasks + held
    rows = [[n] + [p["results"][n][t]["acc"] for t in cols] for n in names]
    lines.append(res.markdown_table(["model"] + [t if t in tasks else f"{t} (held-out)" for t in cols], rows))
    lines += ["## Task interference (expert alone − combined, accuracy; positive = the combination lost)", ""]
    rows = [[t, p["expert_alone"]["random"][t]["acc"], p["interference"]["seeded (random), mean"][t],
             p["expert_alone"]["scratch"][t]["acc"], p["interference"]["scratch experts, mean"][t]] for t in tasks]
    lines.append(res.markdown_table(["task", "seeded expert alone", "interference (seeded)", "scratch expert alone",
                                     "interference (scratch)"], rows))
    lines += ["## Inference time of each aggregation (one forward, fixed batch)", ""]
    rows = [[a, t["tokens"], t["lora_ops_ms"], t["loop_ms"], t["speedup"], t["max_abs_diff"]]
            for a, t in p["timing"].items()]
    lines.append(res.markdown_table(["aggregation", "tokens", "lora_ops ms", "loop ms", "loop / lora_ops",
                                     "max abs Δ logit"], rows))
    if p.get("layer_timing"):
        first = next(iter(p["layer_timing"].values()))
        lines += [f"One {first['d']}×{first['d']} layer, {first['tokens']} tokens, N = {first['n']} experts of "
                  f"rank {first['r']} (delta + base matmul):", ""]
        rows = [[a, t["lora_ops_ms"], t["loop_ms"], t["speedup"], t["max_abs_diff"]]
                for a, t in p["layer_timing"].items()]
        lines.append(res.markdown_table(["aggregation", "lora_ops ms", "loop ms", "loop / lora_ops",
                                         "max abs Δ output"], rows))
    return "\n".join(lines)


def write(p: dict, out: Path) -> dict:
    paths = res.write_results(out, p, markdown(p))
    names = list(p["results"])
    paths["summary_png"] = res.bar_plot(
        out / "summary.png", "Seeded LoRA: mean accuracy", names,
        {"training tasks": [p["summary"][n]["train_acc"] for n in names],
         "held-out (zero-shot)": [p["summary"][n]["heldout_acc"] for n in names]}, "exact-match accuracy")
    aggs = list(p["timing"])
    paths["timing_png"] = res.bar_plot(out / "timing.png", "Seeded LoRA: forward time per aggregation", aggs,
                                       {"lora_ops": [p["timing"][a]["lora_ops_ms"] for a in aggs],
                                        "plain loop": [p["timing"][a]["loop_ms"] for a in aggs]}, "ms")
    return paths
