"""Mixture-of-LoRAs (MoA, arXiv 2403.03432): domain LoRAs and a sequence-level router in every adapted layer.

Procedure (interpretations are listed in docs/papers.md):

1. *Stage 1.* One LoRA per domain, trained separately on that domain's rows.
2. *Stage 2.* Every adapted Linear becomes ``lora_ops.nn.MultiLoRALinear`` over the bank of the N domain LoRAs with
   its own ``lora_ops.routing.MoARouter`` (mean-pooled hidden state of the sequence's prompt -> ``Linear(d, N)``).
   Training minimises ``L = L_LM + η·L_cls``: ``L_cls`` is the cross-entropy of every router against the domain
   label (averaged over routers); in the forward pass the gold domain's expert is used (so the LM loss trains the
   LoRAs, the classification loss the routers). The LoRAs are fine-tuned jointly (``joint``) or kept frozen.
3. *Inference without labels.* Top-1 expert per sequence, chosen per layer by that layer's router, by the last
   adapted layer's router, or by a vote over all routers (the last two take a first, per-layer routed pass to read
   every router, then run the chosen expert in all layers). A mixed-domain batch runs in one grouped_lora pass.

Baselines and ablations: the stage-1 experts with oracle (gold) routing and with a separate classifier on the input
(a linear probe on the base model's mean-pooled last hidden state); MoA without router loss (η = 0 and nothing else
changed: gold routing in training, so its routers stay at their seeded initialisation); an MoE without router loss
(η = 0 with soft routing: the routers mix all experts with their softmax weights in training and inference and learn
from the LM loss alone); one LoRA on the mixed data; stage-2 LoRAs initialised from the stage-1 experts vs from
scratch (which gets the stage-1 steps in stage 2, so the budgets are equal); frozen vs jointly tuned LoRAs.
Metrics: per-domain accuracy and answer LM loss, router accuracy per layer, and the inference throughput of a
mixed-domain batch (lora_ops vs PEFT's ``adapter_names`` mixed batch and a per-domain loop, same outputs).
"""

from __future__ import annotations

import copy
import functools
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lora_ops import nn as lnn
from lora_ops import routing
from lora_ops.recipes import adapters as ad
from lora_ops.recipes import eval as ev
from lora_ops.recipes import results as res
from lora_ops.recipes import train
from lora_ops.recipes.common import BaseSpec, lora_config, prepare
from lora_ops.recipes.model import TinyConfig

__all__ = ["MoAConfig", "VARIANTS", "INFERENCE_MODES", "quick_config", "build_moa_model", "moa_loss",
           "moa_logits", "router_accuracy", "run", "markdown"]

INFERENCE_MODES = ("per-layer", "last", "vote")
# stage-2 variants: (LoRA init, LoRAs tuned jointly, router loss on, routing in training)
VARIANTS = {
    "MoA": ("experts", True, True, "gold"),
    "MoA, frozen LoRAs": ("experts", False, True, "gold"),
    "MoA, LoRAs from scratch": ("scratch", True, True, "gold"),
    # η = 0 and nothing else changed: gold routing in training, so the routers get no training signal at all
    "MoA, no router loss (η = 0)": ("experts", True, False, "gold"),
    # the MoE reading of η = 0: soft mixture in training and inference, routers learn from the LM loss alone
    "MoE, no router loss (η = 0, soft)": ("experts", True, False, "soft"),
}


@dataclass
class MoAConfig:
    base: BaseSpec = field(default_factory=lambda: BaseSpec(tiny=TinyConfig(64, 2, 4, 128), pretrain_steps=800))
    tasks: Optional[Tuple[str, ...]] = None  # default: every training task
    r: int = 8
    alpha: float = 16.0
    expert_steps: int = 300  # stage 1, per domain
    single_steps: Optional[int] = None  # the single mixed-data LoRA; default expert_steps × number of domains
    stage2_steps: int = 300
    batch_size: int = 32
    lr: float = 1e-2  # stage 1 and the single LoRA
    stage2_lr: float = 3e-3  # routers and (jointly tuned) LoRAs
    eta: float = 1.0  # weight of the router classification loss
    variants: Tuple[str, ...] = tuple(VARIANTS)
    classifier_steps: int = 300
    classifier_lr: float = 1e-2
    timing_rows: int = 64
    timing_reps: int = 10
    # throughput also on a random Llama of realistic width (hidden, layers, heads, intermediate); None: skip
    wide_model: Optional[TinyConfig] = field(default_factory=lambda: TinyConfig(1024, 2, 16, 2816, 128))
    seed: int = 0


def quick_config() -> MoAConfig:
    return MoAConfig(base=BaseSpec(tiny=TinyConfig(64, 2, 4, 128), pretrain_steps=200, n_train=200, n_test=32,
                                   n_general=2000),
                     expert_steps=80, stage2_steps=80, classifier_steps=100, timing_reps=5)


# ---------------------------------------------------------------------------------------------------------------
# the MoA model: MultiLoRALinear + MoARouter in every adapted layer

def build_moa_model(base: torch.nn.Module, experts: Sequence[ad.Adapter], domains: Sequence[str], *, r: int,
                    alpha: float, init: str = "experts", trainable: bool = False, mode: str = "top1",
                    seed: int = 0) -> torch.nn.Module:
    """A copy of ``base`` whose Linear layers named in ``experts`` serve the N domain LoRAs with a router each.

    ``init="experts"`` stacks the given experts (``experts[i]`` is domain ``domains[i]``); ``"scratch"`` starts
    from fresh PEFT-style adapters (Kaiming A, zero B, scale ``alpha / r``) on the same layers. ``trainable``
    makes the banks' factors parameters with gradients (always true from scratch). Routers start seeded.
    """
    if init not in ("experts", "scratch"):
        raise ValueError(f"build_moa_model: init must be 'experts' or 'scratch', got {init!r}")
    if len(experts) != len(domains) or not experts:
        raise ValueError(f"build_moa_model: need one expert per domain, got {len(experts)} for {len(domains)}")
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    banks = {}
    for path in sorted(experts[0]):
        if init == "experts":
            banks[path] = lnn.AdapterBank.from_adapters(
                {d: (e[path].a, e[path].b, e[path].scale) for d, e in zip(domains, experts)}, trainable=trainable)
        else:
            banks[path] = lnn.AdapterBank.new(model.get_submodule(path), list(domains), r, alpha, trainable=True)
    lnn.wrap(model, banks)
    for layer in lnn.multi_lora_layers(model):
        layer.router = routing.MoARouter(layer.in_features, len(domains), mode=mode)
    return model.eval()


def _labels(rows: Sequence[dict]) -> torch.Tensor:
    """Gold domain ids of encoded rows (``domain_id``, added by the recipe to every row it encodes)."""
    return torch.tensor([r["domain_id"] for r in rows], dtype=torch.int64)


def _prompt_mask(loss_mask: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """The tokens a router may look at: the prompt (real tokens that carry no answer loss)."""
    return att.bool() & ~loss_mask


def moa_loss(model, mine: Dict[str, List[dict]], everyone: Dict[str, List[dict]], *, eta: float,
             routing_mode: str) -> Tuple[torch.Tensor, dict]:
    """``L_LM + η·L_cls`` on a batch of task rows (each with ``domain_id``); see the module docstring.

    ``routing_mode="gold"`` runs every row through its domain's expert, ``"soft"`` through the routers' softmax
    mixture. Both terms are this rank's share of the global-batch mean (``train.fit``'s convention).
    """
    raw = getattr(model, "module", model)
    rows = mine["task"]
    ids, mask, att = train.collate(rows, 0)
    labels = _labels(rows)
    forced = labels if routing_mode == "gold" else None
    mode = "soft" if routing_mode == "soft" else None
    with routing.moa_state(raw, pool_mask=_prompt_mask(mask, att), forced_ids=forced, mode=mode) as routers:
        ce_sum = train.answer_ce_sum(model, ids, mask, att)
    tokens = max(1, sum(sum(r["loss"][1:]) for r in everyone["task"]))
    lm = ce_sum / tokens
    total, stats = lm, {"lm": lm.detach()}
    if eta:
        cls = routing.moa_router_loss(routers, labels, reduction="sum") / len(everyone["task"])
        total = total + eta * cls
        stats["cls"] = cls.detach()
    return total, stats


@torch.no_grad()
def moa_logits(model, rows: Sequence[dict], ids: torch.Tensor, loss_mask: torch.Tensor, att: torch.Tensor,
               select: str) -> torch.Tensor:
    """LM logits of a MoA model for one batch with expert selection ``select``: ``per-layer`` / ``last`` / ``vote``
    (top-1 per sequence), ``soft`` (softmax mixture), ids ``[B]`` (e.g. gold domains), or a callable
    ``rows -> ids [B]`` (an oracle or a classifier)."""
    prompt = _prompt_mask(loss_mask, att)
    forced, mode = None, None
    if callable(select):
        select = select(rows)
    if isinstance(select, torch.Tensor):
        forced = select
    elif select in routing.MOA_SELECT_MODES:
        with routing.moa_state(model, pool_mask=prompt, mode="top1") as routers:
            model(input_ids=ids, attention_mask=att)
        forced = routing.moa_select([r.last_logits for r in routers], select)
    elif select == "soft":
        mode = "soft"
    elif select == "per-layer":
        mode = "top1"
    else:
        raise ValueError(f"moa_logits: unknown selection {select!r}")
    with routing.moa_state(model, pool_mask=prompt, forced_ids=forced, mode=mode):
        return model(input_ids=ids, attention_mask=att).logits


@torch.no_grad()
def router_accuracy(model, tok, rows_of, examples, max_len: int, batch_size: int = 64) -> dict:
    """Accuracy against the gold domain of every router (per-layer routed pass), of the last router's and of the
    vote's decision: ``{"layers": [names], "per_layer": [acc], "last": acc, "vote": acc}``."""
    names = [name for name, m in model.named_modules() if isinstance(m, routing.MoARouter)]
    correct = torch.zeros(len(names))
    last = vote = total = 0
    for i in range(0, len(examples), batch_size):
        rows = rows_of(examples[i:i + batch_size])
        ids, mask, att = train.collate(rows, 0)
        labels = _labels(rows)
        with routing.moa_state(model, pool_mask=_prompt_mask(mask, att), mode="top1") as routers:
            model(input_ids=ids, attention_mask=att)
        stack = torch.stack([r.last_logits for r in routers])
        correct += (stack.argmax(-1) == labels).sum(-1).float()
        last += int((routing.moa_select(stack, "last") == labels).sum())
        vote += int((routing.moa_select(stack, "vote") == labels).sum())
        total += len(rows)
    return {"layers": [n.rsplit(".router", 1)[0] for n in names], "per_layer": (correct / total).tolist(),
            "last": last / total, "vote": vote / total}


# ---------------------------------------------------------------------------------------------------------------
# the classifier-selection baseline

def _pooled_features(base, rows: Sequence[dict], batch_size: int = 64) -> torch.Tensor:
    """Mean over the prompt tokens of the base model's last hidden state, ``[len(rows), d]``."""
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            ids, mask, att = train.collate(rows[i:i + batch_size], 0)
            h = base(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[-1]
            m = _prompt_mask(mask, att).unsqueeze(-1).to(h.dtype)
            out.append((h * m).sum(1) / m.sum(1).clamp_min(1.0))
    return torch.cat(out)


def train_classifier(base, rows: Sequence[dict], n: int, steps: int, lr: float, seed: int):
    """A linear domain classifier on the base model's pooled features (full-batch AdamW, seeded, standardised
    features); returns ``classify(rows) -> domain ids [B]``."""
    feats = _pooled_features(base, rows)
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    torch.manual_seed(seed)
    probe = torch.nn.Linear(feats.shape[1], n)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr)
    labels = _labels(rows)
    x = (feats - mean) / std
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(probe(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def classify(rows_: Sequence[dict]) -> torch.Tensor:
        with torch.no_grad():
            return probe((_pooled_features(base, rows_) - mean) / std).argmax(-1)

    return classify


# ---------------------------------------------------------------------------------------------------------------
# the recipe

def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _per_domain(result: Dict[str, dict], tasks: Sequence[str], dom: Dict[str, str], domains: Sequence[str]):
    out = {}
    for d in domains:
        ts = [t for t in tasks if dom[t] == d]
        out[d] = {"acc": sum(result[t]["acc"] for t in ts) / len(ts),
                  "loss": sum(result[t]["loss"] for t in ts) / len(ts)}
    return out


def run(cfg: MoAConfig, out_dir, *, data_dir=None, model_dir=None, cache_dir=None, progress: bool = True) -> dict:
    """Runs the recipe and writes results.json, results.md and plots into ``out_dir``; returns the payload."""
    t0 = time.time()
    out = Path(out_dir)
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"moa: unknown variants {unknown} (known: {list(VARIANTS)})")
    setup = prepare(cfg.base, data_dir=data_dir, model_dir=model_dir, cache_dir=cache_dir, progress=progress)
    data, tok, base = setup.data, setup.tok, setup.model
    tasks = list(cfg.tasks) if cfg.tasks else data.train_tasks
    missing = [t for t in tasks if t not in data.train_tasks]
    if missing:
        raise ValueError(f"moa: tasks {missing} have no training rows")
    dom = {e.task: (e.domain or e.task) for e in data.train + data.test}
    domains = sorted({dom[t] for t in tasks})
    if len(domains) < 2:
        raise ValueError(f"moa: needs at least 2 domains to route between, got {domains}")
    pool = [e for e in data.train if e.task in tasks]
    test = [e for e in data.test if e.task in tasks]
    scale = cfg.alpha / cfg.r
    counter = iter(range(10_000))

    def rows_of(examples):
        rows = []
        for e in examples:
            row = train.encode_example(tok, e, setup.max_len)
            row["domain_id"] = domains.index(dom[e.task])
            rows.append(row)
        return rows

    def fit_lora(examples, steps, tag):
        tcfg = train.TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup=steps // 10,
                                 seed=cfg.seed + 1000 * next(counter), desc=tag)
        state, log = train.train_lora(base, tok, examples, tcfg, lora_config(cfg.base, cfg.r, cfg.alpha),
                                      max_len=setup.max_len, save_to=out / "adapters" / tag, progress=progress)
        return state, log

    def gold(rows):  # evaluate()'s rows carry the task; the domain follows from it
        return torch.tensor([domains.index(dom[r["task"]]) for r in rows], dtype=torch.int64)

    def score(model, select=None):
        fwd = None if select is None else (lambda m, rows, i, mk, a: moa_logits(m, rows, i, mk, a, select))
        return ev.evaluate(model, tok, test, max_len=setup.max_len, forward=fwd)

    # stage 1: one LoRA per domain
    expert_states, train_final = [], {}
    for d in domains:
        state, log = fit_lora([e for e in pool if dom[e.task] == d], cfg.expert_steps, f"stage1/{d}")
        expert_states.append(state)
        train_final[f"stage-1 expert {d}"] = log[-1]
    experts = [ad.factors_from_peft(s, scale) for s in expert_states]
    single_state, log = fit_lora(pool, cfg.single_steps or cfg.expert_steps * len(domains), "single-mixed")
    train_final["single LoRA (mixed data)"] = log[-1]

    results: Dict[str, dict] = {"base": score(base)}
    results["single LoRA (mixed data)"] = score(ad.combine(base, [ad.factors_from_peft(single_state, scale)]))
    stage1 = build_moa_model(base, experts, domains, r=cfg.r, alpha=cfg.alpha, seed=cfg.seed)
    results["stage-1 experts, oracle routing"] = score(stage1, gold)
    train_rows = rows_of(pool)
    classifier = train_classifier(base, train_rows, len(domains), cfg.classifier_steps, cfg.classifier_lr, cfg.seed)
    results["stage-1 experts, classifier selection"] = score(stage1, classifier)
    test_rows = rows_of(test)
    classifier_acc = float((classifier(test_rows) == _labels(test_rows)).float().mean())

    # stage 2: routers (and LoRAs) per variant
    routers_acc, models = {}, {}
    for name in cfg.variants:
        init, joint, with_cls, routing_mode = VARIANTS[name]
        model = build_moa_model(base, experts, domains, r=cfg.r, alpha=cfg.alpha, init=init, trainable=joint,
                                mode="soft" if routing_mode == "soft" else "top1", seed=cfg.seed)
        params = [p for n_, p in model.named_parameters() if ".router." in n_ or (joint and ".bank." in n_)]
        # from scratch there is no stage 1: its steps go to stage 2, so every variant trains its LoRAs equally long
        steps = cfg.stage2_steps + (cfg.expert_steps * len(domains) if init == "scratch" else 0)
        tcfg = train.TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=cfg.stage2_lr,
                                 warmup=steps // 10, seed=cfg.seed + 1000 * next(counter), desc=f"stage2/{name}")

        def make_batch(step, gen):
            idx = torch.randint(len(train_rows), (cfg.batch_size,), generator=gen).tolist()
            return {"task": [train_rows[i] for i in idx]}

        loss_fn = functools.partial(moa_loss, eta=cfg.eta if with_cls else 0.0, routing_mode=routing_mode)
        log = train.fit(model, params, make_batch, loss_fn, tcfg, progress=progress)
        train_final[name] = log[-1]
        models[name] = model
        if routing_mode == "soft":
            results[f"{name}"] = score(model, "soft")
        else:
            for mode in INFERENCE_MODES:
                results[f"{name}, {mode}"] = score(model, mode)
            results[f"{name}, oracle"] = score(model, gold)
        routers_acc[name] = router_accuracy(model, tok, rows_of, test, setup.max_len)

    timing = time_mixed_batch(base, models.get("MoA"), stage1, expert_states, domains, test, rows_of, cfg)
    summary = {n: {"mean_acc": ev.mean_accuracy(r, tasks),
                   "mean_loss": sum(r[t]["loss"] for t in tasks) / len(tasks)} for n, r in results.items()}
    payload = {"recipe": "moa", "config": _jsonable(asdict(cfg)), "source": setup.source, "tasks": tasks,
               "domains": domains, "domain_of": {t: dom[t] for t in tasks}, "results": results,
               "per_domain": {n: _per_domain(r, tasks, dom, domains) for n, r in results.items()},
               "summary": summary, "router_accuracy": routers_acc, "classifier_accuracy": classifier_acc,
               "train_final": train_final, "timing": timing, "seconds": time.time() - t0}
    if train.rank() == 0:
        write(payload, out)
    return payload


def _peft_library(base, states: Sequence[dict], domains: Sequence[str], r: int, alpha: float):
    """A PEFT model holding the N domain LoRAs under their domain names (for the throughput comparison)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(train.LoRAConfig().targets), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(base), config, adapter_name=domains[0])
    for d in domains[1:]:
        model.add_adapter(d, config)
    for d, state in zip(domains, states):
        set_peft_model_state_dict(model, state, adapter_name=d)
    return model.eval()


def _time_methods(fns: Dict[str, object], ref: str, tokens: int, reps: int) -> dict:
    """Median forward time of each ``fns`` entry; outputs of the gold-id methods are compared with ``ref``'s."""
    from lora_ops.benchmarks.timing import OtherCpuMeter, time_fn

    want = fns[ref]()
    out = {}
    for name, fn in fns.items():
        meter = OtherCpuMeter()
        t = time_fn(fn, warmup=2, reps=reps)
        entry = {"ms": t.median_ms, "iqr_ms": t.iqr_ms, "tokens_per_s": tokens / (t.median_ms / 1e3),
                 "others_cpu": meter.share()}
        if "gold" in name or name.startswith("PEFT"):
            entry["max_abs_diff_vs_peft"] = float((fn() - want).abs().max())
        out[name] = entry
    base_ms = out.get(BASE_ONLY, {}).get("ms")
    for entry in out.values():
        entry["speedup_vs_peft"] = out[ref]["ms"] / entry["ms"]
        if base_ms is not None:  # the adapters' share: time above the adapter-free model's
            entry["lora_part_ms"] = entry["ms"] - base_ms
    if base_ms is not None:
        peft_part = out[ref]["lora_part_ms"]
        for name, entry in out.items():
            if name != BASE_ONLY and entry["lora_part_ms"] > 0:
                entry["lora_part_speedup_vs_peft"] = peft_part / entry["lora_part_ms"]
    return out


BASE_ONLY = "base model, no adapters"


def _mixed_batch_fns(base, lib_model, peft_model, domains, rows, ids, mask, att, moa_model=None
                     ) -> Dict[str, object]:
    labels = _labels(rows)
    names = [domains[i] for i in labels.tolist()]

    def peft_per_domain():
        out = None
        for i, d in enumerate(domains):
            sel = labels == i
            if sel.any():
                peft_model.set_adapter(d)
                logits = peft_model(input_ids=ids[sel], attention_mask=att[sel]).logits
                out = logits.new_empty(ids.shape + logits.shape[-1:]) if out is None else out
                out[sel] = logits
        return out

    fns = {BASE_ONLY: lambda: base(input_ids=ids, attention_mask=att).logits,
           "lora_ops, gold ids (1 pass)": lambda: moa_logits(lib_model, rows, ids, mask, att, labels),
           "PEFT adapter_names (1 pass)": lambda: peft_model(input_ids=ids, attention_mask=att,
                                                             adapter_names=names).logits,
           "PEFT, one sub-batch per domain": peft_per_domain}
    if moa_model is not None:
        fns["lora_ops, MoA per-layer routing (1 pass)"] = lambda: moa_logits(moa_model, rows, ids, mask, att,
                                                                             "per-layer")
        fns["lora_ops, MoA vote (2 passes)"] = lambda: moa_logits(moa_model, rows, ids, mask, att, "vote")
    return fns


@torch.no_grad()
def time_mixed_batch(base, moa_model, stage1, expert_states, domains, test, rows_of, cfg: MoAConfig) -> dict:
    """Forward time of one mixed-domain batch: lora_ops (gold ids, and MoA routing) vs PEFT (``adapter_names``
    mixed batch, and one sub-batch per domain with ``set_adapter``), on the recipe's model with the same stage-1
    experts; then the same gold-id comparison on a randomly initialised Llama of realistic width
    (``cfg.wide_model``) with random experts, where the adapters' cost is not lost in per-call overheads."""
    rng = random.Random(cfg.seed)
    rows = rows_of(rng.sample(list(test), min(cfg.timing_rows, len(test))))
    ids, mask, att = train.collate(rows, 0)
    tokens = int(att.sum())
    peft_model = _peft_library(base, expert_states, domains, cfg.r, cfg.alpha)
    fns = _mixed_batch_fns(base, stage1, peft_model, domains, rows, ids, mask, att, moa_model)
    out = {"rows": len(rows), "tokens": tokens,
           "methods": _time_methods(fns, "PEFT adapter_names (1 pass)", tokens, cfg.timing_reps)}
    if cfg.wide_model is not None:
        from lora_ops.recipes.model import build_tiny_llama

        wide = build_tiny_llama(base.config.vocab_size, cfg.wide_model, seed=cfg.seed)
        for p in wide.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(cfg.seed)
        targets = train.LoRAConfig().targets
        experts = [{name: ad.Factors(torch.randn(cfg.r, m.in_features, generator=g) / m.in_features ** 0.5,
                                     torch.randn(m.out_features, cfg.r, generator=g) / cfg.r ** 0.5, cfg.alpha / cfg.r)
                    for name, m in wide.named_modules() if name.endswith(targets)} for _ in domains]
        states = [ad.peft_from_factors(e, cfg.alpha) for e in experts]
        lib = build_moa_model(wide, experts, domains, r=cfg.r, alpha=cfg.alpha, seed=cfg.seed)
        fns = _mixed_batch_fns(wide, lib, _peft_library(wide, states, domains, cfg.r, cfg.alpha), domains, rows, ids,
                               mask, att)
        out["wide"] = {"model": asdict(cfg.wide_model), "rows": len(rows), "tokens": tokens,
                       "methods": _time_methods(fns, "PEFT adapter_names (1 pass)", tokens, cfg.timing_reps)}
    return out


def markdown(p: dict) -> str:
    tasks, domains = p["tasks"], p["domains"]
    names = list(p["results"])
    lines = ["# Mixture-of-LoRAs (MoA) reproduction", "",
             f"data: {p['source']['data']}; model: {p['source']['model']}; domains: {', '.join(domains)}; "
             f"{p['seconds']:.0f} s", "", "## Per-domain accuracy (exact match) and answer LM loss", ""]
    headers = ["model"] + [f"{d} acc" for d in domains] + ["mean acc", "mean loss"]
    rows = [[n] + [p["per_domain"][n][d]["acc"] for d in domains] + [p["summary"][n]["mean_acc"],
                                                                     p["summary"][n]["mean_loss"]] for n in names]
    lines.append(res.markdown_table(headers, rows))
    lines += ["## Per-task accuracy", ""]
    rows = [[n] + [p["results"][n][t]["acc"] for t in tasks] for n in names]
    lines.append(res.markdown_table(["model"] + [f"{t} ({p['domain_of'][t]})" for t in tasks], rows))
    lines += ["## Router accuracy against the gold domain (test split)", "",
              f"Separate classifier (linear probe on the base's pooled last hidden state): "
              f"{res.fmt(p['classifier_accuracy'])}", ""]
    variants = list(p["router_accuracy"])
    if variants:
        layers = p["router_accuracy"][variants[0]]["layers"]
        rows = [[layer] + [p["router_accuracy"][v]["per_layer"][i] for v in variants] for i, layer in
                enumerate(layers)]
        rows.append(["**last router's decision**"] + [p["router_accuracy"][v]["last"] for v in variants])
        rows.append(["**vote over all routers**"] + [p["router_accuracy"][v]["vote"] for v in variants])
        lines.append(res.markdown_table(["router of layer"] + variants, rows))
    t = p["timing"]
    lines += [f"## Inference throughput of one mixed-domain batch ({t['rows']} rows, {t['tokens']} tokens)", ""]
    lines.append(_timing_table(t["methods"]))
    if t.get("wide"):
        w = t["wide"]["model"]
        lines += [f"The same batch through a randomly initialised Llama of hidden {w['hidden']}, {w['layers']} "
                  f"layers, intermediate {w['intermediate']} with {len(p['domains'])} random rank-"
                  f"{p['config']['r']} experts on every Linear (gold ids):", ""]
        lines.append(_timing_table(t["wide"]["methods"]))
    return "\n".join(lines)


def _timing_table(methods: dict) -> str:
    rows = [[n, e["ms"], e["tokens_per_s"], e["speedup_vs_peft"], e.get("lora_part_ms"),
             e.get("lora_part_speedup_vs_peft"), e.get("max_abs_diff_vs_peft"), e.get("others_cpu")]
            for n, e in methods.items()]
    return res.markdown_table(["method", "ms", "tokens/s", "speed vs PEFT adapter_names", "adapters' part ms",
                               "adapters' part: PEFT / this", "max abs Δ logit vs PEFT", "others' CPU share"],
                              rows)


def write(p: dict, out: Path) -> dict:
    paths = res.write_results(out, p, markdown(p))
    names = list(p["results"])
    paths["summary_png"] = res.bar_plot(
        out / "domains.png", "MoA: per-domain accuracy", names,
        {d: [p["per_domain"][n][d]["acc"] for n in names] for d in p["domains"]}, "exact-match accuracy")
    if p["router_accuracy"]:
        first = next(iter(p["router_accuracy"].values()))
        paths["router_png"] = res.line_plot(
            out / "router_accuracy.png", "MoA: router accuracy per adapted layer",
            list(range(len(first["layers"]))),
            {v: a["per_layer"] for v, a in p["router_accuracy"].items()}, "adapted layer (forward order)",
            "accuracy vs gold domain")
    methods = [m for m in p["timing"]["methods"] if m != BASE_ONLY]
    series = {"recipe model": [p["timing"]["methods"][m]["speedup_vs_peft"] for m in methods]}
    if p["timing"].get("wide"):
        series["realistic width"] = [p["timing"]["wide"]["methods"].get(m, {}).get("speedup_vs_peft", 0.0)
                                     for m in methods]
    paths["timing_png"] = res.bar_plot(out / "throughput.png", "MoA: mixed-domain batch, speed vs PEFT "
                                       "adapter_names", methods, series, "speed-up (PEFT time / time)")
    return paths
