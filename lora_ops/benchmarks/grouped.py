"""Grouped-LoRA benchmark cases: a mixed-adapter decode batch through one d_in -> d_out layer.

Every case times, in one run and on the same weights:

- ``base``: the base ``nn.Linear`` forward alone (the cost LoRA is added to);
- ``peft``: a PEFT model with N adapters called with ``adapter_names=`` (one name per row); its LoRA part is
  ``time(peft) - time(base)``;
- ``loop``: the strong pure-torch composite (stable sort by adapter, two matmuls per adapter present, one scatter);
- ``gather_bmm``: gather A/B per row then two bmm (slow; only small N, skipped by ``quick``);
- ``lora_ops``: ``lora_ops.grouped_lora`` as users call it by default (``check_ids=True``: one id-range reduction).

The last three compute the LoRA delta alone. Before timing, each of them is checked against PEFT's output minus
the base output, so all methods compute the same thing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn

import lora_ops
from lora_ops.benchmarks.timing import OtherCpuMeter, environment, read_bandwidth, time_fn

__all__ = [
    "DISTRIBUTIONS", "METHODS", "DELTA_METHODS", "GroupedCase", "Workload", "ResultMismatchError",
    "adapter_ids", "cases", "methods_for", "build_workload", "segment_loop_delta", "gather_bmm_delta",
    "memory_floor_bytes", "check_against_peft", "run_case", "run",
]

DISTRIBUTIONS = ("same", "uniform", "zipf", "distinct")
METHODS = ("base", "peft", "loop", "gather_bmm", "lora_ops")
DELTA_METHODS = ("loop", "gather_bmm", "lora_ops")  # methods whose output is the LoRA delta itself
ZIPF_EXPONENT = 1.1
LORA_ALPHA = 32  # scale alpha / r = 2 at r = 16: a non-unit scale, so a dropped scale would fail the check
REL_TOL = 1e-3
GATHER_BMM_MAX_N = 32  # above this gather_bmm only shows what is already known (far slower), at a high cost in time


@dataclass(frozen=True)
class GroupedCase:
    """One shape: ``tokens`` one-token rows of width ``d_in`` through a ``d_in -> d_out`` layer with
    ``n_adapters`` rank-``rank`` adapters, rows assigned to adapters by the distribution ``dist``."""

    d_in: int
    d_out: int
    rank: int
    tokens: int
    n_adapters: int
    dist: str

    @property
    def name(self) -> str:
        shape = f"d{self.d_in}" if self.d_in == self.d_out else f"d{self.d_in}x{self.d_out}"
        return f"{shape}-r{self.rank}-T{self.tokens}-N{self.n_adapters}-{self.dist}"

    def as_dict(self) -> dict:
        return {**asdict(self), "name": self.name}


class ResultMismatchError(RuntimeError):
    """A method's delta differs from PEFT's (output minus base) by more than ``REL_TOL`` relative."""


def adapter_ids(dist: str, tokens: int, n_adapters: int, *, seed: int = 0,
                zipf_exponent: float = ZIPF_EXPONENT) -> torch.Tensor:
    """Adapter id per row, int64 ``[tokens]`` in ``[0, n_adapters)``, reproducible for a given seed.

    - ``same``: every row uses adapter 0 (one long segment);
    - ``uniform``: ids drawn uniformly;
    - ``zipf``: ``P(i) ∝ (i + 1) ** -zipf_exponent`` (a few popular adapters and a long tail), rows in random order;
    - ``distinct``: a random permutation of ``arange(tokens) % n_adapters``: every row its own adapter when
      ``n_adapters >= tokens``, otherwise all adapters used equally often.
    """
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


def cases(*, quick: bool = False, d: Optional[Iterable[int]] = None, n_adapters: Optional[Iterable[int]] = None,
          dists: Optional[Iterable[str]] = None, tokens: int = 256, rank: int = 16) -> list:
    """The case grid (square layers d x d). Defaults: full = d in {2048, 4096}, N in {1, 4, 32, 128};
    quick = d 2048, N in {4, 32, 128}; both with the uniform and Zipf distributions."""
    d = tuple(d or ((2048,) if quick else (2048, 4096)))
    n_adapters = tuple(n_adapters or ((4, 32, 128) if quick else (1, 4, 32, 128)))
    dists = tuple(dists or ("uniform", "zipf"))
    for dist in dists:
        if dist not in DISTRIBUTIONS:
            raise ValueError(f"cases: dist must be one of {DISTRIBUTIONS}, got {dist!r}")
    return [GroupedCase(di, di, rank, tokens, n, dist) for di in d for dist in dists for n in n_adapters]


def methods_for(case: GroupedCase, *, quick: bool = False) -> tuple:
    """Methods timed for ``case``: all of METHODS, except gather_bmm when quick or N > GATHER_BMM_MAX_N."""
    skip_gather = quick or case.n_adapters > GATHER_BMM_MAX_N
    return tuple(m for m in METHODS if not (m == "gather_bmm" and skip_gather))


class _OneLinear(nn.Module):
    """The smallest model PEFT can wrap: one Linear named ``proj``."""

    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


@dataclass
class Workload:
    """A built case: inputs, the base layer, the PEFT model and the same adapters as a lora_ops bank.

    Shapes: x ``[T, d_in]``, ids ``[T]`` int64, lora_a ``[N, r, d_in]``, lora_b ``[N, d_out, r]``, scales ``[N]``.
    """

    case: GroupedCase
    x: torch.Tensor
    ids: torch.Tensor
    base: nn.Linear
    peft_model: nn.Module
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
            "peft": lambda: self.peft_model(x, adapter_names=self.adapter_names),
            "loop": lambda: segment_loop_delta(x, a, b, ids, s),
            "gather_bmm": lambda: gather_bmm_delta(x, a, b, ids, s),
            "lora_ops": lambda: lora_ops.grouped_lora(x, a, b, ids, scales=s),
        }
        return {name: _inference(fn) for name, fn in raw.items()}


def _inference(fn: Callable) -> Callable:
    # Without it the base Linear's weight (requires_grad) makes every call record an autograd graph.
    def call():
        with torch.inference_mode():
            return fn()

    return call


def build_workload(case: GroupedCase, *, device: str | torch.device = "cpu", seed: int = 0) -> Workload:
    """Build ``case`` in float32 on ``device``: a seeded base Linear, a PEFT model holding it with adapters
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
    peft_model.to(device).eval()  # eval: PEFT refuses adapter_names= in training mode

    layer = peft_model.base_model.model.proj
    lora_a = torch.stack([layer.lora_A[n].weight.detach() for n in names]).contiguous()
    lora_b = torch.stack([layer.lora_B[n].weight.detach() for n in names]).contiguous()
    scales = torch.tensor([float(layer.scaling[n]) for n in names], device=device)

    ids = adapter_ids(case.dist, case.tokens, case.n_adapters, seed=seed).to(device)
    x = torch.randn(case.tokens, case.d_in, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    row_names = [names[i] for i in ids.tolist()]
    return Workload(case, x, ids, base, peft_model, row_names, lora_a, lora_b, scales)


def segment_loop_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, ids: torch.Tensor,
                       scales: torch.Tensor) -> torch.Tensor:
    """The best pure-torch composite: LoRA delta ``[T, d_out]`` of ``x [T, d_in]`` with ``ids [T]`` (-1 = none).

    Rows are stably sorted by adapter so each adapter present is one segment: two small GEMMs per segment read
    that adapter's A and B once, and index_add_ scatters the segment's rows back. (Measured faster on CPU than
    writing into a sorted buffer with ``mm(out=...)`` and scattering once.)
    """
    n = lora_a.shape[0]
    order = torch.argsort(ids, stable=True)
    present, counts = torch.unique_consecutive(ids[order], return_counts=True)
    out = x.new_zeros(x.shape[0], lora_b.shape[1])
    s = scales.tolist()
    for i, rows in zip(present.tolist(), order.split(counts.tolist())):
        if 0 <= i < n:
            # the scale goes on the [rows, r] shrink result: r/d_out of the work of scaling the output
            y = (x.index_select(0, rows) @ lora_a[i].T).mul_(s[i]) @ lora_b[i].T
            out.index_add_(0, rows, y)
    return out


def gather_bmm_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, ids: torch.Tensor,
                     scales: torch.Tensor) -> torch.Tensor:
    """The naive composite: gather ``A [T, r, d_in]`` and ``B [T, d_out, r]`` per row, then two bmm.

    Copies T·r·(d_in + d_out) weights per call, which is why it is slow; kept as the known-bad baseline.
    """
    n = lora_a.shape[0]
    valid = (ids >= 0) & (ids < n)
    safe = ids.clamp(0, n - 1)
    h = torch.bmm(lora_a[safe], x.unsqueeze(2))  # [T, r, 1]
    y = torch.bmm(lora_b[safe], h).squeeze(2)  # [T, d_out]
    return y * (scales[safe] * valid)[:, None]


def memory_floor_bytes(case: GroupedCase, n_present: int, element_size: int = 4) -> int:
    """Bytes any grouped-LoRA kernel must move: each present adapter's A and B once, x once, and the output
    read and written once (it is added to the base output): ``b·[n·r·(d_in+d_out) + T·d_in + 2·T·d_out]``."""
    return element_size * (n_present * case.rank * (case.d_in + case.d_out)
                           + case.tokens * case.d_in + 2 * case.tokens * case.d_out)


def check_against_peft(wl: Workload, methods: Iterable[str]) -> dict:
    """``{method: {"max_abs_diff", "rel_diff"}}`` of each delta method vs PEFT output minus base output.

    Raises ResultMismatchError when ``rel_diff = max|diff| / max|reference|`` exceeds REL_TOL.
    """
    fns = wl.fns()
    reference = fns["peft"]() - fns["base"]()
    scale = reference.abs().max().item()
    out = {}
    for m in methods:
        if m not in DELTA_METHODS:
            continue
        diff = (fns[m]() - reference).abs().max().item()
        out[m] = {"max_abs_diff": diff, "rel_diff": diff / scale if scale > 0 else diff}
        if out[m]["rel_diff"] > REL_TOL:
            raise ResultMismatchError(
                f"{m} differs from PEFT on {wl.case.name}: max abs diff {diff:.3e} "
                f"(relative {out[m]['rel_diff']:.3e} > {REL_TOL:g})")
    return out


def run_case(case: GroupedCase, *, device: str | torch.device = "cpu", bandwidth_gbps: float,
             warmup: int = 3, reps: int = 20, quick: bool = False, seed: int = 0) -> dict:
    """Build, check and time one case. Returns a JSON-ready dict: the case, adapters present, per-method timings,
    LoRA-part ms per method, ratios, the memory floor at ``bandwidth_gbps`` and lora_ops' achieved GB/s."""
    methods = methods_for(case, quick=quick)
    wl = build_workload(case, device=device, seed=seed)
    check = check_against_peft(wl, methods)
    fns = wl.fns()
    others = OtherCpuMeter()
    timings = {m: time_fn(fns[m], device=device, warmup=warmup, reps=reps) for m in methods}
    other_cpu_share = others.share()
    ms = {m: t.median_ms for m, t in timings.items()}

    lora_ms = {"peft": ms["peft"] - ms["base"]}  # PEFT cannot run the delta alone
    lora_ms.update({m: ms[m] for m in DELTA_METHODS if m in ms})
    ours = lora_ms["lora_ops"]
    ratio_names = {"peft": "peft_lora", "loop": "loop", "gather_bmm": "gather_bmm"}
    ratios = {f"{name}/lora_ops": lora_ms[m] / ours for m, name in ratio_names.items() if m in lora_ms}
    ratios["lora_ops/base"] = ours / ms["base"]

    n_present = wl.n_present
    nbytes = memory_floor_bytes(case, n_present, wl.x.element_size())
    floor_ms = nbytes / (bandwidth_gbps * 1e9) * 1e3
    return {
        "case": case.as_dict(),
        "n_present": n_present,
        "methods": list(methods),
        "timings": {m: t.as_dict() for m, t in timings.items()},
        "lora_ms": lora_ms,
        "ratios": ratios,
        "floor": {"bytes": nbytes, "ms": floor_ms, "bandwidth_gbps": bandwidth_gbps},
        "lora_ops_gbps": nbytes / (ours * 1e-3) / 1e9,
        "lora_ops_pct_of_floor": 100.0 * floor_ms / ours,
        "check": check,
        "other_cpu_share": other_cpu_share,
    }


def run(case_list: Iterable[GroupedCase], *, device: str | torch.device = "cpu", warmup: int = 3, reps: int = 20,
        quick: bool = False, seed: int = 0, progress: Callable[[list], Iterable] = iter) -> dict:
    """Run every case (``progress`` wraps the case list, e.g. tqdm). Returns the JSON-ready result: ``kind``,
    ``environment``, ``settings``, the measured ``bandwidth`` and the list of ``cases`` (see run_case)."""
    case_list = list(case_list)
    env = environment(device)  # before the cases: its date is when the run started
    others = OtherCpuMeter()
    bandwidth = read_bandwidth(device)
    results = [run_case(c, device=device, bandwidth_gbps=bandwidth["gbps"], warmup=warmup, reps=reps, quick=quick,
                        seed=seed) for c in progress(case_list)]
    return {
        "kind": "grouped",
        "environment": env,
        "settings": {"quick": quick, "warmup": warmup, "reps": reps, "seed": seed, "dtype": "float32",
                     "zipf_exponent": ZIPF_EXPONENT, "lora_alpha": LORA_ALPHA, "rel_tol": REL_TOL},
        "bandwidth": bandwidth,
        "other_cpu_share": others.share(),
        "cases": results,
    }


def format_table(result: dict) -> str:
    """The aligned text table of a run (see lora_ops.benchmarks.report)."""
    from lora_ops.benchmarks import report

    return report.format_table(result)


def write_report(result: dict, out_dir) -> dict:
    """JSON + PNG of a run, written atomically (see lora_ops.benchmarks.report)."""
    from lora_ops.benchmarks import report

    return report.write_report(result, out_dir)
