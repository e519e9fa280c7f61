"""Whole-job benchmark of ``lora-ops train``: N adapters in one job against N sequential PEFT trainings.

Every case trains N adapters (rank 16, alpha 32, every q/k/v/o/gate/up/down projection) for ``warmup + reps``
steps on the same rows (each adapter's own ``DataStream``), with per-adapter batches of ``rows × seq`` tokens:

- ``lora_ops``: the ``lora-ops train`` job itself, in its own process (one, or ``processes`` under torchrun with
  DDP), as users run it: with its default allocator setting (``lora_ops.train.keep_freed_memory``; PEFT and the
  base run in this process with glibc's defaults); the time per step is read from its own log (after the warm-up);
- ``peft``: one PEFT model per adapter trained alone, one after the other (what one-adapter-per-job tooling does),
  same loss (``lora_ops.train.row_ce_sums``: only loss positions go through the vocabulary head, as in the job),
  AdamW and gradient clipping; its time per step is the sum over adapters;
- ``base``: the frozen base alone, forward + backward (activation gradients) over the job's whole batch: the
  floor of any multi-adapter job, so ``peft / base`` bounds the speed-up a multi-adapter job can reach.

The job and the base run a step in passes of at most ``PASS_TOKENS`` tokens (the job's ``micro_batch_rows``:
gradients accumulate), which bounds memory at N = 16 × 8 × 128 tokens; PEFT's per-adapter batches fit in one pass.

The base is a random Llama of SmolLM2-135M's shape (``SMOLLM2_135M``: 30 layers, hidden 576, 9 heads / 3 KV heads,
MLP 1536, vocab 49152, tied embeddings; ``--quick`` keeps 4 of its layers) unless ``model_dir`` names a local model
folder. Check: at step 0 every
adapter's B is zero, so PEFT's and the job's first-step losses must agree (same rows, same tokens).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from lora_ops.benchmarks import report
from lora_ops.benchmarks.timing import OtherCpuMeter, environment

__all__ = ["SMOLLM2_135M", "TrainManyCase", "cases", "run", "format_table", "write_report", "ResultMismatchError"]

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
                    rms_norm_eps=1e-5, rope_theta=100000.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, LR = 16, 32.0, 1e-3
QUICK_LAYERS = 4  # --quick keeps 4 of the 30 layers (width, heads and vocabulary unchanged)
LOSS_RTOL = 1e-3
PASS_TOKENS = 2048  # tokens per forward/backward pass of the job and of the base (micro-batches; bounds memory)


class ResultMismatchError(RuntimeError):
    """The job's and PEFT's first-step losses differ: they did not train on the same rows."""


@dataclass(frozen=True)
class TrainManyCase:
    n_adapters: int
    rows: int  # per adapter per step
    seq: int  # tokens per row
    processes: int = 1

    @property
    def name(self) -> str:
        return f"N{self.n_adapters}-{self.rows}x{self.seq}" + (f"-ddp{self.processes}" if self.processes > 1 else "")

    def as_dict(self) -> dict:
        return {**asdict(self), "name": self.name}


def cases(*, quick: bool = False, n_adapters: Optional[Iterable[int]] = None,
          batches: Optional[Iterable[tuple]] = None, ddp: bool = True) -> list:
    """N in {1, 4, 16} with per-adapter batches 2×64 (quick) and 8×128; DDP with 2 processes at N = 4 (quick) or
    at every N of the 2×64 batch."""
    ns = tuple(n_adapters or (1, 4, 16))
    batches = tuple(tuple(b) for b in (batches or (((2, 64),) if quick else ((2, 64), (8, 128)))))
    for b in batches:
        if len(b) != 2 or min(b) < 1:
            raise ValueError(f"a batch is (rows, seq) with both >= 1, got {b}")
    out = [TrainManyCase(n, r, s) for r, s in batches for n in ns]
    if ddp:
        r, s = batches[0]
        out += [TrainManyCase(n, r, s, 2) for n in ((4,) if quick and 4 in ns else ns)]
    return out


# ---------------------------------------------------------------------------------------------------------------
# set-up: base folder and datasets

def _make_base(folder: Path, layers: Optional[int]) -> dict:
    """A random Llama of SmolLM2-135M's shape (``layers`` may shorten it) with the character tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_ops.recipes.data import CharTokenizer

    shape = dict(SMOLLM2_135M, **({"num_hidden_layers": layers} if layers else {}))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, pad_token_id=0, eos_token_id=1, bos_token_id=None))
    model.save_pretrained(str(folder))
    CharTokenizer.default().save(folder / "char_tokenizer.json")
    return {"source": "random Llama of SmolLM2-135M's shape", **shape}


def _make_data(folder: Path, n: int, seq: int) -> list:
    """One JSONL per adapter of ``{"text"}`` rows long enough to fill ``seq`` tokens (character tokenizer)."""
    import random

    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz "
    paths = []
    for i in range(n):
        path = folder / f"data{i}.jsonl"
        with open(path, "w") as f:
            for _ in range(32):
                # 6 characters per token: enough for a subword tokenizer (--model) to fill seq tokens too
                f.write(json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(6 * seq))}) + "\n")
        paths.append(str(path))
    return paths


def _config(base: str, out: Path, data: list, case: TrainManyCase, steps: int) -> dict:
    return {"base": base, "out": str(out), "steps": steps, "seed": 0, "rows_per_adapter": case.rows,
            "max_len": case.seq, "checkpoint_every": 0, "log_every": 1, "micro_batch_rows": _pass_rows(case.seq),
            "adapters": [{"name": f"a{i}", "data": data[i], "r": RANK, "alpha": ALPHA, "targets": TARGETS, "lr": LR}
                         for i in range(case.n_adapters)]}


def _pass_rows(seq: int) -> int:
    return max(1, PASS_TOKENS // seq)


# ---------------------------------------------------------------------------------------------------------------
# the three methods

def _step_seconds(log_path: Path, warmup: int) -> tuple:
    """(seconds per step after the warm-up, first-step losses, tokens per step) from a job's train_log.jsonl."""
    entries = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    t = [e["time_s"] for e in entries]
    per_step = (t[-1] - t[warmup - 1]) / (len(t) - warmup) if warmup else t[-1] / len(t)
    return per_step, entries[0]["loss"], entries[0]["tokens"]


def _time_job(cfg: dict, folder: Path, case: TrainManyCase, warmup: int, threads: int) -> tuple:
    path = folder / f"{case.name}.json"
    path.write_text(json.dumps(cfg))
    # the job as users run it: `lora-ops train` in its own process (its allocator setting stays out of this one)
    launch = ["torch.distributed.run", "--standalone", "--nproc_per_node", str(case.processes), "-m"] \
        if case.processes > 1 else []
    cmd = [sys.executable, "-m", *launch, "lora_ops.cli", "train", str(path), "--no-progress", "--device", "cpu",
           "--threads", str(max(1, threads // case.processes))]
    root = str(Path(__file__).resolve().parents[2])  # this lora_ops, also when it is not installed
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    if case.processes > 1:
        env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"lora-ops train failed: {done.stderr[-2000:]}")
    return _step_seconds(Path(cfg["out"]) / "train_log.jsonl", warmup)


def _time_peft(base_dir: str, cfg: dict, warmup: int, reps: int) -> tuple:
    """Sum over adapters of PEFT's seconds per step (each adapter trained alone), and its first-step losses."""
    from peft import LoraConfig, get_peft_model

    from lora_ops.recipes.train import collate
    from lora_ops.train import DataStream, _load_base, read_rows, row_ce_sums

    base, tok = _load_base(base_dir, progress=False)
    base.requires_grad_(False)
    total, first = 0.0, {}
    for spec in cfg["adapters"]:
        stream = DataStream(read_rows(spec["data"], tok, cfg["max_len"]), cfg["seed"], spec["name"],
                            cfg["rows_per_adapter"])
        lc = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=spec["targets"], lora_dropout=0.0)
        model = get_peft_model(copy.deepcopy(base), lc)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
        for step in range(warmup + reps):
            if step == warmup:
                t0 = time.perf_counter()
            ids, mask, att = collate(stream.batch(step), tok.pad_id)
            loss = row_ce_sums(model, ids, mask, att).sum() / mask[:, 1:].sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step == 0:
                first[spec["name"]] = loss.item()
        total += (time.perf_counter() - t0) / reps
        del model, opt
    return total, first


def _time_base(base_dir: str, cfg: dict, warmup: int, reps: int) -> float:
    """Seconds per step of the frozen base alone over the whole multi-adapter batch (forward, CE, backward to the
    input embeddings: every activation gradient a LoRA job also computes)."""
    from lora_ops.recipes.train import collate
    from lora_ops.train import DataStream, _load_base, read_rows, row_ce_sums

    model, tok = _load_base(base_dir, progress=False)
    model.requires_grad_(False)
    rows = []
    for spec in cfg["adapters"]:
        rows += DataStream(read_rows(spec["data"], tok, cfg["max_len"]), cfg["seed"], spec["name"],
                           cfg["rows_per_adapter"]).batch(0)
    size = _pass_rows(cfg["max_len"])
    passes = [collate(rows[i:i + size], tok.pad_id) for i in range(0, len(rows), size)]
    count = sum(mask[:, 1:].sum() for _, mask, _ in passes)
    emb = model.get_input_embeddings()
    for step in range(warmup + reps):
        if step == warmup:
            t0 = time.perf_counter()
        for ids, mask, att in passes:  # the job's micro-batches
            x = emb(ids).detach().requires_grad_()
            (row_ce_sums(model, ids, mask, att, inputs_embeds=x).sum() / count).backward()
            del x
    return (time.perf_counter() - t0) / reps


def run(case_list: Iterable[TrainManyCase], *, device: str = "cpu", warmup: int = 1, reps: int = 2,
        progress: Callable[[list], Iterable] = iter, model_dir: Optional[str] = None, layers: Optional[int] = None,
        quick: bool = False) -> dict:
    """Run every case (CPU); returns ``kind``, ``environment``, ``settings``, ``model`` and ``cases``."""
    if device != "cpu":
        raise ValueError("train-many runs on the CPU (the job's CUDA path is the same code; time it with torchrun)")
    case_list = list(case_list)
    if layers is None and quick and not model_dir:
        layers = QUICK_LAYERS
    env = environment(device)
    threads = torch.get_num_threads()
    results = []
    with tempfile.TemporaryDirectory(prefix="train-many-") as tmp:
        tmp = Path(tmp)
        if model_dir:
            base_dir, model_info = model_dir, {"source": f"local folder {Path(model_dir).name}"}
        else:
            base_dir = str(tmp / "base")
            model_info = _make_base(Path(base_dir), layers)
        data = {}
        for case in progress(case_list):
            if case.seq not in data:
                (tmp / f"data{case.seq}").mkdir()
                data[case.seq] = _make_data(tmp / f"data{case.seq}", max(c.n_adapters for c in case_list), case.seq)
            cfg = _config(base_dir, tmp / "runs" / case.name, data[case.seq], case, warmup + reps)
            others = OtherCpuMeter()
            job_s, job_first, job_tokens = _time_job(cfg, tmp, case, warmup, threads)
            entry = {"case": case.as_dict(), "tokens_per_step": job_tokens,
                     "seconds_per_step": {"lora_ops": job_s}}
            if case.processes == 1:
                peft_s, peft_first = _time_peft(base_dir, cfg, warmup, reps)
                base_s = _time_base(base_dir, cfg, warmup, reps)
                diff = max(abs(job_first[k] - peft_first[k]) / abs(peft_first[k]) for k in peft_first)
                if diff > LOSS_RTOL:
                    raise ResultMismatchError(f"{case.name}: first-step losses of the job and PEFT differ by {diff:.2e}"
                                              " (relative): not the same rows")
                entry["seconds_per_step"].update(peft=peft_s, base=base_s)
                entry["first_step_loss_rel_diff"] = diff
                entry["peft/lora_ops"] = peft_s / job_s
                entry["bound peft/base"] = peft_s / base_s
            entry["tokens_per_s"] = {m: entry["tokens_per_step"] / s for m, s in entry["seconds_per_step"].items()}
            entry["other_cpu_share"] = others.share()
            results.append(entry)
            gc.collect()  # each method's model and activations go before the next case
    for e in results:  # DDP speed-up over the same case in one process
        if e["case"]["processes"] > 1:
            one = next((o for o in results if o["case"]["processes"] == 1 and all(
                o["case"][k] == e["case"][k] for k in ("n_adapters", "rows", "seq"))), None)
            if one is not None:
                e["ddp_speedup"] = one["seconds_per_step"]["lora_ops"] / e["seconds_per_step"]["lora_ops"]
    return {"kind": "train-many", "environment": env, "model": model_info,
            "settings": {"quick": quick, "warmup": warmup, "reps": reps, "rank": RANK, "alpha": ALPHA,
                         "targets": TARGETS, "threads": threads, "ddp_threads_per_process": "threads // processes",
                         "pass_tokens": PASS_TOKENS,
                         "dtype": "float32"},
            "cases": results}


def format_table(result: dict) -> str:
    env, m = result["environment"], result["model"]
    lines = [f"Training N adapters, {result['settings']['warmup']} warm-up + {result['settings']['reps']} timed steps "
             f"on {env['cpu_model']}, {result['settings']['threads']} threads; base: {m['source']}"
             + (f" ({m['num_hidden_layers']} layers)" if "num_hidden_layers" in m else "")
             + "; seconds per step (PEFT: summed over its N sequential jobs); bound = peft/base"]
    header = ["case", "lora_ops s", "peft s", "base s", "peft/ops", "bound", "ops tok/s", "ddp x", "others%"]
    rows = []
    for c in result["cases"]:
        s, share = c["seconds_per_step"], c.get("other_cpu_share")
        rows.append([c["case"]["name"], report._fmt(s["lora_ops"], ".3f"), report._fmt(s.get("peft"), ".3f"),
                     report._fmt(s.get("base"), ".3f"), report._fmt(c.get("peft/lora_ops"), ".2f"),
                     report._fmt(c.get("bound peft/base"), ".2f"), report._fmt(c["tokens_per_s"]["lora_ops"], ".0f"),
                     report._fmt(c.get("ddp_speedup"), ".2f"),
                     report._fmt(None if share is None else 100 * share, ".0f")])
    return "\n".join(lines + report.align_rows(header, rows))


def write_plot(result: dict, out_dir) -> Path:
    """Seconds per step of each method per case (PEFT summed over its N jobs), speed-ups written on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = result["cases"]
    methods = ("base", "lora_ops", "peft")
    fig, ax = plt.subplots(figsize=(2.4 + 1.3 * len(cs), 3.8))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        pts = [(j + i * width, c["seconds_per_step"][m]) for j, c in enumerate(cs) if m in c["seconds_per_step"]]
        if pts:
            label = {"base": "base alone (floor)", "lora_ops": "lora-ops train (one job)",
                     "peft": "PEFT, N sequential jobs"}[m]
            ax.bar([p[0] for p in pts], [p[1] for p in pts], width, label=label)
    for j, c in enumerate(cs):
        text = f"{c['peft/lora_ops']:.2f}x" if "peft/lora_ops" in c else (
            f"ddp {c['ddp_speedup']:.2f}x" if "ddp_speedup" in c else "")
        ax.annotate(text, (j + width, c["seconds_per_step"]["lora_ops"]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([j + width for j in range(len(cs))], [c["case"]["name"] for c in cs], fontsize=7, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per training step")
    layers = f" ({result['model']['num_hidden_layers']} layers)" if "num_hidden_layers" in result["model"] else ""
    ax.set_title(f"{result['model']['source']}{layers}, {result['settings']['threads']} CPU threads, "
                 f"per-step seconds, PEFT/ops written on the bars", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    return report.save_png(fig, result, out_dir)


def write_report(result: dict, out_dir) -> dict:
    return {"json": report.write_json(result, out_dir), "png": write_plot(result, out_dir)}
