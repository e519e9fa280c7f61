"""lora_ops.peft: loading PEFT adapters (folders and PeftModel), unsupported features, save round trip, accelerate."""

import copy
import json

import pytest
import torch

import lora_ops
from lora_ops import ops
from lora_ops.nn import adapter_ids, wrap

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from lora_ops.peft import accelerate, deaccelerate, load_adapters, save_adapter  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny shapes: one thread is fastest, and on a shared machine OpenMP threads waiting for descheduled peers
    # make multi-threaded tiny ops 10-100x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# Ranks and alphas of the 8 adapters used for the PeftModel tests (mixed on purpose).
RANKS = (2, 4, 8, 3, 16, 4, 1, 6)
ALPHAS = (4, 8, 16, 3, 8, 1, 2, 12)


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def _lora(r, alpha, **kw):
    kw.setdefault("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # init_lora_weights=False: B is random too, so every adapter changes the output
    return peft.LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, lora_dropout=0.0, **kw)


@pytest.fixture(scope="module")
def base_model():
    return _tiny_llama()


@pytest.fixture(scope="module")
def peft8(base_model):
    """A PeftModel with 8 adapters of mixed ranks / alphas (one rsLoRA, one with a regex target)."""
    torch.manual_seed(1)
    model = peft.get_peft_model(copy.deepcopy(base_model), _lora(RANKS[0], ALPHAS[0]), adapter_name="ad0")
    for i in range(1, 8):
        kw = {}
        if i == 3:
            kw["use_rslora"] = True
        if i == 5:
            kw["target_modules"] = r".*\.(q_proj|v_proj|up_proj)"
        model.add_adapter(f"ad{i}", _lora(RANKS[i], ALPHAS[i], **kw))
    return model.eval()


def _save_dir(base_model, tmp_path, name, cfg, seed):
    torch.manual_seed(seed)
    m = peft.get_peft_model(copy.deepcopy(base_model), cfg)
    path = tmp_path / name
    m.save_pretrained(path)
    return path, m.eval()


def _tokens(b=4, s=7):
    return torch.randint(0, 128, (b, s), generator=torch.Generator().manual_seed(5))


def test_load_from_dirs_matches_peft(base_model, tmp_path):
    cfgs = {
        "plain": _lora(4, 8),
        "rs": _lora(8, 4, use_rslora=True),
        "regex": _lora(2, 3, target_modules=r".*\.self_attn\.(q_proj|v_proj)", rank_pattern={"v_proj": 6},
                       alpha_pattern={"v_proj": 12}),
    }
    dirs, models = {}, {}
    for seed, (name, cfg) in enumerate(cfgs.items()):
        dirs[name], models[name] = _save_dir(base_model, tmp_path, name, cfg, seed)
    banks = load_adapters(list(dirs.values()))
    q = banks["model.layers.0.self_attn.q_proj"]
    assert q.names == ["plain", "rs", "regex"] and q.ranks == [4, 8, 2] and q.rank == 8
    torch.testing.assert_close(q.scales, torch.tensor([8 / 4, 4 / 8 ** 0.5, 3 / 2]))
    assert banks["model.layers.1.self_attn.v_proj"].ranks == [4, 8, 6]
    assert banks["model.layers.1.self_attn.v_proj"].scales[2] == 2.0  # alpha_pattern 12 / rank_pattern 6
    assert banks["model.layers.0.mlp.up_proj"].ranks == [4, 8, 0]  # "regex" does not target the MLP
    wrapped = wrap(copy.deepcopy(base_model), banks)
    tokens = _tokens(3)
    with torch.no_grad(), adapter_ids(wrapped, ["plain", "rs", "regex"]):
        got = wrapped(tokens).logits
    with torch.no_grad():
        for row, name in enumerate(cfgs):
            torch.testing.assert_close(got[row], models[name](tokens[row:row + 1]).logits[0], atol=1e-5, rtol=1e-5)
    # a mapping gives the names
    assert load_adapters({"x": dirs["rs"]})["model.layers.0.self_attn.q_proj"].names == ["x"]


def test_load_from_peft_model_matches_adapter_names(base_model, peft8):
    banks = load_adapters(peft8)
    names = [f"ad{i}" for i in range(8)]
    assert banks["model.layers.0.self_attn.q_proj"].names == names
    assert banks["model.layers.0.self_attn.q_proj"].ranks == list(RANKS)
    assert banks["model.layers.0.mlp.gate_proj"].ranks[5] == 0
    wrapped = wrap(copy.deepcopy(base_model), banks)
    tokens = _tokens(8)
    batch = ["ad3", "__base__", "ad0", "ad5", "ad7", "ad1", "ad4", "ad6"]
    with torch.no_grad():
        want = peft8(tokens, adapter_names=batch).logits
        with adapter_ids(wrapped, batch):
            got = wrapped(tokens).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    sub = load_adapters(peft8, ["ad2", "ad6"])
    assert sub["model.layers.1.mlp.down_proj"].names == ["ad2", "ad6"]
    with pytest.raises(KeyError, match="nope"):
        load_adapters(peft8, ["nope"])


@pytest.mark.parametrize(("kw", "feature"), [
    ({"use_dora": True}, "DoRA"),
    ({"lora_bias": True}, "LoRA bias"),
    ({"target_modules": ["embed_tokens"]}, "embedding LoRA"),
])
def test_unsupported_features_raise(base_model, tmp_path, kw, feature):
    path, model = _save_dir(base_model, tmp_path, "bad", _lora(2, 4, **kw), 0)
    with pytest.raises(NotImplementedError, match=feature):
        load_adapters(path)
    with pytest.raises(NotImplementedError, match=feature):
        load_adapters(model)


def test_other_peft_type_raises(base_model, tmp_path):
    cfg = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    m = peft.get_peft_model(copy.deepcopy(base_model), cfg)
    m.save_pretrained(tmp_path / "ia3")
    with pytest.raises(NotImplementedError, match="IA3"):
        load_adapters(tmp_path / "ia3")


def test_missing_key_and_shape_mismatch(base_model, tmp_path):
    from lora_ops import _io

    path, _ = _save_dir(base_model, tmp_path, "ok", _lora(4, 8), 0)
    state, config = _io.read_peft_adapter_dir(path)
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    missing = {k: v for k, v in state.items() if k != key}
    _io.write_peft_adapter_dir(tmp_path / "missing", missing, config)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_adapters(tmp_path / "missing")
    bad = dict(state)
    bad[key] = torch.zeros(128, 3)
    _io.write_peft_adapter_dir(tmp_path / "shape", bad, config)
    with pytest.raises(ValueError, match=r"shape mismatch: .*up_proj\.lora_A\.weight"):
        load_adapters(tmp_path / "shape")


def test_save_roundtrip_through_peft(base_model, peft8, tmp_path):
    banks = load_adapters(peft8)
    tokens = _tokens(2)
    for name in ("ad3", "ad5"):  # rsLoRA; regex target (some modules absent)
        out = save_adapter(banks, name, tmp_path / name, base_model_name_or_path="tiny-llama")
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == "tiny-llama"
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), out).eval()
        with torch.no_grad():
            want = peft8(tokens, adapter_names=[name, name]).logits
            got = loaded(tokens).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = ops.grouped_lora

    def counting(*args, **kwargs):
        calls.append(args[3].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "grouped_lora", counting)
    return calls


def test_accelerate_parity_and_routing(base_model, counted):
    torch.manual_seed(1)
    model = peft.get_peft_model(copy.deepcopy(base_model), _lora(RANKS[0], ALPHAS[0]), adapter_name="ad0")
    for i in range(1, 8):
        kw = {"use_rslora": True} if i == 3 else {}
        model.add_adapter(f"ad{i}", _lora(RANKS[i], ALPHAS[i], **kw))
    model.eval()
    tokens = _tokens(9, 5)
    batch = ["ad0", "ad1", "__base__", "ad2", "ad3", "ad4", "ad5", "ad6", "ad7"]
    with torch.no_grad():
        want = model(tokens, adapter_names=batch).logits
        plain_want = model(tokens).logits  # active adapter (ad0), PEFT's own path
        accelerate(model)
        accelerate(model)  # idempotent
        assert not counted
        got = model(tokens, adapter_names=batch).logits
        assert len(counted) == 2 * 7  # every LoRA Linear of both layers, one call each
        assert counted[0] == (9, 5)
        assert (got - want).abs().max().item() <= 1e-5
        n = len(counted)
        torch.testing.assert_close(model(tokens).logits, plain_want, atol=0, rtol=0)
        model.set_adapter("ad4")
        torch.testing.assert_close(model(tokens).logits, model(tokens, adapter_names=["ad4"] * 9).logits,
                                   atol=1e-5, rtol=1e-5)
        assert len(counted) == n + 14
        # a new adapter is picked up (the bank is restacked)
        model.add_adapter("late", _lora(5, 7))
        model.eval()
        batch2 = ["late"] + batch[1:]
        got2 = model(tokens, adapter_names=batch2).logits
        n = len(counted)
        deaccelerate(model)  # PEFT's own path, for the reference
        want2 = model(tokens, adapter_names=batch2).logits
        assert len(counted) == n
        assert (got2 - want2).abs().max().item() <= 1e-5
        # our method removed from the instance while the saved original stays (a benchmark's toggle did this):
        # accelerate must put it back, not trust the leftover marker and silently leave PEFT's path in place
        accelerate(model)
        for mod in model.modules():
            mod.__dict__.pop("_mixed_batch_forward", None)
        accelerate(model)
        got3 = model(tokens, adapter_names=batch2).logits
        assert len(counted) == n + 14
        assert (got3 - want2).abs().max().item() <= 1e-5


@pytest.mark.parametrize("rank_y", [4, 2])  # mixed ranks (zero-padded stack) and equal ranks (plain stack)
def test_accelerate_keeps_gradients_exact(base_model, counted, rank_y):
    """With gradients enabled the accelerated call must still give PEFT's outputs and gradients."""
    torch.manual_seed(2)
    model = peft.get_peft_model(copy.deepcopy(base_model), _lora(2, 4), adapter_name="x")
    model.add_adapter("y", _lora(rank_y, 2 * rank_y))
    model.eval()
    tokens = _tokens(2, 4)
    batch = ["x", "y"]

    def grads():
        model.zero_grad()
        out = model(tokens, adapter_names=batch).logits
        out.square().mean().backward()
        w = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["x"].weight
        return out.detach(), w.grad.clone()

    want = grads()
    accelerate(model)
    got = grads()
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-4)
    assert counted  # the gradients above went through grouped_lora's backward, not PEFT's loop


def test_accelerate_notices_weight_edits_and_grad_after_inference(base_model):
    """The stacked bank and the per-composition ids are cached across calls: an in-place edit of one adapter must
    still be seen, and ids built under inference mode must not reach a later backward."""
    torch.manual_seed(3)
    model = peft.get_peft_model(copy.deepcopy(base_model), _lora(2, 4), adapter_name="x")
    model.add_adapter("y", _lora(4, 8))
    model.eval()
    tokens, batch = _tokens(2, 4), ["x", "y"]
    accelerate(model)
    with torch.inference_mode():
        model(tokens, adapter_names=batch)
    w = model.base_model.model.model.layers[1].mlp.down_proj.lora_B["y"].weight
    with torch.no_grad():
        w.mul_(3)
    with torch.inference_mode():
        got = model(tokens, adapter_names=batch).logits
    deaccelerate(model)
    with torch.inference_mode():
        want = model(tokens, adapter_names=batch).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    accelerate(model)
    with torch.inference_mode():
        model(tokens, adapter_names=batch)
    w.requires_grad_(True)
    model(tokens, adapter_names=batch).logits.square().mean().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_gpt2_conv1d_fan_in_fan_out(tmp_path, counted):
    """GPT-2's Conv1D layers (PEFT: fan_in_fan_out=True): load, wrap, save round trip and accelerate."""
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128,
                                                                n_positions=32)).eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                          init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name="g0")
    pm.add_adapter("g1", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                         init_lora_weights=False))
    pm.eval()
    pm.save_pretrained(tmp_path / "saved", selected_adapters=["g0"])
    tokens = _tokens(2, 6)
    batch = ["g0", "g1"]
    with torch.no_grad():
        want = pm(tokens, adapter_names=batch).logits
        banks = load_adapters(pm)
        wrapped = wrap(copy.deepcopy(base), banks)
        with adapter_ids(wrapped, batch):
            torch.testing.assert_close(wrapped(tokens).logits, want, atol=1e-5, rtol=1e-5)
        saved = tmp_path / "saved"
        from_dir = load_adapters(saved / "g0" if (saved / "g0").is_dir() else saved)  # PEFT nests named adapters
        assert set(from_dir) == {k for k, b in banks.items() if b.ranks[0] > 0}
        out = save_adapter(wrapped, "g0", tmp_path / "resaved")
        assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
        torch.testing.assert_close(reloaded(tokens[:1]).logits, want[:1], atol=1e-5, rtol=1e-5)
        accelerate(pm)
        assert (pm(tokens, adapter_names=batch).logits - want).abs().max().item() <= 1e-5
        assert counted
