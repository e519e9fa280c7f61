"""Writing a recipe's results: ``results.json``, ``results.md`` (Markdown tables) and PNG plots, all atomic."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

from lora_ops._io import atomic_write, atomic_write_json, atomic_write_text

__all__ = ["markdown_table", "fmt", "write_results", "bar_plot", "line_plot", "heatmap"]


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _save_figure(fig, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def bar_plot(path, title: str, groups: Sequence[str], series: Mapping[str, Sequence[float]], ylabel: str) -> Path:
    """Grouped bars: one group per entry of ``groups``, one bar per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups) * max(1, len(series)) / 2), 3.6))
    width = 0.8 / max(1, len(series))
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    try:
        return _save_figure(fig, Path(path))
    finally:
        plt.close(fig)


def line_plot(path, title: str, xs: Sequence[float], series: Mapping[str, Sequence[float]], xlabel: str,
              ylabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    try:
        return _save_figure(fig, Path(path))
    finally:
        plt.close(fig)


def heatmap(path, title: str, matrix: Sequence[Sequence[float]], row_labels: Sequence[str],
            col_labels: Optional[Sequence[str]] = None, *, vmin: Optional[float] = None,
            vmax: Optional[float] = None, cbar_label: str = "", annotate: bool = True, digits: int = 2) -> Path:
    """A matrix as a coloured grid (e.g. a similarity matrix), values written in the cells when ``annotate``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    col_labels = list(row_labels) if col_labels is None else list(col_labels)
    if m.ndim != 2 or m.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"heatmap: matrix must have shape [{len(row_labels)}, {len(col_labels)}] (rows x columns "
                         f"of the labels), got {list(m.shape)}")
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * m.shape[1] + 2.0), max(3.2, 0.45 * m.shape[0] + 1.4)))
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto")
    ax.set_xticks(range(m.shape[1]))
    ax.set_xticklabels(col_labels, rotation=45, ha="right")
    ax.set_yticks(range(m.shape[0]))
    ax.set_yticklabels(row_labels)
    if annotate and m.size <= 400:
        lo, hi = (np.nanmin(m), np.nanmax(m)) if m.size else (0.0, 1.0)
        mid = (lo + hi) / 2
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.{digits}f}", ha="center", va="center", fontsize=7,
                        color="black" if m[i, j] > mid else "white")
    fig.colorbar(im, ax=ax, label=cbar_label)
    ax.set_title(title)
    try:
        return _save_figure(fig, Path(path))
    finally:
        plt.close(fig)


def write_results(out_dir, payload: dict, markdown: str) -> Dict[str, Path]:
    out = Path(out_dir)
    return {"json": atomic_write_json(out / "results.json", payload),
            "md": atomic_write_text(out / "results.md", markdown)}
