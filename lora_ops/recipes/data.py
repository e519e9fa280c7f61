"""The recipes' data: a JSONL format users can bring, and a seeded synthetic multi-domain task family.

A data folder holds ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl`` with rows
``{"task": str, "prompt": str, "answer": str, "domain": str (optional), "choices": [str] (optional: a
multiple-choice task, scored by the log-likelihood of each choice)}`` and, optionally, ``general.jsonl`` with
rows ``{"text": str}`` (the "general" corpus used for pre-training the tiny base and for I-LoRA's routing losses).
Tasks that occur in ``test.jsonl`` but not in ``train.jsonl`` are the *held-out* tasks (zero-shot transfer).

The offline default (:func:`synthetic`) is generated from a seed: four domains of two training tasks each, three
held-out tasks related to (compositions or variants of) training tasks, and a general corpus of grammar sentences,
echo lines and counting lines. A model reads ``prompt + SEP`` and must produce ``answer`` then end-of-text.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from lora_ops._io import atomic_write_text

__all__ = ["Example", "Dataset", "TASKS", "HELD_OUT", "synthetic", "general_lines", "read_jsonl", "write_jsonl",
           "load_dir", "save_dir", "CharTokenizer", "SEP"]

SEP = "="  # between prompt and answer; every synthetic prompt ends right before it


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str
    domain: str = ""
    choices: Tuple[str, ...] = ()  # multiple-choice tasks: every option (the answer among them); else empty


@dataclass
class Dataset:
    """Splits of task examples plus the general corpus (plain strings)."""

    train: List[Example]
    valid: List[Example]
    test: List[Example]
    general: List[str]

    @property
    def train_tasks(self) -> List[str]:
        return sorted({e.task for e in self.train})

    @property
    def held_out_tasks(self) -> List[str]:
        seen = set(self.train_tasks)
        return sorted({e.task for e in self.test} - seen)

    @property
    def domains(self) -> List[str]:
        return sorted({e.domain or e.task for e in self.train})

    def domain_of(self, task: str) -> str:
        for e in self.train + self.test:
            if e.task == task:
                return e.domain or e.task
        raise KeyError(task)


# ---------------------------------------------------------------------------------------------------------------
# synthetic tasks: name -> (domain, generator(rng) -> (prompt, answer))

_LETTERS = "abcdefgh"  # a small alphabet keeps the tasks learnable by a tiny model in a few hundred steps


def _word(rng: random.Random, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi)))


def _number(rng: random.Random) -> str:
    return "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(2, 5)))


def _kv(rng: random.Random) -> Tuple[List[str], List[str]]:
    keys = rng.sample(_LETTERS, 3)
    vals = [str(rng.randint(0, 9)) for _ in keys]
    return keys, vals


def _get(rng):
    keys, vals = _kv(rng)
    i = rng.randrange(3)
    return "get:" + "".join(k + v for k, v in zip(keys, vals)) + "|" + keys[i], vals[i]


def _last(rng):  # held out: the value of the last key (a variant of get without a query)
    keys, vals = _kv(rng)
    return "last:" + "".join(k + v for k, v in zip(keys, vals)), vals[-1]


def _key(rng):
    keys, vals = _kv(rng)
    vals = [str(v) for v in rng.sample(range(10), 3)]  # distinct values make the inverse lookup well defined
    i = rng.randrange(3)
    return "key:" + "".join(k + v for k, v in zip(keys, vals)) + "|" + vals[i], keys[i]


def _shift(s: str) -> str:
    return "".join(_LETTERS[(_LETTERS.index(c) + 1) % len(_LETTERS)] for c in s)


TASKS: Dict[str, Tuple[str, Callable[[random.Random], Tuple[str, str]]]] = {
    # domain "seq": order manipulations
    "rev": ("seq", lambda r: (lambda w: ("rev:" + w, w[::-1]))(_word(r))),
    "sort": ("seq", lambda r: (lambda w: ("sort:" + w, "".join(sorted(w))))(_word(r))),
    # domain "num": digit strings
    "inc": ("num", lambda r: (lambda n: ("inc:" + n, "".join(str((int(c) + 1) % 10) for c in n)))(_number(r))),
    "max": ("num", lambda r: (lambda n: ("max:" + n, max(n)))(_number(r))),
    # domain "lookup": key-value tables
    "get": ("lookup", _get),
    "key": ("lookup", _key),
    # domain "map": character maps
    "up": ("map", lambda r: (lambda w: ("up:" + w, w.upper()))(_word(r))),
    "shift": ("map", lambda r: (lambda w: ("shift:" + w, _shift(w)))(_word(r))),
}

# Held-out tasks: related to training tasks (a composition across domains or a variant inside one), never trained.
HELD_OUT: Dict[str, Tuple[str, Callable[[random.Random], Tuple[str, str]]]] = {
    "revup": ("seq+map", lambda r: (lambda w: ("revup:" + w, w[::-1].upper()))(_word(r))),
    "min": ("num", lambda r: (lambda n: ("min:" + n, min(n)))(_number(r))),
    "last": ("lookup", _last),
}

_SUBJ = ["the cat", "a dog", "my friend", "the bird", "a child", "the old man", "her sister"]
_VERB = ["sees", "likes", "finds", "takes", "wants", "makes"]
_OBJ = ["a ball", "the tree", "some bread", "a red box", "the big car", "an apple"]


def _general_line(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return f"{rng.choice(_SUBJ)} {rng.choice(_VERB)} {rng.choice(_OBJ)}."
    if kind == 1:  # echo lines teach copying through SEP, the skill every task builds on (both letter cases)
        w = _word(rng, 2, 7)
        w = w.upper() if rng.random() < 0.5 else w
        return f"say:{w}{SEP}{w}"
    start = rng.randint(0, 5)
    return " ".join(str(i) for i in range(start, start + rng.randint(3, 6)))


def general_lines(seed: int, n: int, exclude: Sequence[str] = ()) -> List[str]:
    """``n`` distinct general-corpus lines drawn from ``seed``, none of them in ``exclude`` (e.g. a held-back set
    disjoint from the corpus a model was trained on); fewer if the generator runs dry."""
    rng, seen, out = random.Random(seed), set(exclude), []
    for _ in range(50 * n):
        line = _general_line(rng)
        if line not in seen:
            seen.add(line)
            out.append(line)
            if len(out) == n:
                break
    return out


def _examples(table, names: Sequence[str], n: int, rng: random.Random) -> List[Example]:
    out = []
    for name in names:
        domain, gen = table[name]
        for _ in range(n):
            prompt, answer = gen(rng)
            out.append(Example(name, prompt, answer, domain))
    return out


def synthetic(seed: int = 0, n_train: int = 400, n_valid: int = 32, n_test: int = 64, n_general: int = 4000,
              tasks: Optional[Sequence[str]] = None) -> Dataset:
    """The offline multi-domain dataset; the same seed gives the same rows. ``n_*`` are per task."""
    names = list(tasks) if tasks is not None else list(TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"synthetic: unknown tasks {unknown} (known: {sorted(TASKS)})")
    rng = random.Random(seed)
    train = _examples(TASKS, names, n_train, rng)
    valid = _examples(TASKS, names, n_valid, rng)
    test = _examples(TASKS, names, n_test, rng) + _examples(HELD_OUT, list(HELD_OUT), n_test, rng)
    general = [_general_line(rng) for _ in range(n_general)]
    return Dataset(train, valid, test, general)


# ---------------------------------------------------------------------------------------------------------------
# JSONL

def read_jsonl(path) -> List[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
    return rows


def write_jsonl(path, rows: Sequence[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _to_examples(rows: List[dict], path) -> List[Example]:
    out = []
    for i, r in enumerate(rows, 1):
        missing = [k for k in ("task", "prompt", "answer") if not isinstance(r.get(k), str)]
        if missing:
            raise ValueError(f"{path}: row {i} lacks string field(s) {missing}")
        choices = r.get("choices") or ()
        if not (isinstance(choices, (list, tuple)) and all(isinstance(c, str) for c in choices)):
            raise ValueError(f"{path}: row {i}: 'choices' must be a list of strings")
        if choices and r["answer"] not in choices:
            raise ValueError(f"{path}: row {i}: the answer is not one of its 'choices'")
        out.append(Example(r["task"], r["prompt"], r["answer"], r.get("domain") or "", tuple(choices)))
    return out


def load_dir(path) -> Dataset:
    """Reads a data folder (see the module docstring); ``general.jsonl`` is optional."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--data {path}: not a folder")
    splits = {}
    for split in ("train", "valid", "test"):
        f = path / f"{split}.jsonl"
        if not f.is_file():
            raise FileNotFoundError(f"--data {path}: missing {split}.jsonl")
        splits[split] = _to_examples(read_jsonl(f), f)
    general = []
    if (path / "general.jsonl").is_file():
        general = [r["text"] for r in read_jsonl(path / "general.jsonl")]
    if not splits["train"]:
        raise ValueError(f"--data {path}: train.jsonl is empty")
    return Dataset(splits["train"], splits["valid"], splits["test"], general)


def save_dir(ds: Dataset, path) -> Path:
    path = Path(path)
    for split in ("train", "valid", "test"):
        write_jsonl(path / f"{split}.jsonl", [asdict(e) for e in getattr(ds, split)])
    write_jsonl(path / "general.jsonl", [{"text": t} for t in ds.general])
    return path


# ---------------------------------------------------------------------------------------------------------------
# tokenizer

class CharTokenizer:
    """Character-level tokenizer saved with the tiny model (``tokenizer.json``); id 0 pads, id 1 ends a text.

    Characters outside the vocabulary map to ``unk`` (id 2), so user data never crashes the synthetic model.
    """

    PAD, EOS, UNK = 0, 1, 2
    pad_id, eos_id = PAD, EOS

    def __init__(self, chars: str):
        self.chars = "".join(dict.fromkeys(chars))  # unique, order kept
        self._index = {c: i + 3 for i, c in enumerate(self.chars)}

    @classmethod
    def default(cls) -> "CharTokenizer":
        return cls(string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,:;|=+-*()[]<>!?'")

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 3

    def encode(self, text: str) -> List[int]:
        return [self._index.get(c, self.UNK) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i - 3] for i in ids if i >= 3)

    def save(self, path) -> Path:
        return atomic_write_text(path, json.dumps({"type": "char", "chars": self.chars}) + "\n")

    @classmethod
    def load(cls, path) -> "CharTokenizer":
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
        if cfg.get("type") != "char":
            raise ValueError(f"{path}: not a lora_ops character tokenizer")
        return cls(cfg["chars"])
