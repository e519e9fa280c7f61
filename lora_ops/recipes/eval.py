"""Evaluation: greedy exact-match accuracy and answer LM loss per task, and LM loss on general text.

Multiple-choice tasks (rows with ``choices``) are scored by :func:`evaluate_choices`, as BIG-bench's
``multiple_choice_grade``: the predicted choice is the one with the highest log-likelihood given the prompt.

Exact match of greedy decoding is computed from one teacher-forced pass: greedy decoding produces the answer tokens
followed by end-of-text if and only if, at every answer position, the arg-max of the logits given the correct
prefix is the correct next token (each greedy step sees exactly that prefix as long as all earlier steps were
right). This is the same number as generating, at the cost of a single forward pass, which also gives the loss.
:func:`greedy` (real generation, left padded) is there to look at the outputs.
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from lora_ops.recipes.data import SEP, Example
from lora_ops.recipes.train import collate, encode_example, encode_text, prompt_ids, token_ce

__all__ = ["greedy", "evaluate", "general_loss", "mean_accuracy", "choice_logprobs", "evaluate_choices"]


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

    A task whose rows all have ``choices`` is a multiple-choice task: its ``acc`` is the multiple-choice grade of
    :func:`evaluate_choices` (``exact`` keeps the exact-match fraction), unless ``forward`` is given.
    ``forward(model, rows, ids, loss_mask, attention_mask) -> logits`` replaces the plain model call (e.g. to route
    each batch from its rows' prompts first); rows are the encoded examples of the batch.
    """
    model.eval()
    by_task: Dict[str, List[Example]] = defaultdict(list)
    for e in examples:
        by_task[e.task].append(e)
    result = {}
    for task, exs in sorted(by_task.items()):
        if all(e.choices for e in exs):
            result[task] = _grade(exs, _choice_scores(model, tok, exs, batch_size=max(1, batch_size // 8),
                                                      max_len=max_len) if forward is None else
                                  _choice_scores_by_rows(model, tok, exs, forward, batch_size=max(1, batch_size // 4),
                                                         max_len=max_len))
            continue
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


def _grade(exs: Sequence[Example], scored: List[List[Tuple[float, int, bool]]]) -> dict:
    """One multiple-choice task's ``acc`` (multiple_choice_grade), ``se``, ``loss`` (answer token-mean CE: the
    correct choice's), ``exact`` (greedy decoding gives the correct choice) and ``n`` from per-choice scores."""
    hits, ce, tokens, exact = 0, 0.0, 0, 0
    for e, sc in zip(exs, scored):
        best = max(range(len(sc)), key=lambda j: sc[j][0])  # ties: the first listed choice
        hits += int(e.choices[best] == e.answer)
        lp, n, greedy_hit = sc[e.choices.index(e.answer)]
        ce, tokens, exact = ce - lp, tokens + n, exact + int(greedy_hit)
    acc = hits / len(exs)
    return {"acc": acc, "se": math.sqrt(acc * (1 - acc) / len(exs)), "loss": ce / max(1, tokens),
            "exact": exact / len(exs), "n": len(exs)}


@torch.no_grad()
def _choice_scores_by_rows(model, tok, exs: Sequence[Example], forward: Callable, *, batch_size: int, max_len: int
                           ) -> List[List[Tuple[float, int, bool]]]:
    """Per-choice ``(log-likelihood, tokens, greedy hit)`` from one teacher-forced row per (example, choice)
    through ``forward`` (for models routed from their rows, e.g. MoA; no KV cache sharing)."""
    rows = [encode_example(tok, Example(e.task, e.prompt, c, e.domain, e.choices), max_len)
            for e in exs for c in e.choices]
    lps, hits = [], []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        ids, mask, att = collate(chunk, 0)
        logits = forward(model, chunk, ids, mask, att)
        lps += (-token_ce(logits, ids, mask).sum(-1)).tolist()
        hits += ((logits[:, :-1].argmax(-1) == ids[:, 1:]) | ~mask[:, 1:]).all(-1).tolist()
    out, k = [], 0
    for e in exs:
        out.append([(lps[k + j], sum(rows[k + j]["loss"]), bool(hits[k + j])) for j in range(len(e.choices))])
        k += len(e.choices)
    return out


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


# ---------------------------------------------------------------------------------------------------------------
# multiple choice

def choice_logprobs(model, tok, examples: Sequence[Example], *, batch_size: int = 8, max_len: int = 1024
                    ) -> List[List[Tuple[float, int]]]:
    """``[[(log p(choice + end-of-text | prompt), token count) for each choice] for each example]``; see
    :func:`_choice_scores`."""
    return [[(lp, n) for lp, n, _ in sc] for sc in _choice_scores(model, tok, examples, batch_size=batch_size,
                                                                   max_len=max_len)]


@torch.no_grad()
def _choice_scores(model, tok, examples: Sequence[Example], *, batch_size: int = 8, max_len: int = 1024
                   ) -> List[List[Tuple[float, int, bool]]]:
    """``[[(log p(choice + end-of-text | prompt), token count, greedy hit) for each choice] for each example]``
    (greedy hit: every token of the choice and the end-of-text is the arg-max given its prefix).

    The prompt is read once per example: a batch of prompts (left padded) runs with the KV cache on, the cache
    rows are repeated once per choice, and all choices of the batch run in one second pass on top of it. A choice
    is its tokens followed by end-of-text, so a choice that is a prefix of another does not win for free. Prompts
    longer than ``max_len`` minus the longest choice lose their start.
    """
    model.eval()
    # transformers renamed the cache argument (past_key_values -> cache); logits_to_keep skips the LM head on
    # the prompt's positions but the last
    params = inspect.signature((model.get_base_model() if hasattr(model, "get_base_model") else model).forward)
    cache_kw = "cache" if "cache" in params.parameters else "past_key_values"
    kw_last = {"logits_to_keep": 1} if "logits_to_keep" in params.parameters else {}
    out: List[List[Tuple[float, int, bool]]] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        conts = [[tok.encode(c) + [tok.eos_id] for c in e.choices] for e in chunk]
        if any(len(c) < 2 for c in conts):
            raise ValueError("choice_logprobs: every example needs at least 2 choices")
        prompts = [prompt_ids(tok, e.prompt)[-max(1, max_len - max(len(x) for x in c)):]
                   for e, c in zip(chunk, conts)]
        lp = max(len(p) for p in prompts)
        ids = torch.full((len(chunk), lp), tok.pad_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, lp - len(p):] = torch.tensor(p)
            att[i, lp - len(p):] = 1
        first = model(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0),
                      use_cache=True, **kw_last)
        last = first.logits[:, -1].float().log_softmax(-1)  # [E, V]: the first token of every choice
        owner = [i for i, c in enumerate(conts) for _ in c]
        rows = [x for c in conts for x in c]
        lc = max(len(r) for r in rows)
        cids = torch.full((len(rows), lc), tok.pad_id, dtype=torch.long)
        cmask = torch.zeros_like(cids)
        for j, r in enumerate(rows):
            cids[j, :len(r)] = torch.tensor(r)
            cmask[j, :len(r)] = 1
        idx = torch.tensor(owner)
        cache = getattr(first, "cache", None) or first.past_key_values
        cache.batch_select_indices(idx)  # one cache row per choice (rows repeat)
        pos = att.sum(-1)[idx, None] + torch.arange(lc)
        logits = model(input_ids=cids, attention_mask=torch.cat([att[idx], cmask], 1), position_ids=pos,
                       **{cache_kw: cache}).logits.float().log_softmax(-1)
        token_lp = torch.cat([last[idx].gather(1, cids[:, :1]), logits[:, :-1].gather(2, cids[:, 1:, None])[..., 0]],
                             1) * cmask
        totals = token_lp.sum(1).tolist()
        greedy = torch.cat([last[idx].argmax(-1, keepdim=True) == cids[:, :1],
                            logits[:, :-1].argmax(-1) == cids[:, 1:]], 1) | ~cmask.bool()
        hits = greedy.all(1).tolist()
        k = 0
        for c in conts:
            out.append([(totals[k + j], len(c[j]), bool(hits[k + j])) for j in range(len(c))])
            k += len(c)
    return out


def evaluate_choices(model, tok, examples: Sequence[Example], *, batch_size: int = 8, max_len: int = 1024,
                     normalize: str = "none", progress=None) -> Dict[str, dict]:
    """``{task: {"acc", "se", "n"}}`` of multiple-choice examples: the predicted choice has the highest
    log-likelihood (``normalize="none"``, BIG-bench's multiple_choice_grade) or the highest mean log-likelihood per
    token (``"tokens"``); ``se`` is the binomial standard error ``sqrt(acc (1 - acc) / n)``.

    ``progress(n_done)`` is called after each batch.
    """
    if normalize not in ("none", "tokens"):
        raise ValueError(f"normalize must be 'none' or 'tokens', got {normalize!r}")
    missing = [e for e in examples if e.answer not in e.choices]
    if missing:
        raise ValueError(f"evaluate_choices: an example of task {missing[0].task!r} has no choices containing its "
                         "answer")
    hits: Dict[str, List[int]] = defaultdict(list)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        for e, scored in zip(chunk, choice_logprobs(model, tok, chunk, batch_size=batch_size, max_len=max_len)):
            values = [lp / n if normalize == "tokens" else lp for lp, n in scored]
            best = max(range(len(values)), key=values.__getitem__)  # ties: the first listed choice
            hits[e.task].append(int(e.choices[best] == e.answer))
        if progress is not None:
            progress(min(start + batch_size, len(examples)))
    result = {}
    for task, h in sorted(hits.items()):
        acc = sum(h) / len(h)
        result[task] = {"acc": acc, "se": math.sqrt(acc * (1 - acc) / len(h)), "n": len(h)}
    return result
