"""The real-model pieces without network: GGUF conversion, BIG-bench task files, JSONL rows, multiple-choice scoring."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lora_ops.recipes import assets, bigbench  # noqa: E402
from lora_ops.recipes.data import CharTokenizer, Example, load_dir, save_dir, Dataset  # noqa: E402
from lora_ops.recipes.eval import choice_logprobs, evaluate_choices  # noqa: E402
from lora_ops.recipes.train import prompt_ids  # noqa: E402


def _llama(vocab, hidden=16, layers=2, heads=2, kv_heads=1, inter=24, seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=inter, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None, **kw)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------------------------------------------
# multiple-choice scoring

TOK = CharTokenizer("ab=xy")  # ids: pad 0, eos 1, unk 2, a 3, b 4, = 5, x 6, y 7


def _bigram_model(table):
    """A one-layer Llama whose next-token distribution is ``table[current token]``: attention and MLP outputs are
    zeroed, embeddings are one-hot and the head holds log-probabilities, so log p is known by hand."""
    v = len(table)
    model = _llama(v, hidden=v, layers=1, heads=2, kv_heads=2, inter=4, rms_norm_eps=1e-12,
                   tie_word_embeddings=False)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(v))
        for norm in (model.model.norm, model.model.layers[0].input_layernorm,
                     model.model.layers[0].post_attention_layernorm):
            norm.weight.fill_(1.0)
        # the final norm maps one-hot(t) to sqrt(v) * one-hot(t); the head's column t is log table[t] / sqrt(v)
        model.lm_head.weight.copy_(torch.tensor(table, dtype=torch.float32).log().T / math.sqrt(v))
    return model


def _table():
    v = TOK.vocab_size
    rows = [[1.0 / v] * v for _ in range(v)]
    eq = [0.1 / 6] * v
    eq[6], eq[7] = 0.4, 0.5  # after "=": x 0.4, y 0.5
    rows[5] = eq
    rows[6] = [0.5 / 7] * v
    rows[6][1] = 0.5  # after x: end-of-text 0.5
    rows[7] = [0.4 / 7] * v
    rows[7][6] = 0.6  # after y: x 0.6
    return rows


def test_choice_logprobs_by_hand():
    model = _bigram_model(_table())
    ex = Example("t", "ab", "yx", choices=("x", "yx"))
    [scored] = choice_logprobs(model, TOK, [ex])
    # "x" + eos: p(x|=) p(eos|x) = 0.4 * 0.5; "yx" + eos: p(y|=) p(x|y) p(eos|x) = 0.5 * 0.6 * 0.5
    assert scored[0][1] == 2 and scored[1][1] == 3
    assert scored[0][0] == pytest.approx(math.log(0.2), abs=1e-5)
    assert scored[1][0] == pytest.approx(math.log(0.15), abs=1e-5)
    # the sum prefers "x" (log 0.2 > log 0.15), the per-token mean prefers "yx" (log(0.15)/3 > log(0.2)/2)
    assert evaluate_choices(model, TOK, [ex])["t"]["acc"] == 0.0
    assert evaluate_choices(model, TOK, [ex], normalize="tokens")["t"]["acc"] == 1.0


def _naive(model, tok, ex):
    """Each choice scored alone: one full forward pass over prompt + choice + eos, no padding, no cache."""
    out = []
    p = prompt_ids(tok, ex.prompt)
    for c in ex.choices:
        cont = tok.encode(c) + [tok.eos_id]
        ids = torch.tensor([p + cont])
        with torch.no_grad():
            lp = model(input_ids=ids).logits[0].log_softmax(-1)
        out.append(sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(cont)))
    return out


def test_choice_logprobs_batched_equals_one_at_a_time():
    tok = CharTokenizer.default()
    model = _llama(tok.vocab_size)
    exs = [Example("t", "q" * (1 + 3 * i % 7), "b", choices=tuple(["ab", "b", "cde"][: 2 + i % 2]))
           for i in range(7)]
    got = choice_logprobs(model, tok, exs, batch_size=3)  # ragged prompts (left padding) and choices
    for ex, scored in zip(exs, got):
        assert [s for s, _ in scored] == pytest.approx(_naive(model, tok, ex), abs=1e-4)
    res = evaluate_choices(model, tok, exs, batch_size=3)["t"]
    assert res["n"] == 7 and res["se"] == pytest.approx(math.sqrt(res["acc"] * (1 - res["acc"]) / 7))


# ---------------------------------------------------------------------------------------------------------------
# extras: a missing optional dependency names the extra to install

@pytest.mark.parametrize("argv, module, extra", [
    (["reproduce", "ilora", "--quick"], "matplotlib", "bench"),
    (["eval", "--task", "nothing.json"], "safetensors", "real"),
    (["assets", "fetch"], "gguf", "real"),  # before any download
])
def test_missing_extra_is_named(monkeypatch, tmp_path, capsys, argv, module, extra):
    from lora_ops import cli

    monkeypatch.setenv("LORA_OPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    if argv[0] == "reproduce":
        argv = argv + ["--out", str(tmp_path / "out")]
    assert cli.main(argv) != 0
    err = capsys.readouterr().err
    assert f"lora_ops[{extra}]" in err and module in err and "Traceback" not in err
    assert not (tmp_path / "cache" / "models").exists()  # nothing half-made
