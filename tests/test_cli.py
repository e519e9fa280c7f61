"""The ``lora-ops`` CLI, run in-process on tiny shapes: files written, JSON contents, one-line errors.

No timing assertions: these run on shared CI machines. The whole file takes a few seconds (mostly importing peft).
"""

import importlib.util
import json

import pytest
import torch  # noqa: F401  (loaded before lora_ops' compiled library, which links against libtorch)

from lora_ops.benchmarks import grouped
from lora_ops.cli import main

# hidden sizing options of `bench grouped`: 2 shapes x 2 distributions, 2 repetitions each
TINY = ["--d", "64", "--n", "2", "4", "--tokens", "8", "--rank", "4", "--reps", "2", "--warmup", "1",
        "--dists", "uniform", "zipf"]

needs_bench_extras = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("peft", "matplotlib", "tqdm")),
    reason="needs the bench extras (peft, matplotlib, tqdm)")


def _assert_one_line_error(capsys) -> str:
    """The error is the last stderr line (a progress bar may precede it), one line, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lora-ops: error:"), err
    assert sum("error" in line for line in err.splitlines()) == 1, err
    return last


@needs_bench_extras
def test_bench_grouped_writes_table_json_and_png(tmp_path, capsys):
    assert main(["bench", "grouped", "--out", str(tmp_path), *TINY]) == 0

    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2, files  # no temporary files left behind
    json_path, png_path = tmp_path / files[0], tmp_path / files[1]
    assert json_path.name.startswith("grouped-cpu-") and json_path.suffix == ".json"
    assert png_path.suffix == ".png" and png_path.stem == json_path.stem
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = json.loads(json_path.read_text())
    assert result["kind"] == "grouped"
    assert {"torch", "lora_ops", "cpu_model", "threads", "date", "device"} <= set(result["environment"])
    assert "hostname" not in result["environment"]
    assert result["bandwidth"]["gbps"] > 0
    cases = result["cases"]
    assert [c["case"]["name"] for c in cases] == [
        "d64-r4-T8-N2-uniform", "d64-r4-T8-N4-uniform", "d64-r4-T8-N2-zipf", "d64-r4-T8-N4-zipf"]
    for c in cases:
        # small N and not --quick: gather_bmm included; on CPU no grouped_mm / check_ids=False variant
        cpu_methods = ["base", "peft", "loop", "gather_bmm", "lora_ops"]
        assert c["methods"] == cpu_methods and c["skipped"] == {}
        assert set(c["timings"]) == set(cpu_methods)
        assert {"median_ms", "iqr_ms", "min_ms", "reps", "threads"} <= set(c["timings"]["lora_ops"])
        assert set(c["lora_ms"]) == {"peft", "loop", "gather_bmm", "lora_ops"}
        assert {"peft/lora_ops", "loop/lora_ops", "lora_ops/base"} <= set(c["ratios"])
        n = c["n_present"]
        assert c["floor"]["bytes"] == 4 * (n * 4 * (64 + 64) + 8 * 64 + 2 * 8 * 64)
        assert c["lora_ops_gbps"] > 0
        assert "other_cpu_share" in c  # contention from other processes, recorded next to the timings
        for method in ("peft", "loop", "gather_bmm", "lora_ops"):  # matches PEFT output minus base
            assert c["check"][method]["rel_diff"] <= grouped.rel_tol(torch.float32) == result["settings"]["rel_tol"]

    table = capsys.readouterr().out
    assert all(c["case"]["name"] in table for c in cases)
    assert str(json_path) in table


@needs_bench_extras
def test_quick_skips_gather_bmm(tmp_path):
    assert main(["bench", "grouped", "--quick", "--out", str(tmp_path), *TINY[:-2], "uniform"]) == 0
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert result["settings"]["quick"] is True
    assert all("gather_bmm" not in c["methods"] for c in result["cases"])


@needs_bench_extras
def test_mismatch_with_peft_fails_loudly(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(grouped, "segment_loop_delta", lambda x, a, b, ids, s: torch.zeros(x.shape[0], b.shape[1]))
    assert main(["bench", "grouped", "--out", str(tmp_path), *TINY]) == 1
    assert "loop differs from PEFT" in _assert_one_line_error(capsys)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [
    [],
    ["frob"],
    ["bench"],
    ["bench", "nope"],
    ["bench", "grouped", "--threads", "0"],
    ["bench", "grouped", "--device", "tpu"],
    ["bench", "grouped", "--dists", "nope"],
    ["bench", "grouped", "--dtype", "fp8"],
    ["bench", "grouped", "--tokens", "10", "--seq-len", "4"],
    ["bench", "train", "--dtype", "bf16"],
    ["bench", "merge", "--dtype", "fp16"],
])
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    _assert_one_line_error(capsys)


def test_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("")
    assert main(["bench", "grouped", "--out", str(target), *TINY]) != 0
    assert "not a directory" in _assert_one_line_error(capsys)


def test_out_that_cannot_be_created(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["bench", "grouped", "--out", str(tmp_path / "file" / "sub"), *TINY]) != 0
    assert "cannot create" in _assert_one_line_error(capsys)


def test_cuda_requested_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "grouped", "--device", "cuda", "--out", str(tmp_path), *TINY]) != 0
    assert "CUDA is not available" in _assert_one_line_error(capsys)


def test_adapter_id_distributions():
    for dist in grouped.DISTRIBUTIONS:
        ids = grouped.adapter_ids(dist, 256, 32, seed=3)
        assert ids.shape == (256,) and ids.dtype == torch.int64
        assert 0 <= ids.min() and ids.max() < 32
        assert torch.equal(ids, grouped.adapter_ids(dist, 256, 32, seed=3))  # seeded
    assert grouped.adapter_ids("same", 16, 8).unique().tolist() == [0]
    assert grouped.adapter_ids("distinct", 64, 128).unique().numel() == 64  # N >= T: every row its own adapter
    assert torch.equal(grouped.adapter_ids("distinct", 64, 8).bincount(), torch.full((8,), 8))
    # Zipf: the most popular adapter takes far more rows than under the uniform distribution
    zipf_top = grouped.adapter_ids("zipf", 4096, 32).bincount().max()
    uniform_top = grouped.adapter_ids("uniform", 4096, 32).bincount().max()
    assert zipf_top > 3 * uniform_top
    with pytest.raises(ValueError, match="dist"):
        grouped.adapter_ids("gaussian", 4, 2)


def test_bench_all_runs_every_implemented_kind(monkeypatch, tmp_path):
    from lora_ops import cli

    seen = []

    def fake(kind, fail=False):
        def handler(args):
            seen.append((kind, args.quick, args.out))
            if fail:
                raise cli.CliError("boom")
            return 0

        return handler

    monkeypatch.setattr(cli, "_BENCH_HANDLERS", {"grouped": fake("grouped"), "arrow": fake("arrow", fail=True)})
    assert cli.main(["bench", "all", "--quick", "--out", str(tmp_path)]) == 1  # arrow failed: reported, not hidden
    assert seen == [("grouped", True, str(tmp_path)), ("arrow", True, str(tmp_path))]
