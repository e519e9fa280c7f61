"""BIG-bench multiple-choice tasks for the recipes: reading ``task.json``, prompts, the real suite and its splits.

A BIG-bench task file has ``examples``, each with ``input`` and ``target_scores`` (choice -> score; the correct
choices score 1). :func:`read_task` turns one into :class:`~lora_ops.recipes.data.Example` rows whose ``prompt`` is
an instruction for a chat model (the task's own ``task_prefix``, the input, and the choices listed in a seeded
random order, so the position of the correct one carries no signal), ``answer`` the correct choice and ``choices``
all of them. How a prompt is wrapped for a model (its chat template) is up to the tokenizer: see
``lora_ops.recipes.eval.prompt_ids``.

:data:`SUITE` is the real task suite of the recipes; :func:`build_suite` extracts it (through
``lora_ops.recipes.assets``) and writes a recipes data folder (train/valid/test JSONL) with seeded splits, into
the cache, never into a repository: every BIG-bench task asks that its examples stay out of training corpora.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from lora_ops.recipes.data import Dataset, Example, save_dir

__all__ = ["SUITE", "HELD_OUT", "suite_tasks", "read_task", "format_prompt", "build_suite", "split_task"]

# domain -> (training tasks, held-out task). Chosen for short inputs (median under ~250 characters), 2-5 short
# choices, at least ~300 examples and a skill a LoRA can plausibly learn from a few hundred examples; the held-out
# task of each domain is related to its training tasks but never trained on (zero-shot transfer). docs/papers.md
# argues the choice.
_DOMAINS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "logic": (("logical_fallacy_detection", "navigate", "cs_algorithms:valid_parentheses"),
              "logical_deduction:three_objects"),
    "knowledge": (("sports_understanding", "strategyqa", "fact_checker:fever"), "winowhy"),
    "social": (("social_iqa", "implicatures", "social_support"), "epistemic_reasoning"),
    "math": (("unit_conversion:si_conversion", "elementary_math_qa:mathematical_hint_only",
              "unit_conversion:unit_identification"), "unit_conversion:different_systems"),
}
SUITE: Dict[str, str] = {t: d for d, (train, _) in _DOMAINS.items() for t in train}  # training task -> domain
HELD_OUT: Dict[str, str] = {held: d for d, (_, held) in _DOMAINS.items()}


def suite_tasks() -> List[str]:
    """Every task of the suite: the training tasks, then the held-out ones."""
    return list(SUITE) + list(HELD_OUT)


def format_prompt(question: str, choices: Sequence[str], prefix: str = "") -> str:
    """The user message of a multiple-choice example: optional task prefix, the question, the options."""
    parts = [prefix.strip()] if prefix and prefix.strip() else []
    parts.append(question.strip())
    parts.append("Options:\n" + "\n".join(f"- {c}" for c in choices))
    parts.append("Answer with one of the options, exactly as written.")
    return "\n".join(parts)


def read_task(path, *, name: Optional[str] = None, domain: str = "", seed: int = 0) -> List[Example]:
    """The multiple-choice examples of a BIG-bench ``task.json`` (rows without ``target_scores`` are skipped).

    Each example's choices are listed in the prompt in an order drawn from ``seed`` and the example's index;
    the answer is the first choice with the highest score.
    """
    path = Path(path)
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read a BIG-bench task ({e})") from None
    if not isinstance(task, dict) or not isinstance(task.get("examples"), list):
        raise ValueError(f"{path}: not a BIG-bench task (no 'examples' list)")
    name = name or task.get("name") or path.parent.name
    prefix = task.get("task_prefix", "") or ""
    out = []
    for i, ex in enumerate(task["examples"]):
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if not isinstance(scores, dict) or len(scores) < 2 or not isinstance(ex.get("input"), str):
            continue
        choices = [str(c) for c in scores]
        best = max(scores.values())
        answer = next(str(c) for c, s in scores.items() if s == best)
        rng = random.Random(f"{seed}:{name}:{i}")
        shown = rng.sample(choices, len(choices))
        out.append(Example(name, format_prompt(ex["input"], shown, prefix), answer, domain, tuple(shown)))
    if not out:
        raise ValueError(f"{path}: no multiple-choice examples (none has 'input' and >= 2 'target_scores')")
    return out


def split_task(examples: Sequence[Example], seed: int, n_train: int, n_valid: int, n_test: int
               ) -> Tuple[List[Example], List[Example], List[Example]]:
    """Seeded disjoint (train, valid, test) samples of one task; the test split is taken first, so it does not
    change when ``n_train`` does. Sizes shrink (test first kept whole) when the task is small."""
    idx = list(range(len(examples)))
    random.Random(f"split:{seed}:{examples[0].task if examples else ''}").shuffle(idx)
    test = idx[:n_test]
    valid = idx[n_test:n_test + n_valid]
    train = idx[n_test + n_valid:n_test + n_valid + n_train]
    pick = lambda ids: [examples[i] for i in ids]  # noqa: E731
    return pick(train), pick(valid), pick(test)


def build_suite(cache=None, *, seed: int = 0, n_train: int = 256, n_valid: int = 32, n_test: int = 100,
                out_dir=None, sdist=None, progress: bool = True) -> Path:
    """The suite as a recipes data folder (``train/valid/test.jsonl``, ``suite.json``), built once per settings.

    Held-out tasks appear only in ``test.jsonl``. The folder goes to ``out_dir`` or into the cache, named after a
    hash of the settings; it is written atomically. ``sdist``: a local copy of the BIG-bench tarball (see
    ``assets.extract_tasks``).
    """
    from lora_ops._io import atomic_write_dir, atomic_write_json
    from lora_ops.recipes import assets

    settings = {"seed": seed, "n_train": n_train, "n_valid": n_valid, "n_test": n_test, "train": SUITE,
                "held_out": HELD_OUT, "source": assets.TASKS_PACKAGE.spec, "v": 1}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(out_dir) if out_dir else assets.cache_dir(cache) / "data" / f"bigbench-suite-{key}"
    if (folder / "suite.json").is_file():
        return folder
    files = assets.extract_tasks(suite_tasks(), cache, sdist=sdist, progress=progress)
    train, valid, test = [], [], []
    for task, domain in {**SUITE, **HELD_OUT}.items():
        rows = read_task(files[task], name=task, domain=domain, seed=seed)
        tr, va, te = split_task(rows, seed, n_train, n_valid, n_test)
        test += te
        if task in SUITE:
            train += tr
            valid += va
    ds = Dataset(train, valid, test, [])

    def fill(tmp: Path) -> None:
        save_dir(ds, tmp)
        (tmp / "general.jsonl").unlink()  # no general corpus: the real base needs no pre-training here
        counts = {t: {s: sum(e.task == t for e in getattr(ds, s)) for s in ("train", "valid", "test")}
                  for t in suite_tasks()}
        atomic_write_json(tmp / "suite.json", dict(settings, key=key, counts=counts))

    return atomic_write_dir(folder, fill)
