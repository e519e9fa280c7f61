"""grouped_lora, MultiLoRALinear, lora_ops.peft.accelerate and a training step under torch.autocast.

The op follows nn.Linear's autocast policy (csrc/autocast/grouped_lora.cpp): x, lora_a and lora_b are cast to the
autocast dtype, fp64 tensors and tensors of another device are left alone, scales and weights keep their dtype, and
fp32 master factors get fp32 gradients through the casts. Outside autocast mixed dtypes still raise TypeError.

Checks: bit-identical to calling the op on explicitly cast inputs (forward and gradients); and against fp32 /
fp64 references with these tolerances, relative to the reference's largest |entry| (outputs: at least 1;
gradients and SGD updates: their own scale). Largest errors measured on CPU in brackets (bf16 / fp16):
  op output and gradients vs fp64: bf16 1.6e-2, fp16 2e-3 (tests.helpers.TOL)              [4.0e-3 / 6.3e-4]
  MultiLoRALinear (also routed by Arrow / MoA soft); a wrapped tiny Llama's logits, adapter gradients and one
  SGD step (fp16 through a GradScaler), vs fp32:
    bf16 4e-2, fp16 8e-3 (AMP_TOL)                                                         [5.2e-3 / 9.1e-4]
  accelerate vs PEFT's own mixed batch under the same autocast, and vs fp32: AMP_TOL         [2.2e-2 / 1.7e-3]
CUDA cases (fp16 and bf16) run the same checks and skip without a GPU and CUDA kernels.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_ops
from lora_ops import reference
from lora_ops.nn import AdapterBank, MultiLoRALinear, adapter_ids, wrap
from tests.conftest import DEVICES
from tests.helpers import TOL, make_bank, make_ids

OP = torch.ops.lora_ops.grouped_lora.default

AMP = [
    ("cpu", torch.bfloat16),
    ("cpu", torch.float16),
    pytest.param("cuda", torch.float16, marks=pytest.mark.cuda),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda),
]
# Whole layers / models vs an fp32 run: every matmul of the model is rounded, not only the adapters'.
AMP_TOL = {torch.bfloat16: 4e-2, torch.float16: 8e-3}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes; see tests/test_nn.py
    yield
    torch.set_num_threads(n)


def _need(device):
    if device not in DEVICES:
        pytest.skip("needs a GPU and CUDA kernels")


def _rel_err(got, want, floor: float = 1.0) -> float:
    """max |got - want| / max(max |want|, floor), over a tensor or a list of tensors (one scale for the list)."""
    got, want = ([got], [want]) if isinstance(got, torch.Tensor) else (got, want)
    scale = max(max(w.abs().max().item() for w in want), floor)
    return max((g.double() - w.double()).abs().max().item() for g, w in zip(got, want)) / scale


def _problem(device, k=2, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    a, b = make_bank(5, 4, 24, 20)
    x = torch.randn(37, 24, generator=g)
    ids = make_ids("mixed_none", (37, k), 5, generator=g)
    scales = torch.rand(5, generator=g) + 0.5
    weights = torch.rand(37, k, generator=g)
    out = [t.to(device) for t in (x, a, b, ids, scales, weights)]
    if requires_grad:
        for i in (0, 1, 2, 5):
            out[i].requires_grad_()
    return out


@pytest.mark.parametrize("device,dtype", AMP)
def test_op_casts_like_linear(device, dtype):
    _need(device)
    x, a, b, ids, scales, weights = _problem(device)
    w_lin = torch.randn(20, 24, device=device)
    with torch.autocast(device, dtype=dtype):
        y = lora_ops.grouped_lora(x, a, b, ids, scales=scales, weights=weights)
        y_lin = nn.functional.linear(x, w_lin)
    assert y.dtype == y_lin.dtype == dtype
    # exactly the op on explicitly cast matmul operands (scales and weights uncast)
    want = lora_ops.grouped_lora(x.to(dtype), a.to(dtype), b.to(dtype), ids, scales=scales, weights=weights)
    assert torch.equal(y, want)
    exact = reference.grouped_lora(x.double(), a.double(), b.double(), ids, scales=scales, weights=weights)
    assert _rel_err(y, exact) <= TOL[dtype]
    # inputs already in a half type (the previous layer's output under autocast) with fp32 master factors
    with torch.autocast(device, dtype=dtype):
        for xh in (x.to(torch.float16), x.to(torch.bfloat16)):
            assert lora_ops.grouped_lora(xh, a, b, ids, scales=scales, weights=weights).dtype == dtype


@pytest.mark.parametrize("device,dtype", AMP)
def test_mixed_dtypes_outside_autocast_still_raise(device, dtype):
    _need(device)
    x, a, b, ids, scales, _ = _problem(device, k=1)
    ids = ids[:, 0]
    with pytest.raises(TypeError, match="lora_a has dtype"):
        lora_ops.grouped_lora(x.to(dtype), a, b, ids)
    with torch.autocast(device, dtype=dtype):
        lora_ops.grouped_lora(x.to(dtype), a, b, ids)  # fine inside
        with torch.autocast(device, enabled=False):
            with pytest.raises(TypeError, match="lora_a has dtype"):
                lora_ops.grouped_lora(x.to(dtype), a, b, ids)
        # fp64 is never cast (as for nn.Linear): fp64 everywhere runs in fp64, fp64 x with fp32 factors raises
        y64 = lora_ops.grouped_lora(x.double(), a.double(), b.double(), ids, scales=scales)
        assert y64.dtype == torch.float64
        with pytest.raises(TypeError, match="has dtype"):
            lora_ops.grouped_lora(x.double(), a, b, ids)
    assert torch.equal(y64, lora_ops.grouped_lora(x.double(), a.double(), b.double(), ids, scales=scales))
    with pytest.raises(TypeError, match="lora_a has dtype"):  # the region is left as it was found
        lora_ops.grouped_lora(x.to(dtype), a, b, ids)


@pytest.mark.cuda
def test_other_device_autocast_does_not_cast():
    # A CUDA autocast region leaves CPU tensors alone (the AutocastCUDA key never sees them).
    _need("cuda")
    x, a, b, ids, _, _ = _problem("cpu", k=1)
    with torch.autocast("cuda", dtype=torch.float16):
        assert lora_ops.grouped_lora(x, a, b, ids[:, 0]).dtype == torch.float32
        with pytest.raises(TypeError, match="lora_a has dtype"):
            lora_ops.grouped_lora(x.half(), a, b, ids[:, 0])


@pytest.mark.parametrize("device,dtype", AMP)
def test_fp32_master_factors_get_fp32_gradients(device, dtype):
    _need(device)
    x, a, b, ids, scales, weights = _problem(device, requires_grad=True)
    g_out = torch.randn(37, 20, generator=torch.Generator().manual_seed(1)).to(device)

    def grads(fn):
        for t in (x, a, b, weights):
            t.grad = None
        fn().float().mul(g_out).sum().backward()
        return [t.grad for t in (x, a, b, weights)]

    def amp():
        with torch.autocast(device, dtype=dtype):
            return lora_ops.grouped_lora(x, a, b, ids, scales=scales, weights=weights)

    got = grads(amp)
    assert [t.dtype for t in got] == [torch.float32] * 4
    want = grads(lambda: lora_ops.grouped_lora(x.to(dtype), a.to(dtype), b.to(dtype), ids, scales=scales,
                                               weights=weights))
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    xd, ad, bd, wd = (t.detach().double().requires_grad_() for t in (x, a, b, weights))
    y = reference.grouped_lora(xd, ad, bd, ids, scales=scales.double(), weights=wd)
    exact = torch.autograd.grad(y, (xd, ad, bd, wd), g_out.double())
    for name, g, e in zip(("x", "lora_a", "lora_b", "weights"), got, exact):
        assert _rel_err(g, e, floor=0) <= TOL[dtype], name


@pytest.mark.parametrize("device,dtype", AMP)
def test_backward_inside_the_autocast_region(device, dtype):
    # Not the recommended pattern (backward outside autocast) but a common one: the gradients must not change.
    _need(device)
    x, a, b, ids, scales, weights = _problem(device, requires_grad=True)
    with torch.autocast(device, dtype=dtype):
        lora_ops.grouped_lora(x, a, b, ids, scales=scales, weights=weights).float().square().sum().backward()
    inside = [t.grad for t in (x, a, b, weights)]
    for t in (x, a, b, weights):
        t.grad = None
    with torch.autocast(device, dtype=dtype):
        y = lora_ops.grouped_lora(x, a, b, ids, scales=scales, weights=weights)
    y.float().square().sum().backward()
    for g, w in zip(inside, (x.grad, a.grad, b.grad, weights.grad)):
        assert torch.equal(g, w)


def test_every_op_has_an_autocast_kernel():
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lora_ops::")]
    assert "lora_ops::grouped_lora" in names and len(names) >= 8
    for key in ("AutocastCPU", "AutocastCUDA"):
        missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, key)]
        assert not missing, f"no {key} kernel (csrc/autocast/other_ops.cpp): {missing}"


@pytest.mark.parametrize("device,dtype", AMP)
def test_other_ops_run_as_called_under_autocast(device, dtype):
    """Their kernels' own ATen calls (GEMMs on fp32 buffers, QR, SVD) must not be autocast: results inside an
    autocast region equal those outside, bit for bit (they used to differ by up to 0.7, and arrow_route raised)."""
    _need(device)
    g = torch.Generator().manual_seed(3)
    a, b = (t.to(device) for t in make_bank(4, 8, 64, 48))
    x = torch.randn(200, 64, generator=g).to(device)
    ids = make_ids("uniform", (200,), 4, generator=g, device=device)
    go = torch.randn(200, 48, generator=g).to(device)
    m = torch.randn(3, 40, 30, generator=g).to(device)

    def calls():
        protos = lora_ops.arrow_prototypes(a, b)
        return [*torch.ops.lora_ops.grouped_lora_backward.default(go, x, a, b, ids, None, None, [True] * 4),
                *lora_ops.merge_lowrank(a, b, torch.rand(4, generator=torch.Generator().manual_seed(0)).to(device),
                                        8, return_singular_values=True),
                *lora_ops.randomized_svd(m, 5, generator=torch.Generator().manual_seed(0)),
                protos, *lora_ops.arrow_route(x, protos, 2)]

    want = calls()
    with torch.autocast(device, dtype=dtype):
        got = calls()
    for i, (g_, w) in enumerate(zip(got, want)):
        assert g_.dtype == w.dtype and torch.equal(g_, w), i


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_step_under_autocast(backend):
    x, a, b, ids, scales, weights = _problem("cpu", requires_grad=True)

    def step(x, a, b, ids, scales, weights):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lora_ops.grouped_lora(x, a, b, ids, scales=scales, weights=weights)
        return y.float().square().mean()

    eager = step(x, a, b, ids, scales, weights)
    eager_grads = torch.autograd.grad(eager, (x, a, b, weights))
    compiled = torch.compile(step, backend=backend, fullgraph=True)(x, a, b, ids, scales, weights)
    grads = torch.autograd.grad(compiled, (x, a, b, weights))
    torch.testing.assert_close(compiled, eager, atol=0, rtol=1e-6)
    for g, e in zip(grads, eager_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)  # inductor may fuse the casts differently


def test_opcheck_under_autocast():
    x, a, b, ids, scales, weights = _problem("cpu", requires_grad=True)
    go = torch.randn(37, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.library.opcheck(OP, (x, a, b, ids, scales, weights, True))
        torch.library.opcheck(torch.ops.lora_ops.grouped_lora_backward.default,
                              (go, x.detach(), a.detach(), b.detach(), ids, scales, weights.detach(), [True] * 4))


# ---- MultiLoRALinear and a training step ----


def _layer(device, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(24, 20).requires_grad_(False)
    adapters = {f"a{i}": (torch.randn(r, 24) / 5, torch.randn(20, r) / 2, 0.5 + i) for i, r in enumerate((2, 5, 3))}
    return MultiLoRALinear(base, AdapterBank.from_adapters(adapters, trainable=True)).to(device)


@pytest.mark.parametrize("device,dtype", AMP)
def test_multilora_linear_under_autocast(device, dtype):
    _need(device)
    layer = _layer(device)
    x = torch.randn(3, 5, 24, device=device)
    ids = torch.randint(-1, 3, (3, 5), device=device)

    def run(amp: bool):
        layer.zero_grad()
        with torch.autocast(device, dtype=dtype, enabled=amp):
            y = layer(x, ids)
        y.float().square().mean().backward()
        return y.detach(), layer.bank.lora_a.grad.clone(), layer.bank.lora_b.grad.clone()

    want = run(False)
    got = run(True)
    assert got[0].dtype == dtype and got[1].dtype == got[2].dtype == torch.float32
    assert _rel_err(got[0], want[0]) <= AMP_TOL[dtype]
    assert _rel_err(got[1:], want[1:], floor=0) <= AMP_TOL[dtype]
    # exactly the base layer under autocast plus the op on explicitly cast operands
    bank = layer.bank
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        base = layer.base(x)
    delta = lora_ops.grouped_lora(x.to(dtype), bank.lora_a.to(dtype), bank.lora_b.to(dtype), ids,
                                  scales=bank.scales)
    assert torch.equal(got[0], base + delta)
    with torch.no_grad(), torch.autocast(device, dtype=dtype):  # inference mode takes the in-place add
        assert torch.equal(layer(x, ids), got[0])
    with torch.no_grad(), torch.autocast(device, dtype=dtype), lora_ops.nn.reference_op():
        assert _rel_err(layer(x, ids), got[0]) <= AMP_TOL[dtype]


@pytest.mark.parametrize("device,dtype", AMP)
@pytest.mark.parametrize("router", ["arrow", "moa_soft"])
def test_routed_layer_under_autocast(device, dtype, router):
    """A MultiLoRALinear with its own router: Arrow (arrow_route inside the region) or MoA's soft mixture (fp32
    weights from the router, trained through grouped_lora's weight gradient)."""
    _need(device)
    from lora_ops.routing import ArrowRouter, MoARouter

    layer = _layer(device)
    bank = layer.bank
    if router == "arrow":
        layer.router = ArrowRouter.from_adapters(bank.lora_a.detach(), bank.lora_b.detach(), 2).to(device)
    else:
        layer.router = MoARouter(24, 3, mode="soft").to(device)
    x = torch.randn(3, 5, 24, device=device)
    trained = [bank.lora_a, bank.lora_b] + ([layer.router.proj.weight] if router == "moa_soft" else [])

    def run(amp: bool):
        layer.zero_grad()
        with torch.autocast(device, dtype=dtype, enabled=amp):
            y = layer(x)
        y.float().square().mean().backward()
        return y.detach(), [p.grad.clone() for p in trained]

    want, got = run(False), run(True)
    assert got[0].dtype == dtype and all(g.dtype == torch.float32 for g in got[1])
    assert _rel_err(got[0], want[0]) <= AMP_TOL[dtype]
    for g, w in zip(got[1], want[1]):
        assert _rel_err(g, w, floor=0) <= AMP_TOL[dtype]


def _tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(cfg).eval()


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("device,dtype", AMP)
def test_training_step_under_autocast(device, dtype):
    """A wrapped tiny Llama, 3 trainable adapters in one batch: loss, adapter gradients and one SGD step under
    autocast (fp16 with GradScaler) against the same step in fp32."""
    _need(device)
    model = _tiny_llama().requires_grad_(False)
    banks = {name: AdapterBank.new(m, ["t0", "t1", "t2"], rank=4, alpha=8)
             for name, m in model.named_modules() if name.endswith(TARGETS)}
    for bank in banks.values():  # B = 0 would make the first step's A gradient exactly zero
        nn.init.normal_(bank.lora_b, std=0.02)
    wrap(model, banks).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    tokens = torch.randint(0, 128, (6, 9), device=device)
    ids = torch.tensor([0, 1, 2, 0, -1, 2], device=device)

    def step(amp: bool):
        for p, s in zip(params, start):
            p.data.copy_(s)
        opt = torch.optim.SGD(params, lr=0.5)
        scaler = torch.amp.GradScaler(device, init_scale=2.0**8, enabled=amp and dtype == torch.float16)
        with adapter_ids(model, ids), torch.autocast(device, dtype=dtype, enabled=amp):
            logits = model(tokens).logits
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
        opt.zero_grad()
        scaler.scale(loss).backward()
        grads = [p.grad.clone() for p in params]
        scaler.step(opt)
        scaler.update()
        if scaler.is_enabled():
            assert scaler.get_scale() == 2.0**8  # no overflow: the step was taken
            grads = [g / 2.0**8 for g in grads]
        return loss.detach(), logits.detach(), grads, [p.detach().clone() for p in params]

    loss32, logits32, grads32, after32 = step(False)
    loss, logits, grads, after = step(True)
    assert logits.dtype == dtype and all(p.dtype == torch.float32 for p in after)
    assert all(g.dtype == torch.float32 for g in grads)
    tol = AMP_TOL[dtype]
    assert abs(loss.item() - loss32.item()) <= tol * max(1.0, loss32.item())
    assert _rel_err(logits, logits32) <= tol
    assert _rel_err(grads, grads32, floor=0) <= tol  # gradients: relative to their own scale
    updates = [p - s for p, s in zip(after, start)]
    assert _rel_err(updates, [p - s for p, s in zip(after32, start)], floor=0) <= tol


# ---- lora_ops.peft.accelerate ----


@pytest.mark.parametrize("device,dtype", AMP)
def test_accelerate_under_autocast(device, dtype):
    _need(device)
    peft = pytest.importorskip("peft")
    from lora_ops.peft import accelerate, deaccelerate

    torch.manual_seed(1)
    cfg = dict(target_modules=list(TARGETS), init_lora_weights=False, lora_dropout=0.0)
    model = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, **cfg), adapter_name="p0")
    model.add_adapter("p1", peft.LoraConfig(r=2, lora_alpha=2, **cfg))
    model.add_adapter("p2", peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True, **cfg))
    model.eval().to(device)
    for _, p in model.named_parameters():
        p.requires_grad_("lora_" in _)
    tokens = torch.randint(0, 128, (4, 7), device=device)
    batch = ["p0", "p1", "__base__", "p2"]
    probe = model.base_model.model.model.layers[1].mlp.down_proj.lora_A["p2"].weight

    def run(amp: bool):
        model.zero_grad()
        with torch.autocast(device, dtype=dtype, enabled=amp):
            logits = model(tokens, adapter_names=batch).logits
        logits.float().square().mean().backward()
        return logits.detach(), probe.grad.clone()

    peft32, peft_amp = run(False), run(True)
    accelerate(model)
    try:
        ours32, ours_amp = run(False), run(True)
    finally:
        deaccelerate(model)
    tol = AMP_TOL[dtype]
    assert ours_amp[0].dtype == peft_amp[0].dtype == dtype and ours_amp[1].dtype == torch.float32
    assert _rel_err(ours32[0], peft32[0]) <= 1e-5
    for got, want in ((ours_amp, peft_amp), (ours_amp, peft32)):
        assert _rel_err(got[0], want[0]) <= tol
        assert _rel_err(got[1], want[1], floor=0) <= tol  # gradients: relative to their own scale
    with torch.no_grad(), torch.autocast(device, dtype=dtype):  # inference: the cached bank, cast per call
        accelerate(model)
        try:
            assert torch.equal(model(tokens, adapter_names=batch).logits, ours_amp[0])
        finally:
            deaccelerate(model)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_example_trains_under_autocast(amp, capsys):
    """examples/train_many_adapters.py --amp bf16 (autocast) and --amp fp16 (autocast + GradScaler) on CPU."""
    import importlib.util
    import math
    from pathlib import Path

    pytest.importorskip("transformers")
    path = Path(__file__).resolve().parents[1] / "examples" / "train_many_adapters.py"
    spec = importlib.util.spec_from_file_location("train_many_adapters_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--adapters", "2", "--steps", "3", "--rows-per-adapter", "1", "--seq", "5", "--rank", "2",
                  "--amp", amp])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("step    2")
    assert all(math.isfinite(float(v)) for v in last.split()[-2:])


def test_compiled_multilora_linear_under_autocast():
    # lora_ops.nn.lora_input reads the autocast state: dynamo must trace it without a graph break
    layer = _layer("cpu")
    x = torch.randn(3, 5, 24)
    ids = torch.randint(-1, 3, (3, 5))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = layer(x, ids), compiled(x, ids)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    got.float().sum().backward()
    assert layer.bank.lora_a.grad.dtype == torch.float32
