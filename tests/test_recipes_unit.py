"""Unit tests of the recipes' building blocks on small hand-checkable cases."""

import math

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from recipes_support import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)

from lora_ops.recipes import adapters as ad  # noqa: E402
from lora_ops.recipes import data, ilora, seeded_lora, train  # noqa: E402
from lora_ops.recipes.model import TinyConfig, build_tiny_llama  # noqa: E402


def _adapter(delta_by_path, rank=None):
    """Factors with scale 1 whose products are the given dense deltas (exact for rank >= true rank)."""
    return ad.adapter_from_dense({p: torch.tensor(d, dtype=torch.float32) for p, d in delta_by_path.items()},
                                 rank or 2)


# ---------------------------------------------------------------------------------------------------------- merging

def test_energy_truncate_keeps_leading_directions_covering_the_fraction():
    d = torch.diag(torch.tensor([3.0, 2.0, 1.0]))  # energies 9, 4, 1 of 14: cumulative 0.64, 0.93, 1
    cut, k = ilora.energy_truncate(d, 0.8)
    assert k == 2
    torch.testing.assert_close(cut, torch.diag(torch.tensor([3.0, 2.0, 0.0])))
    assert ilora.energy_truncate(d, 0.5)[1] == 1
    assert ilora.energy_truncate(d, 9 / 14)[1] == 1  # exactly reaching the fraction is enough
    assert ilora.energy_truncate(d, 1.0)[1] == 3
    assert ilora.energy_truncate(torch.zeros(2, 2), 0.8)[1] == 0
    with pytest.raises(ValueError, match="energy"):
        ilora.energy_truncate(d, 0.0)


def test_max_by_magnitude_elementwise_and_ties_keep_the_running_merge():
    m = torch.tensor([[1.0, -3.0], [2.0, 0.0]])
    d = torch.tensor([[-2.0, 1.0], [-2.0, 5.0]])
    torch.testing.assert_close(ilora.max_by_magnitude(m, d), torch.tensor([[-2.0, -3.0], [2.0, 5.0]]))


def test_iterative_max_truncates_each_arrival_folds_by_magnitude_and_stores_rank_r():
    p = "layer"
    first = _adapter({p: [[1.0, 0.0], [0.0, 0.0]]})
    second = _adapter({p: [[-2.0, 0.0], [0.0, 0.5]]})  # 0.5 carries 0.25/4.25 < 20 % of the energy: dropped
    hist = ilora.iterative_max([first, second], rank=2, energy=0.8)
    torch.testing.assert_close(ad.dense(hist[0])[p], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(ad.dense(hist[1])[p], torch.tensor([[-2.0, 0.0], [0.0, 0.0]]))
    # rank 1 storage: the fold diag(1, 3) is stored by its leading direction only
    third = _adapter({p: [[0.0, 0.0], [0.0, 3.0]]})
    hist = ilora.iterative_max([first, third], rank=1, energy=0.8)
    torch.testing.assert_close(ad.dense(hist[1])[p], torch.tensor([[0.0, 0.0], [0.0, 3.0]]))
    assert hist[1][p].a.shape == (1, 2) and hist[1][p].b.shape == (2, 1)


def test_average_merge_is_the_average_of_products():
    p = "layer"
    a = _adapter({p: [[1.0, 2.0], [0.0, 0.0]]})
    b = _adapter({p: [[3.0, 0.0], [0.0, -4.0]]})
    torch.testing.assert_close(ad.dense(ilora.average_merge([a, b], rank=2))[p],
                               torch.tensor([[2.0, 1.0], [0.0, -2.0]]))


def test_adapter_from_dense_and_peft_round_trip():
    torch.manual_seed(0)
    f = ad.Factors(torch.randn(3, 5), torch.randn(4, 3), 2.0)
    back = ad.factors_from_peft(ad.peft_from_factors({"m.q_proj": f}, alpha=6.0), scale=2.0)["m.q_proj"]
    torch.testing.assert_close(back.delta(), f.delta())
    exact = ad.adapter_from_dense({"x": f.delta()}, rank=3)["x"]
    torch.testing.assert_close(exact.delta(), f.delta(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- routing loss

def test_kl_term_hand_case():
    base = torch.zeros(1, 1, 2)  # p_base = (1/2, 1/2)
    lora = torch.tensor([[[math.log(3.0), 0.0]]])  # p_lora = (3/4, 1/4)
    kl = ilora.kl_base_lora(base, lora, torch.ones(1, 1))
    assert kl.item() == pytest.approx(0.5 * math.log(4.0 / 3.0), rel=1e-6)
    assert ilora.kl_base_lora(lora, lora, torch.ones(1, 1)).item() == pytest.approx(0.0, abs=1e-7)
    assert ilora.kl_base_lora(base, lora, torch.zeros(1, 1)).item() == 0.0


@pytest.fixture(scope="module")
def tiny():
    tok = data.CharTokenizer.default()
    model = build_tiny_llama(tok.vocab_size, TinyConfig(16, 1, 2, 32, 32), seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model


def _rows(tok):
    ds = data.synthetic(seed=1, n_train=4, n_valid=1, n_test=1, n_general=4, tasks=["rev"])
    task = [train.encode_example(tok, e, 32) for e in ds.train]
    gen = [train.encode_text(tok, t, 32) for t in ds.general]
    return {"task": task, "general": gen}


def test_routing_loss_terms_match_hand_computation(tiny):
    tok, base = tiny
    lcfg = train.LoRAConfig(r=2, alpha=4.0, targets=("v_proj",))
    model = train.add_lora(base, lcfg, seed=0)
    torch.manual_seed(1)
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # PEFT starts B at zero; make the branch active
    batch = _rows(tok)
    ce_only, stats = ilora.routing_loss(model, batch, batch, eps=(1.0, 0.0, 0.0))
    ids, mask, att = train.collate(batch["task"], 0)
    expect_ce = train.token_ce(model(input_ids=ids, attention_mask=att).logits, ids, mask).sum() / mask[:, 1:].sum()
    torch.testing.assert_close(ce_only, expect_ce)

    _, stats = ilora.routing_loss(model, batch, batch, eps=(1.0, 1.0, 1.0))
    g_ids, _, g_att = train.collate(batch["general"], 0)
    inputs = []
    hook = layer.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    with torch.no_grad():
        lora_logits = model(input_ids=g_ids, attention_mask=g_att).logits
        with model.disable_adapter():
            base_logits = model(input_ids=g_ids, attention_mask=g_att).logits
    hook.remove()
    h = inputs[0]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    branch = 2.0 * (h @ a.T) @ b.T  # scale = alpha / r = 2
    tokens = g_att.sum()
    expect_act = ((branch ** 2).sum(-1) * g_att).sum() / tokens
    expect_kl = ilora.kl_base_lora(base_logits, lora_logits, g_att.float()) / tokens
    torch.testing.assert_close(stats["act"], expect_act, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats["kl"], expect_kl, rtol=1e-5, atol=1e-7)
    assert stats["kl"] > 0 and stats["act"] > 0


def test_routing_terms_vanish_for_a_fresh_adapter(tiny):
    tok, base = tiny
    model = train.add_lora(base, train.LoRAConfig(r=2, alpha=4.0), seed=0)  # B = 0: the adapter does nothing yet
    batch = _rows(tok)
    _, stats = ilora.routing_loss(model, batch, batch, eps=(1.0, 1.0, 1.0))
    assert stats["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert stats["act"].item() == 0.0


# ------------------------------------------------------------------------------------------------- combinations

def _experts(n=3, r=2, d_in=5, d_out=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [ad.Factors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), 0.5 + i)
            for i in range(n)]


@pytest.mark.parametrize("backend", ["lora_ops", "loop"])
def test_mean_of_outputs_is_the_concatenated_rank_nr_lora(backend):
    torch.manual_seed(0)
    base = torch.nn.Linear(5, 4)
    experts = _experts()
    x = torch.randn(7, 5)
    layer = ad.MixedLoRALinear(base, experts, "mean", backend=backend)
    a_cat = torch.cat([f.a for f in experts])  # [N r, d_in]
    b_cat = torch.cat([f.b * f.scale for f in experts], 1) / len(experts)  # [d_out, N r]
    torch.testing.assert_close(layer(x), base(x) + x @ a_cat.T @ b_cat.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["mean", "weighted", "similarity", "maxpool"])
def test_lora_ops_and_loop_backends_agree(mode):
    torch.manual_seed(0)
    base = torch.nn.Linear(5, 4)
    experts = _experts()
    x = torch.randn(2, 6, 5)
    kw = {"weights": [1.0, 2.0, 1.0]} if mode == "weighted" else {}
    y1 = ad.MixedLoRALinear(base, experts, mode, backend="lora_ops", **kw)(x)
    y2 = ad.MixedLoRALinear(base, experts, mode, backend="loop", **kw)(x)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)


def test_weighted_and_maxpool_hand_case():
    base = torch.nn.Linear(1, 2, bias=False)
    torch.nn.init.zeros_(base.weight)
    e1 = ad.Factors(torch.tensor([[1.0]]), torch.tensor([[1.0], [-4.0]]), 1.0)  # x -> (x, -4x)
    e2 = ad.Factors(torch.tensor([[1.0]]), torch.tensor([[-3.0], [2.0]]), 1.0)  # x -> (-3x, 2x)
    x = torch.tensor([[1.0]])
    torch.testing.assert_close(ad.MixedLoRALinear(base, [e1, e2], "maxpool")(x), torch.tensor([[-3.0, -4.0]]))
    w = ad.MixedLoRALinear(base, [e1, e2], "weighted", weights=[3.0, 1.0])(x)  # weights normalised to 3/4, 1/4
    torch.testing.assert_close(w, torch.tensor([[0.75 - 0.75, -3.0 + 0.5]]))
    with pytest.raises(ValueError, match="weights"):
        ad.MixedLoRALinear(base, [e1, e2], "weighted", weights=[1.0])
    with pytest.raises(ValueError, match="mode"):
        ad.MixedLoRALinear(base, [e1, e2], "median")


def test_similarity_weights_follow_the_prototype():
    base = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(base.weight)
    e1 = ad.Factors(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0]]), 1.0)  # reads x[0]; prototype e_0
    e2 = ad.Factors(torch.tensor([[0.0, 1.0]]), torch.tensor([[10.0]]), 1.0)  # reads x[1]; prototype e_1
    layer = ad.MixedLoRALinear(base, [e1, e2], "similarity", temperature=0.01)
    torch.testing.assert_close(layer(torch.tensor([[2.0, 0.0]])), torch.tensor([[2.0]]))  # all weight on e1
    torch.testing.assert_close(layer(torch.tensor([[0.0, 1.0]])), torch.tensor([[10.0]]))


# ------------------------------------------------------------------------------------------------------ data etc.

def test_synthetic_is_seeded_and_has_held_out_tasks(tmp_path):
    a = data.synthetic(seed=3, n_train=5, n_valid=2, n_test=3, n_general=10)
    b = data.synthetic(seed=3, n_train=5, n_valid=2, n_test=3, n_general=10)
    assert a == b
    assert a != data.synthetic(seed=4, n_train=5, n_valid=2, n_test=3, n_general=10)
    assert set(a.held_out_tasks) == set(data.HELD_OUT) and not set(a.held_out_tasks) & set(a.train_tasks)
    data.save_dir(a, tmp_path)
    assert data.load_dir(tmp_path) == a
    (tmp_path / "valid.jsonl").write_text('{"task": "x", "prompt": 1}\n')
    with pytest.raises(ValueError, match="row 1"):
        data.load_dir(tmp_path)


def test_tasks_compute_what_they_say():
    import random

    rng = random.Random(0)
    for name, (_, gen) in {**data.TASKS, **data.HELD_OUT}.items():
        prompt, answer = gen(rng)
        arg = prompt.split(":", 1)[1]
        expected = {"rev": lambda: arg[::-1], "sort": lambda: "".join(sorted(arg)), "up": lambda: arg.upper(),
                    "revup": lambda: arg[::-1].upper(), "max": lambda: max(arg), "min": lambda: min(arg),
                    "inc": lambda: "".join(str((int(c) + 1) % 10) for c in arg)}.get(name)
        if expected:
            assert answer == expected(), name
    assert data.TASKS["get"][1](random.Random(1))[1].isdigit()


def test_char_tokenizer_round_trip(tmp_path):
    tok = data.CharTokenizer.default()
    assert tok.decode(tok.encode("rev:abc=cba")) == "rev:abc=cba"
    assert tok.encode("é") == [tok.UNK]
    tok.save(tmp_path / "t.json")
    assert data.CharTokenizer.load(tmp_path / "t.json").chars == tok.chars


def test_seed_subsets():
    pool = data.synthetic(seed=0, n_train=50, tasks=["rev", "up", "inc"]).train
    dom = lambda e: e.domain  # noqa: E731
    domains = sorted({e.domain for e in pool})
    for kind in seeded_lora.SEED_KINDS:
        sub = seeded_lora.seed_subset(pool, kind, 0.1, domains, 0, dom)
        assert len(sub) == 15
        if kind == "domain":
            assert {e.domain for e in sub} == {domains[0]}
        if kind == "balanced":
            assert sorted(sum(e.domain == d for e in sub) for d in domains) == [5, 5, 5]
    assert seeded_lora.seed_subset(pool, "random", 0.1, domains, 0, dom) == \
        seeded_lora.seed_subset(pool, "random", 0.1, domains, 0, dom)


def test_lr_schedule():
    cfg = train.TrainConfig(steps=110, warmup=10, schedule="cosine")
    assert train.lr_factor(0, cfg) == pytest.approx(0.1)
    assert train.lr_factor(10, cfg) == pytest.approx(1.0)
    assert train.lr_factor(60, cfg) == pytest.approx(0.5)
    assert train.lr_factor(60, train.TrainConfig(steps=110, warmup=10, schedule="linear")) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule"):
        train.lr_factor(20, train.TrainConfig(schedule="step"))


class _Bigram(torch.nn.Module):
    """Logits depend only on the current token: greedy chains are easy to reason about."""

    def __init__(self, vocab, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        table = torch.randn(vocab, vocab, generator=g)
        table[:, [data.CharTokenizer.PAD, data.CharTokenizer.UNK]] = -1e9
        table[torch.randperm(vocab, generator=g)[: vocab // 3], data.CharTokenizer.EOS] = 1e3  # chains end
        self.table = table

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids])


def test_teacher_forced_exact_match_equals_greedy_generation():
    from lora_ops.recipes import eval as ev

    tok = data.CharTokenizer.default()
    ds = data.synthetic(seed=2, n_train=1, n_valid=1, n_test=20, n_general=1, tasks=["rev", "inc"])
    model = _Bigram(tok.vocab_size, 0)
    preds = ev.greedy(model, tok, [e.prompt for e in ds.test], max_new=12, max_len=48)
    ended = [(e, p) for e, p in zip(ds.test, preds) if len(p) < 11]  # greedy stopped at end-of-text
    assert len(ended) >= 5
    hits = [data.Example("t", e.prompt, p) for e, p in ended]
    assert ev.evaluate(model, tok, hits, max_len=48)["t"]["acc"] == 1.0
    misses = [data.Example("t", e.prompt, p + "a") for e, p in ended] + \
             [data.Example("t", e.prompt, p[:-1]) for e, p in ended if p]
    assert ev.evaluate(model, tok, misses, max_len=48)["t"]["acc"] == 0.0


def test_saved_adapters_load_in_peft_with_the_same_outputs(tiny, tmp_path):
    import copy

    from peft import PeftModel

    tok, base = tiny
    ds = data.synthetic(seed=0, n_train=8, n_valid=1, n_test=1, n_general=1, tasks=["rev"])
    cfg = train.TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup=0)
    state, _ = train.train_lora(base, tok, ds.train, cfg, train.LoRAConfig(r=2, alpha=4.0), max_len=32,
                                save_to=tmp_path / "a", progress=False)
    ids = torch.tensor([tok.encode("rev:abcd=dcba")])
    ours = ad.combine(base, [ad.factors_from_peft(state, 2.0)])
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, peft_model(input_ids=ids).logits)
    # a merged adapter written with another alpha folds the scale into B and still loads exactly
    from lora_ops._io import write_peft_adapter_dir

    merged = ilora.average_merge([ad.factors_from_peft(state, 2.0)], rank=3)
    write_peft_adapter_dir(tmp_path / "m", ad.peft_from_factors(merged, alpha=6.0),
                           {"peft_type": "LORA", "r": 3, "lora_alpha": 6.0, "task_type": "CAUSAL_LM",
                            "target_modules": list(train.LoRAConfig().targets), "bias": "none"})
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "m")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_ilora_general_evaluation_set_is_held_back():
    corpus = data.synthetic(seed=0, n_train=1, n_valid=1, n_test=1, n_general=400).general
    assert len(set(corpus)) < len(corpus)  # the synthetic corpus repeats lines
    tuning, held = ilora.held_back_general(corpus, 64, synthetic_seed=7)
    assert tuning == corpus and len(held) == 64 == len(set(held)) and not set(held) & set(corpus)
    tuning, held = ilora.held_back_general(corpus, 64, synthetic_seed=None)  # user data: the last distinct lines
    assert len(held) == 64 == len(set(held)) and not set(held) & set(tuning)
