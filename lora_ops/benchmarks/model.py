"""End-to-end benchmark: a whole Llama forward on a mixed-adapter batch, PEFT ``adapter_names=`` vs lora_ops.

One case = a randomly initialised Llama (built from a config, no download) with N adapters of rank r on every
projection (q/k/v/o/gate/up/down), and a batch of S sequences of L tokens where each sequence picks its own
adapter. Timed in one run, float32, under inference mode:

- ``base``: the same model without any adapter (the floor every method pays);
- ``peft``: ``peft_model(input_ids, adapter_names=[...])`` (PEFT's mixed batch: a loop over adapters per layer);
- ``accelerated``: the same PEFT model after ``lora_ops.peft.accelerate`` (one grouped_lora call per layer);
- ``wrapped``: the base model with ``lora_ops.nn.wrap`` over ``load_adapters(peft_model)`` (no PEFT in the path).

The figure of merit is each method's time *above* the base model (its LoRA cost). Outputs are checked against
PEFT's before timing.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from lora_ops.benchmarks import report
from lora_ops.benchmarks.timing import OtherCpuMeter, environment, time_fn

__all__ = ["ModelCase", "cases", "build_workload", "run_case", "run", "format_table", "write_report",
           "ResultMismatchError"]

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_ALPHA = 32
ABS_TOL = 1e-4  # fp32 logits of a 4-layer model: PEFT and lora_ops sum the same products in different orders
METHODS = ("base", "peft", "accelerated", "wrapped")


class ResultMismatchError(RuntimeError):
    """A lora_ops path gave logits different from PEFT's: never time a wrong answer."""


@dataclass(frozen=True)
class ModelCase:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    n_adapters: int
    rank: int
    seqs: int
    seq_len: int

    @property
    def name(self) -> str:
        return (f"llama-h{self.hidden}-L{self.layers}-N{self.n_adapters}-r{self.rank}-"
                f"{self.seqs}x{self.seq_len}")

    def as_dict(self) -> dict:
        return {**asdict(self), "name": self.name}


def cases(*, quick: bool = False, hidden: Optional[int] = None, layers: Optional[int] = None,
          intermediate: Optional[int] = None, vocab: int = 1024, n_adapters: int = 32, rank: int = 16,
          seqs: int = 16, seq_len: int = 32) -> list:
    """Default: hidden 1024, 4 layers, intermediate 2816 (quick: 512, 2 layers, 1408); vocab 1024; 32 adapters of
    rank 16; 16 sequences x 32 tokens, every sequence a different adapter."""
    hidden = hidden or (512 if quick else 1024)
    layers = layers or (2 if quick else 4)
    intermediate = intermediate or (1408 if quick else 2816)
    heads = max(1, hidden // 64)
    return [ModelCase(hidden, layers, intermediate, vocab, heads, max(1, heads // 4), n_adapters, rank, seqs,
                      seq_len)]


@dataclass
class Workload:
    case: ModelCase
    input_ids: torch.Tensor  # [seqs, seq_len]
    adapter_names: list  # one per sequence
    base: torch.nn.Module
    peft_model: torch.nn.Module  # accelerated only once ``accelerate()`` is called
    wrapped: torch.nn.Module
    row_ids: torch.Tensor  # [seqs] indices into the banks (for ``wrapped``)

    def fns(self) -> dict:
        from lora_ops.nn import adapter_ids

        def wrapped():
            with adapter_ids(self.wrapped, self.row_ids):
                return self.wrapped(self.input_ids).logits

        raw = {
            "base": lambda: self.base(self.input_ids).logits,
            "peft": lambda: self.peft_model(self.input_ids, adapter_names=self.adapter_names).logits,
            "wrapped": wrapped,
        }
        raw["accelerated"] = raw["peft"]  # the same call; what changes is accelerate() in between
        return {k: _inference(f) for k, f in raw.items()}


def _inference(fn: Callable) -> Callable:
    def call():
        with torch.inference_mode():
            return fn()

    return call


def build_workload(case: ModelCase, *, device: str | torch.device = "cpu", seed: int = 0) -> Workload:
    """A seeded Llama, a PEFT model with adapters ``a0..a{N-1}`` (random nonzero B), and a lora_ops-wrapped copy."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from lora_ops.nn import wrap
    from lora_ops.peft import load_adapters

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=case.hidden, intermediate_size=case.intermediate,
                                   num_hidden_layers=case.layers, num_attention_heads=case.heads,
                                   num_key_value_heads=case.kv_heads, vocab_size=case.vocab,
                                   max_position_embeddings=max(128, case.seq_len))
    base = transformers.LlamaForCausalLM(cfg).to(device).eval()
    names = [f"a{i}" for i in range(case.n_adapters)]

    def lora():
        return LoraConfig(r=case.rank, lora_alpha=LORA_ALPHA, target_modules=list(TARGETS), lora_dropout=0.0,
                          init_lora_weights=False)

    peft_model = get_peft_model(copy.deepcopy(base), lora(), adapter_name=names[0])
    for n in names[1:]:
        peft_model.add_adapter(n, lora())
    peft_model.to(device).eval()
    wrapped = wrap(copy.deepcopy(base), load_adapters(peft_model, device=device))

    g = torch.Generator().manual_seed(seed + 1)
    input_ids = torch.randint(0, case.vocab, (case.seqs, case.seq_len), generator=g).to(device)
    # every sequence its own adapter (distinct while seqs <= N), in random order
    row_ids = torch.randperm(case.n_adapters, generator=g)[torch.arange(case.seqs) % case.n_adapters].to(device)
    return Workload(case, input_ids, [names[i] for i in row_ids.tolist()], base, peft_model, wrapped, row_ids)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def run_case(case: ModelCase, *, device: str | torch.device = "cpu", warmup: int = 2, reps: int = 18,
             rounds: int = 6, seed: int = 0) -> dict:
    """Build, check and time one case; returns a JSON-ready dict (timings, ms above base, ratios, checks).

    The methods are timed in ``rounds`` interleaved rounds of ``reps // rounds`` calls each (PEFT's own path and
    the accelerated one are switched with ``accelerate`` / ``deaccelerate``), so a neighbour's load on a shared
    machine hits all methods alike; a method's time above base is the median over rounds of (its round median
    minus base's round median).
    """
    from lora_ops.peft import accelerate, deaccelerate

    wl = build_workload(case, device=device, seed=seed)
    fns = wl.fns()
    want = fns["peft"]()
    accelerate(wl.peft_model)
    check = {"accelerated": _max_diff(fns["accelerated"](), want), "wrapped": _max_diff(fns["wrapped"](), want),
             "adapters_change_output": _max_diff(fns["base"](), want)}
    for m in ("accelerated", "wrapped"):
        if not check[m] <= ABS_TOL:
            raise ResultMismatchError(f"{m} logits differ from PEFT's on {case.name}: max abs diff {check[m]:.3e} "
                                      f"> {ABS_TOL:g}")
    switch = {"peft": deaccelerate, "accelerated": accelerate}
    others = OtherCpuMeter()
    per_round = {m: [] for m in METHODS}
    cpu_round = {m: [] for m in METHODS}
    n = max(1, reps // max(1, rounds))
    for r in range(max(1, rounds)):
        for m in METHODS:
            if m in switch:
                switch[m](wl.peft_model)
            for _ in range(warmup if r == 0 else 1):
                fns[m]()
            # process CPU time per call next to the wall clock: on a loaded shared machine it leaves out the
            # time the process waited for a core (with --threads 1 it is the compute time itself)
            start = time.process_time()
            per_round[m].append(time_fn(fns[m], device=device, warmup=0, reps=n))
            cpu_round[m].append((time.process_time() - start) * 1e3 / n)
    timings = {m: _merge(ts) for m, ts in per_round.items()}
    for m in METHODS:
        timings[m]["cpu_ms_per_round"] = cpu_round[m]
    above_cpu = {m: _median([c - b for c, b in zip(cpu_round[m], cpu_round["base"])]) for m in METHODS
                 if m != "base"}
    best = {m: t["min_ms"] for m, t in timings.items()}
    # paired by round: a method's cost above base is measured against the base timed right next to it, so the
    # load of other processes (which drifts over seconds) largely cancels; then the median over rounds
    above = {m: _median([t.median_ms - b.median_ms for t, b in zip(per_round[m], per_round["base"])])
             for m in METHODS if m != "base"}
    above_min = {m: best[m] - best["base"] for m in METHODS if m != "base"}
    ratios = {}
    for m in ("accelerated", "wrapped"):
        ratios[f"peft/{m}"] = above["peft"] / above[m] if above[m] > 0 else None
        ratios[f"peft/{m}_min"] = above_min["peft"] / above_min[m] if above_min[m] > 0 else None
        ratios[f"peft/{m}_cpu"] = above_cpu["peft"] / above_cpu[m] if above_cpu[m] > 0 else None
    return {"case": case.as_dict(), "methods": list(METHODS), "timings": timings, "above_base_ms": above,
            "above_base_min_ms": above_min, "above_base_cpu_ms": above_cpu, "ratios": ratios, "check": check, "other_cpu_share": others.share()}


def _median(values: list) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def _merge(rounds: list) -> dict:
    """One summary of several ``Timing`` s: median of the round medians, smallest minimum, all reps."""
    return {"median_ms": _median([t.median_ms for t in rounds]), "min_ms": min(t.min_ms for t in rounds),
            "round_medians_ms": [t.median_ms for t in rounds], "reps": sum(t.reps for t in rounds),
            "threads": rounds[0].threads}


def run(case_list: Iterable[ModelCase], *, device: str | torch.device = "cpu", warmup: int = 2, reps: int = 18,
        rounds: int = 6, seed: int = 0, progress: Callable[[list], Iterable] = iter) -> dict:
    """Run every case; the JSON-ready result has ``kind="model"``, ``environment``, ``settings`` and ``cases``."""
    case_list = list(case_list)
    env = environment(device)
    others = OtherCpuMeter()
    results = [run_case(c, device=device, warmup=warmup, reps=reps, rounds=rounds, seed=seed)
               for c in progress(case_list)]
    return {"kind": "model", "environment": env,
            "settings": {"warmup": warmup, "reps": reps, "rounds": rounds, "seed": seed, "dtype": "float32", "lora_alpha": LORA_ALPHA,
                         "targets": list(TARGETS), "abs_tol": ABS_TOL},
            "other_cpu_share": others.share(), "cases": results}


def format_table(result: dict) -> str:
    env = result["environment"]
    where = env.get("gpu_name") or f"{env['cpu_model']}, {env['threads']} threads"
    lines = [f"whole-model forward, mixed adapter batch, on {env['device']} ({where}); torch {env['torch']}, "
             f"peft {env.get('peft')}; {result['settings']['dtype']}, median of {result['settings']['reps']} reps",
             "ms above base = the LoRA cost of each method (its time minus the adapter-free model's); "
             "(paired per round, median over rounds); (min) = peft/accel from each method's fastest call; "
             "cpu+ = the same from process CPU time per call, (cpu) their peft/accel ratio"]
    header = ["case", "base", "peft", "accel", "wrapped", "+peft", "+accel", "+wrapped", "peft/accel",
              "peft/wrapped", "(min)", "cpu+peft", "cpu+accel", "cpu+wrap", "(cpu)", "diff", "others%"]
    rows = []
    for c in result["cases"]:
        t, a, r = c["timings"], c["above_base_ms"], c["ratios"]
        f = report._fmt
        rows.append([c["case"]["name"], *(f(t[m]["median_ms"], ".1f") for m in METHODS),
                     *(f(a[m], ".1f") for m in ("peft", "accelerated", "wrapped")),
                     f(r["peft/accelerated"], ".1f"), f(r["peft/wrapped"], ".1f"),
                     f(r["peft/accelerated_min"], ".1f"),
                     *(f(c["above_base_cpu_ms"][m], ".1f") for m in ("peft", "accelerated", "wrapped")),
                     f(r["peft/accelerated_cpu"], ".1f"),
                     f(max(c["check"]["accelerated"], c["check"]["wrapped"]), ".1e"),
                     f(None if c.get("other_cpu_share") is None else 100 * c["other_cpu_share"], ".0f")])
    return "\n".join(lines + report.align_rows(header, rows))


def write_plot(result: dict, out_dir) -> Path:
    """Bars of the time above the base model per method (wall clock and process CPU time), one group per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases_ = result["cases"]
    labels = {"peft": ("PEFT adapter_names", "C0"), "accelerated": ("PEFT + lora_ops.peft.accelerate", "C3"),
              "wrapped": ("lora_ops.nn.wrap", "C2")}
    panels = (("above_base_ms", "wall clock"), ("above_base_cpu_ms", "process CPU time"))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 5 * len(cases_)), 4), squeeze=False)
    width = 0.8 / len(labels)
    for ax, (key, title) in zip(axes[0], panels):
        for j, (m, (label, color)) in enumerate(labels.items()):
            ax.bar([i + j * width for i in range(len(cases_))], [c[key][m] for c in cases_], width, label=label,
                   color=color)
        ax.set_xticks([i + width for i in range(len(cases_))], [c["case"]["name"] for c in cases_], fontsize=7)
        ax.set_ylabel("ms above the base model")
        ax.set_title(title, fontsize=9)
        ax.axhline(0, color="k", lw=0.5)
    axes[0][0].legend(fontsize=8)
    env = result["environment"]
    fig.suptitle(f"mixed-adapter batch, whole model ({env.get('gpu_name') or env['cpu_model']}, "
                 f"{env['threads']} threads, others used {100 * (result.get('other_cpu_share') or 0):.0f}% CPU)",
                 fontsize=9)
    fig.tight_layout()
    return report.save_png(fig, result, out_dir)


def write_report(result: dict, out_dir) -> dict:
    return {"json": report.write_json(result, out_dir), "png": write_plot(result, out_dir)}
