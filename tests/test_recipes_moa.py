"""The Mixture-of-LoRAs recipe: its loss and inference modes on hand-checkable models, end to end, determinism."""

import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from recipes_support import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)

from lora_ops import cli, routing  # noqa: E402
from lora_ops.recipes import adapters as ad  # noqa: E402
from lora_ops.recipes import moa, train  # noqa: E402
from lora_ops.recipes.common import BaseSpec  # noqa: E402
from lora_ops.recipes.data import CharTokenizer, Example  # noqa: E402
from lora_ops.recipes.model import TinyConfig, build_tiny_llama  # noqa: E402

TINY_BASE = BaseSpec(tiny=TinyConfig(16, 1, 2, 32, 32), pretrain_steps=8, pretrain_batch=8, n_train=16, n_valid=2,
                     n_test=4, n_general=64, max_len=32)
DOMAINS = ["map", "num", "seq"]


def tiny_moa(**kw):
    cfg = dict(base=TINY_BASE, tasks=("rev", "up", "inc"), r=2, alpha=4.0, expert_steps=3, stage2_steps=3,
               batch_size=4, classifier_steps=3, timing_reps=1, timing_rows=8,
               wide_model=TinyConfig(32, 1, 2, 64, 32))
    cfg.update(kw)
    return moa.MoAConfig(**cfg)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("base-cache")


@pytest.fixture(scope="module")
def small():
    """A 2-layer tiny Llama, three random experts on every Linear, a few encoded rows with domain ids."""
    tok = CharTokenizer.default()
    base = build_tiny_llama(tok.vocab_size, TinyConfig(16, 2, 2, 32, 32), seed=0)
    for p in base.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    experts = []
    for _ in DOMAINS:
        experts.append({name: ad.Factors(0.3 * torch.randn(2, m.in_features, generator=g),
                                         0.3 * torch.randn(m.out_features, 2, generator=g), 2.0)
                        for name, m in base.named_modules() if name.endswith(("q_proj", "v_proj", "down_proj"))})
    rows = []
    for i, (task, prompt, answer) in enumerate([("up", "up:abc", "ABC"), ("inc", "inc:12", "23"),
                                                ("rev", "rev:abcd", "dcba"), ("up", "up:h", "H")]):
        row = train.encode_example(tok, Example(task, prompt, answer), 32)
        row["domain_id"] = DOMAINS.index({"up": "map", "inc": "num", "rev": "seq"}[task])
        rows.append(row)
    return base, experts, rows


def _model(small, **kw):
    base, experts, _ = small
    return moa.build_moa_model(base, experts, DOMAINS, r=2, alpha=4.0, **kw)


def _batch(rows):
    ids, mask, att = train.collate(rows, 0)
    return ids, mask, att


def test_gold_routing_runs_each_sequence_through_its_domain_expert(small):
    base, experts, rows = small
    model = _model(small)
    ids, mask, att = _batch(rows)
    got = moa.moa_logits(model, rows, ids, mask, att, torch.tensor([r["domain_id"] for r in rows]))
    for i, r in enumerate(rows):
        alone = ad.combine(base, [experts[r["domain_id"]]])
        want = alone(input_ids=ids[i:i + 1], attention_mask=att[i:i + 1]).logits[0]
        n = int(att[i].sum())
        torch.testing.assert_close(got[i, :n], want[:n], rtol=1e-5, atol=1e-5)


def _steer(model, per_layer_choice):
    """Routers that ignore their input: router l always ranks per_layer_choice[l] first."""
    for router, c in zip(routing.moa_routers(model), per_layer_choice):
        torch.nn.init.zeros_(router.proj.weight)
        with torch.no_grad():
            router.proj.bias.copy_(torch.nn.functional.one_hot(torch.tensor(c), len(DOMAINS)).float() * 3)


def test_inference_modes_follow_the_routers_as_documented(small):
    _, _, rows = small
    model = _model(small)
    routers = routing.moa_routers(model)
    assert len(routers) == 6  # 3 targets x 2 layers
    choice = [0, 0, 0, 2, 2, 1]  # vote: expert 0 (3 votes); last router: expert 1; per layer: each its own
    _steer(model, choice)
    ids, mask, att = _batch(rows)
    b = len(rows)

    def forced(i):
        return moa.moa_logits(model, rows, ids, mask, att, torch.full((b,), i))

    torch.testing.assert_close(moa.moa_logits(model, rows, ids, mask, att, "vote"), forced(0))
    torch.testing.assert_close(moa.moa_logits(model, rows, ids, mask, att, "last"), forced(1))
    per_layer = moa.moa_logits(model, rows, ids, mask, att, "per-layer")
    assert all((per_layer - forced(i)).abs().max() > 1e-4 for i in range(3))
    # per-layer routing equals setting each layer's MultiLoRALinear to its router's choice explicitly
    for router, layer, c in zip(routers, [m for m in model.modules() if hasattr(m, "bank")], choice):
        layer.router = None
        layer.set_adapter_ids(torch.full((b,), c))
    torch.testing.assert_close(model(input_ids=ids, attention_mask=att).logits, per_layer)


def test_routers_only_look_at_the_prompt(small):
    _, _, rows = small
    model = _model(small)
    ids, mask, att = _batch(rows)
    with routing.moa_state(model, pool_mask=att.bool() & ~mask) as routers:
        model(input_ids=ids, attention_mask=att)
        first = [r.last_logits.clone() for r in routers[:1]]
    changed = ids.clone()
    changed[mask] = 5  # change every answer token: the first router (no earlier LoRA) must not notice
    with routing.moa_state(model, pool_mask=att.bool() & ~mask) as routers:
        model(input_ids=changed, attention_mask=att)
        torch.testing.assert_close(routers[0].last_logits, first[0])


def test_loss_terms_and_which_parameters_they_train(small):
    _, _, rows = small
    batch = {"task": rows}
    ids, mask, att = _batch(rows)
    model = _model(small, trainable=True)
    loss0, stats0 = moa.moa_loss(model, batch, batch, eta=0.0, routing_mode="gold")
    logits = moa.moa_logits(model, rows, ids, mask, att, torch.tensor([r["domain_id"] for r in rows]))
    tokens = sum(sum(r["loss"][1:]) for r in rows)
    torch.testing.assert_close(loss0, train.token_ce(logits, ids, mask).sum() / tokens)
    assert set(stats0) == {"lm"}
    loss1, stats1 = moa.moa_loss(model, batch, batch, eta=0.5, routing_mode="gold")
    labels = torch.tensor([r["domain_id"] for r in rows])
    cls = routing.moa_router_loss(routing.moa_routers(model), labels)
    torch.testing.assert_close(stats1["cls"], cls)
    torch.testing.assert_close(loss1, loss0 + 0.5 * cls)
    # gold routing: the LM loss trains the LoRAs, never the routers
    loss0.backward()
    routers = routing.moa_routers(model)
    assert all(r.proj.weight.grad is None for r in routers)
    assert any(m.bank.lora_b.grad.abs().sum() > 0 for m in model.modules() if hasattr(m, "bank"))
    # soft routing (η = 0): the LM loss reaches the routers through the mixture weights
    soft = _model(small, mode="soft")
    loss, _ = moa.moa_loss(soft, batch, batch, eta=0.0, routing_mode="soft")
    loss.backward()
    assert all(r.proj.weight.grad is not None and r.proj.weight.grad.abs().sum() > 0
               for r in routing.moa_routers(soft))


def test_router_accuracy_counts_layers_last_and_vote(small):
    _, _, rows = small
    model = _model(small)
    _steer(model, [0, 0, 0, 2, 2, 1])  # every row: layers say 0,0,0,2,2,1; gold domains are 0, 1, 2, 0
    exs = [Example(r["task"], "", "") for r in rows]
    acc = moa.router_accuracy(model, None, lambda _: rows, exs, 32)
    assert acc["per_layer"] == pytest.approx([0.5, 0.5, 0.5, 0.25, 0.25, 0.25])
    assert acc["vote"] == 0.5 and acc["last"] == 0.25
    assert acc["layers"][0] == "model.layers.0.self_attn.q_proj"


def test_moa_runs_end_to_end_and_is_deterministic(tmp_path, cache):
    p1 = moa.run(tiny_moa(), tmp_path / "one", cache_dir=cache, progress=False)
    p2 = moa.run(tiny_moa(), tmp_path / "two", cache_dir=cache, progress=False)
    for key in ("results", "router_accuracy", "classifier_accuracy", "per_domain"):
        assert json.dumps(p1[key], sort_keys=True) == json.dumps(p2[key], sort_keys=True), key
    names = set(p1["results"])
    for base_name in ("base", "single LoRA (mixed data)", "stage-1 experts, oracle routing",
                      "stage-1 experts, classifier selection", "MoE, no router loss (η = 0, soft)"):
        assert base_name in names
    for variant in ("MoA", "MoA, frozen LoRAs", "MoA, LoRAs from scratch", "MoA, no router loss (η = 0)"):
        for mode in moa.INFERENCE_MODES + ("oracle",):
            assert f"{variant}, {mode}" in names
    cfg = tiny_moa()
    steps = {n: p1["train_final"][n]["step"] + 1 for n in moa.VARIANTS}
    assert steps["MoA, LoRAs from scratch"] == cfg.stage2_steps + cfg.expert_steps * len(DOMAINS)  # equal budgets
    assert steps["MoA"] == steps["MoA, no router loss (η = 0)"] == cfg.stage2_steps
    assert "cls" not in p1["train_final"]["MoA, no router loss (η = 0)"]  # the loss is the only difference
    assert p1["domains"] == DOMAINS
    ra = p1["router_accuracy"]["MoA"]
    assert len(ra["per_layer"]) == len(ra["layers"]) == 7  # every Linear of the one block
    timing = p1["timing"]["methods"]
    assert timing["lora_ops, gold ids (1 pass)"]["max_abs_diff_vs_peft"] < 1e-4  # same outputs as PEFT
    assert timing["PEFT, one sub-batch per domain"]["max_abs_diff_vs_peft"] < 1e-4
    assert p1["timing"]["wide"]["methods"]["lora_ops, gold ids (1 pass)"]["max_abs_diff_vs_peft"] < 1e-4
    out = tmp_path / "one"
    for f in ("results.json", "results.md", "domains.png", "router_accuracy.png", "throughput.png"):
        assert (out / f).is_file(), f
    assert (out / "adapters" / "stage1" / "seq" / "adapter_model.safetensors").is_file()
    md = (out / "results.md").read_text()
    assert "Router accuracy" in md and "classifier" in md and "tokens/s" in md


def test_moa_bad_configuration(tmp_path, cache):
    with pytest.raises(ValueError, match="variants"):
        moa.run(tiny_moa(variants=("MoA", "nope")), tmp_path, cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match="2 domains"):
        moa.run(tiny_moa(tasks=("rev",)), tmp_path, cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match="init"):
        moa.build_moa_model(torch.nn.Linear(2, 2), [{}], ["a"], r=1, alpha=1.0, init="zeros")


def test_cli_reproduce_moa(tmp_path, cache, monkeypatch, capsys):
    monkeypatch.setattr(moa, "quick_config", lambda: tiny_moa(variants=("MoA",)))
    rc = cli.main(["reproduce", "moa", "--quick", "--out", str(tmp_path / "o"), "--cache", str(cache),
                   "--no-progress"])
    assert rc == 0
    assert "Mixture-of-LoRAs (MoA) reproduction" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "results.json").read_text())["recipe"] == "moa"
