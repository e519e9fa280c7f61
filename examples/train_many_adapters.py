"""Train several LoRA adapters at once, each on its own rows of every batch, then save each as a PEFT adapter.

    python examples/train_many_adapters.py --adapters 4 --steps 50 --out runs/many
    python examples/train_many_adapters.py --amp bf16                     # or --amp fp16 --device cuda

A tiny Llama built from a config (no download) learns one synthetic task per adapter ("next token = token + i + 1"
for adapter i). Every batch mixes all tasks; each row picks its adapter through ``lora_ops.nn.adapter_ids``. With
``per_adapter_loss`` (a mean per adapter, summed) and a per-element optimizer (SGD, Adam/AdamW) every adapter ends
exactly where training it alone on its rows would (tests/test_train_many_adapters.py checks this against PEFT).
Point ``--model`` at a local Hugging Face checkpoint folder to use a real model instead.

``--reference-op`` trains through the pure-torch reference op instead (slow; for checking gradients).
``--amp bf16`` trains under ``torch.autocast`` in bfloat16; ``--amp fp16`` in float16 with a ``GradScaler`` (fp16's
narrow range needs loss scaling, bf16 has fp32's range). The adapter banks stay float32 master weights either way:
grouped_lora casts them per call like ``nn.Linear`` does, and their gradients arrive in float32.
For real jobs (datasets, per-adapter rank / lr / targets, checkpoints, torchrun) use ``lora-ops train CONFIG``
(lora_ops/train.py; README "Training many adapters in one job").
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import lora_ops.nn as lnn
from lora_ops.peft import save_adapter


def build_model(path: str | None):
    import transformers

    if path:
        return transformers.AutoModelForCausalLM.from_pretrained(path)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(cfg)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rows-per-adapter", type=int, default=4)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    p.add_argument("--model", help="local transformers checkpoint folder (default: a tiny random Llama)")
    p.add_argument("--out", help="folder to save each adapter into (PEFT format, one sub-folder per adapter)")
    p.add_argument("--reference-op", action="store_true", help="train through the pure-torch reference op")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="mixed precision (autocast)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    model = build_model(args.model)
    model.requires_grad_(False)  # only the adapter banks train
    names = [f"task{i}" for i in range(args.adapters)]
    # one bank per targeted layer, PEFT's default init (A Kaiming-uniform, B = 0)
    lnn.wrap(model, lambda _name, layer: lnn.AdapterBank.new(layer, names, args.rank, args.alpha), args.targets)
    model.to(args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    vocab = model.config.vocab_size
    ids = torch.arange(args.adapters).repeat_interleave(args.rows_per_adapter)  # every adapter in every batch
    ids = ids.to(args.device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    device_type = torch.device(args.device).type
    scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)  # disabled: a pass-through
    ctx = lnn.reference_op() if args.reference_op else contextlib.nullcontext()
    with ctx:
        for step in range(args.steps):
            tokens = torch.randint(0, vocab, (len(ids), args.seq)).to(args.device)
            labels = (tokens + 1 + ids[:, None]) % vocab
            with lnn.adapter_ids(model, ids), torch.autocast(device_type, dtype=amp_dtype or torch.bfloat16,
                                                             enabled=amp_dtype is not None):
                logits = model(tokens).logits
            ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
            row_loss = ce.view(labels.shape).mean(1)
            loss = lnn.per_adapter_loss(row_loss, ids)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)  # skipped (and the scale lowered) if fp16 gradients overflowed
            scaler.update()
            if step % 10 == 0 or step == args.steps - 1:
                per = [f"{row_loss[ids == i].mean().item():.3f}" for i in range(args.adapters)]
                print(f"step {step:4d}  loss per adapter {' '.join(per)}")
    if args.out:
        for n in names:
            path = save_adapter(model, n, f"{args.out}/{n}", base_model_name_or_path=args.model)
            print(f"saved {n} -> {path}")


if __name__ == "__main__":
    main()
