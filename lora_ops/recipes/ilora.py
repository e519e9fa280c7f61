"""I-LoRA: routing-tuned task LoRAs merged iteratively into one rank-r LoRA, with its two ablations.

Procedure (interpretations are listed in docs/papers.md):

1. *Routing tuning.* Each task's LoRA is trained with
   ``L = ε1·CE(task rows) + ε2·KL(p_base ‖ p_base+LoRA)(general rows) + ε3·‖scale·B·A·h‖²(general rows)``:
   task rows feed only the cross-entropy, general rows only the two "stay out of the way" terms. The KL is the
   token mean over general tokens of ``Σ_v p_base(v) (log p_base(v) − log p_lora(v))``; the activation term is the
   token mean over general tokens of the squared L2 norm of the LoRA branch output, summed over all adapted layers
   (``h`` is each layer's input). With ε2 = ε3 = 0 this is plain fine-tuning (ablation a).
2. *Iterative merging.* Tasks arrive in a fixed order. Per adapted layer, the new ``ΔW_t = scale·B_t·A_t`` is cut
   to its leading singular directions covering ``energy`` (default 0.8) of ``Σσ²``; it is folded into the running
   merge by element-wise max-by-magnitude (``M ← where(|D| > |M|, D, M)``, ties keep M); M is then stored as a
   rank-r LoRA again (truncated SVD), which is the M the next task folds into.
3. *Ablation b.* The iterative merge is replaced by the average of the task deltas (average of products
   ``(1/T) Σ_t ΔW_t``), stored at the same rank r so both merges cost the same at inference.

Metrics: single-task accuracy (merged adapter vs the task's own adapter), multi-task mean accuracy and general-data
loss (vs the base), and the scalability curve (mean accuracy over the first t tasks after merging t tasks).
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from lora_ops.merge import truncate_by_energy
from lora_ops.recipes import adapters as ad
from lora_ops.recipes import data as data_mod
from lora_ops.recipes import eval as ev
from lora_ops.recipes import results as res
from lora_ops.recipes import train
from lora_ops.recipes.common import BaseSpec, lora_config, prepare
from lora_ops.recipes.model import TinyConfig

__all__ = ["ILoRAConfig", "quick_config", "routing_loss", "energy_truncate", "max_by_magnitude", "iterative_max",
           "average_merge", "held_back_general", "run"]


@dataclass
class ILoRAConfig:
    base: BaseSpec = field(default_factory=lambda: BaseSpec(tiny=TinyConfig(64, 2, 4, 128), pretrain_steps=800))
    tasks: Optional[Tuple[str, ...]] = None  # arrival order; default: every training task, sorted
    r: int = 8
    alpha: float = 16.0
    steps: int = 300
    batch_size: int = 32
    general_batch: int = 32
    lr: float = 1e-2
    eps: Tuple[float, float, float] = (1.0, 1.0, 0.1)  # (ε1 CE, ε2 KL, ε3 activation)
    energy: float = 0.8
    n_general_eval: int = 512
    eval_every: int = 100  # validation accuracy / loss in the training log (results.json: "valid_curves")
    # merge sensitivity on the same routing-tuned adapters: (energy, stored rank; 0 = full rank) of iterative max
    sweep: Tuple[Tuple[float, int], ...] = ((0.8, 8), (1.0, 8), (0.8, 32), (1.0, 0))
    seed: int = 0


def quick_config() -> ILoRAConfig:
    return ILoRAConfig(base=BaseSpec(tiny=TinyConfig(64, 2, 4, 128), pretrain_steps=200, n_train=200, n_test=32,
                                     n_general=2000),
                       tasks=("rev", "inc", "get", "up"), steps=100, general_batch=16, n_general_eval=256,
                       eval_every=50)


# ---------------------------------------------------------------------------------------------------------------
# routing tuning

def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _capture_lora_outputs(raw, captured: List[torch.Tensor]) -> list:
    """Forward hooks that append ``‖scale·B·A·h‖²`` per token of every adapted layer to ``captured``."""
    if isinstance(raw, train.LoRAModel):
        def hook(m, args, _out):
            a, b, s = m.bank.adapter(0)
            captured.append(((s * ((args[0].float() @ a.T) @ b.T)) ** 2).sum(-1))
        return [m.register_forward_hook(hook) for m in raw.lora_layers()]
    handles = []
    for layer in _lora_layers(raw):
        scale = layer.scaling["default"]
        handles.append(layer.lora_B["default"].register_forward_hook(
            lambda _m, _i, out, s=scale: captured.append(((out.float() * s) ** 2).sum(-1))))
    return handles


def kl_base_lora(base_logits: torch.Tensor, lora_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over masked positions of ``KL(p_base ‖ p_lora)``; logits ``[B, L, V]``, mask ``[B, L]``."""
    lp_base = F.log_softmax(base_logits.float(), -1)
    lp_lora = F.log_softmax(lora_logits.float(), -1)
    kl = (lp_base.exp() * (lp_base - lp_lora)).sum(-1)
    return (kl * mask).sum()


def routing_loss(model, mine: Dict[str, List[dict]], everyone: Dict[str, List[dict]], *,
                 eps: Tuple[float, float, float]) -> Tuple[torch.Tensor, dict]:
    """I-LoRA's loss for a PEFT model (possibly DDP-wrapped): see the module docstring.

    Task and general rows go through one forward pass (one DDP forward per step); the base distribution on the
    general rows comes from a gradient-free pass with the adapter disabled.
    """
    e1, e2, e3 = eps
    raw = getattr(model, "module", model)
    task_rows, gen_rows = mine["task"], mine.get("general", [])
    ids, mask, att = train.collate(list(task_rows) + list(gen_rows), 0)
    n_task = len(task_rows)
    is_gen = torch.zeros(ids.shape[0], 1, dtype=torch.bool)
    is_gen[n_task:] = True
    gen_tokens_mask = att.bool() & is_gen  # every real token of a general row
    captured: List[torch.Tensor] = []
    handles = _capture_lora_outputs(raw, captured) if e3 else []
    parts = train.decoder_and_head(model)  # real models: the LM head only where a loss needs it
    try:
        if parts is None:
            logits = model(input_ids=ids, attention_mask=att).logits
        else:
            hidden = parts[0](input_ids=ids, attention_mask=att).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    task_tokens = max(1, sum(sum(r["loss"][1:]) for r in everyone["task"]))
    if parts is None:
        ce = train.token_ce(logits[:n_task], ids[:n_task], mask[:n_task]).sum() / task_tokens
        gen_logits = logits[n_task:]
    else:
        keep = mask[:n_task, 1:]
        task_logits = parts[1](hidden[:n_task, :-1][keep]).float()
        ce = F.cross_entropy(task_logits, ids[:n_task, 1:][keep], reduction="sum") / task_tokens
        gen_logits = parts[1](hidden[n_task:]) if len(gen_rows) else None
    total = e1 * ce
    stats = {"ce": ce.detach()}
    gen_all = everyone.get("general", [])
    gen_tokens = max(1, sum(len(r["ids"]) for r in gen_all))
    if gen_all and e2:
        with torch.no_grad(), raw.disable_adapter():
            base_logits = raw(input_ids=ids[n_task:], attention_mask=att[n_task:]).logits
        kl = kl_base_lora(base_logits, gen_logits, gen_tokens_mask[n_task:].float()) / gen_tokens
        total = total + e2 * kl
        stats["kl"] = kl.detach()
    if gen_all and e3:
        act = sum((c * gen_tokens_mask).sum() for c in captured) / gen_tokens
        total = total + e3 * act
        stats["act"] = act.detach()
    return total, stats


# ---------------------------------------------------------------------------------------------------------------
# merging (dense per-layer deltas: the recipes' layers are small; lora_ops.merge works on factors for big ones)

def energy_truncate(delta: torch.Tensor, energy: float) -> Tuple[torch.Tensor, int]:
    """(the leading SVD part of ``delta`` covering ``energy`` of ``Σσ²``, the number of directions kept)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = truncate_by_energy(s, energy)  # the same energy rule as lora_ops.merge's iterative_max
    if s.numel() == 0 or s[0] == 0:
        return torch.zeros_like(delta), 0
    return ((u[:, :k] * s[:k]) @ vh[:k]).to(delta.dtype), k


def max_by_magnitude(m: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Element-wise: the entry with the larger magnitude (ties keep ``m``)."""
    return torch.where(d.abs() > m.abs(), d, m)


def iterative_max(adapters: Sequence[ad.Adapter], rank: Optional[int], energy: float = 0.8) -> List[ad.Adapter]:
    """The rank-``rank`` merge after each arrival: element t is the merge of adapters[:t+1] (None: full rank)."""
    merged: Optional[Dict[str, torch.Tensor]] = None
    history = []
    for adapter in adapters:
        cut = {p: energy_truncate(d, energy)[0] for p, d in ad.dense(adapter).items()}
        if merged is None:
            folded = cut
        else:
            folded = {p: max_by_magnitude(merged[p], cut[p]) for p in cut}
        stored = ad.adapter_from_dense(folded, rank)
        merged = ad.dense(stored)  # the next task folds into M as stored (rank r), not the full-rank fold
        history.append(stored)
    return history


def average_merge(adapters: Sequence[ad.Adapter], rank: Optional[int]) -> ad.Adapter:
    """Average of products ``(1/T) Σ ΔW_t`` stored at rank ``rank``."""
    deltas = [ad.dense(a) for a in adapters]
    return ad.adapter_from_dense({p: sum(d[p] for d in deltas) / len(deltas) for p in deltas[0]}, rank)


# ---------------------------------------------------------------------------------------------------------------
# the recipe

def held_back_general(general: Sequence[str], n: int, *,
                      synthetic_seed: Optional[int]) -> Tuple[List[str], List[str]]:
    """(routing-tuning lines, general evaluation lines): the evaluation set is de-duplicated and disjoint from the
    lines routing tuning draws from. On the synthetic testbed (``synthetic_seed`` given) it is freshly generated
    and also disjoint from the base's pre-training corpus (which is ``general``); on user data it is the corpus's
    last ``n`` distinct lines (at most half of them), held back from routing tuning."""
    unique = list(dict.fromkeys(general))
    if synthetic_seed is not None:
        return list(general), data_mod.general_lines(synthetic_seed, n, exclude=unique)
    n = min(n, len(unique) // 2)
    held = set(unique[len(unique) - n:])
    return [t for t in general if t not in held], unique[len(unique) - n:]


def _train_task_adapters(setup, cfg: ILoRAConfig, tasks, eps, out: Path, tag: str, progress: bool,
                         general: Sequence[str]):
    gen_rows = [train.encode_text(setup.tok, t, setup.max_len) for t in general]
    adapters, logs, curves = [], {}, {}
    for i, task in enumerate(tasks):
        exs = [e for e in setup.data.train if e.task == task]
        tcfg = train.TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup=cfg.steps // 10,
                                 seed=cfg.seed + 1000 * i, desc=f"{tag}:{task}", eval_every=cfg.eval_every)

        def extra(gen):
            return [gen_rows[j] for j in torch.randint(len(gen_rows), (cfg.general_batch,), generator=gen).tolist()]

        use_general = bool(eps[1] or eps[2])
        state, log = train.train_lora(setup.model, setup.tok, exs, tcfg, lora_config(cfg.base, cfg.r, cfg.alpha),
                                      max_len=setup.max_len, loss_fn=functools.partial(routing_loss, eps=eps),
                                      extra_rows=extra if use_general else None,
                                      save_to=out / "adapters" / tag / task, progress=progress,
                                      valid=[e for e in setup.data.valid if e.task == task])
        adapters.append(ad.factors_from_peft(state, cfg.alpha / cfg.r))
        logs[task] = log[-1]
        curves[task] = [{"step": e["step"] + 1, **e["eval"][task]} for e in log if "eval" in e]
    return adapters, logs, curves


def run(cfg: ILoRAConfig, out_dir, *, data_dir=None, model_dir=None, cache_dir=None, progress: bool = True) -> dict:
    """Runs the recipe and writes results.json, results.md and plots into ``out_dir``; returns the payload."""
    t0 = time.time()
    out = Path(out_dir)
    setup = prepare(cfg.base, data_dir=data_dir, model_dir=model_dir, cache_dir=cache_dir, progress=progress)
    tasks = list(cfg.tasks) if cfg.tasks else setup.data.train_tasks
    missing = [t for t in tasks if t not in setup.data.train_tasks]
    if missing:
        raise ValueError(f"ilora: tasks {missing} have no training rows")
    if (cfg.eps[1] or cfg.eps[2]) and not setup.data.general:
        raise ValueError("ilora: routing tuning (ε2, ε3 > 0) needs general text: add general.jsonl to --data")
    test = [e for e in setup.data.test if e.task in tasks]
    # evaluation lines: de-duplicated, never drawn for routing tuning, and (synthetic) never seen in pre-training
    tuning_general, general = held_back_general(setup.data.general, cfg.n_general_eval,
                                                synthetic_seed=None if data_dir else cfg.seed + 7919)
    tok, base = setup.tok, setup.model

    def score(model):
        r = ev.evaluate(model, tok, test, max_len=setup.max_len)
        return r, (ev.general_loss(model, tok, general, max_len=setup.max_len) if general else None)

    base_scores, base_general = score(base)
    plain_eps = (1.0, 0.0, 0.0)
    routed, routed_logs, routed_curves = _train_task_adapters(setup, cfg, tasks, cfg.eps, out, "routing", progress,
                                                              tuning_general)
    plain, plain_logs, plain_curves = _train_task_adapters(setup, cfg, tasks, plain_eps, out, "plain", progress,
                                                           tuning_general)

    own = {}
    for tag, adapters_ in (("routing", routed), ("plain", plain)):
        own[tag] = {}
        for task, a in zip(tasks, adapters_):
            r = ev.evaluate(ad.combine(base, [a]), tok, [e for e in test if e.task == task], max_len=setup.max_len)
            own[tag][task] = r[task]

    histories = {
        "I-LoRA (routing + iterative max)": iterative_max(routed, cfg.r, cfg.energy),
        "ablation a: plain CE + iterative max": iterative_max(plain, cfg.r, cfg.energy),
        "ablation b: routing + average": [average_merge(routed[: t + 1], cfg.r) for t in range(len(tasks))],
        # the exact average (rank T·r), next to the rank-r one: separates averaging from the rank cut
        "ablation b, full rank: routing + average": [average_merge(routed[: t + 1], None) for t in range(len(tasks))],
        "plain CE + average": [average_merge(plain[: t + 1], cfg.r) for t in range(len(tasks))],
    }
    methods = {}
    for name, hist in histories.items():
        curve = []
        for t, merged in enumerate(hist):
            model = ad.combine(base, [merged])
            r = ev.evaluate(model, tok, [e for e in test if e.task in tasks[: t + 1]], max_len=setup.max_len)
            curve.append(ev.mean_accuracy(r, tasks[: t + 1]))
        final_scores, final_general = score(ad.combine(base, [hist[-1]]))
        methods[name] = {"per_task": final_scores, "mean_acc": ev.mean_accuracy(final_scores, tasks),
                         "general_loss": final_general, "scalability": curve}
        if train.rank() == 0:
            from lora_ops._io import write_peft_adapter_dir

            slug = re.sub(r"[^a-z0-9-]+", "_", name.split(":")[0].split(" (")[0].lower()).strip("_")
            write_peft_adapter_dir(out / "merged" / slug, ad.peft_from_factors(hist[-1], cfg.alpha),
                                   {"peft_type": "LORA", "r": cfg.r, "lora_alpha": cfg.alpha,
                                    "target_modules": sorted({p.rsplit(".", 1)[1] for p in hist[-1]}),
                                    "task_type": "CAUSAL_LM", "bias": "none", "lora_dropout": 0.0})
    sweep = []
    for energy, rank in cfg.sweep:
        merged = iterative_max(routed, rank or None, energy)[-1]
        r = ev.evaluate(ad.combine(base, [merged]), tok, test, max_len=setup.max_len)
        sweep.append({"merge": "iterative max", "energy": energy, "rank": rank or "full",
                      "mean_acc": ev.mean_accuracy(r, tasks)})
    sweep.append({"merge": "average of products", "energy": 1.0, "rank": "full",
                  "mean_acc": methods["ablation b, full rank: routing + average"]["mean_acc"]})
    payload = {
        "recipe": "ilora", "config": _jsonable(asdict(cfg)), "source": setup.source, "tasks": tasks,
        "base": {"per_task": base_scores, "mean_acc": ev.mean_accuracy(base_scores, tasks),
                 "general_loss": base_general},
        "own_adapter": {tag: {"per_task": v, "mean_acc": ev.mean_accuracy(v, tasks)} for tag, v in own.items()},
        "train_final": {"routing": routed_logs, "plain": plain_logs},
        "valid_curves": {"routing": routed_curves, "plain": plain_curves},
        "methods": methods, "merge_sweep": sweep, "seconds": time.time() - t0,
    }
    if train.rank() == 0:
        write(payload, out)
    return payload


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def markdown(p: dict) -> str:
    tasks = p["tasks"]
    own_r, own_p = p["own_adapter"]["routing"]["per_task"], p["own_adapter"]["plain"]["per_task"]
    names = list(p["methods"])
    short = {n: n.split(":")[0].split(" (")[0] for n in names}
    lines = ["# I-LoRA reproduction", "", f"data: {p['source']['data']}; model: {p['source']['model']}; "
             f"{p['seconds']:.0f} s", "", "## Single-task accuracy (exact match, test split)", ""]
    headers = ["task", "base", "own (routing)", "own (plain)"] + [short[n] for n in names]
    rows = [[t, p["base"]["per_task"][t]["acc"], own_r[t]["acc"], own_p[t]["acc"]]
            + [p["methods"][n]["per_task"][t]["acc"] for n in names] for t in tasks]
    rows.append(["**mean**", p["base"]["mean_acc"], p["own_adapter"]["routing"]["mean_acc"],
                 p["own_adapter"]["plain"]["mean_acc"]] + [p["methods"][n]["mean_acc"] for n in names])
    lines.append(res.markdown_table(headers, rows))
    lines += ["## Multi-task compatibility", ""]
    rows = [["base", p["base"]["mean_acc"], p["base"]["general_loss"], 0.0]]
    for n in names:
        m = p["methods"][n]
        gl = m["general_loss"]
        rows.append([n, m["mean_acc"], gl, None if gl is None else gl - p["base"]["general_loss"]])
    lines.append(res.markdown_table(["model", "mean acc", "general loss", "Δ general loss vs base"], rows))
    lines += ["## Scalability (mean accuracy over the first t tasks after merging t)", ""]
    headers = ["t"] + [short[n] for n in names]
    rows = [[t + 1] + [p["methods"][n]["scalability"][t] for n in names] for t in range(len(tasks))]
    lines.append(res.markdown_table(headers, rows))
    if p.get("merge_sweep"):
        lines += ["## Merge sensitivity (routing-tuned adapters, all T tasks merged)", ""]
        rows = [[s["merge"], s["energy"], s["rank"], s["mean_acc"]] for s in p["merge_sweep"]]
        lines.append(res.markdown_table(["merge", "energy kept", "stored rank", "mean acc"], rows))
    lines += ["Own adapters' final training loss (routing tuned: ce / kl / act):", ""]
    rows = [[t, p["train_final"]["routing"][t].get("ce"), p["train_final"]["routing"][t].get("kl"),
             p["train_final"]["routing"][t].get("act"), p["train_final"]["plain"][t].get("ce")] for t in tasks]
    lines.append(res.markdown_table(["task", "ce (routing)", "kl", "act", "ce (plain)"], rows))
    return "\n".join(lines)


def write(p: dict, out: Path) -> dict:
    tasks = p["tasks"]
    paths = res.write_results(out, p, markdown(p))
    series = {"own adapter (routing)": [p["own_adapter"]["routing"]["per_task"][t]["acc"] for t in tasks]}
    series.update({n.split(" (")[0]: [p["methods"][n]["per_task"][t]["acc"] for t in tasks] for n in p["methods"]})
    paths["tasks_png"] = res.bar_plot(out / "single_task.png", "I-LoRA: per-task accuracy", tasks, series,
                                      "exact-match accuracy")
    paths["scal_png"] = res.line_plot(out / "scalability.png", "I-LoRA: accuracy vs number of merged tasks",
                                      list(range(1, len(tasks) + 1)),
                                      {n.split(" (")[0]: p["methods"][n]["scalability"] for n in p["methods"]},
                                      "tasks merged", "mean accuracy over merged tasks")
    return paths
