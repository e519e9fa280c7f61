"""Atomic writes and the PEFT adapter-folder reader/writer."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lora_ops import _io


def test_adapter_dir_roundtrip(tmp_path):
    sd = {"base_model.model.q.lora_A.weight": torch.randn(4, 8), "base_model.model.q.lora_B.weight": torch.randn(6, 4)}
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"]}
    _io.write_peft_adapter_dir(tmp_path / "a", sd, cfg)
    got_sd, got_cfg = _io.read_peft_adapter_dir(tmp_path / "a")
    assert got_cfg == cfg and got_sd.keys() == sd.keys()
    for k in sd:
        assert torch.equal(got_sd[k], sd[k])
    # Rewriting replaces the folder whole and leaves no temporary files behind.
    _io.write_peft_adapter_dir(tmp_path / "a", sd, dict(cfg, r=5))
    assert _io.read_peft_adapter_dir(tmp_path / "a")[1]["r"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_corrupt_and_missing_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        _io.read_peft_adapter_dir(tmp_path / "missing")
    d = tmp_path / "bad"
    d.mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        _io.read_peft_adapter_dir(d)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        _io.read_peft_adapter_dir(d)
    (d / "adapter_config.json").write_text(json.dumps({"r": 1}))
    with pytest.raises(FileNotFoundError, match="adapter_model"):
        _io.read_peft_adapter_dir(d)
    _io.atomic_save_safetensors(d / "adapter_model.safetensors", {"w": torch.randn(100, 100)})
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="corrupt or truncated"):
        _io.read_peft_adapter_dir(d)


def test_killed_writer_leaves_old_file_intact(tmp_path):
    target = tmp_path / "out.json"
    _io.atomic_write_json(target, {"v": 1})
    # A writer killed mid-write (os._exit inside the write callback) must not touch the existing file.
    code = textwrap.dedent(
        f"""
        import os
        from lora_ops import _io
        def write(tmp):
            with open(tmp, "w") as f:
                f.write('{{"v": 2, "partial')
                f.flush()
            os._exit(9)
        _io.atomic_write({str(target)!r}, write)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == 9
    assert json.loads(target.read_text()) == {"v": 1}
