"""`lora-ops train`: many adapters in one job (lora_ops.train), single process.

A tiny random Llama (+ character tokenizer) is saved by the test; three adapters with different ranks, alphas,
targets, learning rates and data formats train together.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora_ops import cli  # noqa: E402
from lora_ops import train as job  # noqa: E402
from lora_ops._io import load_tensors  # noqa: E402
from tests.train_job_support import ADAPTERS, make_setup, write_config  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("train_job"))


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _adapter_tensors(out, name):
    return load_tensors(Path(out) / name / "adapter_model.safetensors")


def test_adapter_trained_with_others_equals_adapter_trained_alone(setup, tmp_path):
    many = job.train(write_config(setup, tmp_path / "many", steps=4), progress=False)
    assert set(many["adapters"]) == {a["name"] for a in ADAPTERS}
    for spec in ADAPTERS:
        alone = job.train(write_config(setup, tmp_path / f"alone_{spec['name']}", steps=4, adapters=[spec]),
                          progress=False)
        want = _adapter_tensors(alone["adapters"][spec["name"]], "")
        got = _adapter_tensors(many["adapters"][spec["name"]], "")
        assert set(got) == set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
        assert any(v.abs().max() > 0 for k, v in got.items() if "lora_B" in k)  # training moved B off zero
        # logged losses agree as well
        assert many["loss"][spec["name"]] == pytest.approx(alone["loss"][spec["name"]], rel=1e-5)


@pytest.mark.parametrize("micro", [1, 4])
def test_micro_batches_accumulate_the_whole_step(setup, tmp_path, micro):
    """6 rows per step in chunks of 1 or 4 rows: the same adapters, losses and token counts as one pass."""
    whole = job.train(write_config(setup, tmp_path / "whole", steps=3), progress=False)
    parts = job.train(write_config(setup, tmp_path / "parts", steps=3, micro_batch_rows=micro), progress=False)
    assert parts["tokens"] == whole["tokens"]
    for spec in ADAPTERS:
        want = _adapter_tensors(whole["adapters"][spec["name"]], "")
        got = _adapter_tensors(parts["adapters"][spec["name"]], "")
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
        assert parts["loss"][spec["name"]] == pytest.approx(whole["loss"][spec["name"]], rel=1e-5)


def test_row_ce_sums_equals_cross_entropy_of_full_logits(setup):
    """Only loss positions go through the head: same per-row sums (and gradients) as CE over the full logits."""
    model = transformers.AutoModelForCausalLM.from_pretrained(setup["base"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 9), generator=g)
    att = torch.ones_like(ids)
    att[2, 6:] = 0  # a padded row
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, 4:] = True  # an answer after a prompt
    mask[1] = True  # a text row
    mask[2, 2:6] = True
    got = job.row_ce_sums(model, ids, mask, att)
    assert model.get_output_embeddings()._forward_pre_hooks == {}  # the hook is gone again
    logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    want = (ce * mask[:, 1:]).sum(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w = model.get_input_embeddings().weight
    g_got = torch.autograd.grad(got.sum(), w)[0]
    logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    g_want = torch.autograd.grad((ce * mask[:, 1:]).sum(), w)[0]
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_micro_batch_chunks_match_across_ranks():
    # 7 rows over 2 ranks (4 and 3), at most 2 rows per pass: both ranks make 2 passes
    assert job._micro_batches([0, 2, 4, 6], 2, 7, 2) == [[0, 2], [4, 6]]
    assert job._micro_batches([1, 3, 5], 2, 7, 2) == [[1, 3], [5]]
    # 3 rows over 2 ranks, 1 row per pass: the short rank runs a loss-free pass
    assert job._micro_batches([0, 2], 1, 3, 2) == [[0], [2]]
    assert job._micro_batches([1], 1, 3, 2) == [[1], []]
    assert job._micro_batches([0, 1, 2], 0, 3, 1) == [[0, 1, 2]]


def test_outputs_load_in_peft_with_our_logits(setup, tmp_path):
    summary = job.train(write_config(setup, tmp_path / "run", steps=3), progress=False)
    model = summary["model"]
    tokens = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    plain = transformers.AutoModelForCausalLM.from_pretrained(setup["base"], local_files_only=True)
    with torch.no_grad():
        base_logits = plain(tokens).logits
    for i, spec in enumerate(ADAPTERS):
        cfg = peft.PeftConfig.from_pretrained(summary["adapters"][spec["name"]])
        assert cfg.r == spec["r"] and cfg.lora_alpha == spec["alpha"]
        base = transformers.AutoModelForCausalLM.from_pretrained(setup["base"], local_files_only=True)
        loaded = peft.PeftModel.from_pretrained(base, summary["adapters"][spec["name"]]).eval()
        with torch.no_grad():
            want = loaded(tokens).logits
            from lora_ops.nn import adapter_ids

            with adapter_ids(model, torch.full((2,), i)):
                got = model(tokens).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, base_logits, atol=1e-4)  # the adapter changes the output


def test_log_and_config_formats(setup, tmp_path):
    cfg = write_config(setup, tmp_path / "run", steps=3, suffix=".yaml", log_every=2)
    out = Path(job.load_config(cfg).out)
    assert cli.main(["train", str(cfg), "--no-progress", "--threads", "1"]) == 0
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == [1, 2]  # every 2nd step and the last
    assert set(lines[-1]["loss"]) == {a["name"] for a in ADAPTERS} == set(lines[-1]["grad_norm"])
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == 3


def test_bf16_base_keeps_float32_adapters(setup, tmp_path):
    summary = job.train(write_config(setup, tmp_path / "run", steps=2, base_dtype="bfloat16"), progress=False)
    layer = next(m for m in summary["model"].modules() if hasattr(m, "bank"))
    assert layer.base.weight.dtype == torch.bfloat16 and layer.bank.lora_a.dtype == torch.float32
    state = _adapter_tensors(summary["adapters"]["add3"], "")
    assert all(v.dtype == torch.float32 for v in state.values())
    a = next(v for k, v in state.items() if "lora_A" in k)
    assert bool((a.bfloat16().float() != a).any())  # float32 precision, never rounded through the base dtype
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["loss"].values())


@pytest.mark.parametrize("change, message", [
    (lambda c: c["adapters"].append(dict(c["adapters"][0])), "used twice"),
    (lambda c: c["adapters"][1].update(data="missing.jsonl"), "does not exist"),
    (lambda c: c.update(stpes=3), "unknown key"),
    (lambda c: c.pop("base"), "missing required key"),
    (lambda c: c["adapters"][0].update(r=0), r"adapters\[0\]\.r must be an integer >= 1"),
    (lambda c: c["adapters"][0].update(lr="fast"), r"adapters\[0\]\.lr"),
    (lambda c: c["adapters"][0].update(targets=[]), "targets"),
    (lambda c: c["adapters"][2].update(targets=["nope_proj"]), "match no nn.Linear"),
    (lambda c: c["adapters"][0].update(name="x/y"), "name"),
    (lambda c: c.update(adapters=[]), "non-empty list"),
    (lambda c: c.update(base_dtype="float8"), "base_dtype"),
    (lambda c: c.update(micro_batch_rows=-1), "micro_batch_rows"),
    (lambda c: c["adapters"][1].update(data="bad.jsonl"), r"bad.jsonl:2: a row must be"),
])
def test_bad_config_fails_before_training(setup, tmp_path, capsys, change, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"question": "no"}\n')
    cfg = write_config(setup, tmp_path / "run", steps=3, change=change)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-ops: error: train:") and len(err.strip().splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()  # nothing was written: no training started


def test_existing_checkpoint_needs_resume(setup, tmp_path):
    cfg = write_config(setup, tmp_path / "run", steps=2)
    job.train(cfg, progress=False)
    with pytest.raises(ValueError, match="--resume"):
        job.train(cfg, progress=False)
    # a finished run resumed with more steps continues; a changed config is refused
    more = write_config(setup, tmp_path / "run", steps=3)
    assert job.train(more, resume=True, progress=False)["start"] == 2
    changed = write_config(setup, tmp_path / "run", steps=4, change=lambda c: c.update(seed=1))
    with pytest.raises(ValueError, match="different config"):
        job.train(changed, resume=True, progress=False)


def test_resume_after_kill_equals_uninterrupted_run(setup, tmp_path):
    steps = 40
    cfg = write_config(setup, tmp_path / "killed", steps=steps, checkpoint_every=2)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "lora_ops.cli", "train", str(cfg), "--no-progress",
                             "--threads", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    meta = tmp_path / "killed" / "checkpoint" / "meta.json"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if meta.is_file() and json.loads(meta.read_text())["step"] >= 4:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    killed_at = json.loads(meta.read_text())["step"]
    assert 4 <= killed_at < steps and not (tmp_path / "killed" / "a").exists()
    resumed = job.train(cfg, resume=True, progress=False)
    assert resumed["start"] == killed_at
    straight = job.train(write_config(setup, tmp_path / "straight", steps=steps, checkpoint_every=2), progress=False)
    for spec in ADAPTERS:
        want, got = (_adapter_tensors(s["adapters"][spec["name"]], "") for s in (straight, resumed))
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    steps_logged = [json.loads(x)["step"] for x in Path(resumed["log"]).read_text().splitlines()]
    assert steps_logged == list(range(steps))  # no step lost or repeated in the log


def test_adapter_adamw_matches_torch_adamw_for_one_adapter():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(1, 3, 5))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ours = job.AdapterAdamW([p1], [1e-2], clip=0.5, weight_decay=0.1)
    ref = torch.optim.AdamW([p2], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(1, 3, 5)
        p1.grad, p2.grad = g.clone(), g.clone()
        norm = ours.step()
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_([p2], 0.5).reshape(1))
        ref.step()
        torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-7)


def test_readme_example_config_trains(tmp_path):
    """examples/train_many: make_tiny_base.py + config.yaml (a shortened run into a temporary folder)."""
    import importlib.util

    import yaml

    folder = Path(__file__).resolve().parents[1] / "examples" / "train_many"
    spec = importlib.util.spec_from_file_location("make_tiny_base", folder / "make_tiny_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([str(tmp_path / "tiny-base")])
    raw = yaml.safe_load((folder / "config.yaml").read_text())
    raw.update(base=str(tmp_path / "tiny-base"), out=str(tmp_path / "out"), steps=2)
    summary = job.train(job.parse_config(raw, folder), progress=False)
    for name in ("upper", "reverse", "count"):
        assert peft.PeftConfig.from_pretrained(summary["adapters"][name]).base_model_name_or_path
    count = peft.PeftConfig.from_pretrained(summary["adapters"]["count"])
    assert all(".layers.1." in m for m in count.target_modules)


def _faults_of_repeated_blocks(keep: bool) -> tuple:
    code = ("import platform, resource, torch; from lora_ops.train import keep_freed_memory; "
            f"ok = keep_freed_memory() if {keep} else None; "
            "z = torch.ones(64 << 20, dtype=torch.uint8); del z; "
            "f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(8):\n    z = torch.ones(64 << 20, dtype=torch.uint8); del z\n"
            "print(ok, platform.libc_ver()[0], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(Path(__file__).resolve().parents[1]))
    ok, libc, faults = done.stdout.split()
    return ok, libc, int(faults)


def test_keep_freed_memory_stops_page_faulting_big_blocks_again():
    """In subprocesses (the setting is process-wide): eight fresh 64 MiB tensors (above glibc's largest mmap
    threshold) page-fault every time with its defaults, and about once in all with the memory kept."""
    ok, libc, kept = _faults_of_repeated_blocks(True)
    if libc != "glibc":
        assert ok == "False"
        return
    _, _, default = _faults_of_repeated_blocks(False)
    assert ok == "True"
    assert kept * 3 < default, (kept, default)
