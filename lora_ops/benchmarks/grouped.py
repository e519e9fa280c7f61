"""Grouped-LoRA benchmark cases: a mixed-adapter batch through one d_in -> d_out layer, decode or prefill.

Every case times, in one run and on the same weights:

- ``base``: the base ``nn.Linear`` forward alone (the cost LoRA is added to);
- ``peft``: PEFT's LoRA layer called with ``adapter_names=`` (one name per row), its base layer replaced by a stub
  that returns zeros, so PEFT's own LoRA work (index lists, per-adapter sub-batches, scatter) is timed directly
  instead of as the difference of two times that the base layer dominates on prefill shapes;
- ``loop``: the strong pure-torch composite (stable sort by adapter, two matmuls per adapter present, one scatter);
- ``gather_bmm``: gather A/B per row then two bmm (slow; small N and small gathers only, skipped by ``quick``);
- ``grouped_mm``: sort + ``torch._grouped_mm`` shrink and expand (CUDA, compute capability >= 9.0 only);
- ``lora_ops``: ``lora_ops.grouped_lora`` as users call it by default (``check_ids=True``: one id-range reduction,
  a host sync on CUDA);
- ``lora_ops_nocheck``: the same with ``check_ids=False`` (the serving / CUDA-graph path; CUDA only, where the
  sync is what differs).

All but ``base`` compute the LoRA delta alone. Before timing, each of them is checked against the whole PEFT model's
output minus the base output, so all methods compute the same thing.

The case grid is a set of one-factor sweeps around a central case (``sweeps()``): each sweep changes one axis of
``CENTER`` (adapters N, decode rows T, rank r, layer shape, id distribution, prefill layout), so each plot shows
the effect of one thing. A full Cartesian product of the DESIGN.md axes would be ~600 cases.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn

import lora_ops
from lora_ops.benchmarks.composites import (gather_bmm_delta, grouped_mm_delta, grouped_mm_unavailable,
                                            segment_loop_delta)
from lora_ops.benchmarks.roofline import peak_bandwidth
from lora_ops.benchmarks.timing import OtherCpuMeter, copy_bandwidth, environment, read_bandwidth, time_fn

__all__ = [
    "DISTRIBUTIONS", "DTYPES", "METHODS", "DELTA_METHODS", "CENTER", "SHAPES", "GroupedCase", "Sweep", "Workload",
    "ResultMismatchError", "adapter_ids", "sweeps", "cases", "methods_for", "build_workload", "segment_loop_delta",
    "gather_bmm_delta", "grouped_mm_delta", "memory_floor_bytes", "check_against_peft", "rel_tol", "run_case",
    "run", "parse_dtype",
]

DISTRIBUTIONS = ("same", "uniform", "zipf", "distinct")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("base", "peft", "loop", "gather_bmm", "grouped_mm", "lora_ops", "lora_ops_nocheck")
DELTA_METHODS = METHODS[1:]  # methods whose output is the LoRA delta itself
CUDA_ONLY = ("grouped_mm", "lora_ops_nocheck")
ZIPF_EXPONENT = 1.1
LORA_ALPHA = 32  # scale alpha / r = 2 at r = 16: a non-unit scale, so a dropped scale would fail the check
# Relative max error allowed against PEFT. Half types: PEFT rounds the base output, the LoRA part and their sum to
# the dtype, and its reference (PEFT - base) inherits that rounding of the base output. Measured on CPU over the
# published shapes: largest rel. diff of any method 1.2e-2 in bf16 and 1.4e-3 in fp16 (r = 64, where the delta is
# smallest next to the base output); fp32 below 2e-6.
REL_TOLS = {torch.float32: 1e-3, torch.bfloat16: 4e-2, torch.float16: 5e-3}
GATHER_BMM_MAX_N = 32  # above this gather_bmm only shows what is already known (far slower), at a high cost in time
GATHER_BMM_MAX_ELEMENTS = 32 * 2**20  # T·r·(d_in+d_out) gathered weights per call (128 MiB in fp32)


@dataclass(frozen=True)
class GroupedCase:
    """One shape: ``tokens`` rows of width ``d_in`` through a ``d_in -> d_out`` layer with ``n_adapters``
    rank-``rank`` adapters. ``seq_len = 1`` is decode (every row a one-token request, its adapter drawn by
    ``dist``); ``seq_len > 1`` is prefill: ``tokens / seq_len`` sequences, one adapter per sequence (drawn by
    ``dist`` over the sequences), so ids come in runs of ``seq_len`` equal values."""

    d_in: int
    d_out: int
    rank: int
    tokens: int
    n_adapters: int
    dist: str
    seq_len: int = 1

    def __post_init__(self):
        if self.dist not in DISTRIBUTIONS:
            raise ValueError(f"dist must be one of {DISTRIBUTIONS}, got {self.dist!r}")
        if self.seq_len < 1 or self.tokens % self.seq_len:
            raise ValueError(f"tokens ({self.tokens}) must be a multiple of seq_len ({self.seq_len})")

    @property
    def sequences(self) -> int:
        return self.tokens // self.seq_len

    @property
    def layout(self) -> str:
        """``T256`` (decode: 256 one-token rows) or ``S4x512`` (prefill: 4 sequences of 512 tokens)."""
        return f"T{self.tokens}" if self.seq_len == 1 else f"S{self.sequences}x{self.seq_len}"

    @property
    def shape(self) -> str:
        return f"{self.d_in}" if self.d_in == self.d_out else f"{self.d_in}x{self.d_out}"

    @property
    def name(self) -> str:
        return f"d{self.shape}-r{self.rank}-{self.layout}-N{self.n_adapters}-{self.dist}"

    def as_dict(self) -> dict:
        return {**asdict(self), "name": self.name}


@dataclass(frozen=True)
class Sweep:
    """Cases that differ from each other in one ``axis`` (a GroupedCase field, or ``shape`` / ``layout``)."""

    name: str
    axis: str
    cases: tuple

    def as_dict(self) -> dict:
        return {"name": self.name, "axis": self.axis, "cases": [c.name for c in self.cases]}


# The central case: a decode batch of 256 one-token requests over 32 adapters of rank 16 on a 2048² layer
# (the shape KERNELS.md's measurements use). Every sweep changes one thing of it.
CENTER = GroupedCase(2048, 2048, 16, 256, 32, "uniform")
SHAPES = ((2048, 2048), (4096, 4096), (4096, 11008))  # 4096 -> 11008: a Llama-7B gate/up projection


def _vary(base: GroupedCase, axis: str, values: Iterable) -> tuple:
    if axis == "shape":
        return tuple(dataclasses.replace(base, d_in=di, d_out=do) for di, do in values)
    if axis == "layout":  # (sequences, seq_len)
        return tuple(dataclasses.replace(base, tokens=s * l, seq_len=l) for s, l in values)
    return tuple(dataclasses.replace(base, **{axis: v}) for v in values)


def _published_sweeps(quick: bool) -> list:
    c = CENTER
    prefill = dataclasses.replace(c, tokens=2048, seq_len=512, dist="distinct")  # 4 x 512, one adapter each
    if quick:
        return [
            Sweep("N, uniform", "n_adapters", _vary(c, "n_adapters", (4, 32, 128))),
            Sweep("T (decode rows)", "tokens", _vary(c, "tokens", (16, 256))),
            Sweep("rank", "rank", _vary(c, "rank", (16, 64))),
            Sweep("decode vs prefill", "layout", (c, prefill)),
        ]
    d4096 = dataclasses.replace(c, d_in=4096, d_out=4096)
    distinct128 = dataclasses.replace(c, n_adapters=128, dist="distinct")
    return [
        Sweep("N, uniform", "n_adapters", _vary(c, "n_adapters", (1, 4, 32, 128))),
        Sweep("N, zipf", "n_adapters", _vary(dataclasses.replace(c, dist="zipf"), "n_adapters", (4, 32, 128))),
        Sweep("N, d=4096", "n_adapters", _vary(d4096, "n_adapters", (4, 32, 128))),
        Sweep("T (decode rows), N=32 uniform", "tokens", _vary(c, "tokens", (1, 16, 64, 256))),
        Sweep("T (decode rows), N=128 distinct", "tokens", _vary(distinct128, "tokens", (1, 16, 64, 256))),
        Sweep("rank", "rank", _vary(c, "rank", (8, 16, 64))),
        Sweep("layer shape", "shape", _vary(c, "shape", SHAPES)),
        Sweep("distribution, N=32", "dist", _vary(c, "dist", DISTRIBUTIONS)),
        Sweep("prefill layout, N=32, one adapter per sequence", "layout",
              _vary(prefill, "layout", ((16, 128), (4, 512), (1, 2048)))),
        Sweep("prefill 16x128, distribution over sequences", "dist",
              _vary(dataclasses.replace(prefill, tokens=2048, seq_len=128), "dist", DISTRIBUTIONS)),
        Sweep("prefill 4x512, layer shape", "shape", _vary(prefill, "shape", SHAPES)),
    ]


def sweeps(*, quick: bool = False, d: Optional[Iterable[int]] = None, n_adapters: Optional[Iterable[int]] = None,
           dists: Optional[Iterable[str]] = None, tokens: Optional[int] = None, rank: Optional[int] = None,
           seq_len: Optional[int] = None) -> list:
    """The case grid as one-factor sweeps (see bench/README.md for the published grid; ``quick``: 6 cases).

    Any sizing argument given replaces the published grid by a custom one (tests, experiments): square layers
    ``d``, then one N sweep per (d, dist) at ``tokens`` rows (default 256), ``rank`` (16), ``seq_len`` (1).
    """
    if all(v is None for v in (d, n_adapters, dists, tokens, rank, seq_len)):
        return _published_sweeps(quick)
    ds = tuple(d or (CENTER.d_in,))
    ns = tuple(n_adapters or ((4, 32, 128) if quick else (1, 4, 32, 128)))
    dist_list = tuple(dists or ("uniform",))
    out = []
    for di in ds:
        for dist in dist_list:
            base = GroupedCase(di, di, rank or CENTER.rank, tokens or CENTER.tokens, ns[0], dist, seq_len or 1)
            out.append(Sweep(f"N, d={di}, {dist}", "n_adapters", _vary(base, "n_adapters", ns)))
    return out


def cases(*, quick: bool = False, **sizing) -> list:
    """Every case of ``sweeps(quick=quick, **sizing)`` once, in sweep order (a case shared by sweeps, such as
    CENTER, is run once)."""
    return list(dict.fromkeys(c for s in sweeps(quick=quick, **sizing) for c in s.cases))


def adapter_ids(dist: str, tokens: int, n_adapters: int, *, seed: int = 0, zipf_exponent: float = ZIPF_EXPONENT,
                seq_len: int = 1) -> torch.Tensor:
    """Adapter id per row, int64 ``[tokens]`` in ``[0, n_adapters)``, reproducible for a given seed.

    - ``same``: every row uses adapter 0 (one long segment);
    - ``uniform``: ids drawn uniformly;
    - ``zipf``: ``P(i) ∝ (i + 1) ** -zipf_exponent`` (a few popular adapters and a long tail), rows in random order;
    - ``distinct``: a random permutation of ``arange(tokens) % n_adapters``: every row its own adapter when
      ``n_adapters >= tokens``, otherwise all adapters used equally often.

    With ``seq_len > 1`` the ids are drawn per sequence of ``seq_len`` rows and repeated over it (prefill).
    """
    if seq_len > 1:
        if tokens % seq_len:
            raise ValueError(f"adapter_ids: tokens ({tokens}) must be a multiple of seq_len ({seq_len})")
        per_seq = adapter_ids(dist, tokens // seq_len, n_adapters, seed=seed, zipf_exponent=zipf_exponent)
        return per_seq.repeat_interleave(seq_len)
    g = torch.Generator().manual_seed(seed)
    if dist == "same":
        return torch.zeros(tokens, dtype=torch.int64)
    if dist == "uniform":
        return torch.randint(0, n_adapters, (tokens,), generator=g)
    if dist == "zipf":
        p = torch.arange(1, n_adapters + 1, dtype=torch.float64).pow(-zipf_exponent)
        return torch.multinomial(p, tokens, replacement=True, generator=g)
    if dist == "distinct":
        return torch.randperm(tokens, generator=g) % n_adapters
    raise ValueError(f"adapter_ids: dist must be one of {DISTRIBUTIONS}, got {dist!r}")


def methods_for(case: GroupedCase, *, quick: bool = False, device: str | torch.device = "cpu") -> tuple:
    """Methods timed for ``case`` on ``device``: METHODS without gather_bmm when quick, N > GATHER_BMM_MAX_N or
    the gather exceeds GATHER_BMM_MAX_ELEMENTS, and without the CUDA-only methods off CUDA (grouped_mm also
    needs a GPU that supports it: ``composites.grouped_mm_unavailable``)."""
    gathered = case.tokens * case.rank * (case.d_in + case.d_out)
    skip = set()
    if quick or case.n_adapters > GATHER_BMM_MAX_N or gathered > GATHER_BMM_MAX_ELEMENTS:
        skip.add("gather_bmm")
    if torch.device(device).type != "cuda":
        skip.update(CUDA_ONLY)
    elif grouped_mm_unavailable(device) is not None:
        skip.add("grouped_mm")
    return tuple(m for m in METHODS if m not in skip)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` (or the torch dtype itself) -> torch dtype; ValueError otherwise."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if name in DTYPES:
        return DTYPES[name]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")


def rel_tol(dtype: torch.dtype) -> float:
    return REL_TOLS[dtype]


class _OneLinear(nn.Module):
    """The smallest model PEFT can wrap: one Linear named ``proj``."""

    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


class _ZeroBase(nn.Module):
    """Stands in for PEFT's base layer: zeros of the output shape, so the LoRA layer returns its delta alone."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.out_features = base.out_features
        self.in_features = base.in_features
        self.weight = base.weight  # the same Parameter (PEFT reads the base weight's dtype / device)

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _lora_only(layer: nn.Module) -> nn.Module:
    """A shallow copy of PEFT's LoRA layer sharing its adapters, with the base layer replaced by ``_ZeroBase``."""
    lora = copy.copy(layer)
    lora._modules = dict(layer._modules)
    lora._modules["base_layer"] = _ZeroBase(layer.base_layer)
    return lora


@dataclass
class Workload:
    """A built case: inputs, the base layer, the PEFT model and the same adapters as a lora_ops bank.

    Shapes: x ``[T, d_in]``, ids ``[T]`` int64, lora_a ``[N, r, d_in]``, lora_b ``[N, d_out, r]``, scales ``[N]``
    (float32); x, the layers and the bank in ``dtype``.
    """

    case: GroupedCase
    x: torch.Tensor
    ids: torch.Tensor
    base: nn.Linear
    peft_model: nn.Module
    peft_lora: nn.Module
    adapter_names: list
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scales: torch.Tensor

    @property
    def n_present(self) -> int:
        """Adapters used by at least one row (the n of the memory floor)."""
        return int(self.ids.unique().numel())

    def fns(self) -> dict:
        """``{method: zero-argument callable}`` for every name in METHODS, each run under inference mode."""
        x, a, b, ids, s = self.x, self.lora_a, self.lora_b, self.ids, self.scales
        raw = {
            "base": lambda: self.base(x),
            "peft": lambda: self.peft_lora(x, adapter_names=self.adapter_names),
            "loop": lambda: segment_loop_delta(x, a, b, ids, s),
            "gather_bmm": lambda: gather_bmm_delta(x, a, b, ids, s),
            "grouped_mm": lambda: grouped_mm_delta(x, a, b, ids, s),
            "lora_ops": lambda: lora_ops.grouped_lora(x, a, b, ids, scales=s),
            "lora_ops_nocheck": lambda: lora_ops.grouped_lora(x, a, b, ids, scales=s, check_ids=False),
        }
        return {name: _inference(fn) for name, fn in raw.items()}

    def gemm_fn(self) -> Callable:
        """The GEMM ceiling of the case: every row through adapter 0 with two plain ``torch.mm`` (no sort, no
        scatter), the same FLOPs as the grouped delta when every id is valid; run under inference mode."""
        x, a, b, s = self.x, self.lora_a[0], self.lora_b[0], float(self.scales[0])
        return _inference(lambda: torch.mm(torch.mm(x, a.T).mul_(s), b.T))

    def reference(self) -> torch.Tensor:
        """The whole PEFT model's output minus the base layer's: the delta every method must reproduce."""
        with torch.inference_mode():
            return self.peft_model(self.x, adapter_names=self.adapter_names) - self.base(self.x)


def _inference(fn: Callable) -> Callable:
    # Without it the base Linear's weight (requires_grad) makes every call record an autograd graph.
    def call():
        with torch.inference_mode():
            return fn()

    return call


def build_workload(case: GroupedCase, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> Workload:
    """Build ``case`` in ``dtype`` on ``device``: a seeded base Linear, a PEFT model holding it with adapters
    ``a0..a{N-1}`` (random nonzero B: ``init_lora_weights=False``) and a lora_ops bank read from that PEFT model."""
    from peft import LoraConfig, get_peft_model  # heavy import, only needed here

    torch.manual_seed(seed)  # nn.Linear and PEFT initialise from the global generator
    base = nn.Linear(case.d_in, case.d_out)

    def config():
        return LoraConfig(r=case.rank, lora_alpha=LORA_ALPHA, target_modules=["proj"], lora_dropout=0.0,
                          init_lora_weights=False)

    names = [f"a{i}" for i in range(case.n_adapters)]
    peft_model = get_peft_model(_OneLinear(base), config(), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config())
    peft_model.to(device=device, dtype=dtype).eval()  # eval: PEFT refuses adapter_names= in training mode

    layer = peft_model.base_model.model.proj
    lora_a = torch.stack([layer.lora_A[n].weight.detach() for n in names]).contiguous()
    lora_b = torch.stack([layer.lora_B[n].weight.detach() for n in names]).contiguous()
    scales = torch.tensor([float(layer.scaling[n]) for n in names], device=device)

    ids = adapter_ids(case.dist, case.tokens, case.n_adapters, seed=seed, seq_len=case.seq_len).to(device)
    x = torch.randn(case.tokens, case.d_in, generator=torch.Generator().manual_seed(seed + 1))
    row_names = [names[i] for i in ids.tolist()]
    return Workload(case, x.to(device=device, dtype=dtype), ids, base, peft_model, _lora_only(layer), row_names,
                    lora_a, lora_b, scales)


def memory_floor_bytes(case: GroupedCase, n_present: int, element_size: int = 4) -> int:
    """Bytes any grouped-LoRA kernel must move: each present adapter's A and B once, x once, and the output
    read and written once (it is added to the base output): ``b·[n·r·(d_in+d_out) + T·d_in + 2·T·d_out]``."""
    return element_size * (n_present * case.rank * (case.d_in + case.d_out)
                           + case.tokens * case.d_in + 2 * case.tokens * case.d_out)


class ResultMismatchError(RuntimeError):
    """A method's delta differs from PEFT's (output minus base) by more than the dtype's tolerance."""


OPTIONAL_METHODS = ("grouped_mm",)  # a torch op that may refuse a dtype / shape: skipped (with the reason), not fatal


def check_against_peft(wl: Workload, methods: Iterable[str]) -> tuple:
    """``({method: {"max_abs_diff", "rel_diff"}}, {method: reason})``: each delta method vs PEFT output minus base
    output, and the optional methods that raised instead of returning (they are not timed).

    Raises ResultMismatchError when ``rel_diff = max|diff| / max|reference|`` exceeds the dtype's tolerance.
    """
    fns = wl.fns()
    reference = wl.reference().float()
    scale = reference.abs().max().item()
    tol = rel_tol(wl.x.dtype)
    out, skipped = {}, {}
    for m in methods:
        if m not in DELTA_METHODS:
            continue
        try:
            delta = fns[m]()
        except (RuntimeError, NotImplementedError) as e:
            if m not in OPTIONAL_METHODS:
                raise
            skipped[m] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        if delta.dtype != wl.x.dtype or delta.shape != reference.shape:
            raise ResultMismatchError(f"{m} returned {delta.dtype} {tuple(delta.shape)} on {wl.case.name}, "
                                      f"expected {wl.x.dtype} {tuple(reference.shape)}")
        diff = (delta.float() - reference).abs().max().item()
        out[m] = {"max_abs_diff": diff, "rel_diff": diff / scale if scale > 0 else diff}
        if not out[m]["rel_diff"] <= tol:  # NaN fails too
            raise ResultMismatchError(
                f"{m} differs from PEFT on {wl.case.name}: max abs diff {diff:.3e} "
                f"(relative {out[m]['rel_diff']:.3e} > {tol:g})")
    return out, skipped


def run_case(case: GroupedCase, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             bandwidth_gbps: float, peak_gbps: Optional[float] = None, warmup: int = 3, reps: int = 20,
             budget_s: Optional[float] = None, quick: bool = False, seed: int = 0) -> dict:
    """Build, check and time one case. Returns a JSON-ready dict: the case, adapters present, per-method timings,
    LoRA-part ms per method, ratios, the memory floor at ``bandwidth_gbps``, achieved GB/s per method and, with
    ``peak_gbps``, % of that peak (the memory roofline)."""
    methods = methods_for(case, quick=quick, device=device)
    wl = build_workload(case, device=device, dtype=dtype, seed=seed)
    check, skipped = check_against_peft(wl, methods)
    methods = tuple(m for m in methods if m not in skipped)
    fns = wl.fns()
    others = OtherCpuMeter()
    timings = {m: time_fn(fns[m], device=device, warmup=warmup, reps=reps, budget_s=budget_s) for m in methods}
    gemm = time_fn(wl.gemm_fn(), device=device, warmup=warmup, reps=reps, budget_s=budget_s)
    other_cpu_share = others.share()
    ms = {m: t.median_ms for m, t in timings.items()}

    lora_ms = {m: ms[m] for m in methods if m in DELTA_METHODS}
    ours = lora_ms["lora_ops"]
    ratios = {f"{m}/lora_ops": v / ours for m, v in lora_ms.items() if m != "lora_ops"}
    ratios["lora_ops/base"] = ours / ms["base"]

    n_present = wl.n_present
    nbytes = memory_floor_bytes(case, n_present, wl.x.element_size())
    floor_ms = nbytes / (bandwidth_gbps * 1e9) * 1e3
    gbps = {m: nbytes / (v * 1e-3) / 1e9 for m, v in lora_ms.items()}
    flops = 2 * int((wl.ids >= 0).sum()) * case.rank * (case.d_in + case.d_out)
    return {
        "case": case.as_dict(),
        "n_present": n_present,
        "methods": list(methods),
        "skipped": skipped,
        "timings": {m: t.as_dict() for m, t in timings.items()},
        "lora_ms": lora_ms,
        "ratios": ratios,
        "floor": {"bytes": nbytes, "ms": floor_ms, "bandwidth_gbps": bandwidth_gbps},
        "gbps": gbps,
        "pct_of_peak": None if peak_gbps is None else {m: 100.0 * v / peak_gbps for m, v in gbps.items()},
        "lora_ops_gbps": gbps["lora_ops"],
        "lora_ops_pct_of_floor": 100.0 * floor_ms / ours,
        # GFLOP/s of lora_ops and of two plain torch.mm of the same shapes in the same run (Workload.gemm_fn)
        "gemm": {"flops": flops, "mm_ms": gemm.median_ms, "mm_gflops": flops / gemm.median_ms / 1e6,
                 "lora_ops_gflops": flops / ours / 1e6, "lora_ops_pct_of_mm": 100.0 * gemm.median_ms / ours},
        "check": check,
        "other_cpu_share": other_cpu_share,
    }


def run(case_list: Iterable[GroupedCase], *, device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32, warmup: int = 3, reps: int = 20, budget_s: Optional[float] = None,
        quick: bool = False, seed: int = 0, sweep_list: Optional[Iterable[Sweep]] = None,
        progress: Callable[[list], Iterable] = iter) -> dict:
    """Run every case (``progress`` wraps the case list, e.g. tqdm). Returns the JSON-ready result: ``kind``,
    ``environment``, ``settings``, the measured ``bandwidth`` (and on CUDA ``copy_bandwidth``), the ``peak``
    bandwidth of the roofline, the ``sweeps`` (default: one sweep over the case list) and the ``cases``."""
    case_list = list(case_list)
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    sweep_list = list(sweep_list) if sweep_list is not None else [Sweep("cases", "case", tuple(case_list))]
    env = environment(device)  # before the cases: its date is when the run started
    others = OtherCpuMeter()
    bandwidth = read_bandwidth(device)
    measured = {"read": bandwidth}
    copy_bw = None
    if device.type == "cuda":
        copy_bw = measured["copy"] = copy_bandwidth(device)
    peak = peak_bandwidth(env.get("gpu_name"), measured) if device.type == "cuda" else None
    results = [run_case(c, device=device, dtype=dtype, bandwidth_gbps=bandwidth["gbps"],
                        peak_gbps=peak["gbps"] if peak else None, warmup=warmup, reps=reps, budget_s=budget_s,
                        quick=quick, seed=seed) for c in progress(case_list)]
    names = {c.name for c in case_list}
    return {
        "kind": "grouped",
        "environment": env,
        "settings": {"quick": quick, "warmup": warmup, "reps": reps, "budget_s": budget_s, "seed": seed,
                     "dtype": str(dtype).removeprefix("torch."), "zipf_exponent": ZIPF_EXPONENT,
                     "lora_alpha": LORA_ALPHA, "rel_tol": rel_tol(dtype),
                     "grouped_mm": grouped_mm_unavailable(device) or "timed"},
        "bandwidth": bandwidth,
        "copy_bandwidth": copy_bw,
        "peak": peak,
        "sweeps": [{**s.as_dict(), "cases": [c.name for c in s.cases if c.name in names]} for s in sweep_list],
        "other_cpu_share": others.share(),
        "cases": results,
    }


def format_table(result: dict) -> str:
    """The aligned text table of a run (see lora_ops.benchmarks.grouped_report)."""
    from lora_ops.benchmarks import grouped_report

    return grouped_report.format_table(result)


def write_report(result: dict, out_dir) -> dict:
    """JSON + PNG of a run, written atomically (see lora_ops.benchmarks.grouped_report)."""
    from lora_ops.benchmarks import grouped_report

    return grouped_report.write_report(result, out_dir)
