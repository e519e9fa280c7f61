"""Run by tests/test_distributed_tp.py under torchrun (2 CPU processes, gloo): tensor-parallel grouped_lora and
MultiLoRALinear against the same computation in one process. Raises on any mismatch."""

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import lora_ops
from lora_ops.distributed import parallelize_multi_lora
from lora_ops.nn import AdapterBank, MultiLoRALinear, adapter_ids



def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def close(got, want, msg):
    """float32 sums in another order: within 1e-6 of the largest entry (gradients reach ~50 here)."""
    torch.testing.assert_close(full(got), want, rtol=1e-5, atol=1e-6 * max(1.0, float(want.abs().max())), msg=msg)


def check_op_layouts(mesh):
    """Each layout of the sharding rules, forward and backward, top-k ids with weights and -1 rows."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 16, generator=g)
    a, b = torch.randn(3, 4, 16, generator=g), torch.randn(3, 10, 4, generator=g)
    ids = torch.randint(-1, 3, (4, 6, 2), generator=g)
    w, scales = torch.rand(4, 6, 2, generator=g), torch.tensor([0.5, 1.0, 2.0])
    go = torch.randn(4, 6, 10, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, a, b, w)]
    want = lora_ops.grouped_lora(*leaves[:3], ids, scales=scales, weights=leaves[3])
    want.backward(go)
    R = Replicate()
    layouts = {"replicated": (R, R, R, R), "column": (R, R, Shard(1), R), "row": (Shard(2), Shard(2), R, R),
               "batch": (Shard(0), R, R, Shard(0))}
    for name, (px, pa, pb, pi) in layouts.items():
        dt = [distribute_tensor(t, mesh, [p]).requires_grad_() for t, p in ((x, px), (a, pa), (b, pb), (w, pi))]
        got = lora_ops.grouped_lora(*dt[:3], distribute_tensor(ids, mesh, [pi]), scales=distribute_tensor(
            scales, mesh, [R]), weights=dt[3])
        close(got, want, name)
        got.backward(distribute_tensor(go, mesh, list(got.placements) if got.placements[0].is_shard() else [R]))
        for leaf, d, what in zip(leaves, dt, ("x", "lora_a", "lora_b", "weights")):
            close(d.grad, leaf.grad, f"{name}: grad {what}")


class MLP(nn.Module):
    def __init__(self, d=16, hidden=24, n=3):
        super().__init__()

        def layer(d_in, d_out):
            bank = AdapterBank(torch.randn(n, 4, d_in) * 0.3, torch.randn(n, d_out, 4) * 0.3,
                               torch.tensor([0.5, 1.0, 2.0]), ["a", "b", "c"], trainable=True)
            return MultiLoRALinear(nn.Linear(d_in, d_out), bank)

        self.up, self.down = layer(d, hidden), layer(hidden, d)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def check_layers(mesh):
    """Column-parallel up, row-parallel down (the Megatron MLP), ids per sequence: forward and every gradient."""
    torch.manual_seed(0)
    ref = MLP()
    tp = parallelize_multi_lora(copy.deepcopy(ref), mesh, {"up": "colwise", "down": "rowwise"})
    assert tp.up.bank.lora_b.placements == (Shard(1),) and tp.down.bank.lora_a.placements == (Shard(2),)
    assert tp.up.base.weight.placements == (Shard(0),) and tp.down.base.weight.placements == (Shard(1),)
    x = torch.randn(3, 5, 16)
    ids = torch.tensor([0, 2, -1])
    for model in (ref, tp):
        xx = x.clone().requires_grad_()
        with adapter_ids(model, ids):
            out = model(xx)
        out.backward(torch.ones_like(out) + out.detach())  # a non-uniform output gradient
        model.x_grad, model.out = xx.grad, out.detach()
    assert not isinstance(tp.out, DTensor)  # local tensors come out, as with torch's styles
    close(tp.out, ref.out, "output")
    close(tp.x_grad, ref.x_grad, "grad x")
    params = dict(tp.named_parameters())
    for name, p in ref.named_parameters():
        got = params[name].grad
        assert got.placements == params[name].placements, (name, got.placements)  # no Partial left behind
        close(got, p.grad, name)


LLAMA_PLAN = {"model.layers.*.self_attn.q_proj": "colwise", "model.layers.*.self_attn.k_proj": "colwise",
              "model.layers.*.self_attn.v_proj": "colwise", "model.layers.*.self_attn.o_proj": "rowwise",
              "model.layers.*.mlp.gate_proj": "colwise", "model.layers.*.mlp.up_proj": "colwise",
              "model.layers.*.mlp.down_proj": "rowwise"}


def check_llama(mesh):
    """A tiny transformers Llama with banks on all seven projections, Megatron-style plan: logits and gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_ops.nn import wrap

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50)
    ref = LlamaForCausalLM(cfg).eval()
    ref.requires_grad_(False)

    def bank(_name, layer):
        a = torch.randn(3, 4, layer.in_features) * 0.2
        return AdapterBank(a, torch.randn(3, layer.out_features, 4) * 0.2, torch.tensor([1.0, 0.5, 2.0]),
                           ["a", "b", "c"], trainable=True)

    wrap(ref, bank, list({k.rsplit(".", 1)[1] for k in LLAMA_PLAN}))
    tp = parallelize_multi_lora(copy.deepcopy(ref), mesh, LLAMA_PLAN)
    for layer in tp.model.layers:
        assert layer.self_attn.q_proj.bank.lora_b.placements == (Shard(1),)
        assert layer.mlp.down_proj.bank.lora_a.placements == (Shard(2),)
        assert layer.self_attn.o_proj.base.weight.to_local().shape == (32, 16)  # half of d_in on each rank
    tokens = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(2))
    for model in (ref, tp):
        with adapter_ids(model, torch.tensor([2, 0, -1])):
            logits = model(tokens, use_cache=False).logits
        logits.square().mean().backward()
        model.logits = logits.detach()
    close(tp.logits, ref.logits, "llama logits")
    params = dict(tp.named_parameters())
    for name, p in ref.named_parameters():
        if p.requires_grad:
            close(params[name].grad, p.grad, f"llama {name}")


def main():
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        check_op_layouts(mesh)
        check_layers(mesh)
        check_llama(mesh)
        if dist.get_rank() == 0:
            print("tensor parallel: all checks passed")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
