"""grouped_lora's CUDA kernels against the float64 reference (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

import lora_ops
from lora_ops.reference import grouped_lora as reference

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and lora_ops.cuda_built()),
                                reason="needs a CUDA device and lora_ops built with CUDA")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DISTRIBUTIONS = ["same", "uniform", "zipf", "distinct", "none", "mixed"]


def make_ids(dist: str, T: int, k: int, N: int, gen: torch.Generator) -> torch.Tensor:
    """[T, k] int64 ids drawn from one of DISTRIBUTIONS ("distinct" needs N >= T * k)."""
    n = T * k
    if dist == "same":
        ids = torch.full((n,), N - 1)
    elif dist == "zipf":
        ids = torch.multinomial(torch.arange(1, N + 1, dtype=torch.float64) ** -1.2, n, replacement=True, generator=gen)
    elif dist == "distinct":
        ids = torch.randperm(N, generator=gen)[:n]
    elif dist == "none":
        ids = torch.full((n,), -1)
    else:  # uniform, or mixed: uniform with about a third of the slots empty
        ids = torch.randint(0, N, (n,), generator=gen)
        if dist == "mixed":
            ids[torch.rand(n, generator=gen) < 0.35] = -1
    return ids.view(T, k)


def make_problem(T, d_in, d_out, r, N, k, dtype, dist="uniform", seed=0):
    """(x, lora_a, lora_b, ids) and dict(scales, weights) on the GPU; ids are [T] when k == 1, else [T, k]."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to("cuda", dtype)

    x, a, b = rand(T, d_in), rand(N, r, d_in, std=max(d_in, 1) ** -0.5), rand(N, d_out, r, std=max(r, 1) ** -0.5)
    ids = make_ids(dist, T, k, N, gen)
    ids = (ids[:, 0] if k == 1 else ids).cuda()
    kwargs = dict(scales=(torch.rand(N, generator=gen) + 0.5).cuda(), weights=torch.rand(ids.shape, generator=gen).cuda())
    return (x, a, b, ids), kwargs


def assert_matches_reference(out, args, kwargs):
    """fp32/fp64: close to the exact answer relative to the output scale; fp16/bf16: at most twice the error of the
    same computation in torch at that precision (plus one ulp of the output scale)."""
    x = args[0]
    exact = reference(*(t.double() if t.is_floating_point() else t for t in args), compute_dtype=torch.float64, **kwargs)
    assert out.shape == exact.shape and out.dtype == x.dtype and out.device == x.device
    scale = exact.abs().max().item() if exact.numel() else 0.0
    if x.dtype in (torch.float32, torch.float64):
        tol = 1e-4 if x.dtype == torch.float32 else 1e-10
        torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol * scale)
        return
    same = reference(*args, compute_dtype=x.dtype, **kwargs)
    err, ref_err = ((o.double() - exact).abs().max().item() if exact.numel() else 0.0 for o in (out, same))
    assert err <= 2 * ref_err + torch.finfo(x.dtype).eps * scale, (err, ref_err, scale)


def run(args, kwargs, **kw):
    return lora_ops.grouped_lora(*args, **kwargs, **kw)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_distributions(dtype, k, dist):
    T = 45  # not a multiple of the row blocks: the last block is partly empty
    args, kwargs = make_problem(T, 264, 131, 16, T * k if dist == "distinct" else 7, k, dtype, dist)
    out = run(args, kwargs)
    assert_matches_reference(out, args, kwargs)
    assert torch.equal(out, run(args, kwargs, check_ids=False))  # deterministic: no atomics
    if dtype == torch.float64:  # same semantics as the CPU kernel
        cpu = lora_ops.grouped_lora(*(t.cpu() for t in args), **{n: t.cpu() for n, t in kwargs.items()})
        torch.testing.assert_close(out.cpu(), cpu, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "T, d_in, d_out, r, k",
    [
        (1, 4096, 4096, 16, 1),  # decode: d_in split over many blocks
        (5, 1031, 77, 1, 2),  # odd d_in: scalar loads
        (33, 64, 300, 256, 1),  # rank 256: several rank chunks
        (3, 16392, 40, 8, 3),  # long rows, many splits
        (130, 72, 9, 13, 2),  # odd rank: scalar B loads
        (17, 3, 5, 200, 1),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_shapes(dtype, T, d_in, d_out, r, k):
    args, kwargs = make_problem(T, d_in, d_out, r, 5, k, dtype, "mixed")
    assert_matches_reference(run(args, kwargs), args, kwargs)


@pytest.mark.parametrize(
    "T, d_in, d_out, r, N, k",
    [(0, 8, 8, 4, 3, 1), (4, 8, 0, 4, 3, 1), (4, 8, 8, 0, 3, 2), (4, 8, 8, 4, 0, 1), (4, 0, 8, 4, 3, 1), (4, 8, 8, 4, 3, 0)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_sizes(dtype, T, d_in, d_out, r, N, k):
    """Every degenerate size gives zeros of the right shape (N = 0: every id is -1)."""
    args, kwargs = make_problem(T, d_in, d_out, r, N, max(k, 1), dtype, "none" if N == 0 else "uniform")
    if k == 0:
        args, kwargs = (*args[:3], args[3].view(T, 1)[:, :0]), dict(kwargs, weights=None)
    out = run(args, kwargs)
    torch.testing.assert_close(out, torch.zeros(T, d_out, dtype=dtype, device="cuda"), rtol=0, atol=0)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t whose data pointer is one element past a 16-byte boundary."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    return out.copy_(t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_layouts(dtype):
    """3-D x, non-contiguous x, and misaligned x / lora_a / lora_b (which must fall back to scalar loads)."""
    (x, a, b, ids), kwargs = make_problem(2 * 5, 64, 96, 16, 6, 2, dtype, "mixed")
    x3, ids3 = x.view(2, 5, 64), ids.view(2, 5, 2)
    kw3 = dict(kwargs, weights=kwargs["weights"].view(2, 5, 2))
    cases = [
        (x3, a, b, ids3),
        (torch.cat([x3, x3], dim=-1)[..., ::2], a, b, ids3),  # strided last dim
        (x3.transpose(0, 1).contiguous().transpose(0, 1), a, b, ids3),  # permuted leading dims
        (misaligned(x3), misaligned(a), misaligned(b), ids3),
    ]
    for args in cases:
        out = run(args, kw3)
        assert out.shape == (2, 5, 96)
        assert_matches_reference(out, args, kw3)


@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_small_invalid_ids(ids_dtype):
    """check_ids=False: ids outside [0, N) contribute nothing (and are never read); check_ids=True: IndexError."""
    (x, a, b, ids), kwargs = make_problem(24, 40, 33, 8, 4, 2, torch.float32, "uniform")
    big = 2**40 if ids_dtype == torch.int64 else 2**30
    ids[:5] = torch.tensor([[4, 0], [-2, 1], [big, -big], [5, 7], [-1, 3]])
    args = (x, a, b, ids.to(ids_dtype))
    assert_matches_reference(run(args, kwargs, check_ids=False), args, kwargs)
    with pytest.raises(IndexError, match="adapter_ids"):
        run(args, kwargs)


def test_cuda_graph():
    """With check_ids=False the op has no host sync: capture once, replay on new inputs (invalid ids included)."""
    args, kwargs = make_problem(64, 256, 128, 16, 8, 2, torch.float32, "mixed")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run(args, kwargs, check_ids=False)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(args, kwargs, check_ids=False)
    new_args, new_kwargs = make_problem(64, 256, 128, 16, 8, 2, torch.float32, "zipf", seed=1)
    new_args[3][:3] = torch.tensor([[8, -3], [2, 100], [-1, 9]])
    for t, new in zip([*args, *kwargs.values()], [*new_args, *new_kwargs.values()]):
        t.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(out, args, kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("check_ids", [True, False])
def test_opcheck(dtype, check_ids):
    args, kwargs = make_problem(9, 40, 24, 8, 4, 2, dtype, "mixed")
    torch.library.opcheck(torch.ops.lora_ops.grouped_lora.default, args, dict(kwargs, check_ids=check_ids))
