"""Training-step benchmark: forward + backward of one LoRA layer with many adapters in the batch.

Every case times, in one run, on the same weights, inputs and output gradient (``grad_out``):

- ``base``: the base ``nn.Linear`` forward + backward alone (grads for x, weight and bias): the cost LoRA adds to;
- ``loop``: the segment-loop composite with autograd (stable sort by adapter, two matmuls per adapter present,
  index_add back: ``grouped.segment_loop_delta``);
- ``gather_bmm``: gather A/B per row + two bmm with autograd (``grouped.gather_bmm_delta``; skipped by ``quick``);
- ``lora_ops``: ``lora_ops.grouped_lora`` with its registered autograd;
- ``mm``: the GEMM ceiling: every row through one adapter, ``(x @ A0ᵀ · s) @ B0ᵀ`` with plain ``torch.mm`` and
  autograd (two GEMMs forward, four backward, no sort or scatter): the same FLOPs as the grouped step.

The last three time the LoRA delta's forward plus ``torch.autograd.grad`` for x, lora_a and lora_b. Before timing,
every method's gradients are checked against the loop's (relative max error <= REL_TOL).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

import lora_ops
from lora_ops.benchmarks import report
from lora_ops.benchmarks.grouped import (GroupedCase, ResultMismatchError, adapter_ids, gather_bmm_delta,
                                         segment_loop_delta)
from lora_ops.benchmarks.timing import OtherCpuMeter, environment, time_fn

__all__ = ["METHODS", "LORA_METHODS", "TrainCase", "TrainWorkload", "cases", "methods_for", "build_workload",
           "check_grads", "run_case", "run", "format_table", "write_report"]

METHODS = ("base", "loop", "gather_bmm", "lora_ops", "mm")
LORA_METHODS = ("loop", "gather_bmm", "lora_ops")
REL_TOL = 1e-3
SCALE = 2.0  # lora_alpha / r = 32 / 16: a non-unit scale, so a dropped scale would fail the check


@dataclass(frozen=True)
class TrainCase(GroupedCase):
    """``tokens`` rows of width ``d_in`` through a ``d_in -> d_out`` layer with ``n_adapters`` rank-``rank``
    adapters (ids drawn by ``dist``), float32, grads for x, lora_a and lora_b."""

    @property
    def name(self) -> str:
        return f"train-{super().name}"


def cases(*, quick: bool = False, d: int = 2048, tokens: Iterable[int] | None = None, n_adapters: int = 8,
          rank: int = 16, dists: Iterable[str] | None = None) -> list:
    """Default: d = 2048, N = 8, r = 16, T in {256, 1024} (quick: T = 256), uniform ids (full: + Zipf)."""
    tokens = tuple(tokens or ((256,) if quick else (256, 1024)))
    dists = tuple(dists or (("uniform",) if quick else ("uniform", "zipf")))
    return [TrainCase(d, d, rank, t, n_adapters, dist) for dist in dists for t in tokens]


def methods_for(case: TrainCase, *, quick: bool = False) -> tuple:
    """All METHODS; quick mode drops gather_bmm (tens of times slower, already known to lose)."""
    return tuple(m for m in METHODS if not (quick and m == "gather_bmm"))


@dataclass
class TrainWorkload:
    """A built case. x ``[T, d_in]``, ids ``[T]``, lora_a ``[N, r, d_in]``, lora_b ``[N, d_out, r]``, scales
    ``[N]``, grad_out ``[T, d_out]``; x, lora_a, lora_b and the base layer's parameters require grad."""

    case: TrainCase
    x: torch.Tensor
    ids: torch.Tensor
    base: nn.Linear
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scales: torch.Tensor
    grad_out: torch.Tensor

    def fns(self) -> dict:
        """``{method: zero-argument callable returning the gradients}`` for every name in METHODS."""
        x, a, b, ids, s, go = self.x, self.lora_a, self.lora_b, self.ids, self.scales, self.grad_out

        def step(delta: Callable[[], torch.Tensor]) -> Callable[[], tuple]:
            return lambda: torch.autograd.grad(delta(), (x, a, b), go)

        base_params = (x, self.base.weight, self.base.bias)
        a0, b0 = (t[0].detach().clone().requires_grad_() for t in (a, b))
        s0 = float(s[0])
        return {
            "base": lambda: torch.autograd.grad(self.base(x), base_params, go),
            "loop": step(lambda: segment_loop_delta(x, a, b, ids, s)),
            "gather_bmm": step(lambda: gather_bmm_delta(x, a, b, ids, s)),
            "lora_ops": step(lambda: lora_ops.grouped_lora(x, a, b, ids, scales=s)),
            "mm": lambda: torch.autograd.grad(torch.mm(torch.mm(x, a0.T) * s0, b0.T), (x, a0, b0), go),
        }


def build_workload(case: TrainCase, *, device: str | torch.device = "cpu", seed: int = 0) -> TrainWorkload:
    """Seeded float32 inputs on ``device``; B is nonzero (a trained adapter, not PEFT's zero init)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn.Linear initialises from the global generator
    base = nn.Linear(case.d_in, case.d_out).to(device)
    n, r = case.n_adapters, case.rank

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device)

    x = randn(case.tokens, case.d_in).requires_grad_()
    a = randn(n, r, case.d_in, std=case.d_in ** -0.5).requires_grad_()
    b = randn(n, case.d_out, r, std=r ** -0.5).requires_grad_()
    ids = adapter_ids(case.dist, case.tokens, n, seed=seed).to(device)
    return TrainWorkload(case, x, ids, base, a, b, torch.full((n,), SCALE, device=device),
                         randn(case.tokens, case.d_out))


def check_grads(wl: TrainWorkload, methods: Iterable[str]) -> dict:
    """``{method: {"max_abs_diff", "rel_diff"}}`` of each LoRA method's (dx, dA, dB) vs the segment loop's.

    Raises ResultMismatchError when ``rel_diff`` (max over the three of max|diff| / max|reference|) > REL_TOL.
    """
    fns = wl.fns()
    reference = fns["loop"]()
    out = {}
    for m in methods:
        if m not in LORA_METHODS:
            continue
        grads = fns[m]()
        diff = max((g - r).abs().max().item() for g, r in zip(grads, reference))
        rel = max(((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for g, r in zip(grads, reference))
        out[m] = {"max_abs_diff": diff, "rel_diff": rel}
        if rel > REL_TOL:
            raise ResultMismatchError(f"{m} gradients differ from the segment loop's on {wl.case.name}: "
                                      f"relative {rel:.3e} > {REL_TOL:g}")
    return out


def run_case(case: TrainCase, *, device: str | torch.device = "cpu", warmup: int = 3, reps: int = 20,
             quick: bool = False, seed: int = 0) -> dict:
    """Build, check and time one case: JSON-ready dict with timings per method, ratios and the check."""
    methods = methods_for(case, quick=quick)
    wl = build_workload(case, device=device, seed=seed)
    check = check_grads(wl, methods)
    fns = wl.fns()
    others = OtherCpuMeter()
    timings = {m: time_fn(fns[m], device=device, warmup=warmup, reps=reps) for m in methods}
    ms = {m: t.median_ms for m, t in timings.items()}
    ratios = {f"{m}/lora_ops": ms[m] / ms["lora_ops"] for m in ("loop", "gather_bmm") if m in ms}
    ratios["lora_ops/base"] = ms["lora_ops"] / ms["base"]
    # useful FLOPs of a step (2 GEMMs forward, 4 backward; lora_ops' recomputed shrink not counted)
    flops = 3 * 2 * case.tokens * case.rank * (case.d_in + case.d_out)
    gflops = {m: flops / ms[m] / 1e6 for m in ("lora_ops", "mm", "loop") if m in ms}
    return {"case": case.as_dict(), "n_present": int(wl.ids.unique().numel()), "methods": list(methods),
            "timings": {m: t.as_dict() for m, t in timings.items()}, "ms": ms, "ratios": ratios, "check": check,
            "gemm": {"flops": flops, "gflops": gflops,
                     "lora_ops_pct_of_mm": 100.0 * ms["mm"] / ms["lora_ops"] if "mm" in ms else None},
            "other_cpu_share": others.share()}


def run(case_list: Iterable[TrainCase], *, device: str | torch.device = "cpu", warmup: int = 3, reps: int = 20,
        quick: bool = False, seed: int = 0, progress: Callable[[list], Iterable] = iter) -> dict:
    """Run every case; returns ``kind``, ``environment``, ``settings`` and the list of ``cases`` (see run_case)."""
    case_list = list(case_list)
    env = environment(device)
    others = OtherCpuMeter()
    results = [run_case(c, device=device, warmup=warmup, reps=reps, quick=quick, seed=seed)
               for c in progress(case_list)]
    return {"kind": "train", "environment": env,
            "settings": {"quick": quick, "warmup": warmup, "reps": reps, "seed": seed, "dtype": "float32",
                         "scale": SCALE, "rel_tol": REL_TOL, "grads": ["x", "lora_a", "lora_b"]},
            "other_cpu_share": others.share(), "cases": results}


def format_table(result: dict) -> str:
    """One aligned row per case: fwd+bwd ms per method (median) and the ratios against lora_ops."""
    env = result["environment"]
    where = env.get("gpu_name") or f"{env['cpu_model']}, {env['threads']} threads"
    lines = [f"LoRA training step (forward + backward, grads for x, A, B) on {env['device']} ({where}); "
             f"torch {env['torch']}, lora_ops {env['lora_ops']}; float32, median of {result['settings']['reps']} "
             "reps; base = the base Linear's own fwd+bwd; other columns are the LoRA delta alone; mm = the same "
             "FLOPs through one adapter with plain torch.mm (the GEMM ceiling); GF/s of the step's 6 GEMMs' FLOPs, "
             "%mm = lora_ops GF/s as % of mm's"]
    header = ["case", "base", "loop", "gbmm", "lora_ops", "mm", "loop/ops", "gbmm/ops", "ops/base", "GF/s",
              "mmGF/s", "%mm", "reldiff", "others%"]
    rows = []
    for c in result["cases"]:
        ms, r, share = c["ms"], c["ratios"], c.get("other_cpu_share")
        gemm = c.get("gemm", {}).get("gflops", {})
        rows.append([c["case"]["name"], report._fmt(ms["base"], ".2f"), report._fmt(ms.get("loop"), ".2f"),
                     report._fmt(ms.get("gather_bmm"), ".2f"), report._fmt(ms["lora_ops"], ".2f"),
                     report._fmt(ms.get("mm"), ".2f"),
                     report._fmt(r.get("loop/lora_ops"), ".2f"), report._fmt(r.get("gather_bmm/lora_ops"), ".2f"),
                     report._fmt(r["lora_ops/base"], ".3f"), report._fmt(gemm.get("lora_ops"), ".1f"),
                     report._fmt(gemm.get("mm"), ".1f"), report._fmt(c.get("gemm", {}).get("lora_ops_pct_of_mm"), ".0f"),
                     report._fmt(c["check"]["lora_ops"]["rel_diff"], ".1e"),
                     report._fmt(None if share is None else 100 * share, ".0f")])
    return "\n".join(lines + report.align_rows(header, rows))


def write_plot(result: dict, out_dir) -> Path:
    """Grouped bars of fwd+bwd ms per method for each case (log scale), next to the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases_ = result["cases"]
    fig, ax = plt.subplots(figsize=(2.2 + 2.0 * len(cases_), 3.8))
    width = 0.8 / len(METHODS)
    for i, m in enumerate(METHODS):
        xs = [j + i * width for j, c in enumerate(cases_) if m in c["ms"]]
        ys = [c["ms"][m] for c in cases_ if m in c["ms"]]
        if xs:
            ax.bar(xs, ys, width, label={"base": "base Linear (fwd+bwd)", "mm": "torch.mm, one adapter"}.get(m, m))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases_))],
                  [c["case"]["name"].removeprefix("train-") for c in cases_], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("fwd + bwd (ms)")
    env = result["environment"]
    ax.set_title(f"LoRA training step, {env['device']} ({env.get('gpu_name') or env['cpu_model']}, "
                 f"{env['threads']} threads)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    return report.save_png(fig, result, out_dir)


def write_report(result: dict, out_dir) -> dict:
    """Write the JSON and the plot of ``result``; returns ``{"json": path, "png": path}``."""
    return {"json": report.write_json(result, out_dir), "png": write_plot(result, out_dir)}
