"""Training 4 adapters at once on different rows of one batch == training each alone with PEFT on its rows."""

import copy

import pytest
import torch

from lora_ops.nn import adapter_ids, per_adapter_loss, wrap

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from lora_ops.peft import load_adapters  # noqa: E402

RANKS, ALPHAS = (2, 4, 8, 4), (4, 8, 8, 2)
NAMES = [f"task{i}" for i in range(4)]
IDS = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])  # two rows per adapter, interleaved


def _optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.2, momentum=0.9)
    # AdamW keeps per-element state, so a stacked bank gets exactly the per-adapter updates as long as every
    # adapter is in every batch (an absent adapter would still move by its momentum and weight decay).
    # eps well above float32 noise: Adam divides by sqrt(v), so with the default 1e-8 an element whose gradient is
    # near zero turns summation-order rounding (batched vs per-adapter) into a visible step difference.
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, eps=1e-4)


def _row_losses(logits, targets):
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return ce.view(targets.shape).mean(1)


def check_training_matches_peft(optimizer="sgd", steps=3):
    """Trains the 4 adapters together (lora_ops) and one by one (PEFT); asserts equal factors afterwards."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    base = transformers.LlamaForCausalLM(cfg)
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    pm = None
    for name, r, alpha in zip(NAMES, RANKS, ALPHAS):
        lc = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                             lora_dropout=0.0)
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(base), lc, adapter_name=name)
        else:
            pm.add_adapter(name, lc)
    banks = load_adapters(pm, trainable=True)  # same initial factors, copied before anyone trains
    initial_b = banks["model.layers.0.self_attn.q_proj"].lora_b.detach().clone()

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 128, (steps, len(IDS), 6), generator=g)
    labels = (tokens + 1 + IDS[None, :, None]) % 128  # adapter i learns "next token = token + i + 1"

    multi = copy.deepcopy(base)
    multi.requires_grad_(False)
    wrap(multi, banks)
    params = [p for b in banks.values() for p in b.parameters()]
    opt = _optimizer(optimizer, params)
    for step in range(steps):
        with adapter_ids(multi, IDS):
            loss = per_adapter_loss(_row_losses(multi(tokens[step]).logits, labels[step]), IDS)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for i, name in enumerate(NAMES):
        pm.set_adapter(name)  # only this adapter is trainable now
        mine = [p for n, p in pm.named_parameters() if f".{name}." in n]
        assert mine and all(p.requires_grad for p in mine)
        opt = _optimizer(optimizer, mine)
        rows = (IDS == i).nonzero().squeeze(1)
        for step in range(steps):
            loss = _row_losses(pm(tokens[step][rows]).logits, labels[step][rows]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    from peft.tuners.lora import Linear

    checked = 0
    for module, layer in pm.named_modules():
        if not isinstance(layer, Linear):
            continue
        bank = banks[module[len("base_model.model."):]]
        for name in NAMES:
            a, b, _ = bank.adapter(name)
            torch.testing.assert_close(a, layer.lora_A[name].weight, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(b, layer.lora_B[name].weight, atol=1e-5, rtol=1e-4)
            checked += 1
        # padded rows / columns stay exactly zero
        for i, r in enumerate(bank.ranks):
            assert torch.count_nonzero(bank.lora_a[i, r:]) == 0 and torch.count_nonzero(bank.lora_b[i, :, r:]) == 0
    assert checked == 2 * len(targets) * len(NAMES)
    # and training moved every adapter away from its initial factors
    moved = (banks["model.layers.0.self_attn.q_proj"].lora_b - initial_b).flatten(1).abs().amax(1)
    assert bool((moved > 1e-4).all()), moved


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_four_adapters_in_one_batch_match_training_alone(optimizer):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_training_matches_peft(optimizer)
    finally:
        torch.set_num_threads(n)


def test_per_adapter_loss():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    ids = torch.tensor([0, 1, 0, 1, -1])
    assert per_adapter_loss(losses, ids).item() == pytest.approx(2.0 + 3.0)
    assert per_adapter_loss(losses, torch.full((5,), -1)).item() == 0.0
    with pytest.raises(ValueError, match="ids"):
        per_adapter_loss(losses, ids[:3])


def test_example_script_trains_and_saves_peft_adapters(tmp_path, capsys):
    """examples/train_many_adapters.py end to end (through the reference op, so it runs in any build)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_many_adapters.py"
    spec = importlib.util.spec_from_file_location("train_many_adapters", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        example.main(["--adapters", "3", "--steps", "3", "--rows-per-adapter", "1", "--seq", "5", "--rank", "2",
                      "--reference-op", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert "step    2" in out and out.count("saved task") == 3
    for i in range(3):
        cfg = peft.PeftConfig.from_pretrained(tmp_path / f"task{i}")
        assert cfg.r == 2 and set(cfg.target_modules) >= {"model.layers.0.self_attn.q_proj"}
    # the trained adapter moved B away from zero (PEFT's init) and PEFT loads it
    torch.manual_seed(0)
    base = example.build_model(None)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "task1")
    b = loaded.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert b.abs().max() > 0
