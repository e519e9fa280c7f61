"""Evaluation: greedy exact-match accuracy and answer LM loss per task, and LM loss on general text.

Exact match of greedy decoding is computed from one teacher-forced pass: greedy decoding produces the answer tokens
followed by end-of-text if and only if, at every answer position, the arg-max of the logits given the correct
prefix is the correct next token (each greedy step sees exactly that prefix as long as all earlier steps were
right). This is the same number as generating, at the cost of a single forward pass, which also gives the loss.
:func:`greedy` (real generation, left padded) is there to look at the outputs.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence

import torch

from lora_ops.recipes.data import SEP, Example
from lora_ops.recipes.train import collate, encode_example, encode_text, token_ce

__all__ = ["greedy", "evaluate", "general_loss", "mean_accuracy"]


@torch.no_grad()
def greedy(model, tok, prompts: Sequence[str], max_new: int, max_len: int = 64) -> List[str]:
    """Greedy continuation of each ``prompt + SEP`` (batched, left padded)."""
    encoded = [tok.encode(p + SEP)[-(max_len - max_new):] for p in prompts]
    length = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), length), tok.pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, length - len(e):] = torch.tensor(e, dtype=torch.long)
        att[i, length - len(e):] = 1
    out = torch.empty((len(encoded), 0), dtype=torch.long)
    done = torch.zeros(len(encoded), dtype=torch.bool)
    for _ in range(max_new):
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, -1]
        nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, tok.eos_id), nxt)
        out = torch.cat([out, nxt[:, None]], 1)
        done |= nxt == tok.eos_id
        if done.all():
            break
        ids = torch.cat([ids, nxt[:, None]], 1)
        att = torch.cat([att, torch.ones_like(nxt)[:, None]], 1)
    texts = []
    for row in out.tolist():
        cut = row.index(tok.eos_id) if tok.eos_id in row else len(row)
        texts.append(tok.decode(row[:cut]))
    return texts


@torch.no_grad()
def evaluate(model, tok, examples: Sequence[Example], *, batch_size: int = 64, max_len: int = 64,
             forward: Optional[Callable] = None) -> Dict[str, dict]:
    """``{task: {"acc": exact-match fraction, "loss": answer token-mean CE, "n": rows}}``.

    ``forward(model, rows, ids, loss_mask, attention_mask) -> logits`` replaces the plain model call (e.g. to route
    each batch from its rows' prompts first); rows are the encoded examples of the batch.
    """
    model.eval()
    by_task: Dict[str, List[Example]] = defaultdict(list)
    for e in examples:
        by_task[e.task].append(e)
    result = {}
    for task, exs in sorted(by_task.items()):
        correct, ce_sum, tokens = 0, 0.0, 0
        for i in range(0, len(exs), batch_size):
            chunk = exs[i:i + batch_size]
            rows = [encode_example(tok, e, max_len) for e in chunk]
            ids, mask, att = collate(rows, 0)
            if forward is None:
                logits = model(input_ids=ids, attention_mask=att).logits
            else:
                logits = forward(model, rows, ids, mask, att)
            ce = token_ce(logits, ids, mask)
            ce_sum += float(ce.sum())
            tokens += int(mask[:, 1:].sum())
            hit = (logits[:, :-1].argmax(-1) == ids[:, 1:]) | ~mask[:, 1:]
            correct += int(hit.all(-1).sum())
        result[task] = {"acc": correct / len(exs), "loss": ce_sum / max(1, tokens), "n": len(exs)}
    return result


@torch.no_grad()
def general_loss(model, tok, texts: Sequence[str], *, batch_size: int = 64, max_len: int = 64) -> float:
    """Token-mean LM loss on general text."""
    model.eval()
    ce_sum, tokens = 0.0, 0
    for i in range(0, len(texts), batch_size):
        rows = [encode_text(tok, t, max_len) for t in texts[i:i + batch_size]]
        ids, mask, att = collate(rows, 0)
        ce_sum += float(token_ce(model(input_ids=ids, attention_mask=att).logits, ids, mask).sum())
        tokens += int(mask[:, 1:].sum())
    return ce_sum / max(1, tokens)


def mean_accuracy(result: Dict[str, dict], tasks: Sequence[str]) -> float:
    return sum(result[t]["acc"] for t in tasks) / max(1, len(tasks))
