"""``lora-ops bench arrow`` in-process on a tiny case: table, JSON and PNG written, results checked against PEFT."""

import importlib.util
import json

import pytest
import torch  # noqa: F401  (loaded before lora_ops' compiled library)

from lora_ops.cli import main

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("peft", "matplotlib", "tqdm")),
    reason="needs the bench extras (peft, matplotlib, tqdm)")

TINY = ["--d", "32", "--experts", "3", "--tokens", "8", "--rank", "4", "--top-k", "2", "--reps", "1",
        "--warmup", "0"]


def test_bench_arrow_writes_table_json_and_png(tmp_path, capsys):
    assert main(["bench", "arrow", "--out", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr().out
    assert "d32-r4-T8-E3-k2" in out and "prototypes" in out
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("arrow-cpu-") and files[1].endswith(".png"), files
    result = json.loads((tmp_path / files[0]).read_text())
    assert result["kind"] == "arrow"
    (case,) = result["cases"]
    assert set(case["timings"]) == {"base", "peft", "einsum", "lora_ops", "route"}
    assert case["check"]["lora_ops"]["rel_diff"] <= 1e-3 and case["check"]["einsum"]["rel_diff"] <= 1e-3
    assert case["prototypes"]["max_sin_angle"]["lora_ops"] <= 1e-4
    assert {"peft_arrow/lora_ops", "einsum/lora_ops"} <= set(case["ratios"])


def test_bench_arrow_rejects_top_k_above_experts(tmp_path, capsys):
    assert main(["bench", "arrow", "--out", str(tmp_path), *TINY[:-6], "--top-k", "5"]) == 2
    err = capsys.readouterr().err
    assert "top_k" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
