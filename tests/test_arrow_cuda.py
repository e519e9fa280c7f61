"""Arrow ops on CUDA against the CPU kernels and the float64 references (skipped without a GPU)."""

import pytest
import torch

import lora_ops
from lora_ops import reference, routing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not lora_ops.torch_has_cuda_kernel("arrow_route"),
                                reason="needs a CUDA device and lora_ops built with CUDA")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def bank(n, r, d_in, d_out, dtype=torch.float32, layers=()):
    g = torch.Generator().manual_seed(n * 1000 + r)
    a = torch.randn(*layers, n, r, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    b = torch.randn(*layers, n, d_out, r, generator=g, dtype=torch.float64) / r**0.5
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 16, 256, 192), (5, 1, 33, 7), (3, 12, 10, 40)])
def test_prototypes_match_cpu_and_dense_svd(dtype, shape):
    a, b = bank(*shape, dtype=dtype, layers=(2,))
    p_cuda = lora_ops.arrow_prototypes(a.cuda(), b.cuda())
    p_cpu = lora_ops.arrow_prototypes(a, b)
    assert p_cuda.dtype == dtype and p_cuda.shape == p_cpu.shape
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    ref = reference.arrow_prototypes(a, b)
    p64 = p_cuda.cpu().double()
    assert torch.minimum((p64 - ref).abs().amax(-1), (p64 + ref).abs().amax(-1)).max() <= tol
    # the sign rule makes both backends return the same vector, not just the same line
    assert (p64 - p_cpu.double()).abs().max() <= 2 * tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "n", "d", "k"), [(256, 64, 2048, 4), (37, 5, 64, 5), (9, 100, 17, 33), (1, 1, 8, 1),
                                                (1000, 40, 96, 1)])
def test_route_matches_cpu(dtype, t, n, d, k):
    x = torch.randn(t, d, dtype=torch.float64).to(dtype)
    protos = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1).to(dtype)
    ids_c, w_c = lora_ops.arrow_route(x.cuda(), protos.cuda(), k, temperature=0.7)
    ids_r, w_r = reference.arrow_route(x, protos, k, temperature=0.7)
    assert ids_c.dtype == torch.int64 and w_c.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # cuBLAS and the reference may round a logit differently; ids must agree wherever the logits are not
    # within rounding of each other, so compare the chosen logits and the weights instead of requiring equal ids
    logits = (x.double() @ protos.double().T).abs()
    chosen = logits.gather(-1, ids_c.cpu())
    expected = logits.gather(-1, ids_r)
    tol = 1e-4 if dtype != torch.float64 else 1e-10
    torch.testing.assert_close(chosen, expected, atol=tol * max(1.0, logits.max().item()), rtol=0)
    torch.testing.assert_close(w_c.cpu().double(), w_r.double(), atol=1e-4 if dtype != torch.float64 else 1e-10,
                               rtol=1e-3)


def test_route_ties_pick_the_lowest_index():
    d = 8
    base = torch.randint(-3, 4, (3, d)).double()  # small integers: exact dot products, so exact ties
    protos = torch.stack([base[1], base[0], base[2], -base[0], base[0], base[2] * 0.5, -base[0]]).cuda()
    x = torch.randint(-4, 5, (64, d)).double().cuda()
    for k in range(1, 8):
        ids, w = lora_ops.arrow_route(x, protos, k)
        ref_ids, ref_w = reference.arrow_route(x.cpu(), protos.cpu(), k)
        assert torch.equal(ids.cpu(), ref_ids)
        torch.testing.assert_close(w.cpu(), ref_w, atol=1e-12, rtol=1e-12)
    ids, w = lora_ops.arrow_route(torch.zeros(4, d, device="cuda"), protos.float(), 3)
    assert ids.tolist() == [[0, 1, 2]] * 4


def test_route_empty_and_nan():
    protos = torch.randn(5, 8, device="cuda")
    ids, w = lora_ops.arrow_route(torch.randn(0, 8, device="cuda"), protos, 2)
    assert ids.shape == w.shape == (0, 2)
    x = torch.randn(3, 8, device="cuda")
    x[1, 2] = float("nan")
    ids, w = lora_ops.arrow_route(x, protos, 2)
    assert torch.isnan(w[1]).all() and not torch.isnan(w[[0, 2]]).any()
    assert ids[1].tolist() == [0, 1]


def test_arrow_forward_and_opcheck():
    n, r, d_in, d_out, k = 16, 8, 128, 96, 4
    a, b = bank(n, r, d_in, d_out)
    a, b = a.cuda(), b.cuda()
    scales = torch.rand(n, device="cuda") + 0.5
    protos = routing.arrow_prototypes(a, b)
    x = torch.randn(300, d_in, device="cuda")
    y = routing.arrow_forward(x, a, b, scales, protos, k, 0.5)
    ref = reference.arrow_dense(x.double(), a, b, scales, protos, k, temperature=0.5)
    torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)
    torch.library.opcheck(torch.ops.lora_ops.arrow_route.default, (x[:20], protos, 3, 0.5))
    torch.library.opcheck(torch.ops.lora_ops.arrow_prototypes.default, (a[:4], b[:4]))


def test_route_follows_torch_matmul_precision():
    # The CUDA logits are a cuBLAS matmul: full fp32 by default (what the CPU computes), TF32 only when the user
    # opts in, as for any torch matmul. Documented in docs/architecture.md; this pins both halves.
    x = torch.randn(512, 1024, dtype=torch.float64)
    protos = torch.nn.functional.normalize(torch.randn(16, 1024, dtype=torch.float64), dim=-1)
    logits = (x @ protos.T).abs()
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        _, w = lora_ops.arrow_route(x.float().cuda(), protos.float().cuda(), 4)
        _, w_ref = reference.arrow_route(x, protos, 4)
        torch.testing.assert_close(w.cpu().double(), w_ref, atol=1e-5, rtol=1e-5)
        torch.set_float32_matmul_precision("high")  # TF32: ~1e-3 relative rounding of each logit
        ids, w = lora_ops.arrow_route(x.float().cuda(), protos.float().cuda(), 4)
        chosen, best = logits.gather(-1, ids.cpu()), logits.topk(4, dim=-1).values
        assert ((chosen - best).abs() <= 1e-2 * best).all()
    finally:
        torch.set_float32_matmul_precision(saved)


def test_mixed_devices_raise_value_error():
    # The argument checks run before the device guard: the error names the argument.
    with pytest.raises(ValueError, match="prototypes is on"):
        torch.ops.lora_ops.arrow_route(torch.randn(3, 8), torch.randn(4, 8, device="cuda"), 2)
    with pytest.raises(ValueError, match="x is on|prototypes is on"):
        torch.ops.lora_ops.arrow_route(torch.randn(3, 8, device="cuda"), torch.randn(4, 8), 2)
    a, b = bank(3, 2, 8, 6)
    with pytest.raises(ValueError, match="weights is on"):
        torch.ops.lora_ops.merge_lowrank(a.cuda(), b.cuda(), torch.ones(3), 2)
    with pytest.raises(ValueError, match="lora_b is on"):
        torch.ops.lora_ops.merge_lowrank(a.cuda(), b, torch.ones(3, device="cuda"), 2)
