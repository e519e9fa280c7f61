"""The grouped-LoRA benchmark's logic without a GPU: case grid, method selection, the torch._grouped_mm composite's
index/offset math (against the reference, with a plain-torch stand-in for the op), dtypes, roofline, the budgeted
timer and the GPU-only report parts. No timing assertions."""

import dataclasses
import importlib.util
import json
import time

import pytest
import torch

from lora_ops import reference
from lora_ops.benchmarks import composites, grouped, grouped_report, roofline, timing
from lora_ops.cli import main

needs_bench_extras = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("peft", "matplotlib", "tqdm")),
    reason="needs the bench extras (peft, matplotlib, tqdm)")

TINY = ["--d", "64", "--n", "2", "4", "--tokens", "8", "--rank", "4", "--reps", "2", "--warmup", "1"]


# ----- grid

def _differing_fields(a: grouped.GroupedCase, b: grouped.GroupedCase) -> set:
    return {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


AXIS_FIELDS = {"n_adapters": {"n_adapters"}, "tokens": {"tokens"}, "rank": {"rank"}, "dist": {"dist"},
               "shape": {"d_in", "d_out"}, "layout": {"tokens", "seq_len", "dist"}}


@pytest.mark.parametrize("quick", [False, True])
def test_sweeps_vary_one_axis_each(quick):
    sweeps = grouped.sweeps(quick=quick)
    assert len({s.name for s in sweeps}) == len(sweeps)
    for s in sweeps:
        assert len(s.cases) >= 2 and len(set(s.cases)) == len(s.cases), s.name
        for c in s.cases[1:]:  # every case differs from the sweep's first one in its axis' fields only
            assert _differing_fields(s.cases[0], c) <= AXIS_FIELDS[s.axis], (s.name, c.name)
    all_cases = grouped.cases(quick=quick)
    assert len(all_cases) == len(set(all_cases)) and grouped.CENTER in all_cases


def test_full_grid_covers_every_design_axis():
    full = grouped.cases()
    assert {c.n_adapters for c in full} >= {1, 4, 32, 128}
    assert {c.rank for c in full} >= {8, 16, 64}
    assert {(c.d_in, c.d_out) for c in full} >= {(2048, 2048), (4096, 4096), (4096, 11008)}
    assert {c.dist for c in full} == set(grouped.DISTRIBUTIONS)
    decode = {c.tokens for c in full if c.seq_len == 1}
    assert decode >= {1, 16, 64, 256}
    prefill = [c for c in full if c.seq_len > 1]
    assert {c.seq_len for c in prefill} >= {128, 512, 2048} and all(128 <= c.seq_len <= 2048 for c in prefill)
    assert len(full) <= 40  # one-factor sweeps, not the ~600-case product
    quick = grouped.cases(quick=True)
    assert set(quick) < set(full) and len(quick) <= 8


def test_custom_grid_and_case_names():
    (s,) = grouped.sweeps(d=(64,), n_adapters=(2, 4), tokens=8, rank=4, seq_len=4, dists=("zipf",))
    assert [c.name for c in s.cases] == ["d64-r4-S2x4-N2-zipf", "d64-r4-S2x4-N4-zipf"] and s.axis == "n_adapters"
    assert grouped.GroupedCase(4096, 11008, 16, 256, 32, "uniform").name == "d4096x11008-r16-T256-N32-uniform"
    with pytest.raises(ValueError, match="multiple of seq_len"):
        grouped.GroupedCase(64, 64, 4, 10, 2, "uniform", seq_len=4)
    with pytest.raises(ValueError, match="dist"):
        grouped.GroupedCase(64, 64, 4, 8, 2, "gauss")


def test_prefill_ids_are_runs_one_adapter_per_sequence():
    ids = grouped.adapter_ids("distinct", 4 * 16, 32, seq_len=16, seed=2)
    runs = ids.view(4, 16)
    assert (runs == runs[:, :1]).all()  # constant within a sequence
    assert runs[:, 0].unique().numel() == 4  # distinct: every sequence its own adapter
    assert torch.equal(ids, grouped.adapter_ids("distinct", 64, 32, seq_len=16, seed=2))
    assert grouped.adapter_ids("same", 32, 8, seq_len=8).unique().tolist() == [0]


# ----- method selection

def test_methods_for_cpu_and_gather_limits():
    c = grouped.CENTER
    assert grouped.methods_for(c) == ("base", "peft", "loop", "gather_bmm", "lora_ops")
    assert "gather_bmm" not in grouped.methods_for(c, quick=True)
    assert "gather_bmm" not in grouped.methods_for(dataclasses.replace(c, n_adapters=128))
    big_gather = dataclasses.replace(c, tokens=2048, seq_len=512)  # 2048 x 16 x 4096 weights gathered per call
    assert "gather_bmm" not in grouped.methods_for(big_gather)


@pytest.mark.parametrize(("has_op", "cap", "timed"), [(True, (9, 0), True), (True, (10, 0), True),
                                                      (True, (8, 0), False), (False, (9, 0), False)])
def test_methods_for_cuda_selects_grouped_mm_by_capability(monkeypatch, has_op, cap, timed):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    if not has_op:
        monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    methods = grouped.methods_for(grouped.CENTER, device="cuda")
    assert "lora_ops_nocheck" in methods and ("grouped_mm" in methods) == timed
    reason = composites.grouped_mm_unavailable("cuda")
    assert (reason is None) == timed
    if not timed:
        assert ("8.0" in reason) if has_op else ("no torch._grouped_mm" in reason)
    assert "GPU only" in composites.grouped_mm_unavailable("cpu")


# ----- the grouped-GEMM composite

def _bank(t=40, n=5, r=4, d_in=32, d_out=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d_in, generator=g).to(dtype)
    a = torch.randn(n, r, d_in, generator=g).to(dtype)
    b = torch.randn(n, d_out, r, generator=g).to(dtype)
    s = torch.rand(n, generator=g) + 0.5
    return x, a, b, s


def test_grouped_mm_offsets():
    order, key, offs = composites.grouped_mm_offsets(torch.tensor([2, 0, -1, 2, 7, 0]), 3)
    assert key.tolist() == [0, 0, 2, 2, 3, 3]  # invalid ids (-1, 7) become N = 3 and sort last
    assert order.tolist() == [1, 5, 0, 3, 2, 4]  # stable
    assert offs.dtype == torch.int32 and offs.tolist() == [2, 2, 4]  # adapter 1 absent: an empty group


@pytest.mark.parametrize("ids", [
    torch.tensor([3, 1, 4, 1, 0, 2, 2, 3] * 5),  # mixed
    torch.zeros(40, dtype=torch.int64),  # one segment
    torch.tensor([4] * 20 + [0] * 20),  # long runs, absent adapters in between
    torch.tensor([-1, 2, -1, 9, 1] * 8),  # no adapter (-1) and an out-of-range id add nothing
])
def test_grouped_mm_composite_matches_reference(ids):
    x, a, b, s = _bank()
    valid = torch.where((ids >= 0) & (ids < 5), ids, -1)
    want = reference.grouped_lora(x, a, b, valid, scales=s, compute_dtype=torch.float64).float()
    got = composites.grouped_mm_delta(x, a, b, ids, s, mm=composites.grouped_mm_loop)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(composites.segment_loop_delta(x, a, b, valid, s), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(composites.gather_bmm_delta(x, a, b, ids, s), want, rtol=1e-5, atol=1e-5)


def test_grouped_mm_composite_with_torchs_own_op_where_it_runs():
    # torch's CPU _grouped_mm (where the installed torch has one) checks the composite's strides and offsets too
    x, a, b, s = _bank(t=48, n=4, r=8, d_in=64, d_out=32)
    ids = torch.tensor([1, 3, 3, 0, 1, -1] * 8)
    try:
        got = composites.grouped_mm_delta(x, a, b, ids, s)
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._grouped_mm does not run on this CPU build: {e}")
    want = reference.grouped_lora(x, a, b, ids, scales=s, compute_dtype=torch.float64).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_composites_keep_half_dtypes():
    x, a, b, s = _bank(r=8, d_in=64, d_out=32, dtype=torch.bfloat16)
    ids = torch.arange(40) % 5
    for fn in (composites.segment_loop_delta, composites.gather_bmm_delta,
               lambda *args: composites.grouped_mm_delta(*args, mm=composites.grouped_mm_loop)):
        assert fn(x, a, b, ids, s).dtype == torch.bfloat16


# ----- dtypes, roofline, timer

def test_parse_dtype_and_tolerances():
    assert grouped.parse_dtype("bf16") is torch.bfloat16 and grouped.parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        grouped.parse_dtype("fp8")
    assert grouped.rel_tol(torch.float32) < grouped.rel_tol(torch.float16) < grouped.rel_tol(torch.bfloat16)


def test_spec_bandwidth_table():
    assert roofline.spec_bandwidth("NVIDIA H100 80GB HBM3") == 3350
    assert roofline.spec_bandwidth("NVIDIA H100 PCIe") == 2000
    assert roofline.spec_bandwidth("NVIDIA H200") == 4800
    assert roofline.spec_bandwidth("NVIDIA A100-SXM4-80GB") == 2039
    assert roofline.spec_bandwidth("NVIDIA L40S") == 864 and roofline.spec_bandwidth("NVIDIA L4") == 300
    assert roofline.spec_bandwidth("NVIDIA GH200 480GB") is None  # two memory configurations: measure instead
    assert roofline.spec_bandwidth("Some Future GPU") is None and roofline.spec_bandwidth(None) is None
    measured = {"read": {"gbps": 900.0, "method": "sum"}, "copy": {"gbps": 1100.0, "method": "copy_"}}
    assert roofline.peak_bandwidth("NVIDIA H200", measured) == {"gbps": 4800.0, "source": "spec sheet (NVIDIA H200)"}
    fallback = roofline.peak_bandwidth("Some Future GPU", measured)
    assert fallback["gbps"] == 1100.0 and fallback["source"].startswith("measured (copy")


def test_time_fn_budget_cuts_warmup_and_reps():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.02)

    t = timing.time_fn(slow, warmup=5, reps=40, budget_s=0.04, min_reps=3)
    assert t.reps == 3 and len(calls) == 1 + 3  # warm-up stops after one call over budget/4; reps floor at 3
    calls.clear()
    assert timing.time_fn(lambda: calls.append(1), warmup=2, reps=4).reps == 4 and len(calls) == 6


def test_copy_bandwidth_reports_bytes_moved():
    bw = timing.copy_bandwidth(nbytes=4 * 2**20, warmup=1, reps=2)
    assert bw["bytes"] == 2 * 4 * 2**20 and bw["gbps"] > 0


# ----- the run with the GPU-only methods on CPU (stand-ins), and the GPU parts of the report

def _gpu_methods_on_cpu(monkeypatch, grouped_mm):
    """Make a CPU run time grouped_mm (through ``grouped_mm``) and lora_ops_nocheck as a GPU run would."""
    monkeypatch.setattr(grouped, "methods_for", lambda case, quick=False, device="cpu": grouped.METHODS)
    monkeypatch.setattr(grouped, "grouped_mm_delta", grouped_mm)


@needs_bench_extras
def test_run_with_grouped_mm_and_nocheck(monkeypatch):
    _gpu_methods_on_cpu(monkeypatch, lambda *args: composites.grouped_mm_delta(*args, mm=composites.grouped_mm_loop))
    case = grouped.GroupedCase(32, 24, 4, 12, 3, "uniform", seq_len=3)
    result = grouped.run([case], reps=2, warmup=1)
    (c,) = result["cases"]
    assert c["methods"] == list(grouped.METHODS) and c["skipped"] == {}
    assert all(c["check"][m]["rel_diff"] <= grouped.rel_tol(torch.float32) for m in grouped.DELTA_METHODS)
    assert {"grouped_mm/lora_ops", "lora_ops_nocheck/lora_ops"} <= set(c["ratios"])
    assert c["pct_of_peak"] is None and result["peak"] is None  # CPU: no roofline
    assert result["sweeps"] == [{"name": "cases", "axis": "case", "cases": [case.name]}]
    table = grouped.format_table(result)
    assert "gmm/ops" in table and "ops_nc" in table and "%peak" not in table


@needs_bench_extras
def test_grouped_mm_that_raises_is_skipped_not_fatal(monkeypatch):
    def refuses(*args):
        raise RuntimeError("grouped gemm is not supported for this dtype\nmore detail")

    _gpu_methods_on_cpu(monkeypatch, refuses)
    result = grouped.run([grouped.GroupedCase(32, 32, 4, 8, 2, "zipf")], reps=1, warmup=0)
    (c,) = result["cases"]
    assert c["skipped"] == {"grouped_mm": "RuntimeError: grouped gemm is not supported for this dtype"}
    assert "grouped_mm" not in c["methods"] and "grouped_mm" not in c["timings"]
    assert "grouped_mm skipped (RuntimeError" in grouped.format_table(result)


@needs_bench_extras
def test_wrong_dtype_from_a_method_fails_the_check(monkeypatch):
    monkeypatch.setattr(grouped, "gather_bmm_delta", lambda x, a, b, ids, s: torch.zeros(x.shape[0], b.shape[1],
                                                                                        dtype=torch.float64))
    wl = grouped.build_workload(grouped.GroupedCase(32, 32, 4, 8, 2, "uniform"))
    with pytest.raises(grouped.ResultMismatchError, match="gather_bmm returned torch.float64"):
        grouped.check_against_peft(wl, ["gather_bmm"])


@needs_bench_extras
def test_bench_grouped_bf16_and_a_gpu_style_report(tmp_path, capsys):
    assert main(["bench", "grouped", "--dtype", "bf16", "--seq-len", "4", "--out", str(tmp_path), *TINY]) == 0
    (path,) = tmp_path.glob("grouped-*.json")
    result = json.loads(path.read_text())
    assert result["settings"]["dtype"] == "bfloat16" and result["settings"]["rel_tol"] == grouped.rel_tol(
        torch.bfloat16)
    assert [c["case"]["name"] for c in result["cases"]] == ["d64-r4-S2x4-N2-uniform", "d64-r4-S2x4-N4-uniform"]
    assert all(c["floor"]["bytes"] % 2 == 0 and c["check"]["lora_ops"]["rel_diff"] <= result["settings"]["rel_tol"]
               for c in result["cases"])
    assert result["sweeps"][0]["axis"] == "n_adapters"
    capsys.readouterr()

    # what a GPU run adds: a peak bandwidth and % of it per method -> a %peak column and roofline panels
    result["peak"] = {"gbps": 4800.0, "source": "spec sheet (test)"}
    for c in result["cases"]:
        c["pct_of_peak"] = {m: 100.0 * v / 4800.0 for m, v in c["gbps"].items()}
    result["environment"]["date"] = "2030-01-01T00:00:00+00:00"  # a new file name
    assert "%peak" in grouped.format_table(result) and "memory roofline 4800 GB/s" in grouped.format_table(result)
    png = grouped_report.write_plot(result, tmp_path)
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stem.endswith("20300101-000000")


def test_bench_all_passes_dtype_to_the_kinds_that_take_it(monkeypatch, tmp_path, capsys):
    from lora_ops import cli

    seen = []

    def handler(args):
        seen.append((args.kind, args.dtype))
        return 0

    monkeypatch.setattr(cli, "_BENCH_HANDLERS", {"grouped": handler, "train": handler})
    assert cli.main(["bench", "all", "--quick", "--dtype", "fp16", "--out", str(tmp_path)]) == 0
    assert seen == [("grouped", "fp16"), ("train", None)]
    out = capsys.readouterr().out
    assert "=== bench grouped (fp16)" in out and "=== bench train (fp32)" in out


def test_bench_all_on_cuda_leaves_out_the_cpu_only_kinds(monkeypatch, tmp_path, capsys):
    from lora_ops import cli

    seen = []
    monkeypatch.setattr(cli, "_BENCH_HANDLERS", {k: (lambda args: seen.append(args.kind)) for k in ("grouped", "merge")})
    assert cli.main(["bench", "all", "--device", "cuda", "--out", str(tmp_path)]) == 0
    assert seen == ["grouped"] and "bench merge skipped: PEFT's merge is timed on the CPU" in capsys.readouterr().out
