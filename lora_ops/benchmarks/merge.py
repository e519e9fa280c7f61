"""Merge and SVD benchmarks, each checked for equal results before it is timed.

- ``peft_svd``: PEFT ``add_weighted_adapter(..., combination_type="svd")`` (dense delta, full SVD) vs
  ``lora_ops.merge_lowrank`` (factored, exact) on one d x d layer with 8 adapters of rank 16 -> rank 16.
  The merged products are compared first (relative Frobenius difference).
- ``llama``: a whole tiny Llama built from a config (every attention and MLP projection of every layer, 8 adapters)
  merged by PEFT and by ``lora_ops.merge.merge_peft_adapters`` (one batched ``merge_lowrank`` call per layer shape).
- ``rsvd``: ``lora_ops.randomized_svd`` vs ``torch.svd_lowrank`` (batched call, and one call per matrix) on a batch
  of matrices with a decaying spectrum; same sketch width q = rank + oversample and power iterations. Errors are
  the mean Frobenius reconstruction error of the rank-``rank`` result.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

import lora_ops
from lora_ops.benchmarks.timing import OtherCpuMeter, environment, time_fn
from lora_ops.merge import merge_peft_adapters

__all__ = ["ResultMismatchError", "run_merge", "run_svd", "format_merge_table", "format_svd_table",
           "plot_merge", "plot_svd", "decaying_matrices"]

N_ADAPTERS, RANK, ALPHA = 8, 16, 32
REL_TOL = 1e-3  # PEFT's own fp32 error on a full dense SVD is ~1e-4 of the product's norm


class ResultMismatchError(RuntimeError):
    """Two methods meant to compute the same merge (or SVD quality) disagree."""


class _OneLinear(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        return self.proj(x)


def _peft_with_adapters(model: nn.Module, targets, n: int, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(model, cfg, adapter_name="a0")
    for i in range(1, n):
        peft_model.add_adapter(f"a{i}", cfg)
    return peft_model


def _adapter_state(peft_model, n: int):
    from peft.utils import get_peft_model_state_dict

    return [(get_peft_model_state_dict(peft_model, adapter_name=f"a{i}"), peft_model.peft_config[f"a{i}"].to_dict())
            for i in range(n)]


def _products(sd: dict) -> dict:
    mods = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    return {m: sd[f"{m}.lora_B.weight"].double() @ sd[f"{m}.lora_A.weight"].double() for m in mods}


def _max_rel_diff(ours: dict, ref: dict) -> float:
    return max(((ours[m] - ref[m]).norm() / ref[m].norm().clamp_min(1e-30)).item() for m in ref)


def _peft_merge_fn(peft_model, n: int, weights):
    """One PEFT svd merge (the new adapter is deleted afterwards so each call does the full work)."""
    from peft.utils import get_peft_model_state_dict

    names = [f"a{i}" for i in range(n)]
    out = {}

    def call():
        peft_model.add_weighted_adapter(names, weights, "merged", combination_type="svd", svd_rank=RANK)
        out["sd"] = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model, adapter_name="merged").items()}
        peft_model.delete_adapter("merged")

    return call, out


def _case_peft_svd(d: int, *, peft_reps: int, reps: int, warmup: int) -> dict:
    peft_model = _peft_with_adapters(_OneLinear(d), ["proj"], N_ADAPTERS)
    adapters = _adapter_state(peft_model, N_ADAPTERS)
    weights = [1.0 / N_ADAPTERS] * N_ADAPTERS
    a = torch.stack([sd["base_model.model.proj.lora_A.weight"] for sd, _ in adapters])
    b = torch.stack([sd["base_model.model.proj.lora_B.weight"] for sd, _ in adapters])
    w = torch.tensor(weights) * (ALPHA / RANK)
    others = OtherCpuMeter()
    peft_call, peft_out = _peft_merge_fn(peft_model, N_ADAPTERS, weights)
    t_peft = time_fn(peft_call, warmup=0, reps=peft_reps)
    ma, mb = lora_ops.merge_lowrank(a, b, w, RANK)
    diff = _max_rel_diff({"p": mb.double() @ ma.double()}, {"p": list(_products(peft_out["sd"]).values())[0]})
    if diff > REL_TOL:
        raise ResultMismatchError(f"d={d}: lora_ops merge differs from PEFT's by {diff:.2e} (relative)")
    t_ops = time_fn(lambda: lora_ops.merge_lowrank(a, b, w, RANK), warmup=warmup, reps=reps)
    t_state = time_fn(lambda: merge_peft_adapters(adapters, weights, "svd", rank=RANK),
                      warmup=1, reps=max(3, reps // 4))
    return {"case": f"peft_svd-d{d}", "d": d, "n_adapters": N_ADAPTERS, "rank": RANK,
            "timings": {"peft": t_peft.as_dict(), "lora_ops": t_ops.as_dict(), "lora_ops_state_dict": t_state.as_dict()},
            "speedup": t_peft.median_ms / t_ops.median_ms, "max_rel_diff": diff, "other_cpu_share": others.share()}


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _case_llama(*, peft_reps: int, reps: int, warmup: int) -> dict:
    peft_model = _peft_with_adapters(_tiny_llama(), LLAMA_TARGETS, N_ADAPTERS)
    adapters = _adapter_state(peft_model, N_ADAPTERS)
    weights = [1.0 / N_ADAPTERS] * N_ADAPTERS
    others = OtherCpuMeter()
    peft_call, peft_out = _peft_merge_fn(peft_model, N_ADAPTERS, weights)
    t_peft = time_fn(peft_call, warmup=0, reps=peft_reps)
    sd, _ = merge_peft_adapters(adapters, weights, "svd", rank=RANK)
    diff = _max_rel_diff(_products(sd), _products(peft_out["sd"]))
    if diff > REL_TOL:
        raise ResultMismatchError(f"tiny llama: lora_ops merge differs from PEFT's by {diff:.2e} (relative)")
    t_ops = time_fn(lambda: merge_peft_adapters(adapters, weights, "svd", rank=RANK),
                    warmup=warmup, reps=reps)
    return {"case": "llama-tiny", "layers": len(_products(sd)), "n_adapters": N_ADAPTERS, "rank": RANK,
            "timings": {"peft": t_peft.as_dict(), "lora_ops_state_dict": t_ops.as_dict()},
            "speedup": t_peft.median_ms / t_ops.median_ms, "max_rel_diff": diff, "other_cpu_share": others.share()}


def run_merge(*, quick: bool = False, device: str = "cpu", reps: int = 10, warmup: int = 2,
              progress: Optional[Callable] = None) -> dict:
    """PEFT svd merge vs lora_ops: one d x d layer for d in {2048, 4096} (quick: 2048), and a tiny Llama."""
    if device != "cpu":
        raise ValueError("bench merge compares against PEFT's CPU merge; run it with --device cpu")
    env = environment(device)
    ds = (2048,) if quick else (2048, 4096)
    steps = [("peft_svd", d) for d in ds] + [("llama", None)]
    cases = []
    for kind, d in (progress or (lambda x: x))(steps):
        if kind == "peft_svd":
            cases.append(_case_peft_svd(d, peft_reps=1 if (quick or d > 2048) else 2, reps=reps, warmup=warmup))
        else:
            cases.append(_case_llama(peft_reps=1 if quick else 3, reps=reps, warmup=warmup))
    return {"kind": "merge", "environment": env, "settings": {"reps": reps, "dtype": "float32"}, "cases": cases}


def decaying_matrices(batch: int, m: int, n: int, decay: float = 0.8, seed: int = 0) -> torch.Tensor:
    """float32 [batch, m, n] with singular values decay**i (plus a small noise floor)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(batch, m, k, generator=g))[0]
    v = torch.linalg.qr(torch.randn(batch, n, k, generator=g))[0]
    s = decay ** torch.arange(k, dtype=torch.float32)
    return (u * s) @ v.mT + 1e-4 * torch.randn(batch, m, n, generator=g) / (m * n) ** 0.25


def _recon_error(x, u, s, vh) -> float:
    return ((u * s.unsqueeze(-2)) @ vh - x).flatten(-2).norm(dim=-1).mean().item()


def run_svd(*, quick: bool = False, device: str = "cpu", reps: int = 10, warmup: int = 2, batch: int = 64,
            size: int = 512, rank: int = 16, oversample: int = 10, n_iter: int = 2) -> dict:
    """lora_ops.randomized_svd vs torch.svd_lowrank (batched, and per matrix) at the same q and iterations."""
    env = environment(device)
    x = decaying_matrices(batch, size, size).to(device)
    q = rank + oversample
    others = OtherCpuMeter()
    gen = torch.Generator(device).manual_seed(0)

    def ours():
        return lora_ops.randomized_svd(x, rank, oversample=oversample, n_iter=n_iter, generator=gen)

    def torch_batched():
        u, s, v = torch.svd_lowrank(x, q=q, niter=n_iter)
        return u[..., :rank], s[..., :rank], v[..., :rank].mT

    def torch_loop():
        outs = [torch.svd_lowrank(xi, q=q, niter=n_iter) for xi in x]
        return (torch.stack([u[:, :rank] for u, _, _ in outs]), torch.stack([s[:rank] for _, s, _ in outs]),
                torch.stack([v[:, :rank].mT for _, _, v in outs]))

    fns = {"lora_ops": ours, "torch_svd_lowrank": torch_batched, "torch_svd_lowrank_loop": torch_loop}
    torch.manual_seed(0)
    errors = {name: _recon_error(x, *fn()) for name, fn in fns.items()}
    optimum = torch.linalg.svdvals(x[:8].double())[..., rank:].pow(2).sum(-1).sqrt().mean().item()
    if errors["lora_ops"] > 1.1 * errors["torch_svd_lowrank"]:
        raise ResultMismatchError(f"randomized_svd error {errors['lora_ops']:.3e} > 1.1x torch.svd_lowrank's "
                                  f"{errors['torch_svd_lowrank']:.3e}")
    timings = {name: time_fn(fn, device=device, warmup=warmup, reps=reps).as_dict() for name, fn in fns.items()}
    best_torch = min(timings["torch_svd_lowrank"]["median_ms"], timings["torch_svd_lowrank_loop"]["median_ms"])
    case = {"case": f"rsvd-b{batch}-{size}x{size}-r{rank}-q{q}-it{n_iter}", "batch": batch, "size": size,
            "rank": rank, "q": q, "n_iter": n_iter, "timings": timings, "errors": errors,
            "optimal_error_first8": optimum, "speedup": best_torch / timings["lora_ops"]["median_ms"],
            "error_ratio": errors["lora_ops"] / errors["torch_svd_lowrank"], "other_cpu_share": others.share()}
    return {"kind": "svd", "environment": env, "settings": {"reps": reps, "dtype": "float32"}, "cases": [case]}


def _where(env: dict) -> str:
    return env.get("gpu_name") or f"{env['cpu_model']}, {env['threads']} threads"


def format_merge_table(result: dict) -> str:
    env = result["environment"]
    lines = [f"merge (PEFT add_weighted_adapter svd vs lora_ops) on {env['device']} ({_where(env)}); torch "
             f"{env['torch']}, peft {env.get('peft')}; medians in ms",
             f"{'case':<16}{'peft':>12}{'lora_ops':>12}{'state_dict':>12}{'speedup':>10}{'rel_diff':>10}{'others%':>9}"]
    for c in result["cases"]:
        t = c["timings"]
        ops = t.get("lora_ops", t["lora_ops_state_dict"])["median_ms"]
        share = c.get("other_cpu_share")
        lines.append(f"{c['case']:<16}{t['peft']['median_ms']:>12.1f}{ops:>12.2f}"
                     f"{t['lora_ops_state_dict']['median_ms']:>12.2f}{c['speedup']:>10.0f}{c['max_rel_diff']:>10.1e}"
                     f"{'-' if share is None else f'{100 * share:.0f}':>9}")
    return "\n".join(lines)


def format_svd_table(result: dict) -> str:
    env = result["environment"]
    c = result["cases"][0]
    lines = [f"randomized SVD on {env['device']} ({_where(env)}); {c['case']}; medians in ms, mean Frobenius error "
             f"(optimum {c['optimal_error_first8']:.3e})",
             f"{'method':<26}{'ms':>10}{'error':>12}"]
    for name, t in c["timings"].items():
        lines.append(f"{name:<26}{t['median_ms']:>10.1f}{c['errors'][name]:>12.3e}")
    share = c.get("other_cpu_share")
    lines.append(f"speedup vs the faster torch.svd_lowrank: {c['speedup']:.2f}x; error ratio {c['error_ratio']:.3f}"
                 + ("" if share is None else f"; other processes used {100 * share:.0f}% of the CPU"))
    return "\n".join(lines)


def _bar_figure(title: str, groups: list, series: dict, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(groups), 3.6))
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width=width, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_merge(result: dict):
    cases = result["cases"]
    series = {
        "PEFT add_weighted_adapter svd": [c["timings"]["peft"]["median_ms"] for c in cases],
        "lora_ops.merge_peft_adapters": [c["timings"]["lora_ops_state_dict"]["median_ms"] for c in cases],
    }
    return _bar_figure(f"merge 8 adapters r=16 -> 16, {_where(result['environment'])}", [c["case"] for c in cases],
                       series, "ms (log)")


def plot_svd(result: dict):
    c = result["cases"][0]
    return _bar_figure(f"{c['case']}, {_where(result['environment'])}", list(c["timings"]),
                       {"median ms": [t["median_ms"] for t in c["timings"].values()]}, "ms (log)")


def write(result: dict, out_dir, plot) -> dict:
    """JSON + PNG of a merge/svd result, atomically, named like every other benchmark result."""
    from lora_ops.benchmarks import report

    paths = {"json": report.write_json(result, out_dir)}
    fig = plot(result)
    try:
        png = paths["json"].with_suffix(".png")
        paths["png"] = report._atomic_write(png, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return paths

