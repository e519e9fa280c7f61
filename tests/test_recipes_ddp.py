"""The training loop under DDP: 2 CPU processes (gloo) give the single-process result of the same global batch."""

import functools
import os
import socket

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from lora_ops._io import atomic_save_safetensors, load_tensors  # noqa: E402
from lora_ops.recipes import data, ilora, train  # noqa: E402
from lora_ops.recipes.model import TinyConfig, build_tiny_llama  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _train_once():
    """A few routing-tuned steps on a tiny random base: (PEFT state dict, final log entry)."""
    torch.set_num_threads(1)
    tok = data.CharTokenizer.default()
    base = build_tiny_llama(tok.vocab_size, TinyConfig(16, 1, 2, 32, 32), seed=0)
    for p in base.parameters():
        p.requires_grad_(False)
    ds = data.synthetic(seed=0, n_train=16, n_valid=1, n_test=1, n_general=32, tasks=["rev"])
    gen_rows = [train.encode_text(tok, t, 32) for t in ds.general]

    def extra(gen):
        return [gen_rows[i] for i in torch.randint(len(gen_rows), (4,), generator=gen).tolist()]

    cfg = train.TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup=1, seed=3, desc="ddp")
    return train.train_lora(base, tok, ds.train, cfg, train.LoRAConfig(r=2, alpha=4.0), max_len=32,
                            loss_fn=functools.partial(ilora.routing_loss, eps=(1.0, 1.0, 1.0)),
                            extra_rows=extra, progress=False)


def _worker(rank, world, port, out):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    try:
        state, log = _train_once()
        assert train.world() == world and train.rank() == rank
        atomic_save_safetensors(os.path.join(out, f"rank{rank}.safetensors"), state)
        torch.save(torch.tensor([log[-1]["loss"], log[-1]["ce"], log[-1]["kl"], log[-1]["act"]]),
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single_state, single_log = _train_once()
    assert not (dist.is_initialized())  # the single-process run used no process group
    ranks = [load_tensors(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    assert set(ranks[0]) == set(single_state)
    for k, v in single_state.items():
        torch.testing.assert_close(ranks[0][k], ranks[1][k], rtol=0, atol=0)  # ranks stay in lockstep
        # float summation order differs (two partial sums + all-reduce), so not bit-identical
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5)
    assert any(v.abs().sum() > 0 for k, v in single_state.items() if "lora_B" in k)  # training moved B
    logged = torch.load(tmp_path / "rank0.pt", weights_only=True)
    expect = torch.tensor([single_log[-1][k] for k in ("loss", "ce", "kl", "act")])
    torch.testing.assert_close(logged, expect, rtol=1e-4, atol=1e-6)
