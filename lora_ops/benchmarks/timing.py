"""The one timing helper every lora_ops benchmark uses, plus the run's environment and measured read bandwidth.

Timings are reported as median and inter-quartile range (robust on a shared machine where a neighbour's job can
stall a few repetitions) and the minimum (the least-disturbed repetition). On CUDA each repetition is timed with
CUDA events and preceded by zeroing a 256 MB buffer, so no repetition finds its operands still in L2.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["Timing", "time_fn", "synchronized", "read_bandwidth", "copy_bandwidth", "OtherCpuMeter", "environment", "load_average"]

L2_FLUSH_BYTES = 256 * 1024**2


@dataclass(frozen=True)
class Timing:
    """Summary of ``reps`` timed calls, in milliseconds; ``threads`` is torch's intra-op thread count."""

    median_ms: float
    iqr_ms: float
    min_ms: float
    reps: int
    threads: int

    def as_dict(self) -> dict:
        return asdict(self)


def time_fn(
    fn: Callable[[], Any],
    *,
    device: str | torch.device = "cpu",
    warmup: int = 3,
    reps: int = 20,
    flush_l2: bool = True,
    budget_s: float | None = None,
    min_reps: int = 5,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``reps`` timed ones (CUDA events and an L2 flush on CUDA).

    ``budget_s`` bounds the time spent on a slow ``fn`` (e.g. a 1 s prefill GEMM on two cores): warm-up stops once
    it has used a quarter of the budget (after at least one call), and the repetitions are cut to what the budget
    allows at the last warm-up call's speed, but never below ``min_reps`` (nor above ``reps``). The number of
    repetitions actually timed is in the returned ``Timing.reps``.
    """
    if reps < 1:
        raise ValueError(f"time_fn: reps must be >= 1, got {reps}")
    device = torch.device(device)
    last = _warm_up(fn, device, warmup, budget_s)
    if budget_s is not None and last is not None and last > 0:
        reps = min(reps, max(min_reps, int(budget_s / last)))
    if device.type == "cuda":
        samples = _time_cuda(fn, device, reps, flush_l2)
    else:
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
    q1, med, q3 = np.percentile(samples, [25, 50, 75])
    return Timing(float(med), float(q3 - q1), float(min(samples)), reps, torch.get_num_threads())


def _warm_up(fn: Callable[[], Any], device: torch.device, warmup: int, budget_s: float | None) -> float | None:
    """Run the warm-up calls; returns the last one's seconds when a budget is set (None otherwise, or if none ran)."""
    if budget_s is None:
        for _ in range(warmup):
            fn()
        return None
    last, began = None, time.perf_counter()
    for _ in range(warmup):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the call's own time, not its launch
        last = time.perf_counter() - start
        if last + (start - began) > budget_s / 4:
            break
    return last


def _time_cuda(fn: Callable[[], Any], device: torch.device, reps: int, flush_l2: bool) -> list:
    flush = _l2_flush_buffer(device) if flush_l2 else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize(device)
    for start, end in zip(starts, ends):
        if flush is not None:
            flush.zero_()  # outside the events: evicts the operands without being timed
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


@functools.lru_cache(maxsize=None)
def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    # Allocated once per device: larger than any current L2 (H100: 50 MB, H200: 60 MB).
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)


def synchronized(fn: Callable[[], Any], device: str | torch.device) -> Callable[[], Any]:
    """``fn`` followed by a device sync, for wall-clock timers (pytest-benchmark) on CUDA; ``fn`` itself on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


class OtherCpuMeter:
    """Share of the machine's CPU time used by anything but this process (and its children) since the meter was made.

    On a shared machine a neighbour's compile job can inflate CPU timings many-fold (OpenMP threads wait for a
    descheduled peer), so every result records this next to its timings. Linux only (``/proc/stat``); ``share()``
    is None elsewhere. 0.0 = the machine was ours, 0.5 = others used half of all cores' time.
    """

    def __init__(self):
        self._wall = time.perf_counter()
        self._busy = _machine_busy_seconds()
        self._own = _own_seconds()

    def share(self) -> float | None:
        busy = _machine_busy_seconds()
        if busy is None or self._busy is None:
            return None
        wall = time.perf_counter() - self._wall
        others = (busy - self._busy) - (_own_seconds() - self._own)
        return round(min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1)))), 3)


def _own_seconds() -> float:
    """CPU seconds of this process and of its finished child processes (a benchmark's own subprocesses)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _machine_busy_seconds() -> float | None:
    """CPU seconds all cores have spent not idle since boot (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def read_bandwidth(
    device: str | torch.device = "cpu", *, nbytes: int = L2_FLUSH_BYTES, warmup: int = 3, reps: int = 20
) -> dict:
    """Measured read bandwidth: ``.sum()`` over a float32 tensor of ``nbytes`` (far larger than any cache).

    Returns ``{"gbps": best GB/s (1e9 bytes/s), "gbps_median": ..., "bytes": nbytes, "method": ...,
    "timing": Timing dict}``. The floor uses the best repetition: it is what the memory system can deliver, and on
    a shared VM the median of the same measurement varies between runs far more than the best does.
    """
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return _bandwidth(buf.sum, buf.numel() * 4, "float32 tensor .sum(), best repetition", device, warmup, reps)


def copy_bandwidth(
    device: str | torch.device = "cpu", *, nbytes: int = L2_FLUSH_BYTES, warmup: int = 3, reps: int = 20
) -> dict:
    """Measured copy bandwidth: ``dst.copy_(src)`` of ``nbytes``, counting the bytes read plus those written
    (``2 * nbytes``), best repetition. Same keys as ``read_bandwidth``."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return _bandwidth(lambda: dst.copy_(src), 2 * src.numel() * 4,
                      "float32 copy_ (bytes read + written), best repetition", device, warmup, reps)


def _bandwidth(fn: Callable[[], Any], moved: int, method: str, device, warmup: int, reps: int) -> dict:
    # No L2 flush: the buffers themselves are far larger than L2, so every pass already streams from memory.
    t = time_fn(fn, device=device, warmup=warmup, reps=reps, flush_l2=False)
    return {"gbps": moved / (t.min_ms * 1e-3) / 1e9, "gbps_median": moved / (t.median_ms * 1e-3) / 1e9,
            "bytes": moved, "method": method, "timing": t.as_dict()}


def environment(device: str | torch.device = "cpu") -> dict:
    """What the numbers depend on: versions, processor, threads, date. No hostname or user name."""
    import lora_ops

    device = torch.device(device)
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device.type,
        "torch": torch.__version__,
        "lora_ops": lora_ops.__version__,
        "lora_ops_git": _git_describe(os.path.dirname(lora_ops.__file__)),  # the version alone hides kernel changes
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "cpu_model": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_avg_1m": load_average(),  # other processes on the machine skew CPU timings: say so
    }
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        env["peft"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu_name=props.name,
            gpu_memory_gib=round(props.total_memory / 1024**3, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
    return env


def _git_describe(path: str) -> str | None:
    """``<short hash>[-dirty]`` of the checkout holding ``path``; None for an installed wheel or without git."""
    try:
        out = subprocess.run(["git", "-C", path, "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none); near or above the core count means contention."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def cpu_model_name() -> str:
    """The processor's marketing name (``/proc/cpuinfo`` on Linux), else whatever ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
