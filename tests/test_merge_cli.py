"""`lora-ops merge` and the argument errors of `lora-ops bench merge|svd`: one-line errors, atomic output."""

import json

import pytest
import torch

from lora_ops._io import read_peft_adapter_dir, write_peft_adapter_dir
from lora_ops.cli import main
from lora_ops.merge import merge_peft_adapters

pytest.importorskip("peft")
from test_merge import _peft_model, _products  # noqa: E402


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    _, adapters = _peft_model()
    dirs = []
    for i, (sd, cfg) in enumerate(adapters):
        cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
        dirs.append(str(write_peft_adapter_dir(root / f"a{i}", sd, cfg)))
    return dirs


def _one_line_error(capsys, code=2):
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-ops: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_merge_writes_a_peft_folder(adapter_dirs, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", *adapter_dirs, "--method", "svd", "--weights", "0.5", "0.3", "0.2", "--rank", "6",
                 "--out", str(out), "--quiet"]) == 0
    assert "merged 3 adapters" in capsys.readouterr().out
    sd, cfg = read_peft_adapter_dir(out)
    assert cfg["r"] == 6 and cfg["lora_alpha"] == 6
    ref, _ = merge_peft_adapters(adapter_dirs, [0.5, 0.3, 0.2], "svd", rank=6)
    for m, p in _products(ref).items():
        torch.testing.assert_close(_products(sd)[m], p)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary leftovers


def test_merge_default_weights_average_and_other_methods(adapter_dirs, tmp_path):
    assert main(["merge", *adapter_dirs, "--method", "ties", "--density", "0.5", "--out", str(tmp_path / "t"),
                 "--quiet"]) == 0
    sd, _ = read_peft_adapter_dir(tmp_path / "t")
    ref, _ = merge_peft_adapters(adapter_dirs, [1 / 3] * 3, "ties", density=0.5)
    for k in ref:
        torch.testing.assert_close(sd[k], ref[k])


@pytest.mark.parametrize(("args", "msg"), [
    (["--method", "mean"], "invalid choice"),
    (["--weights", "1", "2"], "got 2 weights for 3 adapters"),
    (["--weights", "1", "x", "2"], "expected a number"),
    (["--method", "ties"], "needs density"),
    (["--rank", "0"], "positive integer"),
])
def test_merge_argument_errors(adapter_dirs, tmp_path, capsys, args, msg):
    assert main(["merge", *adapter_dirs, *args, "--out", str(tmp_path / "o"), "--quiet"]) != 0
    assert msg in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_merge_bad_paths(adapter_dirs, tmp_path, capsys):
    assert main(["merge", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) != 0
    assert "not a directory" in _one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["merge", adapter_dirs[0], str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) != 0
    assert "not a PEFT adapter folder" in _one_line_error(capsys)
    (tmp_path / "file").write_text("x")
    assert main(["merge", *adapter_dirs, "--out", str(tmp_path / "file")]) != 0
    assert "not a directory" in _one_line_error(capsys)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"r": 4}))
    assert main(["merge", adapter_dirs[0], str(broken), "--out", str(tmp_path / "o")]) != 0
    assert "adapter_model" in _one_line_error(capsys)


def test_bench_merge_refuses_cuda_device_cleanly(capsys):
    assert main(["bench", "merge", "--device", "cuda"]) != 0
    _one_line_error(capsys)


def test_peft_merge_adapters_writes_folder(tmp_path):
    # lora_ops.peft.merge_adapters is the PEFT-facing name of merge.merge_peft_adapters (+ an atomic write).
    import torch

    from lora_ops import _io
    from lora_ops.peft import merge_adapters

    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q"]}
    pairs = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        sd = {"base_model.model.q.lora_A.weight": torch.randn(2, 8, generator=g),
              "base_model.model.q.lora_B.weight": torch.randn(6, 2, generator=g)}
        pairs.append((sd, cfg))
    sd, config = merge_adapters(pairs, [1 / 3] * 3, "cat", out=tmp_path / "merged")
    got_sd, got_cfg = _io.read_peft_adapter_dir(tmp_path / "merged")
    assert got_cfg == config and set(got_sd) == set(sd)
    a, b = got_sd["base_model.model.q.lora_A.weight"], got_sd["base_model.model.q.lora_B.weight"]
    expect = sum(p["base_model.model.q.lora_B.weight"] @ p["base_model.model.q.lora_A.weight"] for p, _ in pairs) / 3
    torch.testing.assert_close(config["lora_alpha"] / config["r"] * b @ a, expect, atol=1e-5, rtol=1e-5)
