"""Table and plots of a grouped-LoRA run (``lora_ops.benchmarks.grouped.run``).

The plot has one panel per sweep of the grid: the speed-up of ``lora_ops.grouped_lora`` over each other method
(that method's LoRA-part time / lora_ops' time; above 1 = lora_ops is faster) against the sweep's axis (N, T, r,
layer shape, distribution, prefill layout), a first panel of absolute LoRA-part times with the memory floor, and on
GPU one more panel per sweep with each method's achieved bandwidth as % of the memory roofline (peak bandwidth).
Results written before sweeps were recorded are drawn with one N sweep per (layer, rank, rows, distribution).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from lora_ops.benchmarks.report import _fmt, align_rows, save_png, write_json

__all__ = ["format_table", "write_plot", "write_report", "result_sweeps"]

# column header and plot label / colour of each method (fixed colours, so plots with and without a method compare)
METHOD_STYLE = {
    "peft": ("peft", "PEFT adapter_names", "C0"),
    "loop": ("loop", "torch segment loop", "C1"),
    "gather_bmm": ("gbmm", "torch gather + bmm", "C2"),
    "grouped_mm": ("gmm", "torch._grouped_mm composite", "C4"),
    "lora_ops": ("ops", "lora_ops.grouped_lora", "C3"),
    "lora_ops_nocheck": ("ops_nc", "lora_ops, check_ids=False", "C5"),
}
NUMERIC_AXES = {"n_adapters": "adapters N", "tokens": "decode rows T", "rank": "rank r"}


def _present(result: dict, methods) -> list:
    return [m for m in methods if any(m in c["lora_ms"] for c in result["cases"])]


def format_table(result: dict) -> str:
    """The run as plain text: a header naming the machine, then one aligned row per case. Columns appear only for
    methods that some case timed (gather_bmm, the CUDA-only ones)."""
    env, bw, settings = result["environment"], result["bandwidth"], result["settings"]
    where = env.get("gpu_name") or f"{env['cpu_model']}, {env['threads']} threads"
    lines = [
        f"grouped LoRA on {env['device']} ({where}); torch {env['torch']}, lora_ops {env['lora_ops']}, "
        f"peft {env.get('peft')}; {settings['dtype']}, median of up to {settings['reps']} reps",
        f"read bandwidth {bw['gbps']:.1f} GB/s ({bw['method']}, {bw['bytes'] / 2**20:.0f} MiB); "
        "ms columns after 'base' are LoRA deltas alone; floor = memory floor at that bandwidth; mm = the same FLOPs "
        "as two plain torch.mm (all rows through one adapter), %mm = lora_ops GF/s as % of mm's",
    ]
    peak = result.get("peak")
    if peak:
        lines.append(f"memory roofline {peak['gbps']:.0f} GB/s ({peak['source']}); %peak = achieved GB/s / that")
    if settings.get("grouped_mm") not in (None, "timed"):
        lines.append(f"torch._grouped_mm not timed: {settings['grouped_mm']}")
    share = result.get("other_cpu_share")
    if share is not None:
        lines.append(f"other processes used {100 * share:.0f}% of the machine's CPU time during the run"
                     + (" -- timings may be inflated (see the others% column)" if share > 0.05 else ""))
    skipped = {(c["case"]["name"], m): why for c in result["cases"] for m, why in c.get("skipped", {}).items()}
    for (name, m), why in skipped.items():
        lines.append(f"{name}: {m} skipped ({why})")

    timed = _present(result, METHOD_STYLE)
    versus = [m for m in timed if m not in ("lora_ops", "lora_ops_nocheck")]
    header = (["case", "n", "base"] + [METHOD_STYLE[m][0] for m in timed] + ["floor"]
              + [f"{METHOD_STYLE[m][0]}/ops" for m in versus] + ["ops/base", "GB/s", "%floor"]
              + (["%peak"] if peak else []) + ["mm", "GF/s", "mmGF/s", "%mm", "maxdiff", "others%"])
    rows = []
    for c in result["cases"]:
        lm, r = c["lora_ms"], c["ratios"]
        share = c.get("other_cpu_share")
        row = [c["case"]["name"], str(c["n_present"]), _fmt(c["timings"]["base"]["median_ms"], ".3f")]
        row += [_fmt(lm.get(m), ".3f") for m in timed] + [_fmt(c["floor"]["ms"], ".3f")]
        row += [_fmt(r.get(f"{m}/lora_ops"), ".2f") for m in versus]
        row += [_fmt(r.get("lora_ops/base"), ".3f"), _fmt(c["lora_ops_gbps"], ".1f"),
                _fmt(c["lora_ops_pct_of_floor"], ".0f")]
        if peak:
            row.append(_fmt((c.get("pct_of_peak") or {}).get("lora_ops"), ".1f"))
        gemm = c.get("gemm") or {}  # absent in results written before the GEMM ceiling was timed
        row += [_fmt(gemm.get("mm_ms"), ".3f"), _fmt(gemm.get("lora_ops_gflops"), ".1f"),
                _fmt(gemm.get("mm_gflops"), ".1f"), _fmt(gemm.get("lora_ops_pct_of_mm"), ".0f")]
        row += [_fmt(c["check"]["lora_ops"]["max_abs_diff"], ".1e"),
                _fmt(None if share is None else 100 * share, ".0f")]
        rows.append(row)
    return "\n".join(lines + align_rows(header, rows))


def _layout(case: dict) -> str:
    seq = case.get("seq_len", 1)
    return f"decode T{case['tokens']}" if seq == 1 else f"prefill {case['tokens'] // seq}x{seq}"


def _x_label(axis: str, case: dict) -> str:
    if axis == "shape":
        return f"{case['d_in']}x{case['d_out']}"
    if axis == "layout":
        return _layout(case)
    if axis == "dist":
        return case["dist"]
    return case["name"]


def result_sweeps(result: dict) -> list:
    """``[(name, axis, [case results])]`` of a run: its recorded sweeps, or for older results one N sweep per
    (layer, rank, rows, distribution)."""
    by_name = {c["case"]["name"]: c for c in result["cases"]}
    if result.get("sweeps"):
        return [(s["name"], s["axis"], [by_name[n] for n in s["cases"] if n in by_name]) for s in result["sweeps"]]
    groups: dict = {}
    for c in result["cases"]:
        k = c["case"]
        groups.setdefault((k["d_in"], k["d_out"], k["rank"], _layout(k), k["dist"]), []).append(c)
    return [(f"N, d={k[0]}x{k[1]}, r{k[2]}, {k[3]}, {k[4]}", "n_adapters", v) for k, v in groups.items()]


def _axis_values(ax, axis: str, panel: list) -> list:
    """x positions of the panel's cases; sets the ticks (log2 for numeric axes, one slot per case otherwise)."""
    if axis in NUMERIC_AXES:
        xs = [c["case"][axis] for c in panel]
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(NUMERIC_AXES[axis])
        return xs
    xs = list(range(len(panel)))
    ax.set_xticks(xs, [_x_label(axis, c["case"]) for c in panel], fontsize=7, rotation=20 if len(xs) > 3 else 0)
    ax.set_xlim(-0.5, len(xs) - 0.5)
    return xs


def _method_lines(ax, axis: str, panel: list, value) -> list:
    """One line per method through ``value(case, method)`` (None or <= 0: no point, e.g. a method not timed, or a
    value a log axis cannot show); returns the x positions of the panel's cases."""
    xs = _axis_values(ax, axis, panel)
    for m, (_, label, color) in METHOD_STYLE.items():
        pts = [(x, v) for x, c in zip(xs, panel) if (v := value(c, m)) is not None and v > 0]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=color, label=label)
    return xs


def _speedup_panel(ax, name: str, axis: str, panel: list) -> None:
    from matplotlib.ticker import FuncFormatter

    def speedup(c, m):
        ours, theirs = c["lora_ms"].get("lora_ops"), c["lora_ms"].get(m)
        return None if m == "lora_ops" or not ours or theirs is None else theirs / ours

    _method_lines(ax, axis, panel, speedup)
    ax.axhline(1.0, color="C3", lw=1, label="lora_ops.grouped_lora (= 1)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}x" if f"{v:g}"[0] in "25" else ""))
    ax.set_ylabel("time / lora_ops time")
    ax.set_title(f"speed-up of lora_ops: {name}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)


def _absolute_panel(ax, name: str, axis: str, panel: list) -> None:
    xs = _method_lines(ax, axis, panel, lambda c, m: c["lora_ms"].get(m))
    ax.plot(xs, [c["floor"]["ms"] for c in panel], "k--", label="memory floor")
    ax.plot(xs, [c["timings"]["base"]["median_ms"] for c in panel], ":", color="gray", label="base Linear (whole)")
    ax.set_yscale("log")
    ax.set_ylabel("LoRA part (ms)")
    ax.set_title(f"time: {name}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)


def _roofline_panel(ax, name: str, axis: str, panel: list) -> None:
    _method_lines(ax, axis, panel, lambda c, m: (c.get("pct_of_peak") or {}).get(m))
    ax.set_ylim(bottom=0)
    ax.set_ylabel("% of memory roofline")
    ax.set_title(f"bandwidth: {name}", fontsize=9)
    ax.grid(True, alpha=0.3)


def write_plot(result: dict, out_dir: str | os.PathLike) -> Path:
    """The panels described in the module docstring, three per row, with one shared legend below them. Written to
    ``<out_dir>/<kind>-<machine>-<stamp>.png``; returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and no GUI backend chosen behind the user's back
    import matplotlib.pyplot as plt

    sweep_list = [s for s in result_sweeps(result) if s[2]]
    panels = [(_absolute_panel, *sweep_list[0])] + [(_speedup_panel, *s) for s in sweep_list]
    if result.get("peak"):
        panels += [(_roofline_panel, *s) for s in sweep_list]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.5 * nrows + 0.8), squeeze=False)
    legend = {}
    for ax, (draw, name, axis, panel) in zip(axes.flat, panels):
        draw(ax, name, axis, panel)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.legend(list(legend.values()), list(legend.keys()), loc="lower center", ncol=4, fontsize=8, frameon=False)
    env = result["environment"]
    fig.suptitle(f"grouped LoRA, {env['device']} ({env.get('gpu_name') or env['cpu_model']}, "
                 f"{env['threads']} threads), {result['settings']['dtype']}")
    fig.tight_layout(rect=(0, 0.6 / (3.5 * nrows + 0.8) + 0.02, 1, 1))  # leave the bottom strip to the legend
    return save_png(fig, result, out_dir)


def write_report(result: dict, out_dir: str | os.PathLike) -> dict:
    """Write the JSON and the plot of ``result`` to ``out_dir``; returns ``{"json": path, "png": path}``."""
    return {"json": write_json(result, out_dir), "png": write_plot(result, out_dir)}
