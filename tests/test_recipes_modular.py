"""The Modular LLMs recipe (library of LoRAs, MBC, Arrow, Mu): routing against plain-torch references, its pieces,
the recipe end to end on a tiny configuration, determinism and the ``reproduce modular`` CLI."""

import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("sklearn")

from recipes_support import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)

from lora_ops import cli, reference  # noqa: E402
from lora_ops.recipes import adapters as ad  # noqa: E402
from lora_ops.recipes import modular, train  # noqa: E402
from lora_ops.recipes.common import BaseSpec  # noqa: E402
from lora_ops.recipes.model import TinyConfig, build_tiny_llama  # noqa: E402

TINY_BASE = BaseSpec(tiny=TinyConfig(16, 1, 2, 32, 32), pretrain_steps=8, pretrain_batch=8, n_train=16, n_valid=2,
                     n_test=4, n_general=64, max_len=32)


def tiny_config(**kw):
    return modular.ModularConfig(**{"base": TINY_BASE, "r": 2, "alpha": 4.0, "steps": 2, "batch_size": 4,
                                    "top_k_sweep": (1, 8), **kw})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("base-cache")


# ------------------------------------------------------------------------------------------- routing vs references

def _library(model, n, r=2, seed=0):
    """n random adapters on every Linear of the Llama blocks (non-zero B, distinct scales)."""
    g = torch.Generator().manual_seed(seed)
    paths = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in train.LoRAConfig().targets]
    lib = []
    for i in range(n):
        adapter = {}
        for p in paths:
            lin = model.get_submodule(p)
            adapter[p] = ad.Factors(torch.randn(r, lin.in_features, generator=g) * 0.3,
                                    torch.randn(lin.out_features, r, generator=g) * 0.3, 0.5 + 0.25 * i)
        lib.append(adapter)
    return lib


def _reference_logits(base, ids, delta_fns):
    """Logits of ``base`` with ``delta_fns[path](x)`` added to each listed Linear's output (plain torch hooks)."""
    handles = [base.get_submodule(p).register_forward_hook(lambda _m, inp, out, f=f: out + f(inp[0]))
               for p, f in delta_fns.items()]
    try:
        with torch.no_grad():
            return base(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def tiny_llama():
    return build_tiny_llama(40, TinyConfig(16, 2, 2, 32, 32), seed=0)


@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (2, 1.0), (3, 0.5), (4, 2.0)])
def test_arrow_in_the_recipe_equals_the_all_experts_reference(tiny_llama, top_k, temperature):
    lib = _library(tiny_llama, 4)
    names = [f"e{i}" for i in range(4)]
    model = modular.arrow_model(tiny_llama, lib, names, top_k, temperature)
    ids = torch.randint(3, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(input_ids=ids).logits

    def arrow_ref(path):
        a = torch.stack([x[path].a for x in lib])
        b = torch.stack([x[path].b for x in lib])
        s = torch.tensor([x[path].scale for x in lib])
        protos = reference.arrow_prototypes(a, b)  # float64, dense SVD of each B A

        def delta(x):  # PEFT's way: every expert for every token, softmax over the top-k logits only
            flat = x.reshape(-1, x.shape[-1])
            return reference.arrow_dense(flat, a, b, s, protos, top_k, temperature=temperature).reshape(
                *x.shape[:-1], -1)
        return delta

    want = _reference_logits(tiny_llama, ids, {p: arrow_ref(p) for p in lib[0]})
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # and the routing really differs from using every expert (top-k < N must matter)
    if top_k < 4:
        dense = modular.arrow_model(tiny_llama, lib, names, 4, temperature)
        with torch.no_grad():
            assert (dense(input_ids=ids).logits - got).abs().max() > 1e-3


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_arrow_factor_mixing_mixes_a_and_b_per_token(tiny_llama, top_k):
    lib = _library(tiny_llama, 3)
    names = ["a", "b", "c"]
    model = modular.arrow_factor_model(tiny_llama, lib, names, top_k, 0.7)
    ids = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(input_ids=ids).logits

    def factor_ref(path):
        a = torch.stack([x[path].a for x in lib]).double()
        b = torch.stack([x[path].b for x in lib]).double()
        s = torch.tensor([x[path].scale for x in lib], dtype=torch.float64)
        protos = reference.arrow_prototypes(a, b)

        def delta(x):  # token by token: A_t = Σ w_i A_i, B_t = Σ w_i s_i B_i over the chosen i
            flat = x.reshape(-1, x.shape[-1]).double()
            out = []
            for t in range(flat.shape[0]):
                logits = (flat[t] @ protos.T).abs()
                top = logits.topk(top_k).indices
                w = torch.softmax(logits[top] / 0.7, 0)
                a_t = sum(w[j] * a[i] for j, i in enumerate(top.tolist()))
                b_t = sum(w[j] * s[i] * b[i] for j, i in enumerate(top.tolist()))
                out.append(b_t @ (a_t @ flat[t]))
            return torch.stack(out).reshape(*x.shape[:-1], -1).to(x.dtype)
        return delta

    torch.testing.assert_close(got, _reference_logits(tiny_llama, ids, {p: factor_ref(p) for p in lib[0]}),
                               atol=1e-4, rtol=1e-4)
    outputs = modular.arrow_model(tiny_llama, lib, names, top_k, 0.7)
    with torch.no_grad():
        diff = (outputs(input_ids=ids).logits - got).abs().max()
    assert diff < 1e-5 if top_k == 1 else diff > 1e-4  # the same for k = 1, cross terms B_j A_i otherwise


def test_arrow_layers_route_through_multilora_and_arrow_router(tiny_llama):
    from lora_ops.nn import MultiLoRALinear
    from lora_ops.routing import ArrowRouter

    lib = _library(tiny_llama, 3)
    model = modular.arrow_model(tiny_llama, lib, ["a", "b", "c"], 2)
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    assert len(layers) == len(lib[0]) and all(isinstance(m.router, ArrowRouter) for m in layers)
    assert all(m.router.top_k == 2 and m.router.num_experts == 3 for m in layers)
    # the base model is untouched
    assert not [m for m in tiny_llama.modules() if isinstance(m, MultiLoRALinear)]


def test_mu_is_the_average_of_factors_not_of_products(tiny_llama):
    lib = _library(tiny_llama, 3)
    for x in lib:  # Mu with a common scale keeps it (mu_factors)
        for f in x.values():
            f.scale = 2.0
    model = modular.mu_model(tiny_llama, lib)
    ids = torch.randint(3, 40, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(input_ids=ids).logits

    def mu_ref(path):
        a = sum(x[path].a for x in lib) / len(lib)
        b = sum(x[path].b for x in lib) / len(lib)
        return lambda x: 2.0 * (x @ a.T) @ b.T

    torch.testing.assert_close(got, _reference_logits(tiny_llama, ids, {p: mu_ref(p) for p in lib[0]}),
                               atol=1e-5, rtol=1e-5)
    products = ad.combine(tiny_llama, lib, "mean")  # the ablation: mean of B_i A_i, a different adapter
    with torch.no_grad():
        assert (products(input_ids=ids).logits - got).abs().max() > 1e-3


def test_mu_with_different_scales_folds_each_scale_into_b():
    p = "layer"
    lib = [{p: ad.Factors(torch.eye(2), torch.eye(2), 1.0)}, {p: ad.Factors(torch.eye(2), 3 * torch.eye(2), 2.0)}]
    mu = modular.mu_adapter(lib)[p]
    torch.testing.assert_close(mu.delta(), torch.eye(2) * (1 * 1 + 3 * 2) / 2)  # mean A = I, mean of s_i B_i


def test_routing_profile_shares_sum_to_one_and_follow_the_prototypes(tiny_llama):
    from lora_ops.recipes.data import CharTokenizer, Example

    tok = CharTokenizer.default()
    model = build_tiny_llama(tok.vocab_size, TinyConfig(16, 1, 2, 32, 32), seed=0)
    lib = _library(model, 3)
    exs = [Example("t", "rev:abc", "cba"), Example("t", "rev:ab", "ba"), Example("u", "up:a", "A")]
    routed = modular.arrow_model(model, lib, ["a", "b", "c"], 1)
    prof = modular.routing_profile(routed, tok, exs, 3, max_len=32)
    assert set(prof) == {"t", "u"}
    for shares in prof.values():
        assert len(shares) == 3 and min(shares) >= 0 and abs(sum(shares) - 1) < 1e-9
    # k = N gives every expert some weight on every token
    full = modular.routing_profile(modular.arrow_model(model, lib, ["a", "b", "c"], 3), tok, exs, 3, max_len=32)
    assert all(min(s) > 0 for s in full.values())
    with pytest.raises(ValueError, match="ArrowRouter"):
        modular.routing_profile(model, tok, exs, 3)


# ------------------------------------------------------------------------------------------------------- pieces

def test_oracle_picks_the_best_adapter_per_task_with_ties_broken_by_loss():
    single = {"x": {"t": {"acc": 0.5, "loss": 1.0, "n": 4}, "u": {"acc": 0.25, "loss": 2.0, "n": 4}},
              "y": {"t": {"acc": 0.5, "loss": 0.5, "n": 4}, "u": {"acc": 0.0, "loss": 0.1, "n": 4}}}
    got = modular.oracle(single, ["t", "u"])
    assert got["t"]["adapter"] == "y" and got["t"]["acc"] == 0.5
    assert got["u"]["adapter"] == "x" and got["u"]["acc"] == 0.25


def test_random_partition_keeps_cluster_sizes_and_is_seeded():
    labels = [0, 0, 1, 1, 1, 2, 3, 3]
    a, b = modular.random_partition(labels, 3), modular.random_partition(labels, 3)
    assert a == b and sorted(a) == sorted(labels)
    assert modular._clusters_of([1, 0, 1], ["p", "q", "r"]) == [["p", "r"], ["q"]]


def test_mbc_vectors_kinds():
    p = "m"
    init = {p: ad.Factors(torch.ones(1, 2), torch.zeros(2, 1), 2.0)}
    x = {p: ad.Factors(torch.full((1, 2), 3.0), torch.ones(2, 1), 2.0)}
    (params,) = modular.mbc_vectors([x], "parameters")
    (upd,) = modular.mbc_vectors([x], "updates", init)
    (prod,) = modular.mbc_vectors([x], "products")
    torch.testing.assert_close(params[0], x[p].a)
    torch.testing.assert_close(upd[0], torch.full((1, 2), 2.0))
    torch.testing.assert_close(prod[0], torch.full((2, 2), 6.0))
    with pytest.raises(ValueError, match="init"):
        modular.mbc_vectors([x], "updates")
    with pytest.raises(ValueError, match="kind"):
        modular.mbc_vectors([x], "nope")


def test_library_banks_checks_names_and_modules():
    lib = [{"m": ad.Factors(torch.ones(1, 2), torch.ones(2, 1), 1.0)},
           {"n": ad.Factors(torch.ones(1, 2), torch.ones(2, 1), 1.0)}]
    with pytest.raises(ValueError, match="other modules"):
        modular.library_banks(lib, ["a", "b"])
    with pytest.raises(ValueError, match="one name per adapter"):
        modular.library_banks(lib[:1], ["a", "b"])
    bank = modular.library_banks(lib[:1], ["a"])["m"]
    assert bank.names == ["a"] and bank.lora_a.shape == (1, 1, 2)


@pytest.mark.parametrize("kw,match", [({"clusters": 0}, "clusters"), ({"top_k": 0}, "top_k"),
                                      ({"temperature": 0.0}, "temperature"), ({"steps": 0}, "steps"),
                                      ({"dropout": 1.0}, "dropout"), ({"mbc_on": "x"}, "mbc_on"),
                                      ({"mbc_on": "updates", "same_init": False}, "same_init"),
                                      ({"top_k_sweep": (1, 0)}, "top_k_sweep"), ({"keep_fraction": 0.0}, "keep")])
def test_bad_settings_fail_clearly_before_training(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        modular.run(tiny_config(**kw), tmp_path, cache_dir=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()  # nothing was pre-trained


def test_more_clusters_than_tasks_fails_clearly(tmp_path, cache):
    with pytest.raises(ValueError, match="clusters .* number of tasks = 2"):
        modular.run(tiny_config(tasks=("rev", "up"), clusters=3), tmp_path, cache_dir=cache, progress=False)


def test_paper_config_has_the_papers_hyper_parameters():
    cfg = modular.paper_config(steps=7)
    assert (cfg.r, cfg.dropout, cfg.lr, cfg.steps) == (4, 0.05, 1e-4, 7)
    default = modular.ModularConfig()
    assert (default.r, default.dropout, default.clusters, default.top_k) == (4, 0.05, 4, 2)


# --------------------------------------------------------------------------------------------------- end to end

def test_recipe_end_to_end_and_deterministic(tmp_path, cache):
    p1 = modular.run(tiny_config(), tmp_path / "one", cache_dir=cache, progress=False)
    p2 = modular.run(tiny_config(), tmp_path / "two", cache_dir=cache, progress=False)
    for key in ("results", "summary", "mbc", "libraries", "single", "oracle", "topk", "routing_profile",
                "train_final"):
        assert json.dumps(p1[key], sort_keys=True) == json.dumps(p2[key], sort_keys=True), key
    names = set(p1["results"])
    assert {"base", "shared LoRA (all tasks)", "oracle (best private LoRA per task)"} <= names
    for lib in ("private", "MBC", "random clusters"):
        for method in ("Arrow (k=2)", "Mu (average of factors)", "average of products (ablation)"):
            assert f"{lib}: {method}" in names
    tasks = p1["tasks"]
    assert len(tasks) == 8 and set(p1["held_out"]) == {"last", "min", "revup"}
    for lib in ("MBC", "random clusters"):
        clusters = p1["libraries"][lib]["clusters"]
        assert len(clusters) == 4 and sorted(t for g in clusters for t in g) == sorted(tasks)
        assert -1.0 <= p1["libraries"][lib]["ari"] <= 1.0
    assert set(p1["mbc"]["variants"]) == set(modular.MBC_INPUTS)
    sim = torch.tensor(p1["mbc"]["similarity"])
    assert sim.shape == (8, 8) and torch.allclose(sim.diagonal(), torch.ones(8, dtype=sim.dtype))
    assert set(p1["topk"]["private"]) == {"1", "2", "8"} and set(p1["topk"]["MBC"]) == {"1", "2"}
    for t in p1["held_out"]:  # the oracle row is the per-task maximum over the private LoRAs alone
        best = max(v[t]["acc"] for v in p1["single"]["private"].values())
        assert p1["results"]["oracle (best private LoRA per task)"][t]["acc"] == best
    # cluster LoRAs trained for steps x (tasks in the cluster), the shared one for steps x 8
    for g in p1["libraries"]["MBC"]["clusters"]:
        assert p1["train_final"]["mbc/" + "+".join(g)]["step"] == 2 * len(g) - 1
    assert p1["train_final"]["shared"]["step"] == 2 * 8 - 1
    out = tmp_path / "one"
    for f in ("results.json", "results.md", "similarity.png", "summary.png", "zero_shot.png", "topk.png",
              "routing.png"):
        assert (out / f).is_file(), f
    assert (out / "adapters" / "private" / "rev" / "adapter_model.safetensors").is_file()
    cfg_saved = json.loads((out / "adapters" / "private" / "rev" / "adapter_config.json").read_text())
    assert cfg_saved["lora_dropout"] == 0.05 and cfg_saved["r"] == 2
    md = (out / "results.md").read_text()
    # results.json has sorted keys: tables rendered from it keep the recipe's row order
    assert modular.markdown(json.loads((out / "results.json").read_text())) == modular.markdown(p1) == md
    for text in ("adjusted Rand index", "Zero-shot accuracy per held-out task", "In-distribution", "top-k",
                 "Where Arrow sends the tokens"):
        assert text in md, text


def test_same_init_starts_every_library_lora_from_one_initialisation(tmp_path, cache):
    p = modular.run(tiny_config(tasks=("rev", "up"), clusters=1, steps=1, random_clusters=False,
                                top_k_sweep=()), tmp_path, cache_dir=cache, progress=False)
    from lora_ops._io import read_peft_adapter_dir

    a = [read_peft_adapter_dir(tmp_path / "adapters" / "private" / t)[0] for t in ("rev", "up")]
    key = next(k for k in a[0] if k.endswith("lora_A.weight"))
    # one AdamW step of lr 1e-2 moves every entry by at most ~lr: the two A's share their start
    assert (a[0][key] - a[1][key]).abs().max() < 0.05
    assert set(p["libraries"]) == {"private", "MBC"} and p["libraries"]["MBC"]["clusters"] == [["rev", "up"]]


def test_cli_reproduce_modular(tmp_path, cache, monkeypatch, capsys):
    monkeypatch.setattr(modular, "quick_config", lambda: tiny_config(tasks=("rev", "up", "inc"), clusters=2,
                                                                     random_clusters=False))
    rc = cli.main(["reproduce", "modular", "--quick", "--out", str(tmp_path / "o"), "--cache", str(cache),
                   "--no-progress"])
    assert rc == 0
    assert "Towards Modular LLMs reproduction" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "results.json").read_text())["recipe"] == "modular"
