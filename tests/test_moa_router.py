"""lora_ops.routing's Mixture-of-LoRAs router: pooling, selection modes, the router loss and the vote."""

import pytest
import torch
from torch import nn

from lora_ops import nn as lnn
from lora_ops import reference, routing
from tests.helpers import make_bank


def _router(d=4, n=3, mode="top1", seed=0):
    torch.manual_seed(seed)
    return routing.MoARouter(d, n, mode=mode)


def test_pool_is_the_mean_over_masked_tokens():
    r = _router()
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    pooled = r.pool(x, mask)
    torch.testing.assert_close(pooled[0], x[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], torch.zeros(4))  # nothing to pool: zeros, logits = bias
    torch.testing.assert_close(r.logits(x, mask)[1], r.proj.bias)
    torch.testing.assert_close(r.pool(x), x.mean(1))
    torch.testing.assert_close(r.pool(x[:, 0]), x[:, 0])  # [B, d]: one token per row


def test_top1_forced_and_soft_outputs():
    r = _router()
    x = torch.randn(3, 6, 4)
    ids, w = r(x)
    assert ids.shape == (3, 6) and w is None
    assert torch.equal(ids, r.logits(x).argmax(-1)[:, None].expand(3, 6))
    torch.testing.assert_close(r.last_logits, r.logits(x))
    r.forced_ids = torch.tensor([2, -1, 0])
    ids, w = r(x)
    assert torch.equal(ids, torch.tensor([2, -1, 0])[:, None].expand(3, 6)) and w is None
    r.forced_ids, r.mode = None, "soft"
    ids, w = r(x)
    assert torch.equal(ids, torch.arange(3).expand(3, 6, 3))
    torch.testing.assert_close(w, torch.softmax(r.logits(x), -1)[:, None].expand(3, 6, 3))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="num_experts"):
        routing.MoARouter(4, 0)
    with pytest.raises(ValueError, match="d_in"):
        routing.MoARouter(0, 2)
    with pytest.raises(ValueError, match="mode"):
        routing.MoARouter(4, 2, mode="top2")
    r = _router()
    with pytest.raises(ValueError, match="width"):
        r(torch.randn(2, 3, 5))
    r.pool_mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="pool_mask"):
        r(torch.randn(2, 3, 4))
    r.pool_mask, r.forced_ids = None, torch.tensor([0, 3])
    with pytest.raises(IndexError, match="forced_ids"):
        r(torch.randn(2, 3, 4))
    r.forced_ids = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="forced_ids"):
        r(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="MoARouter"):
        with routing.moa_state(nn.Linear(2, 2)):
            pass
    with pytest.raises(ValueError, match="no logits"):
        routing.moa_router_loss([_router()], torch.tensor([0]))
    with pytest.raises(ValueError, match="L >= 1"):
        routing.moa_select(torch.zeros(0, 2, 3), "vote")
    with pytest.raises(ValueError, match="mode"):
        routing.moa_select(torch.zeros(1, 2, 3), "mean")


def _moa_layer(mode="top1", dtype=torch.float32):
    torch.manual_seed(0)
    base = nn.Linear(8, 6).to(dtype)
    a, b = make_bank(3, 2, 8, 6, dtype=dtype)
    bank = lnn.AdapterBank(a, b, torch.tensor([1.0, 2.0, 0.5], dtype=dtype), ["x", "y", "z"])
    router = routing.MoARouter(8, 3, mode=mode).to(dtype)
    return lnn.MultiLoRALinear(base, bank, router=router)


def _expert(layer, i, x):
    a, b, s = layer.bank.adapter(i)
    return s * (x @ a.T) @ b.T


def test_multilora_linear_with_top1_router_uses_each_sequence_argmax_expert():
    layer = _moa_layer()
    x = torch.randn(4, 5, 8)
    mask = torch.rand(4, 5) > 0.3
    with routing.moa_state(layer, pool_mask=mask):
        y = layer(x)
    choice = layer.router.logits(x, mask).argmax(-1)
    for bi in range(4):
        torch.testing.assert_close(y[bi], layer.base(x[bi]) + _expert(layer, int(choice[bi]), x[bi]))
    assert layer.router.pool_mask is None  # restored after the block


def test_soft_router_mixes_every_expert_and_trains_through_the_weights():
    layer = _moa_layer("soft", torch.float64)
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    y = layer(x)
    p = torch.softmax(layer.router.logits(x), -1)
    want = layer.base(x) + sum(p[:, i, None, None] * _expert(layer, i, x) for i in range(3))
    torch.testing.assert_close(y, want)
    y.square().sum().backward()
    g_ops = layer.router.proj.weight.grad.clone()
    assert g_ops.abs().sum() > 0
    layer.router.proj.weight.grad = None
    with lnn.reference_op():  # plain-autograd reference of grouped_lora
        layer(x).square().sum().backward()
    torch.testing.assert_close(g_ops, layer.router.proj.weight.grad, rtol=1e-10, atol=1e-12)


def test_router_loss_is_the_mean_cross_entropy_over_routers():
    r1, r2 = _router(seed=1), _router(seed=2)
    r1.last_logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    r2.last_logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    labels = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy
    want = (ce(r1.last_logits, labels) + ce(r2.last_logits, labels)) / 2
    torch.testing.assert_close(routing.moa_router_loss([r1, r2], labels), want)
    want_sum = (ce(r1.last_logits, labels, reduction="sum") + ce(r2.last_logits, labels, reduction="sum")) / 2
    torch.testing.assert_close(routing.moa_router_loss([r1, r2], labels, reduction="sum"), want_sum)
    with pytest.raises(ValueError, match="labels"):
        routing.moa_router_loss([r1], torch.tensor([0]))


def _one_hot_logits(choices, n=3, margin=2.0):
    """[L, B, N] logits where router l ranks choices[l][b] first (by ``margin``)."""
    return torch.nn.functional.one_hot(torch.tensor(choices), n).float() * margin


def test_select_last_and_vote_on_hand_checked_cases():
    # 3 routers, 2 sequences: row 0 votes (0, 1, 1) -> vote 1, last 1; row 1 votes (2, 2, 0) -> vote 2, last 0
    logits = _one_hot_logits([[0, 2], [1, 2], [1, 0]])
    assert routing.moa_select(logits, "last").tolist() == [1, 0]
    assert routing.moa_select(logits, "vote").tolist() == [1, 2]
    assert routing.moa_select(list(logits), "vote").tolist() == [1, 2]
    # 4 routers, 2 votes each for experts 0 and 1: the larger summed probability wins
    tie = _one_hot_logits([[0], [0], [1], [1]])
    tie[2, 0, 1] = 5.0  # one vote for expert 1 is much more confident
    assert routing.moa_select(tie, "vote").tolist() == [1]
    # a perfect tie goes to the lower index
    assert routing.moa_select(_one_hot_logits([[2], [1]]), "vote").tolist() == [1]
    # a single very confident router does not outvote two others
    lop = _one_hot_logits([[0], [0], [1]])
    lop[2, 0, 1] = 50.0
    assert routing.moa_select(lop, "vote").tolist() == [0]
