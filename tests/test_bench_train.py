"""``lora-ops bench train`` and lora_ops.benchmarks.train on tiny shapes: output files, gradient check, errors."""

import json

import pytest
import torch

from lora_ops.benchmarks import grouped, train
from lora_ops.cli import main

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

TINY = ["--d", "64", "--n", "4", "--tokens", "32", "--rank", "4", "--dists", "uniform", "--reps", "2", "--warmup", "1"]


def test_bench_train_writes_table_json_and_png(tmp_path, capsys):
    assert main(["bench", "train", "--out", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr().out
    assert "loop/ops" in out and "train-d64-r4-T32-N4-uniform" in out
    (json_path,) = tmp_path.glob("train-*.json")
    assert (tmp_path / json_path.name.replace(".json", ".png")).stat().st_size > 0
    result = json.loads(json_path.read_text())
    assert result["kind"] == "train" and len(result["cases"]) == 1
    c = result["cases"][0]
    assert c["methods"] == list(train.METHODS)  # not --quick: gather_bmm included
    assert all(c["ms"][m] > 0 for m in train.METHODS)
    assert c["ratios"]["loop/lora_ops"] == pytest.approx(c["ms"]["loop"] / c["ms"]["lora_ops"])
    assert all(c["check"][m]["rel_diff"] <= train.REL_TOL for m in train.LORA_METHODS)


def test_quick_skips_gather_bmm(tmp_path):
    assert main(["bench", "train", "--quick", "--out", str(tmp_path), *TINY]) == 0
    result = json.loads(next(tmp_path.glob("train-*.json")).read_text())
    assert "gather_bmm" not in result["cases"][0]["ms"]


def test_wrong_gradients_stop_the_run(tmp_path, monkeypatch, capsys):
    # a composite that drops the scale gives gradients half the loop's: the check must refuse to time it
    real = grouped.gather_bmm_delta
    monkeypatch.setattr(train, "gather_bmm_delta", lambda x, a, b, ids, s: real(x, a, b, ids, s / 2))
    assert main(["bench", "train", "--out", str(tmp_path), *TINY]) == 1
    assert "gather_bmm gradients differ" in capsys.readouterr().err
    assert not list(tmp_path.glob("train-*"))


def test_workload_grads_match_between_methods():
    wl = train.build_workload(train.TrainCase(32, 24, 4, 20, 3, "zipf"))
    check = train.check_grads(wl, train.LORA_METHODS)
    assert set(check) == set(train.LORA_METHODS) and check["loop"]["max_abs_diff"] == 0
    grads = wl.fns()["lora_ops"]()
    assert [g.shape for g in grads] == [wl.x.shape, wl.lora_a.shape, wl.lora_b.shape]
    assert torch.isfinite(torch.cat([g.flatten() for g in grads])).all()
