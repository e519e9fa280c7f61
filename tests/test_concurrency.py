"""Ops called from many threads at once give the same results as serial calls (no shared mutable state)."""

from concurrent.futures import ThreadPoolExecutor

import torch

import lora_ops
from lora_ops import reference
from tests.helpers import make_bank, make_ids


def test_grouped_lora_from_threads():
    cases = []
    for i in range(16):
        g = torch.Generator().manual_seed(i)
        n, t, d_in, d_out = 3 + i % 5, 20 + 7 * i, 32 + i, 24 + 2 * i
        x = torch.randn(t, d_in, generator=g)
        a, b = make_bank(n, 4 + i % 3, d_in, d_out)
        ids = make_ids("mixed_none", (t, 1 + i % 3), n, generator=g)
        cases.append((x, a, b, ids))
    expected = [reference.grouped_lora(*c, compute_dtype=torch.float64) for c in cases]

    def run(j):
        c = cases[j % len(cases)]
        return j % len(cases), lora_ops.grouped_lora(*c)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, range(128)))
    for j, out in results:
        torch.testing.assert_close(out.double(), expected[j].double(), atol=1e-4, rtol=1e-4)


def test_merge_and_arrow_ops_from_threads():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, 40, generator=g), torch.randn(4, 30, 3, generator=g)
    w = torch.rand(4, generator=g)
    x = torch.randn(50, 40, generator=g)
    serial = (lora_ops.merge_lowrank(a, b, w, 5), lora_ops.arrow_prototypes(a, b))
    protos = serial[1]
    routed = lora_ops.arrow_route(x, protos, 2)

    def run(_):
        return lora_ops.merge_lowrank(a, b, w, 5), lora_ops.arrow_prototypes(a, b), lora_ops.arrow_route(x, protos, 2)

    with ThreadPoolExecutor(max_workers=8) as pool:
        for (ma, mb), p, (ids, wt) in pool.map(run, range(48)):
            torch.testing.assert_close(mb @ ma, serial[0][1] @ serial[0][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(p, protos, atol=1e-6, rtol=1e-6)
            assert torch.equal(ids, routed[0])
            torch.testing.assert_close(wt, routed[1])
