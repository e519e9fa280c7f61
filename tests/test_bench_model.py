"""``lora-ops bench model`` and lora_ops.benchmarks.model on a tiny Llama: files, output checks, paired timing."""

import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from lora_ops.benchmarks import model  # noqa: E402
from lora_ops.cli import main  # noqa: E402

FAST = ["--threads", "1", "--pairs", "1"]


def test_quick_run_writes_table_json_and_png(tmp_path, capsys):
    assert main(["bench", "model", "--quick", "--out", str(tmp_path), *FAST]) == 0
    out = capsys.readouterr().out
    assert "llama-tiny-decode-N4-r16-4x4+3" in out and "peft/accel" in out and "random Llama" in out
    (json_path,) = tmp_path.glob("model-cpu-*.json")
    assert (tmp_path / json_path.name.replace(".json", ".png")).stat().st_size > 0
    result = json.loads(json_path.read_text())
    assert result["models"]["llama-tiny"]["source"] == "random Llama"
    assert [(c["case"]["workload"], c["case"]["n_adapters"]) for c in result["cases"]] == [
        (w, n) for n in (2, 4) for w in model.WORKLOADS]
    for c in result["cases"]:
        assert set(c["timings"]) == set(model.METHODS) and set(c["above_base"]) == set(model.VARIANTS)
        assert all(len(c["timings"][m]["ms"]) == (2 if m == "base" else 1) for m in model.METHODS)
        assert c["check"]["accelerated"] <= model.REL_TOL and c["check"]["wrapped"] <= model.REL_TOL
        assert c["check"]["adapters_change_output"] > model.REL_TOL  # the adapters are not a no-op
        assert c["tokens_per_s"]["base"] > 0 and 0 <= c["other_cpu_share"] <= 1
        if c["case"]["workload"] == "decode":
            assert c["check"]["accelerated_tokens_equal"] and c["check"]["wrapped_tokens_equal"]
            assert c["case"]["tokens"] == 4 * 3  # new tokens


def test_local_model_folder_is_used_for_smollm2(tmp_path, capsys):
    import transformers

    folder = tmp_path / "smol"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.MODELS["llama-tiny"])).save_pretrained(folder)
    args = ["bench", "model", "--model", str(folder), "--models", "smollm2-135m", "--workloads", "prefill",
            "--adapters", "3", "--seqs", "2", "--seq-len", "5", "--out", str(tmp_path / "out"), *FAST]
    assert main(args) == 0
    result = json.loads(next((tmp_path / "out").glob("model-*.json")).read_text())
    assert result["models"]["smollm2-135m"]["source"].startswith("pretrained weights (smol")
    assert result["cases"][0]["case"]["name"] == "smollm2-135m-prefill-N3-r16-2x5"


def test_wrong_outputs_stop_the_run(tmp_path, monkeypatch, capsys):
    import lora_ops.peft

    real = lora_ops.peft.load_adapters

    def halved(*args, **kwargs):  # wrap's banks with half the scale: must not be timed
        banks = real(*args, **kwargs)
        for bank in banks.values():
            bank.scales.mul_(0.5)
        return banks

    monkeypatch.setattr(lora_ops.peft, "load_adapters", halved)
    args = ["bench", "model", "--quick", "--workloads", "train", "--adapters", "2", "--out", str(tmp_path), *FAST]
    assert main(args) == 1
    assert "wrapped differs from PEFT" in capsys.readouterr().err
    assert not list(tmp_path.glob("model-*"))


def test_paired_times_subtracts_the_interpolated_base(monkeypatch):
    # a fake clock: base takes 10 + the calls so far (a linear drift), variant v takes that plus its own cost
    clock = {"t": 0.0, "calls": 0}

    def cost(extra):
        def fn():
            clock["t"] += (10 + clock["calls"] + extra) / 1e3
            clock["calls"] += 1
        return fn

    fake = type("T", (), {"perf_counter": staticmethod(lambda: clock["t"]),
                          "process_time": staticmethod(lambda: clock["t"])})
    monkeypatch.setattr(model, "time", fake)
    res = model.paired_times({"base": cost(0), "a": cost(1), "b": cost(5), "c": cost(2)}, pairs=4)
    assert len(res["base"]["ms"]) == 5 and all(len(res[m]["ms"]) == 4 for m in "abc")
    for m, want in (("a", 1), ("b", 5), ("c", 2)):
        assert res[m]["above_ms"] == pytest.approx([want] * 4)
        assert res[m]["above_cpu_ms"] == pytest.approx([want] * 4)


def test_cases_and_errors():
    full = model.cases()
    assert {(c.model, c.n_adapters) for c in full} == {("smollm2-135m", 8), ("smollm2-135m", 32), ("llama-h1024", 32)}
    dec = next(c for c in full if c.workload == "decode")
    assert (dec.seqs, dec.new_tokens, dec.tokens) == (32, 32, 1024)
    assert next(c for c in full if c.workload == "prefill").name == "smollm2-135m-prefill-N8-r16-16x128"
    with pytest.raises(ValueError, match="unknown model"):
        model.cases(models=["gpt5"])
    with pytest.raises(ValueError, match="unknown workload"):
        model.cases(workloads=["serve"])
