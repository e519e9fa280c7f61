"""lora_ops.nn: AdapterBank padding, MultiLoRALinear against base + reference, merge/unmerge, wrap on tiny models."""

import pytest
import torch
from torch import nn

import lora_ops
from lora_ops import reference
from lora_ops.nn import AdapterBank, MultiLoRALinear, adapter_ids, set_adapter_ids, wrap
from tests.conftest import DEVICES

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny shapes: one thread is fastest, and on a shared machine OpenMP threads waiting for descheduled peers
    # make multi-threaded tiny ops 10-100x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mixed_bank(d_in=24, d_out=20, ranks=(2, 5, 3), dtype=torch.float32, trainable=False):
    adapters = {f"a{i}": (torch.randn(r, d_in, dtype=dtype), torch.randn(d_out, r, dtype=dtype), 0.5 + i)
                for i, r in enumerate(ranks)}
    return adapters, AdapterBank.from_adapters(adapters, trainable=trainable)


def _per_adapter_reference(x, base, adapters, ids):
    """base(x) + scale_i · B_i A_i x row by row, each adapter at its own (unpadded) rank, in float64."""
    names = list(adapters)
    out = base(x).double()
    xf = x.reshape(-1, x.shape[-1]).double()
    of = out.reshape(-1, out.shape[-1])
    for t, i in enumerate(ids.reshape(-1).tolist()):
        if i >= 0:
            a, b, s = adapters[names[i]]
            of[t] += s * (b.double() @ (a.double() @ xf[t]))
    return out


def test_bank_padding_is_exact():
    adapters, bank = _mixed_bank()
    assert bank.lora_a.shape == (3, 5, 24) and bank.lora_b.shape == (3, 20, 5)
    assert bank.ranks == [2, 5, 3] and bank.names == ["a0", "a1", "a2"]
    for i, (name, (a, b, s)) in enumerate(adapters.items()):
        assert bank.index(name) == i
        ga, gb, gs = bank.adapter(name)
        assert torch.equal(ga, a) and torch.equal(gb, b) and gs == s
        assert torch.count_nonzero(bank.lora_a[i, a.shape[0]:]) == 0
        assert torch.count_nonzero(bank.lora_b[i, :, a.shape[0]:]) == 0
    x = torch.randn(7, 24)
    ids = torch.tensor([0, 1, 2, -1, 2, 1, 0])
    got = lora_ops.grouped_lora(x, bank.lora_a, bank.lora_b, ids, scales=bank.scales)
    want = _per_adapter_reference(x, lambda v: torch.zeros(*v.shape[:-1], 20), adapters, ids)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert bank.index("__base__") == -1 and bank.index(None) == -1
    with pytest.raises(KeyError, match="nope"):
        bank.index("nope")


def test_bank_trainable_and_module_behaviour():
    _, frozen = _mixed_bank()
    _, train = _mixed_bank(trainable=True)
    assert not frozen.lora_a.requires_grad and train.lora_a.requires_grad and train.lora_b.requires_grad
    assert {n for n, _ in train.named_parameters()} == {"lora_a", "lora_b"}
    assert "scales" in train.state_dict()
    assert train.to(torch.float64).lora_a.dtype == torch.float64 and train.scales.dtype == torch.float64


def test_bank_rejects_bad_input():
    with pytest.raises(ValueError, match="adapter 'x' needs A"):
        AdapterBank.from_adapters({"x": (torch.randn(2, 4), torch.randn(3, 5), 1.0)})
    with pytest.raises(ValueError, match="d_in"):
        AdapterBank.from_adapters({"x": (torch.randn(2, 4), torch.randn(3, 2), 1.0),
                                   "y": (torch.randn(2, 5), torch.randn(3, 2), 1.0)})
    with pytest.raises(ValueError, match="reserved"):
        AdapterBank.from_adapters({"__base__": (torch.randn(2, 4), torch.randn(3, 2), 1.0)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multilora_linear_matches_reference(dtype):
    adapters, bank = _mixed_bank(dtype=dtype)
    base = nn.Linear(24, 20).to(dtype)
    layer = MultiLoRALinear(base, bank)
    x = torch.randn(3, 5, 24, dtype=dtype)
    ids = torch.randint(-1, 3, (3, 5))
    with torch.no_grad():
        want = _per_adapter_reference(x, base, adapters, ids)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(layer(x, ids).double(), want, atol=tol, rtol=tol)
        # per-sequence ids broadcast over the sequence, names accepted
        seq = ["a2", "__base__", "a0"]
        want_seq = _per_adapter_reference(x, base, adapters, torch.tensor([2, -1, 0])[:, None].expand(3, 5))
        torch.testing.assert_close(layer(x, seq).double(), want_seq, atol=tol, rtol=tol)
        # set per batch, then the same through the setter
        layer.set_adapter_ids(ids)
        torch.testing.assert_close(layer(x).double(), want, atol=tol, rtol=tol)
        layer.set_adapter_ids(None)
        with pytest.raises(ValueError, match="no adapter_ids"):
            layer(x)


def test_router_topk():
    adapters, bank = _mixed_bank()
    base = nn.Linear(24, 20)
    calls = []

    def router(x):
        calls.append(x.shape)
        ids = torch.stack([torch.zeros(x.shape[:-1], dtype=torch.long), torch.full(x.shape[:-1], 2)], -1)
        return ids, torch.full(ids.shape, 0.5)

    layer = MultiLoRALinear(base, bank, router=router)
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        got = layer(x)
        ids, w = router(x)
        want = base(x) + reference.grouped_lora(x, bank.lora_a, bank.lora_b, ids, scales=bank.scales, weights=w)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert calls[0] == (2, 3, 24)


def test_dropout_only_in_training_and_shared_by_adapters():
    _, bank = _mixed_bank()
    base = nn.Linear(24, 20)
    layer = MultiLoRALinear(base, bank, lora_dropout=0.5)
    x = torch.randn(4, 24)
    ids = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        layer.eval()
        eval_out = layer(x, ids)
        torch.testing.assert_close(eval_out, base(x) + lora_ops.grouped_lora(x, bank.lora_a, bank.lora_b, ids,
                                                                             scales=bank.scales))
        layer.train()
        torch.manual_seed(3)
        train_out = layer(x, ids)
        torch.manual_seed(3)
        dropped = nn.functional.dropout(x, 0.5, training=True)  # one mask for the whole x
        torch.testing.assert_close(train_out, base(x) + lora_ops.grouped_lora(dropped, bank.lora_a, bank.lora_b,
                                                                              ids, scales=bank.scales))
        assert not torch.allclose(train_out, eval_out)


@pytest.mark.parametrize("conv1d", [False, True])
def test_merge_unmerge(conv1d):
    adapters, bank = _mixed_bank()
    if conv1d:
        base = transformers.pytorch_utils.Conv1D(20, 24)
    else:
        base = nn.Linear(24, 20)
    w0 = base.weight.detach().clone()
    layer = MultiLoRALinear(base, bank)
    x = torch.randn(5, 24)
    with torch.no_grad():
        want = layer(x, torch.full((5,), 1))
        layer.merge("a1")
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x, torch.full((5,), 1)), want, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="unmerge"):
            layer(x, torch.zeros(5, dtype=torch.long))
        with pytest.raises(RuntimeError, match="already merged"):
            layer.merge("a0")
        layer.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)
    assert layer.merged_index is None


def _tiny_llama():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def _tiny_gpt2():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _random_banks(model, target, n=3, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    banks = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, transformers.pytorch_utils.Conv1D)) and lora_ops.nn._matches(name, target):
            d_in, d_out, _ = lora_ops.nn._in_out_features(m)
            banks[name] = AdapterBank.from_adapters(
                {f"ad{i}": (torch.randn(rank, d_in, generator=g) * 0.1, torch.randn(d_out, rank, generator=g) * 0.1,
                            2.0) for i in range(n)})
    return banks


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_wrap_tiny_models(which):
    torch.manual_seed(0)
    model = _tiny_llama() if which == "llama" else _tiny_gpt2()
    target = ["q_proj", "v_proj", "down_proj"] if which == "llama" else r".*\.(c_attn|c_proj)"
    banks = _random_banks(model, target)
    ref = {name: model.get_submodule(name) for name in banks}
    ids_in = torch.randint(0, 128, (3, 6))
    seq_ids = torch.tensor([1, -1, 2])
    with torch.no_grad():
        base_out = model(ids_in).logits
        # reference: the same deltas via forward hooks on the original layers
        handles = []
        for name, layer in ref.items():
            bank = banks[name]

            def hook(mod, inp, out, bank=bank):
                x = inp[0]
                ids = seq_ids[:, None].expand(x.shape[:-1])
                return out + reference.grouped_lora(x, bank.lora_a, bank.lora_b, ids, scales=bank.scales)

            handles.append(layer.register_forward_hook(hook))
        want = model(ids_in).logits
        for h in handles:
            h.remove()
        wrap(model, banks, target)
        assert sum(isinstance(m, MultiLoRALinear) for m in model.modules()) == len(banks)
        with adapter_ids(model, seq_ids):
            got = model(ids_in).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got[0], base_out[0], atol=1e-3)
        torch.testing.assert_close(got[1], base_out[1], atol=1e-5, rtol=1e-5)  # -1: base model
        set_adapter_ids(model, torch.full((3,), -1))
        torch.testing.assert_close(model(ids_in).logits, base_out, atol=1e-5, rtol=1e-5)


def test_target_modules_matching():
    m = lora_ops.nn._matches
    assert m("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert not m("model.layers.0.self_attn.qq_proj", ["q_proj"])
    assert m("model.layers.1.mlp.up_proj", r".*layers\.1\..*proj")
    assert not m("model.layers.0.mlp.up_proj", r"layers\.0")  # regex: full match, like PEFT


def test_wrap_errors():
    model = _tiny_llama()
    banks = _random_banks(model, ["q_proj"])
    with pytest.raises(ValueError, match="no targeted"):
        wrap(model, banks, ["k_proj"])
    with pytest.raises(ValueError, match="no MultiLoRALinear"):
        set_adapter_ids(_tiny_llama(), torch.tensor([0]))


def test_bank_new_peft_like_init():
    layer = nn.Linear(16, 12)
    bank = AdapterBank.new(layer, ["x", "y"], rank=4, alpha=8)
    assert bank.lora_a.shape == (2, 4, 16) and bank.lora_a.requires_grad
    assert torch.count_nonzero(bank.lora_b) == 0 and bank.scales.tolist() == [2.0, 2.0]
    assert not torch.equal(bank.lora_a[0], bank.lora_a[1])
    assert AdapterBank.new(layer, ["x"], rank=4, alpha=8, use_rslora=True).scales.item() == pytest.approx(4.0)


@pytest.mark.parametrize("device,dtype,compiled", [
    pytest.param("cuda", torch.float32, False, marks=pytest.mark.cuda),
    pytest.param("cuda", torch.bfloat16, False, marks=pytest.mark.cuda),
    ("cpu", torch.float32, True),  # the serving path (check_ids=False) compiles to one graph, no breaks
    pytest.param("cuda", torch.float32, True, marks=pytest.mark.cuda),
])
def test_multilora_linear_device_and_compile(device, dtype, compiled):
    if device not in DEVICES:
        pytest.skip("needs a GPU and CUDA kernels")
    adapters, bank = _mixed_bank()
    base = nn.Linear(24, 20)
    x = torch.randn(3, 5, 24)
    ids = torch.randint(-1, 3, (3, 5))
    with torch.no_grad():
        want = _per_adapter_reference(x, base, adapters, ids)
        layer = MultiLoRALinear(base, bank, check_ids=not compiled).to(device, dtype)
        fn = torch.compile(layer, fullgraph=True, backend="inductor") if compiled else layer
        got = fn(x.to(device, dtype), ids.to(device)).double().cpu()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, want, atol=tol * max(1.0, want.abs().max().item()), rtol=tol)


@pytest.mark.cuda
@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and CUDA kernels")
def test_multilora_linear_cuda_graph():
    # Captured once, replayed with new ids and inputs copied into the static buffers (the decode-loop pattern).
    adapters, bank = _mixed_bank()
    base = nn.Linear(24, 20)
    layer = MultiLoRALinear(base, bank, check_ids=False).cuda()
    x_static, ids_static = torch.zeros(4, 24, device="cuda"), torch.zeros(4, dtype=torch.long, device="cuda")
    with torch.no_grad():
        layer(x_static, ids_static)  # warm-up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_static = layer(x_static, ids_static)
        for _ in range(2):
            x, ids = torch.randn(4, 24), torch.randint(-1, 3, (4,))
            x_static.copy_(x)
            ids_static.copy_(ids)
            graph.replay()
            want = _per_adapter_reference(x, base, adapters, ids)
            torch.testing.assert_close(out_static.double().cpu(), want, atol=1e-4 * max(1.0, want.abs().max().item()),
                                       rtol=1e-4)
