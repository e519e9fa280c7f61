"""Towards Modular LLMs (arXiv 2405.11157): a library of LoRAs, MBC clustering, Arrow and Mu routing, zero-shot.

Procedure (interpretations are listed in docs/papers.md):

1. *Private library.* One LoRA per training task (paper: rank 4, dropout 0.05, lr 1e-4; here rank 4, dropout 0.05
   and lr 1e-2 by default, because the tiny base needs a larger step size). Every library LoRA starts from the same
   seeded initialisation, so differences between their parameters come from training, not from the random A.
2. *MBC.* The private LoRAs are clustered by their parameters (``lora_ops.routing.mbc_cluster``: flattened A and B
   of every layer, sparsified, cosine k-means) into ``clusters`` groups (default 4 = the planted task families of
   the synthetic testbed; the paper's 10 is for 256 tasks). One LoRA per cluster is trained on the union of its
   tasks, for as many passes over the data as a private LoRA (steps ∝ number of tasks in the cluster).
3. *Routing, training-free, on each library* (private and MBC):
   - **Arrow**: per token, in every adapted layer, the top-k library LoRAs by ``|⟨x, v_i⟩|`` (``v_i`` the top right
     singular vector of ``B_i A_i`` of that layer), softmax over the k chosen with a temperature; computed with
     ``lora_ops.nn.MultiLoRALinear`` + ``lora_ops.routing.ArrowRouter`` (route, then ``grouped_lora`` over the k).
   - **Mu**: the uniform average of the library as one LoRA whose A is the mean of the A_i and B the mean of the B_i
     (``lora_ops.routing.mu_factors``: averaging *factors*, the paper's Mu). The average of the *products*
     ``(1/N) Σ B_i A_i`` (= average of the outputs, a rank N·r LoRA) is reported next to it as an ablation.
4. *Baselines*: the base model; one shared LoRA trained on all training tasks for as many steps as the whole
   private library; the oracle = per task, the best single private-library LoRA (chosen on the test split itself:
   an upper bound on any one-adapter selection).
5. *Ablations*: Arrow's k (``top_k_sweep``); random clusters of the same sizes as MBC's in place of MBC
   (``random_clusters``).

Reported: the cosine-similarity matrix of the private LoRAs (plot), the clusters against the planted task families
(adjusted Rand index), accuracy per training task (in-distribution) and per held-out task (zero-shot) for every
library / routing / baseline, and where Arrow sends each task's tokens (share of the routing weight per LoRA).
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections import defaultdict
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

__all__ = ["ModularConfig", "quick_config", "paper_config", "PAPER_HPARAMS", "MBC_INPUTS", "library_banks",
           "arrow_model", "mu_adapter", "mu_model", "routing_profile", "mbc_vectors", "oracle", "random_partition",
           "run", "markdown"]

# What MBC can compare (each flattened over all layers): the factors A and B themselves (the paper's MBC), their
# updates from the common initialisation, or the products scale·B·A (dense per-layer deltas).
MBC_INPUTS = ("parameters", "updates", "products")

# The paper's LoRA hyper-parameters for the library (for a real base model: see paper_config()).
PAPER_HPARAMS = {"r": 4, "dropout": 0.05, "lr": 1e-4}


@dataclass
class ModularConfig:
    base: BaseSpec = field(default_factory=lambda: BaseSpec(tiny=TinyConfig(64, 2, 4, 128), pretrain_steps=800))
    tasks: Optional[Tuple[str, ...]] = None  # the private library's tasks; default: every training task
    r: int = 4  # paper
    alpha: float = 8.0  # scale alpha / r = 2, as in the other recipes
    dropout: float = 0.05  # paper
    lr: float = 1e-2  # paper: 1e-4 (too small for the tiny base to learn a task in a few hundred steps)
    steps: int = 500  # per private LoRA; a cluster LoRA gets steps x (tasks in the cluster)
    batch_size: int = 32
    same_init: bool = True  # every library LoRA starts from one seeded initialisation
    shared_steps: Optional[int] = None  # shared LoRA on all tasks; default steps x number of tasks
    clusters: int = 4  # MBC's k (paper: 10, for a library of 256 LoRAs)
    keep_fraction: float = 0.2  # MBC's sparsification (lora_ops.routing.mbc_cluster's default)
    mbc_on: str = "parameters"  # what MBC compares: parameters (paper) | updates (minus the common init) | products
    top_k: int = 2  # Arrow's k (paper: 4 of 256 private / 10 MBC LoRAs)
    temperature: float = 1.0  # softmax temperature over the k chosen
    top_k_sweep: Tuple[int, ...] = (1, 2, 4, 8)  # ablation; values larger than a library are skipped
    random_clusters: bool = True  # ablation: random clusters of MBC's sizes, trained like MBC's
    # Arrow also with the experts' factors mixed per token (the authors' code's default) next to mixed outputs
    arrow_factor_mixing: bool = True
    seed: int = 0


def quick_config() -> ModularConfig:
    return ModularConfig(base=BaseSpec(tiny=TinyConfig(64, 2, 4, 128), pretrain_steps=200, n_train=200, n_test=32,
                                       n_general=2000),
                         steps=80, top_k_sweep=(1, 2, 4))


def paper_config(**overrides) -> ModularConfig:
    """The default configuration with the paper's LoRA hyper-parameters (rank 4, dropout 0.05, lr 1e-4): meant for
    a real base model (``--model``); on the tiny base lr 1e-4 learns next to nothing in the default steps."""
    return ModularConfig(**{"r": PAPER_HPARAMS["r"], "dropout": PAPER_HPARAMS["dropout"],
                            "lr": PAPER_HPARAMS["lr"], **overrides})


def _check(cfg: ModularConfig, n_tasks: Optional[int] = None) -> None:
    """Clear errors for bad settings (``n_tasks`` known: also the number of clusters)."""
    def positive_int(name, v):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"modular: {name} must be an int >= 1, got {v!r}")

    for name in ("r", "steps", "batch_size", "top_k"):
        positive_int(name, getattr(cfg, name))
    if cfg.shared_steps is not None:
        positive_int("shared_steps", cfg.shared_steps)
    for k in cfg.top_k_sweep:
        positive_int("top_k_sweep entries", k)
    if not isinstance(cfg.clusters, int) or cfg.clusters < 1 or (n_tasks is not None and cfg.clusters > n_tasks):
        bound = "the number of tasks" if n_tasks is None else f"the number of tasks = {n_tasks}"
        raise ValueError(f"modular: clusters must be an int from 1 to {bound}, got {cfg.clusters!r}")
    if not cfg.temperature > 0 or cfg.temperature == float("inf"):
        raise ValueError(f"modular: temperature must be a finite number > 0, got {cfg.temperature!r}")
    if not cfg.lr > 0:
        raise ValueError(f"modular: lr must be > 0, got {cfg.lr!r}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"modular: dropout must be in [0, 1), got {cfg.dropout!r}")
    if cfg.mbc_on not in MBC_INPUTS:
        raise ValueError(f"modular: mbc_on must be one of {MBC_INPUTS}, got {cfg.mbc_on!r}")
    if cfg.mbc_on == "updates" and not cfg.same_init:
        raise ValueError("modular: mbc_on='updates' needs same_init=True (one common initialisation to subtract)")
    if not 0 < cfg.keep_fraction <= 1:
        raise ValueError(f"modular: keep_fraction must be in (0, 1], got {cfg.keep_fraction!r}")


# ---------------------------------------------------------------------------------------------------------------
# routing a library (each library: a list of adapters {module path: Factors} and their names)

def library_banks(library: Sequence[ad.Adapter], names: Sequence[str], dtype=torch.float32) -> dict:
    """``{module path: lora_ops.nn.AdapterBank}`` stacking the library's factors of each adapted layer."""
    from lora_ops.nn import AdapterBank

    if not library or len(library) != len(names):
        raise ValueError(f"library_banks: need one name per adapter, got {len(library)} adapters and {len(names)} "
                         "names")
    paths = sorted(library[0])
    for i, adapter in enumerate(library[1:], 1):
        if sorted(adapter) != paths:
            raise ValueError(f"library_banks: adapter {names[i]!r} targets other modules than {names[0]!r}")
    return {p: AdapterBank.from_adapters({n: (a[p].a, a[p].b, a[p].scale) for n, a in zip(names, library)},
                                         dtype=dtype)
            for p in paths}


def arrow_model(base: torch.nn.Module, library: Sequence[ad.Adapter], names: Sequence[str], top_k: int,
                temperature: float = 1.0) -> torch.nn.Module:
    """A copy of ``base`` routing every token of every adapted layer to its top-``top_k`` library LoRAs (Arrow).

    Each adapted Linear becomes ``lora_ops.nn.MultiLoRALinear(linear, bank, router=ArrowRouter(prototypes of that
    layer's bank, top_k, temperature))``: ``base(x) + grouped_lora(x, bank, *arrow_route(x, prototypes, top_k))``.
    """
    from lora_ops.nn import wrap
    from lora_ops.routing import ArrowRouter

    model = copy.deepcopy(base)
    dtype = next(model.parameters()).dtype
    banks = library_banks(library, names, dtype)
    wrap(model, banks)
    for path, bank in banks.items():
        model.get_submodule(path).router = ArrowRouter.from_adapters(bank.lora_a.detach(), bank.lora_b.detach(),
                                                                     top_k, temperature)
    return model.eval()


class ArrowFactorMixLinear(torch.nn.Module):
    """``base(x) + (Σ_i w_i s_i B_i)(Σ_i w_i A_i) x`` per token over the Arrow router's top-k experts ``i`` with
    weights ``w_i``: the experts' *factors* mixed per token (cross terms ``B_j A_i`` included), the default of the
    Modular LLMs authors' code and consistent with Mu; ``arrow_model`` mixes the experts' *outputs*
    ``Σ_i w_i s_i B_i A_i x`` (as PEFT's Arrow does). Both are the same for k = 1."""

    def __init__(self, base: torch.nn.Linear, bank, router):
        super().__init__()
        self.base, self.router = base, router
        n, r, d_in = bank.lora_a.shape
        self.register_buffer("a_cat", bank.lora_a.detach().reshape(n * r, d_in).clone())  # [N r, d_in]
        self.register_buffer("b_cat", bank.lora_b.detach().permute(0, 2, 1).reshape(n * r, -1).clone())  # [N r, d_out]
        self.register_buffer("scales", bank.scales.detach().clone())
        self.n, self.r = n, r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ids, w = self.router(x2)  # [T, k] each
        coef = torch.zeros(x2.shape[0], self.n, dtype=x2.dtype, device=x2.device).scatter_add_(1, ids, w.to(x2.dtype))
        u = ((x2 @ self.a_cat.T).view(-1, self.n, self.r) * coef[:, :, None]).sum(1)  # (Σ w_i A_i) x: [T, r]
        mixed = (coef * self.scales)[:, :, None] * u[:, None, :]  # row t holds w_i s_i u_t for every i
        delta = mixed.reshape(x2.shape[0], -1) @ self.b_cat  # (Σ w_i s_i B_i) u
        return self.base(x) + delta.reshape(*x.shape[:-1], -1).to(x.dtype)


def arrow_factor_model(base: torch.nn.Module, library: Sequence[ad.Adapter], names: Sequence[str], top_k: int,
                       temperature: float = 1.0) -> torch.nn.Module:
    """Like :func:`arrow_model` (same router and prototypes) but mixing the top-k experts' factors per token."""
    from lora_ops.routing import ArrowRouter

    model = copy.deepcopy(base)
    banks = library_banks(library, names, next(model.parameters()).dtype)
    for path, bank in banks.items():
        parent, _, name = path.rpartition(".")
        router = ArrowRouter.from_adapters(bank.lora_a.detach(), bank.lora_b.detach(), top_k, temperature)
        setattr(model.get_submodule(parent), name, ArrowFactorMixLinear(model.get_submodule(path), bank, router))
    return model.eval()


def mu_adapter(library: Sequence[ad.Adapter]) -> ad.Adapter:
    """The paper's Mu: per layer, one LoRA with the mean A and the mean B of the library (``mu_factors``; not the
    mean of the products B_i A_i)."""
    from lora_ops.routing import mu_factors

    out: ad.Adapter = {}
    for path in library[0]:
        a, b, scale = mu_factors(torch.stack([x[path].a for x in library]), torch.stack([x[path].b for x in library]),
                                 torch.tensor([x[path].scale for x in library]))
        out[path] = ad.Factors(a, b, float(scale))
    return out


def mu_model(base: torch.nn.Module, library: Sequence[ad.Adapter]) -> torch.nn.Module:
    return ad.combine(base, [mu_adapter(library)])


@torch.no_grad()
def routing_profile(model: torch.nn.Module, tok, examples: Sequence[Example], n_experts: int, *, max_len: int = 64,
                    batch_size: int = 64) -> Dict[str, List[float]]:
    """Per task, the share of Arrow's routing weight each library LoRA receives, over every real token of the
    teacher-forced rows and every routed layer (the shares of a task sum to 1)."""
    from lora_ops.routing import ArrowRouter

    routers = [m for m in model.modules() if isinstance(m, ArrowRouter)]
    if not routers:
        raise ValueError("routing_profile: the model has no ArrowRouter (build it with arrow_model)")
    captured: List[Tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: captured.append(out)) for r in routers]
    by_task: Dict[str, List[Example]] = defaultdict(list)
    for e in examples:
        by_task[e.task].append(e)
    profile = {}
    try:
        for task, exs in sorted(by_task.items()):
            mass = torch.zeros(n_experts, dtype=torch.float64)
            for i in range(0, len(exs), batch_size):
                rows = [train.encode_example(tok, e, max_len) for e in exs[i:i + batch_size]]
                ids, _, att = train.collate(rows, 0)
                captured.clear()
                model(input_ids=ids, attention_mask=att)
                real = att.bool()
                for chosen, weights in captured:
                    mass.index_add_(0, chosen[real].reshape(-1), weights[real].reshape(-1).double())
            profile[task] = (mass / mass.sum().clamp_min(1e-300)).tolist()
    finally:
        for h in hooks:
            h.remove()
    return profile


def mbc_vectors(library: Sequence[ad.Adapter], kind: str, init: Optional[ad.Adapter] = None) -> List[list]:
    """Each adapter as the list of tensors MBC flattens: ``parameters`` (every layer's A, then every layer's B, in
    sorted module order), ``updates`` (the same minus ``init``'s factors) or ``products`` (every layer's scale·B·A)."""
    if kind not in MBC_INPUTS:
        raise ValueError(f"mbc_vectors: kind must be one of {MBC_INPUTS}, got {kind!r}")
    if kind == "updates" and init is None:
        raise ValueError("mbc_vectors: kind='updates' needs the common initialisation (init)")
    out = []
    for x in library:
        paths = sorted(x)
        if kind == "products":
            out.append([x[p].delta() for p in paths])
        elif kind == "updates":
            out.append([x[p].a - init[p].a for p in paths] + [x[p].b - init[p].b for p in paths])
        else:
            out.append([x[p].a for p in paths] + [x[p].b for p in paths])
    return out


def oracle(single: Dict[str, Dict[str, dict]], tasks: Sequence[str]) -> Dict[str, dict]:
    """Per task, the library LoRA with the best accuracy alone (ties: lower loss, then library order):
    ``{task: {"acc", "loss", "n", "adapter"}}`` from ``single = {adapter name: evaluate(...) result}``."""
    out = {}
    names = list(single)
    for t in tasks:
        best = min(names, key=lambda n: (-single[n][t]["acc"], single[n][t]["loss"], names.index(n)))
        out[t] = {**single[best][t], "adapter": best}
    return out


def random_partition(labels: Sequence[int], seed: int) -> List[int]:
    """A seeded random relabelling with the same cluster sizes as ``labels`` (a shuffle of them)."""
    shuffled = list(labels)
    random.Random(seed).shuffle(shuffled)
    return shuffled


# ---------------------------------------------------------------------------------------------------------------
# the recipe

def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _clusters_of(labels: Sequence[int], tasks: Sequence[str]) -> List[List[str]]:
    """Tasks of each cluster, clusters ordered by their first task (so label permutations give the same list)."""
    groups: Dict[int, List[str]] = defaultdict(list)
    for lab, t in zip(labels, tasks):
        groups[int(lab)].append(t)
    return sorted(groups.values(), key=lambda g: tasks.index(g[0]))


def run(cfg: ModularConfig, out_dir, *, data_dir=None, model_dir=None, cache_dir=None, progress: bool = True) -> dict:
    """Runs the recipe and writes results.json, results.md and plots into ``out_dir``; returns the payload."""
    from sklearn.metrics import adjusted_rand_score

    from lora_ops.routing import mbc_cluster

    t0 = time.time()
    _check(cfg)
    out = Path(out_dir)
    setup = prepare(cfg.base, data_dir=data_dir, model_dir=model_dir, cache_dir=cache_dir, progress=progress)
    data, tok, base = setup.data, setup.tok, setup.model
    tasks = list(cfg.tasks) if cfg.tasks else data.train_tasks
    missing = [t for t in tasks if t not in data.train_tasks]
    if missing:
        raise ValueError(f"modular: tasks {missing} have no training rows")
    _check(cfg, len(tasks))
    held_out = data.held_out_tasks
    dom = {e.task: (e.domain or e.task) for e in data.train + data.test}
    test = [e for e in data.test if e.task in tasks or e.task in held_out]
    lcfg = lora_config(cfg.base, cfg.r, cfg.alpha, cfg.dropout)
    scale = cfg.alpha / cfg.r
    init = train.lora_state_dict(train.add_lora(base, lcfg, cfg.seed)) if cfg.same_init else None
    train_final: Dict[str, dict] = {}
    seconds: Dict[str, float] = {}

    def fit_lora(task_set: Sequence[str], steps: int, tag: str, seed: int) -> ad.Adapter:
        rows = [e for e in data.train if e.task in task_set]
        tcfg = train.TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup=steps // 10,
                                 seed=cfg.seed + seed, desc=tag)
        state, log = train.train_lora(base, tok, rows, tcfg, lcfg, max_len=setup.max_len, init=init,
                                      save_to=out / "adapters" / tag, progress=progress)
        train_final[tag] = {k: v for k, v in log[-1].items() if k in ("step", "loss", "ce")}
        return ad.factors_from_peft(state, scale)

    def score(model) -> dict:
        return ev.evaluate(model, tok, test, max_len=setup.max_len)

    # 1. the private library
    t = time.time()
    private = [fit_lora([task], cfg.steps, f"private/{task}", 1 + 1000 * i) for i, task in enumerate(tasks)]
    seconds["private library"] = time.time() - t

    # 2. MBC on the private LoRAs' parameters, then one LoRA per cluster on the union of its tasks
    planted = [dom[task] for task in tasks]
    init_factors = ad.factors_from_peft(init, scale) if init is not None else None
    mbc_variants = {}
    for kind in MBC_INPUTS:
        if kind == "updates" and init_factors is None:
            continue
        found = mbc_cluster(mbc_vectors(private, kind, init_factors), cfg.clusters, cfg.seed,
                            keep_fraction=cfg.keep_fraction)
        mbc_variants[kind] = {"labels": found.labels.tolist(), "similarity": found.similarity.tolist(),
                              "ari": float(adjusted_rand_score(planted, found.labels.tolist())),
                              "clusters": _clusters_of(found.labels.tolist(), tasks)}
    labels = mbc_variants[cfg.mbc_on]["labels"]
    partitions = {"MBC": labels}
    if cfg.random_clusters:
        partitions["random clusters"] = random_partition(labels, cfg.seed + 7)
    libraries: Dict[str, dict] = {"private": {"names": list(tasks), "adapters": private, "clusters": None}}
    for lib_i, (lib, part) in enumerate(partitions.items()):
        t = time.time()
        groups = _clusters_of(part, tasks)
        names = ["+".join(g) for g in groups]
        adapters = [fit_lora(g, cfg.steps * len(g), f"{lib.split()[0].lower()}/{name}", 100_000 * (lib_i + 1)
                             + 1000 * j) for j, (g, name) in enumerate(zip(groups, names))]
        libraries[lib] = {"names": names, "adapters": adapters, "clusters": groups,
                          "ari": float(adjusted_rand_score(planted, part))}
        seconds[f"{lib} library"] = time.time() - t

    # 3. baselines
    t = time.time()
    shared = fit_lora(tasks, cfg.shared_steps or cfg.steps * len(tasks), "shared", 900_000)
    seconds["shared LoRA"] = time.time() - t
    t = time.time()
    results: Dict[str, dict] = {"base": score(base), "shared LoRA (all tasks)": score(ad.combine(base, [shared]))}
    single: Dict[str, Dict[str, dict]] = {}
    oracles: Dict[str, Dict[str, dict]] = {}
    for lib, L in libraries.items():
        single[lib] = {n: score(ad.combine(base, [a])) for n, a in zip(L["names"], L["adapters"])}
        oracles[lib] = oracle(single[lib], tasks + held_out)
    results["oracle (best private LoRA per task)"] = oracles["private"]

    # 4. routing on each library
    topk: Dict[str, Dict[str, dict]] = {}
    profiles: Dict[str, Dict[str, List[float]]] = {}
    for lib, L in libraries.items():
        names, lib_adapters = L["names"], L["adapters"]
        k_main = min(cfg.top_k, len(names))
        topk[lib] = {}
        for k in sorted(set([k_main] + [k for k in cfg.top_k_sweep if k <= len(names)])):
            model = arrow_model(base, lib_adapters, names, k, cfg.temperature)
            r = score(model)
            topk[lib][str(k)] = {"train_acc": ev.mean_accuracy(r, tasks), "heldout_acc": ev.mean_accuracy(r, held_out)}
            if k == k_main:
                results[f"{lib}: Arrow (k={k})"] = r
                profiles[lib] = routing_profile(model, tok, test, len(names), max_len=setup.max_len)
                if cfg.arrow_factor_mixing and k > 1:  # for k = 1 the two mixings are the same model
                    results[f"{lib}: Arrow (k={k}), factors mixed"] = score(
                        arrow_factor_model(base, lib_adapters, names, k, cfg.temperature))
        results[f"{lib}: Mu (average of factors)"] = score(mu_model(base, lib_adapters))
        results[f"{lib}: average of products (ablation)"] = score(ad.combine(base, lib_adapters, "mean"))
    seconds["evaluation"] = time.time() - t

    summary = {name: {"train_acc": ev.mean_accuracy(r, tasks), "heldout_acc": ev.mean_accuracy(r, held_out),
                      "heldout_loss": (sum(r[x]["loss"] for x in held_out) / len(held_out)) if held_out else None}
               for name, r in results.items()}
    payload = {
        "recipe": "modular", "config": _jsonable(asdict(cfg)), "source": setup.source, "tasks": tasks,
        "held_out": held_out, "domains": {x: dom[x] for x in tasks + held_out},
        "mbc": {"on": cfg.mbc_on, "labels": labels, "planted": planted,
                "similarity": mbc_variants[cfg.mbc_on]["similarity"], "ari": libraries["MBC"]["ari"],
                "variants": mbc_variants},
        "libraries": {lib: {"names": L["names"], "clusters": L["clusters"], "ari": L.get("ari")}
                      for lib, L in libraries.items()},
        "results": results, "summary": summary, "single": single, "oracle": oracles, "topk": topk,
        "routing_profile": profiles, "train_final": train_final, "stage_seconds": seconds,
        "seconds": time.time() - t0,
    }
    if train.rank() == 0:
        write(payload, out)
    return payload


# ---------------------------------------------------------------------------------------------------------------
# tables and plots

def _ordered(keys, first: Sequence[str]) -> List[str]:
    """``keys`` with those named in ``first`` first (in that order), the rest in their order. results.json is
    written with sorted keys, so tables and plots fix their row order here, not from the dict."""
    keys = list(keys)
    return [k for k in first if k in keys] + [k for k in keys if k not in first]


LIBRARY_ORDER = ("private", "MBC", "random clusters")


def _libs(mapping) -> List[str]:
    return _ordered(mapping, LIBRARY_ORDER)


def _methods(p: dict) -> List[str]:
    first = ["base", "shared LoRA (all tasks)", "oracle (best private LoRA per task)"]
    for lib in _libs(p["libraries"]):
        first += sorted((n for n in p["results"] if n.startswith(f"{lib}: ")),
                        key=lambda n: (0 if "Arrow" in n else 1 if "Mu" in n else 2, n))
    return _ordered(p["results"], first)


def _by_family(p: dict) -> List[str]:
    """The library's tasks ordered by planted family, then name (the order of the similarity plot)."""
    return sorted(p["tasks"], key=lambda t: (p["domains"][t], t))


def markdown(p: dict) -> str:
    tasks, held = p["tasks"], p["held_out"]
    names = _methods(p)
    cfg = p["config"]
    lines = ["# Towards Modular LLMs reproduction (library of LoRAs, MBC, Arrow, Mu)", "",
             f"data: {p['source']['data']}; model: {p['source']['model']}; {len(tasks)} private LoRAs (rank "
             f"{cfg['r']}, dropout {cfg['dropout']}, lr {cfg['lr']}, {cfg['steps']} steps each); MBC k = "
             f"{cfg['clusters']}; Arrow top-{cfg['top_k']}, temperature {cfg['temperature']}; {p['seconds']:.0f} s",
             "", "## Summary (exact-match accuracy)", ""]
    rows = [[n, p["summary"][n]["train_acc"], p["summary"][n]["heldout_acc"], p["summary"][n]["heldout_loss"]]
            for n in names]
    lines.append(res.markdown_table(["model", f"in-distribution ({len(tasks)} training tasks)",
                                     f"zero-shot ({len(held)} held-out tasks)", "held-out answer loss"], rows))
    lines += ["## Clusters vs the planted task families", ""]
    for lib in _libs(p["libraries"]):
        L = p["libraries"][lib]
        if L["clusters"] is None:
            continue
        lines.append(f"**{lib}** (adjusted Rand index vs planted families: {L['ari']:.3f})")
        lines.append("")
        rows = [[i, ", ".join(g), ", ".join(sorted({p["domains"][t] for t in g}))] for i, g in enumerate(L["clusters"])]
        lines.append(res.markdown_table(["cluster", "tasks", "planted families"], rows))
    lines += [f"What MBC compares (ablation; the MBC library above clusters the {p['mbc']['on']}):", ""]
    rows = [[kind, v["ari"], " / ".join(", ".join(g) for g in v["clusters"])]
            for kind, v in ((k, p["mbc"]["variants"][k]) for k in _ordered(p["mbc"]["variants"], MBC_INPUTS))]
    lines.append(res.markdown_table(["MBC input", "adjusted Rand index", "clusters"], rows))
    order = _by_family(p)
    idx = [tasks.index(t) for t in order]
    sim = p["mbc"]["similarity"]
    lines += [f"Cosine similarity of the private LoRAs' sparsified {p['mbc']['on']} (ordered by planted family):", ""]
    rows = [[f"{t} ({p['domains'][t]})"] + [sim[i][j] for j in idx] for t, i in zip(order, idx)]
    lines.append(res.markdown_table(["LoRA"] + order, rows))
    if held:
        lines += ["## Zero-shot accuracy per held-out task", ""]
        rows = [[n] + [p["results"][n][t]["acc"] for t in held] + [p["summary"][n]["heldout_acc"]] for n in names]
        lines.append(res.markdown_table(["model"] + held + ["mean"], rows))
        lines += ["Oracle choices (best single LoRA alone, chosen on the test split): "
                  + "; ".join(f"{lib}: " + ", ".join(f"{t} → {p['oracle'][lib][t]['adapter']} "
                                                     f"({p['oracle'][lib][t]['acc']:.3f})" for t in held)
                              for lib in _libs(p["oracle"])), ""]
    lines += ["## In-distribution accuracy per training task", ""]
    rows = [[n] + [p["results"][n][t]["acc"] for t in tasks] for n in names]
    lines.append(res.markdown_table(["model"] + tasks, rows))
    lines += ["## Arrow: top-k ablation (mean accuracy)", ""]
    ks = sorted({int(k) for v in p["topk"].values() for k in v})
    headers = ["library"] + [f"k={k} in-dist / zero-shot" for k in ks]
    rows = [[lib] + [(f"{v[str(k)]['train_acc']:.3f} / {v[str(k)]['heldout_acc']:.3f}" if str(k) in v else None)
                     for k in ks] for lib, v in ((x, p["topk"][x]) for x in _libs(p["topk"]))]
    lines.append(res.markdown_table(headers, rows))
    for lib in _libs(p["routing_profile"]):
        prof = p["routing_profile"][lib]
        experts = p["libraries"][lib]["names"]
        lines += [f"## Where Arrow sends the tokens ({lib} library, top-{min(cfg['top_k'], len(experts))}: share of "
                  "the routing weight per LoRA, over all tokens and layers)", ""]
        rows = [[t + (" (held-out)" if t in held else "")] + prof[t] for t in tasks + held if t in prof]
        lines.append(res.markdown_table(["task"] + experts, rows))
        if lib == "private" and experts == list(tasks):
            own = sum(prof[t][i] for i, t in enumerate(tasks) if t in prof) / max(1, len(tasks))
            lines += [f"Mean share on a training task's own LoRA: {own:.3f} (uniform routing: {1 / len(tasks):.3f}).",
                      ""]
    lines += ["## Each private LoRA alone (accuracy per task; the oracle picks the column maximum of each row)", ""]
    single = p["single"]["private"]
    cols = _ordered(single, p["libraries"]["private"]["names"])
    rows = [[t + (" (held-out)" if t in held else "")] + [single[n][t]["acc"] for n in cols] for t in tasks + held]
    lines.append(res.markdown_table(["task"] + cols, rows))
    lines += ["Final training loss per LoRA:", ""]
    tags = sorted(p["train_final"], key=lambda t: (["private", "mbc", "random", "shared"].index(t.split("/")[0])
                                                   if t.split("/")[0] in ("private", "mbc", "random", "shared")
                                                   else 4, t))
    rows = [[tag, p["train_final"][tag].get("step"), p["train_final"][tag].get("loss")] for tag in tags]
    lines.append(res.markdown_table(["LoRA", "last step", "loss"], rows))
    stages = _ordered(p["stage_seconds"], ["private library"] + [f"{x} library" for x in LIBRARY_ORDER[1:]]
                      + ["shared LoRA", "evaluation"])
    rows = [[k, p["stage_seconds"][k]] for k in stages]
    lines += ["Time per stage (s):", "", res.markdown_table(["stage", "seconds"], rows)]
    return "\n".join(lines)


def write(p: dict, out: Path) -> dict:
    paths = res.write_results(out, p, markdown(p))
    tasks, held = p["tasks"], p["held_out"]
    order = _by_family(p)
    idx = [tasks.index(t) for t in order]
    sim = p["mbc"]["similarity"]
    labels = {t: lab for t, lab in zip(tasks, p["mbc"]["labels"])}
    paths["similarity_png"] = res.heatmap(
        out / "similarity.png", f"Private LoRAs: cosine similarity (MBC ARI {p['mbc']['ari']:.2f})",
        [[sim[i][j] for j in idx] for i in idx], [f"{t} ({p['domains'][t]}, c{labels[t]})" for t in order], order,
        vmin=-1.0, vmax=1.0, cbar_label="cosine similarity")
    names = _methods(p)
    paths["summary_png"] = res.bar_plot(
        out / "summary.png", "Modular LLMs: mean accuracy", names,
        {"in-distribution": [p["summary"][n]["train_acc"] for n in names],
         "zero-shot (held-out)": [p["summary"][n]["heldout_acc"] for n in names]}, "exact-match accuracy")
    if held:
        main = [n for n in names if "ablation" not in n]
        paths["zero_shot_png"] = res.bar_plot(
            out / "zero_shot.png", "Modular LLMs: zero-shot accuracy per held-out task", held,
            {n: [p["results"][n][t]["acc"] for t in held] for n in main}, "exact-match accuracy")
    series = {}
    ks = sorted({int(k) for v in p["topk"].values() for k in v})
    for lib in _libs(p["topk"]):
        v = p["topk"][lib]
        for what, key in (("zero-shot", "heldout_acc"), ("in-dist", "train_acc")):
            series[f"{lib}, {what}"] = [v[str(k)][key] if str(k) in v else float("nan") for k in ks]
    paths["topk_png"] = res.line_plot(out / "topk.png", "Arrow: accuracy vs top-k", ks, series, "k",
                                      "mean accuracy")
    prof = p["routing_profile"].get("private")
    if prof:
        rows = [t for t in tasks + held if t in prof]
        paths["routing_png"] = res.heatmap(
            out / "routing.png", "Arrow on the private library: routing weight share", [prof[t] for t in rows],
            [t + (" *" if t in held else "") for t in rows], p["libraries"]["private"]["names"], vmin=0.0,
            vmax=max(max(v) for v in prof.values()), cbar_label="share of routing weight (* = held-out)")
    return paths
