"""grouped_lora's CUDA backward against autograd through the float64 reference and against the CPU kernel
(skipped without a GPU). Tolerances as in tests/test_grouped_lora_backward.py."""

from __future__ import annotations

import pytest
import torch

import lora_ops
from tests.helpers import DISTRIBUTIONS, make_bank, make_ids
from tests.test_grouped_lora_backward import run_case

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and lora_ops.cuda_built()),
                                reason="needs a CUDA device and lora_ops built with CUDA")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
OP = torch.ops.lora_ops.grouped_lora_backward.default


def problem(T, k, n, r, d_in, d_out, dtype=torch.float32, dist="mixed_none", device="cuda"):
    """(grad_out, x, lora_a, lora_b, ids, scales, weights) on ``device``."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    a, b = make_bank(n, r, d_in, d_out, dtype)
    ids = make_ids(dist, (T,) + ((k,) if k else ()), n, generator=g)
    args = (torch.randn(T, d_out, dtype=dtype, generator=g), torch.randn(T, d_in, dtype=dtype, generator=g), a, b,
            ids, torch.rand(n, generator=g) + 0.5, torch.rand(ids.shape, generator=g))
    return tuple(t.to(device) for t in args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [None, 1, 3])
@pytest.mark.parametrize("shape", [(37, 5, 3, 67, 45), (70, 3, 16, 128, 96), (9, 2, 1, 1, 1), (20, 4, 40, 257, 31)])
def test_grads_match_reference(dtype, k, shape):
    t, n, r, d_in, d_out = shape  # r = 40: several rank chunks of the pair and segment kernels
    run_case("cuda", dtype, (t,), k, n, r, d_in, d_out)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("k", [None, 3])
def test_distributions(dist, k):
    run_case("cuda", torch.float32, (70,), k, 8, 16, 96, 80, dist=dist)


@pytest.mark.parametrize("r", [1, 7, 64, 200])
def test_ranks(r):
    run_case("cuda", torch.float32, (33,), None, 4, r, 130, 70)


@pytest.mark.parametrize("k", [None, 2])
def test_matches_cpu_kernel_float64_and_deterministic(k):
    args = problem(300, k, 6, 16, 200, 150, torch.float64)
    mask = [True] * 4
    got = OP(*args, mask)
    want = OP(*(t.cpu() for t in args), mask)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-10)
    for g, again in zip(got, OP(*args, mask)):
        assert torch.equal(g, again)  # no atomics: bitwise reproducible


def test_training_shape_and_absent_adapters():
    args = problem(1024, None, 8, 16, 512, 384, dist="zipf")
    go, x, a, b, ids, s, w = args
    ids = ids.clamp(max=5)  # adapters 6, 7 absent
    got = OP(go, x, a, b, ids, s, w, [True] * 4)
    want = OP(*(t.cpu() for t in (go, x, a, b, ids, s, w)), [True] * 4)
    for g, e in zip(got, want):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-4, atol=1e-4)
    assert got[1][6:].abs().max() == 0 and got[2][6:].abs().max() == 0


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_empty_batch(lead):
    got = run_case("cuda", torch.float32, lead, 2, 3, 4, 16, 8)
    assert torch.equal(got[1], torch.zeros(3, 4, 16, device="cuda"))


def test_empty_sizes():
    for T, n, r, d_in, d_out in [(4, 3, 0, 8, 8), (4, 0, 4, 8, 8), (4, 3, 4, 0, 8), (4, 3, 4, 8, 0)]:
        args = problem(T, None, n, r, d_in, d_out, dist="all_none" if n == 0 else "uniform")
        for g, t in zip(OP(*args, [True] * 4), (args[1], args[2], args[3], args[6])):
            assert g.shape == t.shape and (g.numel() == 0 or g.abs().max() == 0)


def test_unchecked_invalid_ids_get_nothing():
    go, x, a, b, ids, s, w = problem(8, None, 3, 4, 16, 8)
    bad = torch.tensor([0, 3, -2, 2**62, 1, -(2**62), 2, -1], device="cuda")
    valid = torch.where((bad >= 0) & (bad < 3), bad, torch.full_like(bad, -1))
    for g, e in zip(OP(go, x, a, b, bad, s, w, [True] * 4), OP(go, x, a, b, valid, s, w, [True] * 4)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_cuda_graph_capture_of_backward():
    """No host sync in the backward op: capture it and replay on new inputs."""
    args = problem(64, 2, 8, 16, 256, 128)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        OP(*args, [True] * 4)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = OP(*args, [True] * 4)
    new = problem(64, 2, 8, 16, 256, 128, dist="zipf")
    for t, n in zip(args, new):
        t.copy_(n)
    graph.replay()
    torch.cuda.synchronize()
    want = OP(*(t.cpu() for t in args), [True] * 4)
    for g, e in zip(out, want):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    args = problem(9, 2, 4, 8, 40, 24, dtype)
    for mask in ([True] * 4, [True, False, True, False]):
        torch.library.opcheck(OP, (*args, mask))
    go, x, a, b, ids, s, w = args
    x, a, b, w = (t.clone().requires_grad_() for t in (x, a, b, w))
    torch.library.opcheck(torch.ops.lora_ops.grouped_lora.default, (x, a, b, ids, s, w, True))


def test_gradcheck_float64():
    go, x, a, b, ids, s, w = problem(7, 2, 3, 2, 5, 4, torch.float64)
    x, a, b, w = (t.clone().double().requires_grad_() for t in (x, a, b, w))
    assert torch.autograd.gradcheck(lambda x, a, b, w: lora_ops.grouped_lora(x, a, b, ids, scales=s.double(),
                                                                             weights=w), (x, a, b, w))
