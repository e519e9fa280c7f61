"""lora_ops.routing: ArrowRouter / arrow_forward against the all-experts reference, GenKnowSub, Mu (factor and
output averaging), MBC clustering on planted clusters, and PEFT Arrow interop (equal outputs with exact
prototypes; PEFT's power iterations are approximate when the top two singular values are close)."""

import pytest
import torch
from torch import nn

import lora_ops
from lora_ops import reference, routing
from tests.conftest import DEVICES
from tests.helpers import make_bank


# ---- Arrow ----


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("n", "k", "temperature"), [(8, 1, 1.0), (8, 4, 1.0), (8, 8, 0.5), (33, 3, 2.0)])
def test_arrow_forward_matches_all_experts_reference(device, n, k, temperature):
    r, d_in, d_out = 8, 64, 40
    a, b = make_bank(n, r, d_in, d_out, device=device)
    scales = torch.rand(n, device=device) + 0.5
    protos = routing.arrow_prototypes(a, b)
    x = torch.randn(3, 17, d_in, device=device)
    y = routing.arrow_forward(x, a, b, scales, protos, k, temperature)
    ref = reference.arrow_dense(x.reshape(-1, d_in).double(), a, b, scales, protos, k, temperature=temperature)
    assert y.shape == (3, 17, d_out)
    torch.testing.assert_close(y.reshape(-1, d_out).double().cpu(), ref.cpu(), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_arrow_router_module(device):
    a, b = make_bank(6, 4, 32, 16, device=device)
    router = routing.ArrowRouter.from_adapters(a, b, top_k=2, temperature=0.5)
    assert router.num_experts == 6 and "top_k=2" in repr(router)
    x = torch.randn(5, 32, device=device)
    ids, w = router(x)
    ref_ids, ref_w = lora_ops.arrow_route(x, lora_ops.arrow_prototypes(a, b), 2, temperature=0.5)
    assert torch.equal(ids, ref_ids) and torch.equal(w, ref_w)
    assert "prototypes" not in router.state_dict()  # derived from the adapters: not saved twice
    router.to(torch.float64)
    assert router.prototypes.dtype == torch.float64
    with pytest.raises(ValueError, match="top_k"):
        routing.ArrowRouter(torch.randn(3, 8), top_k=4)
    with pytest.raises(ValueError, match="temperature"):
        routing.ArrowRouter(torch.randn(3, 8), top_k=1, temperature=-1.0)
    with pytest.raises(ValueError, match="prototypes"):
        routing.ArrowRouter(torch.randn(3, 8, 2), top_k=1)


def test_general_knowledge_subtraction():
    a, b = make_bank(5, 4, 20, 12)
    ga, gb = make_bank(3, 4, 20, 12)
    p = routing.arrow_prototypes(a, b, use_gks=True, general=(ga, gb))
    expected = lora_ops.arrow_prototypes(a - ga.mean(0), b - gb.mean(0))
    assert torch.equal(p, expected)
    p_lib = routing.arrow_prototypes(a, b, use_gks=True)  # library mean
    assert torch.equal(p_lib, lora_ops.arrow_prototypes(a - a.mean(0), b - b.mean(0)))
    with pytest.raises(ValueError, match="use_gks"):
        routing.arrow_prototypes(a, b, general=(ga, gb))
    with pytest.raises(ValueError, match="general"):
        routing.arrow_prototypes(a, b, use_gks=True, general=(ga[:, :2], gb))


# ---- Mu ----


def test_mu_factors_and_router():
    n, r, d_in, d_out = 5, 4, 24, 16
    a, b = make_bank(n, r, d_in, d_out)
    ma, mb, s = routing.mu_factors(a, b, torch.full((n,), 2.0))
    assert s == 2.0 and torch.allclose(ma, a.mean(0)) and torch.allclose(mb, b.mean(0))
    scales = torch.rand(n) + 0.5
    ma, mb, s = routing.MuRouter.merge(a, b, scales)
    assert s == 1.0 and torch.allclose(mb, (b * scales[:, None, None]).mean(0))
    # layers batched: [L, N, r, d_in]
    ma2, mb2, _ = routing.mu_factors(a.view(1, n, r, d_in), b.view(1, n, d_out, r))
    assert ma2.shape == (1, r, d_in) and mb2.shape == (1, d_out, r)

    router = routing.MuRouter(n, mode="outputs")
    x = torch.randn(2, 7, d_in)
    ids, w = router(x)
    assert ids.shape == w.shape == (2, 7, n)
    y = lora_ops.grouped_lora(x, a, b, ids, scales=scales, weights=w)
    expected = torch.einsum("btf,erf,eor,e->bto", x, a, b, scales) / n  # mean of the adapters' outputs
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        routing.MuRouter(n, mode="products")
    with pytest.raises(ValueError, match="num_adapters"):
        routing.MuRouter(0)


# ---- MBC ----


def planted_library(n_clusters=4, per_cluster=6, layers=3, r=4, d=48, noise=0.6, seed=0):
    """State dicts of n_clusters * per_cluster adapters drawn around n_clusters centres, in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    centres = [{f"layers.{j}.lora_A.weight": torch.randn(r, d, generator=g) for j in range(layers)}
               | {f"layers.{j}.lora_B.weight": torch.randn(d, r, generator=g) for j in range(layers)}
               for _ in range(n_clusters)]
    truth = torch.arange(n_clusters).repeat_interleave(per_cluster)
    truth = truth[torch.randperm(len(truth), generator=g)]
    adapters = [{key: v + noise * torch.randn(v.shape, generator=g) for key, v in centres[c].items()}
                for c in truth.tolist()]
    return adapters, truth


def test_mbc_recovers_planted_clusters():
    from sklearn.metrics import adjusted_rand_score

    adapters, truth = planted_library()
    result = routing.mbc_cluster(adapters, k=4, seed=0)
    assert adjusted_rand_score(truth.numpy(), result.labels.numpy()) >= 0.9
    n = len(adapters)
    sim = result.similarity
    assert sim.shape == (n, n) and torch.allclose(sim, sim.T) and torch.allclose(sim.diagonal(), torch.ones(n, dtype=sim.dtype))
    same = truth[:, None] == truth[None, :]
    assert sim[same].mean() > sim[~same].mean() + 0.3  # the similarity itself separates the clusters
    # reproducible for a seed; tensors and sequences of tensors are accepted as adapters
    again = routing.mbc_cluster([list(ad.values()) for ad in adapters], k=4, seed=0, keep_fraction=0.2)
    assert torch.equal(again.labels, result.labels)
    reduced = routing.mbc_cluster(adapters, k=4, seed=1, n_components=6, keep_fraction=1.0)
    assert reduced.embedding.shape == (n, 6)
    assert adjusted_rand_score(truth.numpy(), reduced.labels.numpy()) >= 0.9


def test_mbc_bad_arguments():
    adapters, _ = planted_library(n_clusters=2, per_cluster=2)
    with pytest.raises(ValueError, match="k must"):
        routing.mbc_cluster(adapters, k=5)
    with pytest.raises(ValueError, match="keep_fraction"):
        routing.mbc_cluster(adapters, k=2, keep_fraction=0.0)
    with pytest.raises(ValueError, match="same number"):
        routing.mbc_cluster([torch.randn(10), torch.randn(11)], k=1)
    with pytest.raises(ValueError, match="n_components"):
        routing.mbc_cluster(adapters, k=2, n_components=9)
    with pytest.raises(TypeError, match="adapter"):
        routing.mbc_cluster([["not a tensor"]], k=1)


# ---- PEFT interop ----

peft = pytest.importorskip("peft")


class TwoLayer(nn.Module):
    def __init__(self, d=32, h=24):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def save_adapters(tmp_path, prefix, count, seed, r=4, alpha=8):
    """count random LoRA adapters of TwoLayer saved in PEFT format; returns their folders."""
    paths = []
    for i in range(count):
        torch.manual_seed(seed + i)
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["up", "down"], init_lora_weights=False)
        model = peft.get_peft_model(TwoLayer(), cfg)
        path = tmp_path / f"{prefix}{i}"
        model.save_pretrained(str(path))
        paths.append(str(path))
    return paths


def arrow_model(tmp_path, top_k, temperature=1.0, use_gks=False, n=5):
    torch.manual_seed(123)
    base = TwoLayer()
    tasks = save_adapters(tmp_path, "task", n, seed=10)
    general = save_adapters(tmp_path, "general", 2, seed=50) if use_gks else None
    cfg = peft.ArrowConfig(top_k=top_k, router_temperature=temperature, use_gks=use_gks, rng_seed=0)
    return peft.create_arrow_model(base, tasks, cfg, general_adapter_paths=general).eval()


def our_forward(model, layers, x):
    """TwoLayer's forward with every LoRA layer's Arrow delta computed by lora_ops."""
    inner = model.base_model.model
    h = inner.up.base_layer(x) + layers["base_model.model.up"].delta(x)
    h = torch.relu(h)
    return inner.down.base_layer(h) + layers["base_model.model.down"].delta(h)


@pytest.mark.parametrize(("top_k", "temperature", "use_gks"), [(1, 1.0, False), (2, 0.5, False), (5, 1.0, False),
                                                               (3, 1.0, True)])
def test_peft_arrow_equal_outputs_with_exact_prototypes(tmp_path, top_k, temperature, use_gks):
    model = arrow_model(tmp_path, top_k, temperature, use_gks)
    layers = routing.arrow_from_peft(model)  # before PEFT's first forward (GenKnowSub still pending)
    assert set(layers) == {"base_model.model.up", "base_model.model.down"}
    layer = layers["base_model.model.up"]
    assert layer.names == [f"task_{i}" for i in range(5)] and layer.lora_a.shape == (5, 4, 32)
    assert layer.router.top_k == top_k and layer.router.temperature == temperature
    routing.set_peft_prototypes(model, layers)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        expected = model(x)
        ours = our_forward(model, layers, x)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    # after PEFT applied GenKnowSub in place, reading the model again gives the same bank
    again = routing.arrow_from_peft(model)
    for name in layers:
        torch.testing.assert_close(again[name].lora_a, layers[name].lora_a, atol=1e-6, rtol=0)
        torch.testing.assert_close(again[name].router.prototypes, layers[name].router.prototypes, atol=1e-5, rtol=0)


def test_peft_power_iteration_is_approximate_when_singular_values_are_close(tmp_path):
    model = arrow_model(tmp_path, top_k=2)
    up = model.base_model.model.up
    # task_0 gets singular values 1.0 and 0.99 (orthonormal factors): 15 power iterations cannot separate them
    with torch.no_grad():
        q_in = torch.linalg.qr(torch.randn(32, 4))[0]
        q_out = torch.linalg.qr(torch.randn(24, 4))[0]
        up.lora_A["task_0"].weight.copy_(q_in.T)
        up.lora_B["task_0"].weight.copy_(q_out * torch.tensor([1.0, 0.99, 0.5, 0.1]))
        # task_1: a wide gap (1.0 vs 0.3), where 15 iterations are plenty
        up.lora_A["task_1"].weight.copy_(q_in.T)
        up.lora_B["task_1"].weight.copy_(q_out * torch.tensor([0.3, 1.0, 0.2, 0.1]))
        model(torch.randn(1, 32))  # PEFT builds its prototypes on the first forward
    peft_proto = up.lora_arrow["arrow_router"].prototypes
    exact = routing.arrow_from_peft(model)["base_model.model.up"].router.prototypes
    torch.testing.assert_close(exact[0].abs(), q_in[:, 0].abs(), atol=1e-5, rtol=0)  # ours: exact
    assert abs(float(peft_proto[0] @ exact[0])) < 0.999  # PEFT: still mixed with the second direction
    # where the gap is wide PEFT converges to the same vector
    torch.testing.assert_close(exact[1].abs(), q_in[:, 1].abs(), atol=1e-5, rtol=0)
    assert abs(float(peft_proto[1] @ exact[1])) > 1 - 1e-6


def test_arrow_from_peft_needs_an_arrow_model():
    model = peft.get_peft_model(TwoLayer(), peft.LoraConfig(r=2, target_modules=["up"]))
    with pytest.raises(ValueError, match="Arrow router"):
        routing.arrow_from_peft(model)


def test_multilora_linear_arrow_mode():
    # Arrow mode of MultiLoRALinear: per layer, per token, route then apply grouped_lora over the top-k.
    from lora_ops.nn import AdapterBank, MultiLoRALinear
    from lora_ops.routing import ArrowRouter, arrow_forward

    g = torch.Generator().manual_seed(3)
    n, r, d_in, d_out = 6, 4, 24, 18
    a, b = torch.randn(n, r, d_in, generator=g), torch.randn(n, d_out, r, generator=g)
    scales = torch.rand(n, generator=g) + 0.5
    bank = AdapterBank(a, b, scales, [f"e{i}" for i in range(n)])
    base = torch.nn.Linear(d_in, d_out)
    router = ArrowRouter.from_adapters(a, b, top_k=2, temperature=0.7)
    layer = MultiLoRALinear(base, bank, router=router)
    x = torch.randn(3, 5, d_in, generator=g)
    with torch.no_grad():
        want = base(x) + arrow_forward(x, a, b, scales, router.prototypes, 2, 0.7)
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
