"""Arrow routing benchmark: one d -> d layer over a library of E rank-r experts, T tokens, top-k routing.

Every case times, in one run and on the same weights:

- ``base``: the base ``nn.Linear`` alone;
- ``peft``: PEFT's Arrow layer (``ArrowConfig``; base + routed delta); its Arrow part is ``peft - base``. PEFT
  re-stacks the experts' A and B on every call and evaluates every expert for every token, then masks;
- ``einsum``: the same all-experts computation in plain torch on pre-stacked A/B (the best dense composite);
- ``lora_ops``: ``arrow_route`` + ``grouped_lora`` over the k chosen experts (work ∝ k, not E);
- ``route``: ``arrow_route`` alone (part of ``lora_ops``, shown for the split).

The delta methods are checked against PEFT's output minus the base output before timing. For that check PEFT is
given the exact prototypes (its power-iteration ones can pick different experts where two logits are close);
timing is unaffected since prototypes are built once.

Prototype computation is compared separately: PEFT's ``build_prototypes`` (15 power iterations per expert, a
Python loop) vs ``lora_ops.arrow_prototypes`` (QR + r x r SVD, batched), with each one's angle error against the
float64 exact prototypes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

import lora_ops
from lora_ops.benchmarks import report
from lora_ops.benchmarks.grouped import _inference, _OneLinear
from lora_ops.benchmarks.timing import OtherCpuMeter, environment, time_fn

__all__ = ["METHODS", "DELTA_METHODS", "ArrowCase", "ArrowWorkload", "ResultMismatchError", "cases",
           "build_workload", "all_experts_einsum_delta", "check_against_peft", "run_case", "run", "format_table",
           "write_report"]

METHODS = ("base", "peft", "einsum", "lora_ops", "route")
DELTA_METHODS = ("einsum", "lora_ops")
LORA_ALPHA = 32
REL_TOL = 1e-3
ROUTER = "arrow_router"
DECAY = 0.8  # spectrum decay of the second prototype-accuracy library (B's column j scaled by DECAY**j)


@dataclass(frozen=True)
class ArrowCase:
    """``tokens`` rows of width ``d`` through a ``d -> d`` layer with ``n_experts`` rank-``rank`` experts, each
    row routed to ``top_k`` of them."""

    d: int
    rank: int
    tokens: int
    n_experts: int
    top_k: int

    @property
    def name(self) -> str:
        return f"d{self.d}-r{self.rank}-T{self.tokens}-E{self.n_experts}-k{self.top_k}"

    def as_dict(self) -> dict:
        return {**asdict(self), "name": self.name}


class ResultMismatchError(RuntimeError):
    """A method's delta differs from PEFT's Arrow delta by more than ``REL_TOL`` relative."""


def cases(*, quick: bool = False, d: int = 2048, n_experts: Iterable[int] | None = None, tokens: int = 256,
          rank: int = 16, top_k: int = 4) -> list:
    """The case grid: E in {8, 64} (quick) or {8, 64, 128}; d = 2048, r = 16, T = 256, k = 4 by default."""
    ns = tuple(n_experts or ((8, 64) if quick else (8, 64, 128)))
    for n in ns:
        if not 1 <= top_k <= n:
            raise ValueError(f"cases: top_k must be in [1, E] for every E, got top_k={top_k} with E={n}")
    return [ArrowCase(d, rank, tokens, n, top_k) for n in ns]


@dataclass
class ArrowWorkload:
    """A built case. Shapes: x ``[T, d]``, lora_a ``[E, r, d]``, lora_b ``[E, d, r]``, scales ``[E]``,
    prototypes ``[E, d]`` (exact, lora_ops)."""

    case: ArrowCase
    x: torch.Tensor
    base: nn.Linear
    peft_model: nn.Module
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scales: torch.Tensor
    prototypes: torch.Tensor

    @property
    def peft_layer(self) -> nn.Module:
        return self.peft_model.base_model.model.proj

    def fns(self) -> dict:
        """``{method: zero-argument callable}`` for METHODS, each under inference mode."""
        x, a, b, s, p, c = self.x, self.lora_a, self.lora_b, self.scales, self.prototypes, self.case
        raw = {
            "base": lambda: self.base(x),
            "peft": lambda: self.peft_model(x),
            "einsum": lambda: all_experts_einsum_delta(x, a, b, s, p, c.top_k),
            "lora_ops": lambda: lora_ops.routing.arrow_forward(x, a, b, s, p, c.top_k),
            "route": lambda: lora_ops.arrow_route(x, p, c.top_k),
        }
        return {name: _inference(fn) for name, fn in raw.items()}


def build_workload(case: ArrowCase, *, device: str | torch.device = "cpu", seed: int = 0) -> ArrowWorkload:
    """A seeded base Linear wrapped by PEFT with experts ``task_0..task_{E-1}`` (random nonzero B) and an Arrow
    router adapter (what ``peft.create_arrow_model`` builds, here without writing adapters to disk)."""
    from peft import ArrowConfig, LoraConfig, get_peft_model

    import lora_ops.routing  # noqa: F401  (arrow_forward)

    torch.manual_seed(seed)
    base = nn.Linear(case.d, case.d)
    names = [f"task_{i}" for i in range(case.n_experts)]

    def config():
        return LoraConfig(r=case.rank, lora_alpha=LORA_ALPHA, target_modules=["proj"], lora_dropout=0.0,
                          init_lora_weights=False)

    model = get_peft_model(_OneLinear(base), config(), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config())
    arrow_config = ArrowConfig(top_k=case.top_k, router_temperature=1.0, rng_seed=seed)
    arrow_config.task_adapter_names = names  # create_arrow_model sets these two after loading the adapters
    arrow_config.gks_adapter_names = []
    model.add_adapter(ROUTER, LoraConfig(arrow_config=arrow_config, target_modules=["proj"], r=case.rank))
    model.set_adapter(ROUTER)
    model.to(device).eval()

    layer = model.base_model.model.proj
    lora_a = torch.stack([layer.lora_A[n].weight.detach() for n in names]).contiguous()
    lora_b = torch.stack([layer.lora_B[n].weight.detach() for n in names]).contiguous()
    scales = torch.tensor([float(layer.scaling[n]) for n in names], device=device)
    x = torch.randn(case.tokens, case.d, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    prototypes = lora_ops.arrow_prototypes(lora_a, lora_b)
    return ArrowWorkload(case, x, base, model, lora_a, lora_b, scales, prototypes)


def all_experts_einsum_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                             prototypes: torch.Tensor, top_k: int, temperature: float = 1.0) -> torch.Tensor:
    """The dense composite: every expert's delta for every row (``[T, E, d_out]``), weighted by a softmax over
    the top_k logits (others masked to -inf). ``x [T, d_in] -> [T, d_out]``."""
    logits = (x @ prototypes.T).abs()
    top, ids = logits.topk(top_k, dim=-1)
    coeff = torch.full_like(logits, float("-inf")).scatter_(-1, ids, top).div_(temperature).softmax(-1)
    z = torch.einsum("tf,erf->ter", x, lora_a)
    y = torch.einsum("ter,eor->teo", z * scales[None, :, None], lora_b)
    return torch.einsum("te,teo->to", coeff, y)


def _set_exact_prototypes(wl: ArrowWorkload) -> None:
    arrow = wl.peft_layer.lora_arrow[ROUTER]
    arrow.register_buffer("prototypes", wl.prototypes.clone(), persistent=False)
    arrow._protos_ready = True


def check_against_peft(wl: ArrowWorkload) -> dict:
    """``{method: {"max_abs_diff", "rel_diff"}}`` of each delta method vs PEFT's Arrow (with exact prototypes)
    output minus the base output. Raises ResultMismatchError above REL_TOL."""
    _set_exact_prototypes(wl)
    fns = wl.fns()
    reference = fns["peft"]() - fns["base"]()
    scale = reference.abs().max().item()
    out = {}
    for m in DELTA_METHODS:
        diff = (fns[m]() - reference).abs().max().item()
        out[m] = {"max_abs_diff": diff, "rel_diff": diff / scale if scale > 0 else diff}
        if out[m]["rel_diff"] > REL_TOL:
            raise ResultMismatchError(f"{m} differs from PEFT's Arrow on {wl.case.name}: max abs diff {diff:.3e} "
                                      f"(relative {out[m]['rel_diff']:.3e} > {REL_TOL:g})")
    return out


def _angle_errors(p: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Sine of the angle between each prototype and the exact one (sign-invariant), ``[E]`` float64."""
    cos = (p.double() * exact.double()).sum(-1).abs() / (p.double().norm(dim=-1) * exact.double().norm(dim=-1))
    return torch.sqrt((1 - cos.clamp(max=1) ** 2).clamp_min(0))


def prototype_comparison(wl: ArrowWorkload, *, device, warmup: int, reps: int) -> dict:
    """Time and accuracy of PEFT's power-iteration prototypes vs lora_ops' exact ones (fp32 both; the float64
    factor method is the exact answer)."""
    arrow, layer = wl.peft_layer.lora_arrow[ROUTER], wl.peft_layer

    def peft_build():
        arrow._protos_ready = False
        arrow.build_prototypes(layer.lora_A, layer.lora_B)
        return arrow.prototypes

    ours = _inference(lambda: lora_ops.arrow_prototypes(wl.lora_a, wl.lora_b))
    exact = lora_ops.arrow_prototypes(wl.lora_a.double(), wl.lora_b.double())
    peft_protos = _inference(peft_build)()
    timings = {"peft": time_fn(_inference(peft_build), device=device, warmup=warmup, reps=reps),
               "lora_ops": time_fn(ours, device=device, warmup=warmup, reps=reps)}
    peft_err, ops_err = _angle_errors(peft_protos, exact), _angle_errors(ours(), exact)
    # Random factors have tightly clustered singular values (sigma_2 / sigma_1 near 1), the worst case for power
    # iteration; trained LoRAs usually decay faster. The same experts with B's columns scaled by DECAY**j show
    # the milder case, through PEFT's own per-expert routine.
    b_dec = wl.lora_b * (DECAY ** torch.arange(wl.case.rank, device=wl.lora_b.device, dtype=wl.lora_b.dtype))
    with torch.inference_mode():
        peft_dec = torch.stack([arrow.top_right_singular_vec_from_BA(a_i, b_i) for a_i, b_i in zip(wl.lora_a, b_dec)])
        exact_dec = lora_ops.arrow_prototypes(wl.lora_a.double(), b_dec.double())
        peft_dec_err = _angle_errors(peft_dec, exact_dec)
        ops_dec_err = _angle_errors(lora_ops.arrow_prototypes(wl.lora_a, b_dec), exact_dec)
    _set_exact_prototypes(wl)  # leave PEFT routing with the exact prototypes the forward check used
    return {
        "timings": {m: t.as_dict() for m, t in timings.items()},
        "ratio_peft/lora_ops": timings["peft"].median_ms / timings["lora_ops"].median_ms,
        "max_sin_angle": {"peft": float(peft_err.max()), "lora_ops": float(ops_err.max())},
        "median_sin_angle": {"peft": float(peft_err.median()), "lora_ops": float(ops_err.median())},
        "decaying_spectrum": {"decay": DECAY,
                              "max_sin_angle": {"peft": float(peft_dec_err.max()), "lora_ops": float(ops_dec_err.max())},
                              "median_sin_angle": {"peft": float(peft_dec_err.median()),
                                                   "lora_ops": float(ops_dec_err.median())}},
    }


def run_case(case: ArrowCase, *, device: str | torch.device = "cpu", warmup: int = 3, reps: int = 20,
             seed: int = 0) -> dict:
    """Build, check and time one case (forward methods and prototypes). Returns a JSON-ready dict."""
    wl = build_workload(case, device=device, seed=seed)
    check = check_against_peft(wl)
    fns = wl.fns()
    others = OtherCpuMeter()
    timings = {m: time_fn(fns[m], device=device, warmup=warmup, reps=reps) for m in METHODS}
    protos = prototype_comparison(wl, device=device, warmup=min(warmup, 2), reps=max(3, reps // 4))
    ms = {m: t.median_ms for m, t in timings.items()}
    arrow_ms = {"peft": ms["peft"] - ms["base"], "einsum": ms["einsum"], "lora_ops": ms["lora_ops"],
                "route": ms["route"]}
    ours = arrow_ms["lora_ops"]
    return {
        "case": case.as_dict(),
        "methods": list(METHODS),
        "timings": {m: t.as_dict() for m, t in timings.items()},
        "arrow_ms": arrow_ms,
        "ratios": {"peft_arrow/lora_ops": arrow_ms["peft"] / ours, "einsum/lora_ops": arrow_ms["einsum"] / ours,
                   "lora_ops/base": ours / ms["base"]},
        "prototypes": protos,
        "check": check,
        "other_cpu_share": others.share(),
    }


def run(case_list: Iterable[ArrowCase], *, device: str | torch.device = "cpu", warmup: int = 3, reps: int = 20,
        quick: bool = False, seed: int = 0, progress: Callable[[list], Iterable] = iter) -> dict:
    """Run every case; returns ``kind``, ``environment``, ``settings`` and the list of ``cases`` (see run_case)."""
    case_list = list(case_list)
    env = environment(device)
    others = OtherCpuMeter()
    results = [run_case(c, device=device, warmup=warmup, reps=reps, seed=seed) for c in progress(case_list)]
    return {
        "kind": "arrow",
        "environment": env,
        "settings": {"quick": quick, "warmup": warmup, "reps": reps, "seed": seed, "dtype": "float32",
                     "lora_alpha": LORA_ALPHA, "rel_tol": REL_TOL, "temperature": 1.0},
        "other_cpu_share": others.share(),
        "cases": results,
    }


def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(result: dict) -> str:
    """Two aligned tables: the forward (Arrow part in ms) and the prototype computation."""
    env = result["environment"]
    where = env.get("gpu_name") or f"{env['cpu_model']}, {env['threads']} threads"
    lines = [f"Arrow routing on {env['device']} ({where}); torch {env['torch']}, lora_ops {env['lora_ops']}, "
             f"peft {env.get('peft')}; {result['settings']['dtype']}, median of {result['settings']['reps']} reps",
             "forward: ms of the Arrow part (peft = peft layer - base); lora_ops = route + grouped_lora top-k"]
    share = result.get("other_cpu_share")
    if share is not None and share > 0.05:
        lines.append(f"other processes used {100 * share:.0f}% of the machine's CPU time: timings may be inflated")

    def table(header, rows):
        lines.extend(report.align_rows(header, rows))

    rows = []
    for c in result["cases"]:
        am, r = c["arrow_ms"], c["ratios"]
        rows.append([c["case"]["name"], _fmt(c["timings"]["base"]["median_ms"], ".2f"), _fmt(am["peft"], ".2f"),
                     _fmt(am["einsum"], ".2f"), _fmt(am["lora_ops"], ".3f"), _fmt(am["route"], ".3f"),
                     _fmt(r["peft_arrow/lora_ops"], ".1f"), _fmt(r["einsum/lora_ops"], ".1f"),
                     _fmt(c["check"]["lora_ops"]["rel_diff"], ".1e"),
                     _fmt(None if c.get("other_cpu_share") is None else 100 * c["other_cpu_share"], ".0f")])
    table(["case", "base", "peft", "einsum", "lora_ops", "route", "peft/ops", "einsum/ops", "reldiff", "others%"],
          rows)
    lines.append("prototypes: ms for all experts; sin(angle) to the exact (float64) prototypes, max and median "
                 "over experts")
    rows = []
    for c in result["cases"]:
        p = c["prototypes"]
        rows.append([c["case"]["name"], _fmt(p["timings"]["peft"]["median_ms"], ".2f"),
                     _fmt(p["timings"]["lora_ops"]["median_ms"], ".2f"), _fmt(p["ratio_peft/lora_ops"], ".1f"),
                     _fmt(p["max_sin_angle"]["peft"], ".1e"), _fmt(p["median_sin_angle"]["peft"], ".1e"),
                     _fmt(p["max_sin_angle"]["lora_ops"], ".1e"), _fmt(p["median_sin_angle"]["lora_ops"], ".1e")])
    table(["case", "peft_ms", "ops_ms", "peft/ops", "peft_max", "peft_med", "ops_max", "ops_med"], rows)
    lines.append(f"same experts with B's column j scaled by {DECAY}**j (a decaying spectrum, milder for power "
                 "iteration): sin(angle) max / median")
    rows = []
    for c in result["cases"]:
        dec = c["prototypes"]["decaying_spectrum"]
        rows.append([c["case"]["name"], _fmt(dec["max_sin_angle"]["peft"], ".1e"),
                     _fmt(dec["median_sin_angle"]["peft"], ".1e"), _fmt(dec["max_sin_angle"]["lora_ops"], ".1e"),
                     _fmt(dec["median_sin_angle"]["lora_ops"], ".1e")])
    table(["case", "peft_max", "peft_med", "ops_max", "ops_med"], rows)
    return "\n".join(lines)


def write_plot(result: dict, out_dir) -> Path:
    """Arrow-part time per method (log scale), one group of bars per case; ``<out_dir>/<stem>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"peft": "PEFT Arrow (minus base)", "einsum": "torch all-experts einsum",
              "lora_ops": "lora_ops route + grouped_lora", "route": "lora_ops arrow_route alone"}
    cases_ = result["cases"]
    fig, ax = plt.subplots(figsize=(2.2 + 2.0 * len(cases_), 4))
    width = 0.8 / len(labels)
    for j, (m, label) in enumerate(labels.items()):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(cases_))]
        ax.bar(xs, [max(c["arrow_ms"][m], 1e-4) for c in cases_], width, label=label, color=f"C{j}")
    ax.set_xticks(range(len(cases_)), [c["case"]["name"] for c in cases_], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms (Arrow part)")
    env = result["environment"]
    ax.set_title(f"Arrow routing, {env['device']} ({env.get('gpu_name') or env['cpu_model']}, "
                 f"{env['threads']} threads), float32", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    return report.save_png(fig, result, out_dir)


def write_report(result: dict, out_dir) -> dict:
    """JSON (report.write_json) and the bar plot; returns ``{"json": path, "png": path}``."""
    from lora_ops.benchmarks import report

    return {"json": report.write_json(result, out_dir), "png": write_plot(result, out_dir)}
