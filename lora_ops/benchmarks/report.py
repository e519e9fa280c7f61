"""Output helpers shared by every benchmark kind: aligned text tables, atomic JSON and PNG files.

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

__all__ = ["align_rows", "machine_slug", "save_png", "write_json"]


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def align_rows(header: list, rows: list) -> list:
    """Text lines of a table: the first column (the case name) left-aligned, every other (numbers) right-aligned."""
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    return ["  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])])
            for row in [header] + rows]


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
