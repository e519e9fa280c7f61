"""Every op on batched inputs of several sizes under 1, 2 and 4 threads, each in its own process with a timeout.

A library call that opens its own thread team inside ``at::parallel_for`` (MKL's LAPACK did, in merge_lowrank and
randomized_svd) spins forever instead of failing: here a hang fails the test after TIMEOUT seconds instead of
hanging CI. The sizes are chosen so MKL takes its threaded paths (tall QR factors, batches of layers) as well as
small ones, and the results are compared with lora_ops.reference in the same process.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 180  # seconds per (op, thread count); each case takes a few seconds when it does not hang

PRELUDE = """
import sys
import torch
import lora_ops
from lora_ops import reference
from tests.helpers import make_bank, make_ids

torch.set_num_threads(int(sys.argv[1]))
assert torch.get_num_threads() == int(sys.argv[1])
g = torch.Generator().manual_seed(0)
"""

CASES = {
    "grouped_lora": """
        for n, r, d_in, d_out, t, k, dist in [(4, 8, 64, 48, 37, 1, "mixed_none"), (8, 16, 512, 384, 1024, 1, "zipf"),
                                              (3, 4, 256, 256, 2048, 1, "same"), (16, 8, 300, 200, 129, 2, "uniform")]:
            a, b = make_bank(n, r, d_in, d_out)
            x = torch.randn(3, t // 3 + 1, d_in, generator=g)
            shape = x.shape[:-1] + ((k,) if k > 1 else ())
            ids = make_ids(dist, shape, n, generator=g)
            w = torch.rand(shape, generator=g) if k > 1 else None
            s = torch.rand(n, generator=g)
            y = lora_ops.grouped_lora(x, a, b, ids, scales=s, weights=w)
            want = reference.grouped_lora(x, a, b, ids, scales=s, weights=w, compute_dtype=torch.float64)
            torch.testing.assert_close(y.double(), want.double(), atol=1e-4, rtol=1e-4)
    """,
    "grouped_lora_backward": """
        for n, r, d_in, d_out, t, k, dist in [(4, 8, 64, 48, 37, 1, "mixed_none"), (8, 16, 512, 384, 1024, 1, "zipf"),
                                              (3, 4, 256, 256, 2048, 1, "same"), (16, 8, 300, 200, 129, 2, "uniform")]:
            a, b = make_bank(n, r, d_in, d_out)
            x = torch.randn(t, d_in, generator=g)
            shape = x.shape[:-1] + ((k,) if k > 1 else ())
            ids = make_ids(dist, shape, n, generator=g)
            w = torch.rand(shape, generator=g) if k > 1 else None
            leaves = [v.clone().requires_grad_() for v in (x, a, b)] + ([w.clone().requires_grad_()] if k > 1 else [])
            y = lora_ops.grouped_lora(*leaves[:3], ids, weights=leaves[3] if k > 1 else None)
            go = torch.randn(y.shape, generator=g)
            got = torch.autograd.grad(y, leaves, go)
            want = reference.grouped_lora_backward(go, x, a, b, ids, weights=w, compute_dtype=torch.float64)
            for gv, wv in zip(got, want):
                torch.testing.assert_close(gv.double(), wv.double(), atol=2e-3, rtol=1e-4)
    """,
    "merge_lowrank": """
        for lead, n, r, d_in, d_out, rank in [((3,), 6, 8, 300, 200, 8), ((2, 3), 4, 16, 512, 256, 16),
                                              ((5,), 8, 16, 2048, 160, 16), ((4,), 2, 4, 40, 30, 12)]:
            a = torch.randn(*lead, n, r, d_in, generator=g) / d_in ** 0.5
            b = torch.randn(*lead, n, d_out, r, generator=g)
            w = torch.rand(n, generator=g)
            ma, mb, s = lora_ops.merge_lowrank(a, b, w, rank, return_singular_values=True)
            ra, rb, rs = reference.merge_lowrank(a, b, w, rank)
            torch.testing.assert_close((mb @ ma).double(), rb @ ra, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(s.double(), rs, atol=1e-4, rtol=1e-4)
    """,
    "randomized_svd": """
        for lead, m, n, rank in [((64,), 512, 512, 16), ((2, 3), 300, 700, 8), ((9,), 1024, 256, 32), ((3,), 20, 30, 5)]:
            # exact rank `rank`: the sketch recovers the triplets up to rounding
            u = torch.linalg.qr(torch.randn(*lead, m, rank, generator=g))[0]
            v = torch.linalg.qr(torch.randn(*lead, n, rank, generator=g))[0]
            sv = torch.linspace(10, 1, rank).expand(*lead, rank)
            x = (u * sv.unsqueeze(-2)) @ v.transpose(-1, -2)
            U, S, Vh = lora_ops.randomized_svd(x, rank, generator=torch.Generator().manual_seed(1))
            torch.testing.assert_close(S, sv, atol=1e-4, rtol=1e-4)  # exact by construction (no dense SVD)
            torch.testing.assert_close(((U * S.unsqueeze(-2)) @ Vh).double(), x.double(), atol=1e-4, rtol=1e-4)
    """,
    "arrow_prototypes": """
        for lead, n, r, d_in, d_out in [((), 8, 16, 2048, 96), ((3,), 6, 8, 300, 200), ((2, 2), 32, 4, 64, 48)]:
            a = torch.randn(*lead, n, r, d_in, generator=g) / d_in ** 0.5
            b = torch.randn(*lead, n, d_out, r, generator=g)
            p = lora_ops.arrow_prototypes(a, b)
            torch.testing.assert_close(p.double(), reference.arrow_prototypes(a, b), atol=1e-4, rtol=1e-4)
    """,
    "arrow_route": """
        for t, n, d, k in [(4096, 32, 576, 2), (37, 8, 64, 3), (1000, 128, 300, 4)]:
            x = torch.randn(2, t, d, generator=g)
            protos = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
            ids, w = lora_ops.arrow_route(x, protos, k)
            rids, rw = reference.arrow_route(x, protos, k)
            # the same logits up to rounding: ids may swap only where two logits are within rounding
            logits = (x @ protos.T).abs()
            torch.testing.assert_close(logits.gather(-1, ids), logits.gather(-1, rids), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(w, rw, atol=1e-5, rtol=1e-5)
    """,
}


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("op", sorted(CASES))
def test_op_under_threads(op, threads, tmp_path):
    script = tmp_path / f"{op}.py"
    script.write_text(PRELUDE + textwrap.dedent(CASES[op]) + "print('ok')\n")
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        done = subprocess.run([sys.executable, str(script), str(threads)], capture_output=True, text=True,
                              timeout=TIMEOUT, cwd=str(ROOT), env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{op} with {threads} threads did not finish in {TIMEOUT} s (a hang)")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
