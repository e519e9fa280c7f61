"""Output of a benchmark run: an aligned text table, a JSON file and a PNG plot.

Files are named ``<kind>-<machine>-<YYYYMMDD-HHMMSS>.{json,png}`` (machine: ``cpu-2threads`` or the GPU's name as a
slug; the time is when the run started) and written atomically: a temporary file in the same folder, then
``os.replace``, so a crash or a full disk never leaves a truncated result next to the committed ones.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from pathlib import Path
from typing import Callable

__all__ = ["align_rows", "format_table", "machine_slug", "save_png", "write_json", "write_plot", "write_report"]

# Plotted methods (LoRA part) in legend order, with fixed colours so plots with and without gather_bmm compare;
# "peft" is PEFT's total minus the base layer.
PLOT_METHODS = {"peft": ("PEFT adapter_names (minus base)", "C0"), "loop": ("torch segment loop", "C1"),
                "gather_bmm": ("torch gather + bmm", "C2"), "lora_ops": ("lora_ops.grouped_lora", "C3")}


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def align_rows(header: list, rows: list) -> list:
    """Text lines of a table: the first column (the case name) left-aligned, every other (numbers) right-aligned."""
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    return ["  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])])
            for row in [header] + rows]


def format_table(result: dict) -> str:
    """The grouped result as plain text: a header naming the machine, then one aligned row per case."""
    env, bw = result["environment"], result["bandwidth"]
    where = env.get("gpu_name") or f"{env['cpu_model']}, {env['threads']} threads"
    lines = [
        f"grouped LoRA on {env['device']} ({where}); torch {env['torch']}, lora_ops {env['lora_ops']}, "
        f"peft {env.get('peft')}; {result['settings']['dtype']}, median of {result['settings']['reps']} reps",
        f"read bandwidth {bw['gbps']:.1f} GB/s ({bw['method']}, {bw['bytes'] / 2**20:.0f} MiB); "
        "ms columns after 'base' are LoRA parts (peft = peft - base); floor = memory floor at that bandwidth",
    ]
    share = result.get("other_cpu_share")
    if share is not None:
        lines.append(f"other processes used {100 * share:.0f}% of the machine's CPU time during the run"
                     + (" -- timings may be inflated (see the others% column)" if share > 0.05 else ""))
    header = ["case", "n", "base", "peft", "loop", "gbmm", "lora_ops", "floor", "peft/ops", "loop/ops",
              "ops/base", "GB/s", "%floor", "maxdiff", "others%"]
    rows = []
    for c in result["cases"]:
        lm, r, base = c["lora_ms"], c["ratios"], c["timings"]["base"]["median_ms"]
        rows.append([
            c["case"]["name"], str(c["n_present"]), _fmt(base, ".3f"), _fmt(lm.get("peft"), ".3f"),
            _fmt(lm.get("loop"), ".3f"), _fmt(lm.get("gather_bmm"), ".3f"), _fmt(lm["lora_ops"], ".3f"),
            _fmt(c["floor"]["ms"], ".3f"), _fmt(r.get("peft_lora/lora_ops"), ".2f"),
            _fmt(r.get("loop/lora_ops"), ".2f"), _fmt(r.get("lora_ops/base"), ".3f"),
            _fmt(c["lora_ops_gbps"], ".1f"), _fmt(c["lora_ops_pct_of_floor"], ".0f"),
            _fmt(c["check"]["lora_ops"]["max_abs_diff"], ".1e"),
            _fmt(None if c.get("other_cpu_share") is None else 100 * c["other_cpu_share"], ".0f"),
        ])
    return "\n".join(lines + align_rows(header, rows))


def machine_slug(env: dict) -> str:
    """Short file-name-safe machine name: the GPU's name (``nvidia-h100-80gb-hbm3``) or ``cpu-<threads>threads``."""
    if env.get("gpu_name"):
        return re.sub(r"[^a-z0-9]+", "-", env["gpu_name"].lower()).strip("-")
    return f"cpu-{env['threads']}threads"


def _stem(result: dict) -> str:
    started = datetime.datetime.fromisoformat(result["environment"]["date"])
    return f"{result['kind']}-{machine_slug(result['environment'])}-{started:%Y%m%d-%H%M%S}"


def _atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` for a temporary file next to ``path``, then rename it into place."""
    # a plain open() (not mkstemp) so the file gets the usual umask permissions; the pid keeps names unique
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_png(fig, result: dict, out_dir: str | os.PathLike) -> Path:
    """Save a matplotlib figure atomically as ``<out_dir>/<kind>-<machine>-<stamp>.png`` and close it."""
    import matplotlib.pyplot as plt

    try:
        return _atomic_write(Path(out_dir) / f"{_stem(result)}.png",
                             lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def write_json(result: dict, out_dir: str | os.PathLike) -> Path:
    """Write ``result`` to ``<out_dir>/<kind>-<machine>-<stamp>.json``; returns the path."""
    path = Path(out_dir) / f"{_stem(result)}.json"

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")

    return _atomic_write(path, write)


def write_plot(result: dict, out_dir: str | os.PathLike) -> Path:
    """LoRA-part time vs N (log-log), one line per method plus the memory floor and the base layer, one panel per
    (d, distribution). Written to ``<out_dir>/<kind>-<machine>-<stamp>.png``; returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, and no GUI backend chosen behind the user's back
    import matplotlib.pyplot as plt

    cases = result["cases"]
    ds = sorted({c["case"]["d_in"] for c in cases})
    dists = list(dict.fromkeys(c["case"]["dist"] for c in cases))
    fig, axes = plt.subplots(len(ds), len(dists), figsize=(4.5 * len(dists), 3.6 * len(ds)), squeeze=False)
    for row, d in enumerate(ds):
        for col, dist in enumerate(dists):
            ax = axes[row][col]
            panel = sorted((c for c in cases if c["case"]["d_in"] == d and c["case"]["dist"] == dist),
                           key=lambda c: c["case"]["n_adapters"])
            ns = [c["case"]["n_adapters"] for c in panel]
            for method, (label, color) in PLOT_METHODS.items():
                # a LoRA part can come out <= 0 (PEFT minus base within noise): no point on a log axis
                pts = [(c["case"]["n_adapters"], c["lora_ms"][method]) for c in panel
                       if c["lora_ms"].get(method, 0) > 0]
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=color, label=label)
            ax.plot(ns, [c["floor"]["ms"] for c in panel], "k--", label="memory floor")
            ax.plot(ns, [c["timings"]["base"]["median_ms"] for c in panel], ":", color="gray",
                    label="base Linear (whole)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.set_title(f"d={d}, {dist}")
            ax.set_xlabel("adapters N")
            ax.set_ylabel("LoRA part (ms)")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    env = result["environment"]
    fig.suptitle(f"grouped LoRA, {env['device']} ({env.get('gpu_name') or env['cpu_model']}, "
                 f"{env['threads']} threads), {result['settings']['dtype']}")
    fig.tight_layout(rect=(0, 0.08, 1, 1))  # leave the bottom strip to the shared legend
    return save_png(fig, result, out_dir)


def write_report(result: dict, out_dir: str | os.PathLike) -> dict:
    """Write the JSON and the plot of ``result`` to ``out_dir``; returns ``{"json": path, "png": path}``."""
    return {"json": write_json(result, out_dir), "png": write_plot(result, out_dir)}
