"""The ``lora-ops`` console script.

    lora-ops bench grouped [--quick] [--device cpu|cuda] [--out DIR] [--threads N]
    lora-ops bench train [--quick] [--device cpu|cuda] [--out DIR] [--threads N]

``bench`` has one sub-command per benchmark kind (grouped, merge, svd, arrow, train, all); only ``grouped`` is
and ``train`` are implemented so far. Further top-level commands (``merge``, ``reproduce``) get their own sub-parser next to
``bench``. Usage errors and failed preconditions print one line on stderr and exit non-zero, without a traceback.

``bench grouped`` also takes hidden options that shrink the case grid (``--d 64 --n 2 4 --tokens 8 --rank 4
--dists uniform --reps 2 --warmup 1``), for tests and quick experiments.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

__all__ = ["main"]

BENCH_KINDS = ("grouped", "merge", "svd", "arrow", "train", "all")
KIND_HELP = {"grouped": "grouped LoRA on a mixed-adapter batch: PEFT, torch composites and lora_ops",
             "train": "training step (fwd + bwd) of one layer with many adapters: torch composites and lora_ops"}


class CliError(Exception):
    """An error the user can fix; printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    # argparse prints the usage block and exits; we want one line and the caller to decide the exit.
    def error(self, message):
        raise CliError(f"{message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora-ops", description="lora_ops command line tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    bench = commands.add_parser("bench", help="run a benchmark suite and write table, JSON and plot",
                                description="Run a benchmark suite; prints a table, writes JSON and PNG to --out.")
    common = _Parser(add_help=False)
    common.add_argument("--quick", action="store_true", help="fewer cases and repetitions (a few minutes at most)")
    common.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    common.add_argument("--out", default=os.path.join("bench", "results"), metavar="DIR",
                        help="folder for the JSON and PNG results (default: bench/results)")
    common.add_argument("--threads", type=_positive_int, metavar="N",
                        help="torch intra-op threads (default: torch's own choice)")
    kinds = bench.add_subparsers(dest="kind", required=True, metavar="kind")
    for kind in BENCH_KINDS:
        p = kinds.add_parser(kind, parents=[common], help=KIND_HELP.get(kind, "not implemented yet"))
        p.set_defaults(handler=BENCH_HANDLERS.get(kind, _not_implemented))
        if kind == "grouped":
            _add_grouped_sizing(p)
        if kind == "train":
            _add_train_sizing(p)
    return parser


def _add_grouped_sizing(p: argparse.ArgumentParser) -> None:
    hide = argparse.SUPPRESS  # testing knobs: the published case grid is fixed by --quick
    p.add_argument("--d", type=_positive_int, nargs="+", help=hide)
    p.add_argument("--n", type=_positive_int, nargs="+", help=hide)
    p.add_argument("--tokens", type=_positive_int, default=256, help=hide)
    p.add_argument("--rank", type=_positive_int, default=16, help=hide)
    p.add_argument("--dists", nargs="+", choices=("same", "uniform", "zipf", "distinct"), help=hide)
    p.add_argument("--reps", type=_positive_int, help=hide)
    p.add_argument("--warmup", type=int, help=hide)


def _not_implemented(args) -> int:
    raise CliError(f"bench: kind {args.kind!r} is not implemented yet (available: {', '.join(BENCH_HANDLERS)})")


def _prepare_out_dir(out: str) -> str:
    """Create ``out`` if needed and make sure results can be written there, before any time is spent."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise CliError(f"--out {out}: exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise CliError(f"--out {out}: cannot create directory ({e.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise CliError(f"--out {out}: directory is not writable")
    return out


def _select_device(device: str) -> str:
    import torch

    import lora_ops

    if device == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device cuda: CUDA is not available (torch {torch.__version__})")
        if not lora_ops.cuda_built():
            raise CliError("--device cuda: lora_ops was built without CUDA kernels (rebuild with LORA_OPS_CUDA=1)")
    return device


def _prepare_bench(args, extras: tuple) -> tuple:
    """Check the device and --out and apply --threads before any time is spent; import the bench extras.
    Returns ``(device, out_dir)``."""
    import importlib

    import torch

    device = _select_device(args.device)
    out = _prepare_out_dir(args.out)  # before the run: a bad --out should not cost the whole benchmark
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        for name in extras:
            importlib.import_module(name)
    except ImportError as e:
        raise CliError(f"bench needs the 'bench' extras ({e.name} is missing): pip install 'lora_ops[bench]'") from None
    return device, out


def _run_with_progress(kind: str, run):
    """``run(progress)`` with a tqdm bar per case list; a result mismatch becomes a one-line error (exit 1)."""
    from tqdm import tqdm

    from lora_ops.benchmarks.grouped import ResultMismatchError

    bars = []

    def progress(items):
        bars.append(tqdm(items, desc=f"bench {kind}", unit="case", file=sys.stderr))
        return bars[-1]

    try:
        return run(progress)
    except ResultMismatchError as e:
        raise CliError(f"bench {kind}: {e}", code=1) from None
    finally:
        for bar in bars:  # end the bar's line before any error message
            bar.close()


def _bench_grouped(args) -> int:
    device, out = _prepare_bench(args, ("peft", "tqdm"))
    from lora_ops.benchmarks import grouped, report

    case_list = grouped.cases(quick=args.quick, d=args.d, n_adapters=args.n, dists=args.dists, tokens=args.tokens,
                              rank=args.rank)
    reps = args.reps or (20 if args.quick else 40)
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)
    result = _run_with_progress("grouped", lambda progress: grouped.run(
        case_list, device=device, warmup=warmup, reps=reps, quick=args.quick, progress=progress))
    print(report.format_table(result))
    paths = report.write_report(result, out)
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0


def _add_train_sizing(p: argparse.ArgumentParser) -> None:
    hide = argparse.SUPPRESS  # testing knobs, as for grouped
    p.add_argument("--d", type=_positive_int, default=2048, help=hide)
    p.add_argument("--n", type=_positive_int, default=8, help=hide)
    p.add_argument("--tokens", type=_positive_int, nargs="+", help=hide)
    p.add_argument("--rank", type=_positive_int, default=16, help=hide)
    p.add_argument("--dists", nargs="+", choices=("same", "uniform", "zipf", "distinct"), help=hide)
    p.add_argument("--reps", type=_positive_int, help=hide)
    p.add_argument("--warmup", type=int, help=hide)


def _bench_train(args) -> int:
    device, out = _prepare_bench(args, ("tqdm", "matplotlib"))
    from lora_ops.benchmarks import train

    case_list = train.cases(quick=args.quick, d=args.d, tokens=args.tokens, n_adapters=args.n, rank=args.rank,
                            dists=args.dists)
    reps = args.reps or (10 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    result = _run_with_progress("train", lambda progress: train.run(
        case_list, device=device, warmup=warmup, reps=reps, quick=args.quick, progress=progress))
    print(train.format_table(result))
    paths = train.write_report(result, out)
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0


BENCH_HANDLERS = {"grouped": _bench_grouped, "train": _bench_train}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``lora-ops`` script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except CliError as e:
        print(f"lora-ops: error: {e}".replace("\n", " "), file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("lora-ops: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
