"""`lora-ops bench train-many` on a tiny model folder (the published runs use SmolLM2-135M's shape)."""

import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from lora_ops import cli  # noqa: E402
from lora_ops.benchmarks import train_many  # noqa: E402
from tests.train_job_support import make_setup  # noqa: E402


def test_cases_grid():
    quick = train_many.cases(quick=True)
    assert [c.name for c in quick] == ["N1-2x64", "N4-2x64", "N16-2x64", "N4-2x64-ddp2"]
    full = train_many.cases()
    assert {(c.rows, c.seq) for c in full} == {(2, 64), (8, 128)} and sum(c.processes == 2 for c in full) == 3
    with pytest.raises(ValueError, match="rows, seq"):
        train_many.cases(batches=[(0, 64)])


def test_bench_train_many_runs_and_writes_reports(tmp_path, capsys):
    setup = make_setup(tmp_path / "setup")
    n = torch.get_num_threads()
    try:
        code = cli.main(["bench", "train-many", "--model", setup["base"], "--n", "1", "3", "--batches", "2x12",
                         "--no-ddp", "--reps", "1", "--warmup", "1", "--threads", "1", "--out", str(tmp_path / "out")])
    finally:
        torch.set_num_threads(n)
    assert code == 0
    out = capsys.readouterr().out
    assert "N3-2x12" in out and "peft/ops" in out
    result = json.loads(next((tmp_path / "out").glob("train-many-*.json")).read_text())
    assert next((tmp_path / "out").glob("train-many-*.png")).stat().st_size > 0
    for case in result["cases"]:
        s = case["seconds_per_step"]
        assert set(s) == {"lora_ops", "peft", "base"} and all(v > 0 for v in s.values())
        assert case["first_step_loss_rel_diff"] < 1e-3  # the job and PEFT trained on the same rows
        assert 0 < case["tokens_per_step"] <= case["case"]["n_adapters"] * 2 * 12
