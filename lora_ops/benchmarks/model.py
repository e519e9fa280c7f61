"""Whole-model benchmark: what a user who drops lora_ops into a PEFT model sees (prefill, decoding, training).

Models: SmolLM2-135M (the fetched assets' converted folder when present, ``lora-ops assets fetch``; else a random
Llama of the same config: the output says which) and a random Llama with hidden 1024 (4 layers, MLP 2816, vocab
1024). ``--quick`` replaces both by a tiny random Llama (a test-sized run, not a measurement).

Adapters: N random LoRA adapters of rank r on every projection (q/k/v/o/gate/up/down), written as PEFT adapter
folders by PEFT's ``save_pretrained`` and loaded the way users load them: ``PeftModel.from_pretrained`` for the
first, ``load_adapter`` for the others, ``lora_ops.peft.load_adapters(folders)`` for ``wrap``.

Workloads (every sequence its own adapter, distinct while sequences <= N):

- ``prefill``: one forward of S sequences x L tokens (last-token logits only, as generation's prefill);
- ``decode``: ``generate`` of T new tokens (greedy, KV cache) after an L-token prompt for S sequences;
- ``train``: one training step of a mixed batch: forward, next-token loss, backward (gradients reach every
  adapter used; the base stays frozen; no optimizer step; eval mode, since PEFT refuses ``adapter_names`` in
  training mode, with LoRA dropout 0 the same math). Inputs enter as embeddings that require gradients, so
  the adapter-free ``base`` step runs the same backward through every layer.

Methods: ``base`` (the model without adapters: the floor), ``peft`` (PEFT's ``adapter_names=`` mixed batch, a loop
over adapters per layer), ``accelerated`` (the same PEFT model after ``lora_ops.peft.accelerate``), ``wrapped``
(the base model under ``lora_ops.nn.wrap`` with banks loaded from the folders: no PEFT in the path).

Timing: the adapters' cost is a few % of a prefill, less than this machine's drift over a minute, so it is measured
as the difference of *paired* calls: every repetition times base, then the three methods (order rotated per
repetition), then base again; each method's cost is its time minus the base interpolated linearly between the two
base calls around it. Reported: median and inter-quartile range of those per-pair differences (wall clock and
process CPU time), each method's median time and tokens/s. Outputs are checked against PEFT's before timing.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from lora_ops.benchmarks import report
from lora_ops.benchmarks.timing import OtherCpuMeter, environment

__all__ = ["MODELS", "WORKLOADS", "METHODS", "ModelCase", "cases", "build_model", "Workload", "build_workload",
           "paired_times", "run_case", "run", "format_table", "write_report", "ResultMismatchError"]

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_ALPHA = 32
B_STD = 0.02  # adapters' B ~ N(0, 0.02^2): a trained adapter's scale (PEFT's random init would swamp a real model)
# Outputs vs PEFT, float32: max |diff| <= REL_TOL * max(1, max |PEFT's value|) for logits and for gradients. PEFT and
# lora_ops add the same products in different orders; 30 layers amplify rounding to ~1e-6 of the logits' scale.
REL_TOL = 1e-4
METHODS = ("base", "peft", "accelerated", "wrapped")
VARIANTS = METHODS[1:]
WORKLOADS = ("prefill", "decode", "train")

_SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
                rms_norm_eps=1e-5, rope_theta=100000.0)
MODELS = {
    "smollm2-135m": _SMOLLM2,
    "llama-h1024": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                        num_key_value_heads=4, vocab_size=1024, max_position_embeddings=2048),
    "llama-tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=256),
}
# the full run's shapes: (seqs, tokens per sequence (decode: prompt), new tokens); --quick: tiny ones
SHAPES = {"prefill": (16, 128, 0), "decode": (32, 16, 32), "train": (16, 32, 0)}
QUICK_SHAPES = {"prefill": (4, 8, 0), "decode": (4, 4, 3), "train": (4, 8, 0)}
# adapter counts per model of the full run: the hidden-1024 Llama (the committed case re-measured) at N = 32 only,
# so that the whole run stays within ~8 minutes on two cores
DEFAULT_NS = {"smollm2-135m": (8, 32), "llama-h1024": (32,), "llama-tiny": (2, 4)}
# paired repetitions (each: the 3 methods + 1 base call): as many as BUDGET_S allows after the output checks
# (which time one call of every method), within [MIN_PAIRS, MAX_PAIRS]
MIN_PAIRS, MAX_PAIRS, BUDGET_S = 3, 9, 30.0


class ResultMismatchError(RuntimeError):
    """A lora_ops path gave outputs different from PEFT's: never time a wrong answer."""


@dataclass(frozen=True)
class ModelCase:
    model: str  # key of MODELS
    workload: str  # prefill | decode | train
    n_adapters: int
    rank: int
    seqs: int
    seq_len: int  # tokens per sequence (decode: the prompt)
    new_tokens: int = 0  # decode only

    @property
    def name(self) -> str:
        tail = f"+{self.new_tokens}" if self.workload == "decode" else ""
        return f"{self.model}-{self.workload}-N{self.n_adapters}-r{self.rank}-{self.seqs}x{self.seq_len}{tail}"

    @property
    def tokens(self) -> int:
        """Tokens a call produces (decode: new tokens) or processes (prefill, train): the tokens/s numerator."""
        return self.seqs * (self.new_tokens if self.workload == "decode" else self.seq_len)

    def as_dict(self) -> dict:
        return {**asdict(self), "name": self.name, "tokens": self.tokens}


def cases(*, quick: bool = False, models: Optional[Sequence[str]] = None, workloads: Optional[Sequence[str]] = None,
          n_adapters: Optional[Sequence[int]] = None, rank: int = 16, seqs: Optional[int] = None,
          seq_len: Optional[int] = None, new_tokens: Optional[int] = None) -> list:
    """Every model x N x workload. Default: SmolLM2-135M (N = 8 and 32) and the hidden-1024 Llama (N = 32), rank
    16, the ``SHAPES`` above; ``quick``: the tiny Llama, N = 2 and 4, ``QUICK_SHAPES``. ``seqs`` / ``seq_len`` /
    ``new_tokens`` override every workload's shape (experiments, tests)."""
    models = list(models or (("llama-tiny",) if quick else ("smollm2-135m", "llama-h1024")))
    workloads = list(workloads or WORKLOADS)
    for m in models:
        if m not in MODELS:
            raise ValueError(f"unknown model {m!r} (models: {', '.join(MODELS)})")
    for w in workloads:
        if w not in WORKLOADS:
            raise ValueError(f"unknown workload {w!r} (workloads: {', '.join(WORKLOADS)})")
    if rank < 1 or min(n_adapters or (1,)) < 1:
        raise ValueError("rank and the adapter counts must be >= 1")
    shapes = QUICK_SHAPES if quick else SHAPES
    out = []
    for m in models:
        for n in sorted(set(n_adapters or DEFAULT_NS[m])):
            for w in workloads:
                s, length, t = shapes[w]
                out.append(ModelCase(m, w, n, rank, seqs or s, seq_len or length,
                                     (new_tokens or t) if w == "decode" else 0))
    return out


# ---------------------------------------------------------------------------------------------------------------
# models and adapters


def build_model(name: str, *, model_dir: Optional[str] = None, seed: int = 0, device="cpu"):
    """``(model, info)``: the local folder for SmolLM2 when ``model_dir`` is given, else a seeded random Llama of
    the named config. ``info["source"]`` says which."""
    import transformers

    if name == "smollm2-135m" and model_dir:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        source = f"pretrained weights ({Path(model_dir).name}, fetched assets)"
    else:
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODELS[name]))
        source = f"random Llama of {name}'s config" if name == "smollm2-135m" else "random Llama"
    model = model.float().to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config
    info = {"source": source, "parameters": sum(p.numel() for p in model.parameters()),
            **{k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                             "num_attention_heads", "num_key_value_heads", "vocab_size")}}
    return model, info


def _sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree that shares every parameter and buffer with ``model`` (no second set of weights:
    the frozen base is read from the same memory by every method)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def save_adapter_folders(base: torch.nn.Module, n: int, rank: int, out: Path, *, seed: int = 0) -> dict:
    """``{name: folder}`` of ``n`` PEFT adapters (``a0..``) saved by PEFT's ``save_pretrained``: A like PEFT's
    random init, B ~ N(0, B_STD^2)."""
    from peft import LoraConfig, get_peft_model

    names = [f"a{i}" for i in range(n)]
    cfg = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, target_modules=list(TARGETS), lora_dropout=0.0,
                     init_lora_weights=False)
    pm = get_peft_model(_sharing_copy(base), cfg, adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, cfg)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for mod in pm.modules():
            if hasattr(mod, "lora_B") and isinstance(getattr(mod, "lora_B"), torch.nn.ModuleDict):
                for name in names:
                    w = mod.lora_B[name].weight
                    w.copy_(torch.randn(w.shape, generator=g) * B_STD)
    pm.save_pretrained(str(out), selected_adapters=names)
    # PEFT writes the adapter named "default" at the root and every other one in a sub-folder of its name
    return {name: out / name for name in names}


@dataclass
class Workload:
    """One model with its first N adapters, three ways, and the inputs of every workload."""

    n_adapters: int
    base: torch.nn.Module
    peft_model: torch.nn.Module  # accelerate() applied; switched per call by ``use_accelerated``
    wrapped: torch.nn.Module
    names: list  # adapter names, in bank order
    _fast: list = field(default_factory=list)  # (layer, accelerated bound method)

    def use_accelerated(self, on: bool) -> None:
        """Switch the PEFT model between PEFT's mixed-batch forward and accelerate's, keeping accelerate's stacked
        banks (the state a user who called ``accelerate`` once is in; ``deaccelerate`` would drop them)."""
        for layer, fast in self._fast:
            if on:
                layer.__dict__["_mixed_batch_forward"] = fast
            else:
                layer.__dict__.pop("_mixed_batch_forward", None)


def build_workload(base: torch.nn.Module, folders: dict, n: int, *, previous: Optional[Workload] = None,
                   device="cpu") -> Workload:
    """PEFT model with the first ``n`` adapter folders (loaded onto ``previous``'s PEFT model when given: adapters
    are added, as a server would), accelerated, and a wrapped copy of ``base`` with banks loaded from the folders."""
    from peft import PeftModel

    from lora_ops.nn import wrap
    from lora_ops.peft import _peft_lora_layers, accelerate, load_adapters

    names = list(folders)[:n]
    if previous is None:
        pm = PeftModel.from_pretrained(_sharing_copy(base), str(folders[names[0]]), adapter_name=names[0])
        have = {names[0]}
    else:
        pm, have = previous.peft_model, set(previous.names)
    for name in names:
        if name not in have:
            pm.load_adapter(str(folders[name]), adapter_name=name)
    pm.eval()
    accelerate(pm)
    layers = [layer for _, layer in _peft_lora_layers(pm)]
    fast = [(layer, layer.__dict__["_mixed_batch_forward"]) for layer in layers
            if "_mixed_batch_forward" in layer.__dict__]
    if len(fast) != len(layers):  # "accelerated" would silently time PEFT's own path
        raise RuntimeError(f"accelerate left {len(layers) - len(fast)} of {len(layers)} LoRA layers on PEFT's path")
    banks = load_adapters({name: folders[name] for name in names}, trainable=True, device=device)
    wrapped = wrap(_sharing_copy(base), banks)
    return Workload(n, base, pm, wrapped, names, fast)


def _assignment(case: ModelCase, names: list, seed: int) -> tuple:
    """(per-sequence adapter names, bank row ids): every sequence its own adapter while seqs <= N, random order."""
    g = torch.Generator().manual_seed(seed + 1)
    rows = torch.randperm(len(names), generator=g)[torch.arange(case.seqs) % len(names)]
    return [names[i] for i in rows.tolist()], rows


def _lora_params(wl: Workload, method: str) -> dict:
    """``{(module, adapter): (A, B)}`` parameters a training step updates, for the gradient check."""
    from lora_ops.nn import MultiLoRALinear
    from lora_ops.peft import _peft_lora_layers

    out = {}
    if method == "wrapped":
        for name, m in wl.wrapped.named_modules():
            if isinstance(m, MultiLoRALinear):
                for i, a in enumerate(m.bank.names):
                    out[(name, a)] = (m.bank.lora_a, m.bank.lora_b, i)
        return out
    for name, layer in _peft_lora_layers(wl.peft_model):
        for a in wl.names:
            out[(name, a)] = (layer.lora_A[a].weight, layer.lora_B[a].weight, None)
    return out


def _grads(params: dict, used: set) -> dict:
    out = {}
    for key, (a, b, i) in params.items():
        if key[1] not in used:
            continue
        ga, gb = (a.grad, b.grad) if i is None else (a.grad[i], b.grad[i])
        out[key] = (ga.clone(), gb.clone())
    return out


def make_fns(case: ModelCase, wl: Workload, *, seed: int = 0) -> tuple:
    """``(fns, check_fns)``: ``fns[method]()`` runs one timed call; ``check_fns[method]()`` returns what is
    compared with PEFT (logits, generated tokens and logits, or loss and gradients)."""
    from lora_ops.nn import adapter_ids

    names, rows = _assignment(case, wl.names, seed)
    g = torch.Generator().manual_seed(seed + 2)
    vocab = wl.base.config.vocab_size
    device = wl.base.device
    ids = torch.randint(0, vocab, (case.seqs, case.seq_len), generator=g).to(device)
    rows = rows.to(device)
    models = {"base": wl.base, "peft": wl.peft_model, "accelerated": wl.peft_model, "wrapped": wl.wrapped}

    def call(method: str, fn: Callable):
        def run(**kw):
            if method in ("peft", "accelerated"):
                wl.use_accelerated(method == "accelerated")
                return fn(models[method], adapter_names=names, **kw)
            if method == "wrapped":
                with adapter_ids(wl.wrapped, rows):
                    return fn(models[method], **kw)
            return fn(models[method], **kw)
        return run

    if case.workload == "prefill":
        def fwd(model, keep=1, **kw):
            with torch.inference_mode():
                return model(input_ids=ids, logits_to_keep=keep, **kw).logits

        fns = {m: call(m, fwd) for m in METHODS}
        checks = {m: (lambda f=fns[m]: {"logits": f(keep=0)}) for m in METHODS}
        return fns, checks

    if case.workload == "decode":
        mask = torch.ones_like(ids)
        gen = dict(max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens, do_sample=False,
                   temperature=None, top_p=None, top_k=None, pad_token_id=0, use_cache=True)

        def generate(model, extra=None, **kw):
            with torch.inference_mode():
                return model.generate(input_ids=ids, attention_mask=mask, **gen, **(extra or {}), **kw)

        fns = {m: call(m, generate) for m in METHODS}

        def check(f):
            out = f(extra=dict(return_dict_in_generate=True, output_logits=True))
            return {"tokens": out.sequences[:, ids.shape[1]:], "logits": torch.stack(out.logits, 1)}

        return fns, {m: (lambda f=fns[m]: check(f)) for m in METHODS}

    # train: one step of a mixed batch (the base frozen; inputs as embeddings that require gradients)
    # PEFT refuses adapter_names in training mode: the step runs in eval mode (no dropout: the same math)
    embed = wl.base.get_input_embeddings()
    for a, b, _ in list(_lora_params(wl, "peft").values()) + list(_lora_params(wl, "wrapped").values()):
        a.requires_grad_(True)
        b.requires_grad_(True)

    def step(model, **kw):
        for p in model.parameters():
            p.grad = None
        x = embed(ids).detach().requires_grad_()
        loss = model(inputs_embeds=x, labels=ids, **kw).loss
        loss.backward()
        return loss.detach()

    fns = {m: call(m, step) for m in METHODS}
    used = set(names)

    def check(m):
        loss = fns[m]()
        return {"loss": loss.reshape(1), **({} if m == "base" else {"grads": _grads(_lora_params(wl, m), used)})}

    return fns, {m: (lambda m=m: check(m)) for m in METHODS}


def _max_rel(got, want) -> float:
    """max |got - want| / max(1, max |want|) over tensors or (A, B) gradient pairs."""
    if isinstance(want, dict):
        return max((_max_rel(got[k], want[k]) for k in want), default=0.0)
    if isinstance(want, tuple):
        return max(_max_rel(g, w) for g, w in zip(got, want))
    return (got.float() - want.float()).abs().max().item() / max(1.0, want.abs().max().item())


def check_outputs(case: ModelCase, checks: dict) -> dict:
    """Each lora_ops method's outputs vs PEFT's (relative to max(1, max |PEFT's|)); raises ResultMismatchError
    above REL_TOL. Decoding: the generated tokens must agree wherever PEFT's top two logits differ by more than
    the tolerance; logits are compared up to the first step at which any sequence's token differs."""
    want = checks["peft"]()
    out = {}
    for m in ("accelerated", "wrapped"):
        got = checks[m]()
        if case.workload == "decode":
            same = (got["tokens"] == want["tokens"]).all(0)
            first = int(same.logical_not().nonzero()[0]) if not bool(same.all()) else same.numel()
            steps = min(first + 1, same.numel())
            diff = _max_rel(got["logits"][:, :steps], want["logits"][:, :steps])
            out[m] = diff
            out[f"{m}_tokens_equal"] = bool(same.all())
            if first < same.numel():
                top2 = want["logits"][:, first].float().topk(2, -1).values
                gap = (top2[:, 0] - top2[:, 1]).min().item() / max(1.0, want["logits"].abs().max().item())
                if gap > REL_TOL:
                    raise ResultMismatchError(f"{m} generated other tokens than PEFT on {case.name} at step {first} "
                                              f"(top-two logit gap {gap:.2e} > {REL_TOL:g}: not a tie)")
        elif case.workload == "train":
            out[m] = max(_max_rel(got["loss"], want["loss"]), _max_rel(got["grads"], want["grads"]))
        else:
            out[m] = _max_rel(got["logits"], want["logits"])
        if not out[m] <= REL_TOL:
            raise ResultMismatchError(f"{m} differs from PEFT on {case.name}: max |diff| {out[m]:.3e} (relative to "
                                      f"max(1, max |PEFT|)) > {REL_TOL:g}")
    base = checks["base"]()
    key = "loss" if case.workload == "train" else "logits"
    n = min(base[key].shape[1], want[key].shape[1]) if base[key].dim() > 1 else None
    out["adapters_change_output"] = _max_rel(base[key][:, :n] if n else base[key], want[key][:, :n] if n else want[key])
    return out


# ---------------------------------------------------------------------------------------------------------------
# timing


def paired_times(fns: dict, *, pairs: int, warmup: int = 0, device="cpu") -> dict:
    """Time ``fns`` (``base`` + variants) in ``pairs`` repetitions of: base, the variants (order rotated by one
    each repetition), base again (shared with the next repetition). A variant's cost above base = its time minus
    the base linearly interpolated between the two base calls around it, by position (cancels a linear drift of
    the machine's speed within a repetition). Returns per method: ``ms`` and ``cpu_ms`` lists (every timed call),
    and for each variant ``above_ms`` / ``above_cpu_ms`` lists (one per repetition)."""
    variants = [m for m in fns if m != "base"]
    for _ in range(warmup):
        for m in fns:
            fns[m]()

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def timed(m):
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        fns[m]()
        sync()
        return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3

    res = {m: {"ms": [], "cpu_ms": []} for m in fns}
    for m in variants:
        res[m].update(above_ms=[], above_cpu_ms=[])

    def record(m, t):
        res[m]["ms"].append(t[0])
        res[m]["cpu_ms"].append(t[1])

    before = timed("base")
    record("base", before)
    for p in range(pairs):
        order = variants[p % len(variants):] + variants[:p % len(variants)]
        ts = [timed(m) for m in order]
        after = timed("base")
        record("base", after)
        for k, (m, t) in enumerate(zip(order, ts)):
            record(m, t)
            frac = (k + 1) / (len(order) + 1)
            res[m]["above_ms"].append(t[0] - (before[0] + frac * (after[0] - before[0])))
            res[m]["above_cpu_ms"].append(t[1] - (before[1] + frac * (after[1] - before[1])))
        before = after
    return res


def _stats(values: list) -> dict:
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "min": float(min(values)),
            "max": float(max(values)), "n": len(values)}


def run_case(case: ModelCase, wl: Workload, *, pairs: Optional[int] = None, budget_s: float = BUDGET_S,
             warmup: int = 0, seed: int = 0) -> dict:
    """Check and time one case on a built workload; returns a JSON-ready dict. ``pairs`` None: as many paired
    repetitions as ``budget_s`` allows at the speed of the checks' calls, within [MIN_PAIRS, MAX_PAIRS]."""
    others = OtherCpuMeter()
    fns, checks = make_fns(case, wl, seed=seed)
    check_s = {}

    def timed(m, f):
        def call():
            t0 = time.perf_counter()
            out = f()
            check_s[m] = time.perf_counter() - t0
            return out
        return call

    check = check_outputs(case, {m: timed(m, f) for m, f in checks.items()})
    if pairs is None:
        pairs = int(min(MAX_PAIRS, max(MIN_PAIRS, budget_s // max(sum(check_s.values()), 1e-9))))
    raw = paired_times(fns, pairs=pairs, warmup=warmup, device=wl.base.device)
    timings = {m: {"median_ms": float(np.median(r["ms"])), "min_ms": float(min(r["ms"])),
                   "cpu_median_ms": float(np.median(r["cpu_ms"])), "ms": r["ms"]} for m, r in raw.items()}
    above = {m: _stats(raw[m]["above_ms"]) for m in VARIANTS}
    above_cpu = {m: _stats(raw[m]["above_cpu_ms"]) for m in VARIANTS}
    tokens_per_s = {m: case.tokens / (t["median_ms"] * 1e-3) for m, t in timings.items()}

    def ratio(num, den):
        return num / den if den > 0 else None

    a = {m: above[m]["median"] for m in VARIANTS}
    ratios = {"peft/accelerated": ratio(a["peft"], a["accelerated"]), "peft/wrapped": ratio(a["peft"], a["wrapped"]),
              "accelerated/wrapped": ratio(a["accelerated"], a["wrapped"])}
    wl.use_accelerated(False)
    return {"case": case.as_dict(), "methods": list(METHODS), "timings": timings, "above_base": above,
            "above_base_cpu": above_cpu, "tokens_per_s": tokens_per_s, "ratios": ratios, "check": check,
            "pairs": pairs, "other_cpu_share": others.share()}


def run(case_list: Iterable[ModelCase], *, device: str | torch.device = "cpu", warmup: int = 0,
        pairs: Optional[int] = None, budget_s: float = BUDGET_S, seed: int = 0, model_dir: Optional[str] = None,
        progress: Callable[[list], Iterable] = iter, reps: Optional[int] = None) -> dict:
    """Run every case; ``pairs`` paired repetitions per case (default: as ``budget_s`` allows, see ``run_case``;
    ``reps`` is accepted as its alias). SmolLM2 uses ``model_dir`` when given, else the fetched assets' folder when present,
    else a random Llama of its config. Returns ``kind="model"``, ``environment``, ``settings``, ``models``,
    ``cases``."""
    pairs = pairs or reps
    case_list = list(case_list)
    env = environment(device)
    others = OtherCpuMeter()
    started = time.perf_counter()
    if model_dir is None and any(c.model == "smollm2-135m" for c in case_list):
        model_dir = _assets_model_dir()
    results, models = [], {}
    by_model = {}
    for c in case_list:
        by_model.setdefault(c.model, {}).setdefault((c.n_adapters, c.rank), []).append(c)
    todo = iter(progress(case_list))
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        for mname, groups in by_model.items():
            base, models[mname] = build_model(mname, model_dir=model_dir, seed=seed, device=device)
            for rank in sorted({r for _, r in groups}):
                ns = sorted(n for n, r in groups if r == rank)
                folders = save_adapter_folders(base, max(ns), rank, Path(tmp) / f"{mname}-r{rank}", seed=seed)
                wl = None
                for n in ns:
                    wl = build_workload(base, folders, n, previous=wl, device=device)
                    for case in groups[(n, rank)]:
                        next(todo, None)
                        results.append(run_case(case, wl, pairs=pairs, budget_s=budget_s, warmup=warmup,
                                                seed=seed))
            del base, wl
    return {"kind": "model", "environment": env, "models": models,
            "settings": {"warmup": warmup, "pairs": pairs or f"{MIN_PAIRS}..{MAX_PAIRS} within {budget_s:g} s per case",
                         "seed": seed, "dtype": "float32",
                         "lora_alpha": LORA_ALPHA, "b_std": B_STD, "targets": list(TARGETS), "rel_tol": REL_TOL},
            "other_cpu_share": others.share(), "elapsed_s": round(time.perf_counter() - started, 1), "cases": results}


def _assets_model_dir() -> Optional[str]:
    try:
        from lora_ops.recipes import assets

        return assets.status().get("model_dir")
    except Exception:  # noqa: BLE001 - any trouble reading the cache means: no converted model
        return None


# ---------------------------------------------------------------------------------------------------------------
# report


def format_table(result: dict) -> str:
    env = result["environment"]
    f = report._fmt
    lines = [f"whole model, mixed adapter batch, on {env['device']} ({env['cpu_model']}, {env['threads']} threads); "
             f"torch {env['torch']}, peft {env.get('peft')}; float32"]
    for name, info in result["models"].items():
        lines.append(f"  {name}: {info['source']}, {info['num_hidden_layers']} layers, hidden {info['hidden_size']},"
                     f" {info['parameters'] / 1e6:.1f}M parameters")
    lines.append("+X = ms above the base model: median over paired repetitions [inter-quartile range]; tok/s = tokens "
                 "per second of each method's median call; diff = max |diff| vs PEFT relative to max(1, max |PEFT|)")
    header = ["case", "base ms", "+peft", "+accel", "+wrap", "peft/accel", "peft/wrap", "accel/wrap", "tok/s base",
              "tok/s peft", "tok/s accel", "tok/s wrap", "diff", "pairs", "others%"]
    rows = []
    for c in result["cases"]:
        a, r, tps = c["above_base"], c["ratios"], c["tokens_per_s"]
        rows.append([c["case"]["name"], f(c["timings"]["base"]["median_ms"], ".1f"),
                     *(f"{a[m]['median']:.1f} [{a[m]['q1']:.1f},{a[m]['q3']:.1f}]" for m in VARIANTS),
                     f(r["peft/accelerated"], ".2f"), f(r["peft/wrapped"], ".2f"), f(r["accelerated/wrapped"], ".2f"),
                     *(f(tps[m], ".0f") for m in METHODS),
                     f(max(c["check"]["accelerated"], c["check"]["wrapped"]), ".1e"), str(c["pairs"]),
                     f(None if c.get("other_cpu_share") is None else 100 * c["other_cpu_share"], ".0f")])
    lines += report.align_rows(header, rows)
    if "elapsed_s" in result:
        lines.append(f"whole run {result['elapsed_s']:.0f} s; others used "
                     f"{100 * (result.get('other_cpu_share') or 0):.0f}% of the CPU")
    return "\n".join(lines)


def write_plot(result: dict, out_dir) -> Path:
    """One panel per workload: ms above the base model per method (median, bars = inter-quartile range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"peft": ("PEFT adapter_names", "C0"), "accelerated": ("PEFT + lora_ops.peft.accelerate", "C3"),
              "wrapped": ("lora_ops.nn.wrap", "C2")}
    workloads = [w for w in WORKLOADS if any(c["case"]["workload"] == w for c in result["cases"])]
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.2), squeeze=False)
    width = 0.8 / len(labels)
    for ax, w in zip(axes[0], workloads):
        cs = [c for c in result["cases"] if c["case"]["workload"] == w]
        for j, (m, (label, color)) in enumerate(labels.items()):
            med = [c["above_base"][m]["median"] for c in cs]
            err = [[c["above_base"][m]["median"] - c["above_base"][m]["q1"] for c in cs],
                   [c["above_base"][m]["q3"] - c["above_base"][m]["median"] for c in cs]]
            ax.bar([i + j * width for i in range(len(cs))], med, width, yerr=err, label=label, color=color,
                   capsize=2)
        ax.set_xticks([i + width for i in range(len(cs))],
                      [f"{c['case']['model']}\nN={c['case']['n_adapters']}" for c in cs], fontsize=7)
        ax.set_ylabel("ms above the base model")
        shape = cs[0]["case"]
        what = {"prefill": f"prefill {shape['seqs']}x{shape['seq_len']}",
                "decode": f"generate {shape['new_tokens']} tokens x {shape['seqs']} seqs",
                "train": f"training step {shape['seqs']}x{shape['seq_len']}"}[w]
        ax.set_title(what, fontsize=9)
        ax.axhline(0, color="k", lw=0.5)
    axes[0][0].legend(fontsize=7)
    env = result["environment"]
    fig.suptitle(f"LoRA cost in a whole model, mixed adapter batch ({env['cpu_model']}, {env['threads']} threads, "
                 f"others used {100 * (result.get('other_cpu_share') or 0):.0f}% CPU)", fontsize=9)
    fig.tight_layout()
    return report.save_png(fig, result, out_dir)


def write_report(result: dict, out_dir) -> dict:
    return {"json": report.write_json(result, out_dir), "png": write_plot(result, out_dir)}
