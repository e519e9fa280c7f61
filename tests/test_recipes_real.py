"""``reproduce RECIPE --real`` without network: a tiny GGUF model converted into a fake assets cache and a fake
BIG-bench sdist holding every suite task; plus the training pieces the real testbed uses (the lora_ops LoRA backend,
the answer-only LM head, adapters on the top layers, the adapter cache)."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from lora_ops.recipes import assets, bigbench, real, train  # noqa: E402
from lora_ops.recipes.data import CharTokenizer, Example  # noqa: E402
from lora_ops.recipes.model import TinyConfig, build_tiny_llama  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# training pieces on the tiny Llama

def _tiny():
    tok = CharTokenizer.default()
    base = build_tiny_llama(tok.vocab_size, TinyConfig(32, 3, 4, 64), seed=0)
    for p in base.parameters():
        p.requires_grad_(False)
    exs = [Example("t", f"rev:{w}", w[::-1]) for w in ("abc", "bca", "cab", "abd", "dba", "cdab")]
    return base, tok, exs


def _train(base, tok, exs, lcfg, init=None, answer_only=False, steps=5):
    cfg = train.TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup=0, seed=3, desc="t")
    with train.answer_head_only(answer_only):
        state, log = train.train_lora(base, tok, exs, cfg, lcfg, max_len=32, init=init, progress=False)
    return state, log


def test_lora_ops_backend_trains_like_peft():
    base, tok, exs = _tiny()
    init = train.lora_state_dict(train.add_lora(base, train.LoRAConfig(4, 8.0), seed=1))
    init = {k: (v if "lora_A" in k else torch.randn_like(v) * 0.01) for k, v in init.items()}  # B != 0
    peft_state, peft_log = _train(base, tok, exs, train.LoRAConfig(4, 8.0), init)
    ours, our_log = _train(base, tok, exs, train.LoRAConfig(4, 8.0, backend="lora_ops"), init, answer_only=True)
    assert sorted(ours) == sorted(peft_state)
    for k in ours:
        torch.testing.assert_close(ours[k], peft_state[k], rtol=1e-4, atol=1e-5)
    assert [e["loss"] for e in our_log] == pytest.approx([e["loss"] for e in peft_log], rel=1e-5)


def test_answer_head_only_gives_the_same_loss():
    base, tok, exs = _tiny()
    model = train.add_lora(base, train.LoRAConfig(4, 8.0, backend="lora_ops"), seed=0)
    rows = [train.encode_example(tok, e, 32) for e in exs]
    ids, mask, att = train.collate(rows, 0)
    full = train.answer_ce_sum(model, ids, mask, att)
    with train.answer_head_only():
        only = train.answer_ce_sum(model, ids, mask, att)
    torch.testing.assert_close(only, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["peft", "lora_ops"])
def test_lora_layers_restrict_the_adapters(backend):
    base, tok, exs = _tiny()
    state, _ = _train(base, tok, exs, train.LoRAConfig(4, 8.0, layers=(2,), backend=backend), steps=2)
    assert state and all(".layers.2." in k for k in state)
    assert len(state) == 2 * 7  # A and B of the seven projections of one layer


def test_lora_ops_backend_disable_adapter_gives_the_base():
    base, tok, exs = _tiny()
    state, _ = _train(base, tok, exs, train.LoRAConfig(4, 8.0, backend="lora_ops"), steps=3)
    model = train.add_lora(base, train.LoRAConfig(4, 8.0, backend="lora_ops"), seed=0, init=state)
    ids = torch.tensor([tok.encode("rev:abc=")])
    with torch.no_grad():
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        on = model(input_ids=ids).logits
        want = base(input_ids=ids).logits
    torch.testing.assert_close(off, want)
    assert (on - want).abs().max() > 1e-4


def test_adapter_cache_trains_once(tmp_path, monkeypatch):
    base, tok, exs = _tiny()
    lcfg = train.LoRAConfig(4, 8.0, backend="lora_ops")
    with train.adapter_cache(tmp_path, "model-a"):
        first, log = _train(base, tok, exs, lcfg)
        monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("trained again"))
        again, log2 = _train(base, tok, exs, lcfg)
        for k in first:
            assert torch.equal(first[k], again[k])
        assert log2 == json.loads(json.dumps(log))
        monkeypatch.undo()
        _train(base, tok, exs[:-1], lcfg)  # other rows: another adapter
    with train.adapter_cache(tmp_path, "model-b"):  # another base model: another adapter
        _train(base, tok, exs, lcfg)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("lora-")]) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


# ---------------------------------------------------------------------------------------------------------------
# reproduce --real end to end on a fake assets cache

@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    import test_real_assets as tra

    root = tmp_path_factory.mktemp("real")
    cache = root / "cache"
    model = tra._llama(257, hidden=32, layers=2, heads=4, kv_heads=2, inter=48, rms_norm_eps=1e-5,
                       rope_theta=10000.0, bos_token_id=256, eos_token_id=256, pad_token_id=None)
    gguf_path = tra._write_gguf(root / "tiny.gguf", model)
    assets.convert_gguf(gguf_path, assets.model_dir(cache), check_prompt="ab", progress=False)
    sdist = tra._fake_sdist(root / "bb.tar.gz", bigbench.suite_tasks(), n=200)
    assets.extract_tasks(bigbench.suite_tasks(), cache, sdist=sdist, progress=False)
    return cache


def test_reproduce_ilora_real_quick_cli(real_cache, tmp_path, capsys):
    from lora_ops import cli

    out = tmp_path / "out"
    assert cli.main(["reproduce", "ilora", "--real", "--quick", "--cache", str(real_cache), "--out", str(out),
                     "--no-progress", "--threads", "1"]) == 0
    p = json.loads((out / "results.json").read_text())
    tasks = list(real.real_spec("ilora", quick=True).tasks)
    assert p["real"]["tasks"] == tasks and p["real"]["split_seed"] == 0
    info = json.loads((assets.model_dir(real_cache) / assets.ASSET_INFO).read_text())
    assert p["real"]["model_sha256"] == info["weights"]["model.safetensors"]
    assert p["real"]["lora_backend"] == "lora_ops" and p["config"]["base"]["lora_backend"] == "lora_ops"
    assert set(p["base"]["per_task"]) == set(tasks)
    assert all(v["n"] == 20 and "se" in v for v in p["base"]["per_task"].values())
    assert str(real_cache) not in (out / "results.json").read_text()  # no local paths in the results
    assert (out / "results.md").is_file() and (out / "single_task.png").is_file()
    # the plain-CE task adapters went into the cache (the routing-tuned ones draw general rows: not cached)
    cached = [p.name for p in (real_cache / "adapters").iterdir() if p.name.startswith("lora-")]
    assert len(cached) == len(tasks)
    data = {p.name for p in (real_cache / "data").iterdir()}
    assert any(n.startswith("real-") for n in data)
    assert cli.main(["reproduce", "ilora", "--real", "--data", str(tmp_path)]) == 2


SMALL = {"ilora": {"steps": 2, "sweep": ((0.8, 8),), "n_general_eval": 4},
         "seeded-lora": {"seed_steps": 2, "expert_steps": 2, "layer_timing_size": (32, 8)},
         "moa": {"expert_steps": 2, "stage2_steps": 2, "classifier_steps": 2, "single_steps": 2},
         "modular": {"steps": 2, "shared_steps": 2, "top_k_sweep": (1, 2), "clusters": 2}}


@pytest.mark.parametrize("recipe", ["seeded-lora", "moa", "modular"])
def test_reproduce_real_other_recipes(real_cache, tmp_path, recipe):
    real.real_config(recipe, quick=True), real.real_config(recipe, quick=False)  # the published configs build
    spec = real.RealSpec(tasks=("logical_fallacy_detection", "sports_understanding"),
                         held_out=("winowhy",) if recipe in ("seeded-lora", "modular") else (),
                         n_train=8, n_valid=2, n_test=4, n_general=8, top_layers=1)
    p = real.run(recipe, tmp_path / recipe, quick=True, cache=real_cache, spec=spec, progress=False,
                 config_overrides=SMALL[recipe])
    saved = json.loads((tmp_path / recipe / "results.json").read_text())
    assert saved["real"]["tasks"] == list(spec.tasks) and saved["real"]["held_out"] == list(spec.held_out)
    assert saved["real"]["adapted_layers"] == [1] and saved["recipe"] == p["recipe"]
    assert str(real_cache) not in (tmp_path / recipe / "results.json").read_text()


def test_real_run_without_assets_says_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="lora-ops assets fetch"):
        real.run("ilora", tmp_path / "out", quick=True, cache=tmp_path / "empty")
    with pytest.raises(ValueError, match="not a task of the suite"):
        real.data_folder(real.RealSpec(("nope",), (), 1, 1, 1), tmp_path / "empty")
