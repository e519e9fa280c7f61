"""The recipes end to end on a very small configuration, their determinism, and the ``reproduce`` CLI."""

import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from recipes_support import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)

from lora_ops import cli  # noqa: E402
from lora_ops.recipes import ilora, seeded_lora  # noqa: E402
from lora_ops.recipes.common import BaseSpec  # noqa: E402
from lora_ops.recipes.model import TinyConfig, pretrained_base  # noqa: E402

TINY_BASE = BaseSpec(tiny=TinyConfig(16, 1, 2, 32, 32), pretrain_steps=8, pretrain_batch=8, n_train=16, n_valid=2,
                     n_test=4, n_general=64, max_len=32)


def tiny_ilora():
    return ilora.ILoRAConfig(base=TINY_BASE, tasks=("rev", "up"), r=2, alpha=4.0, steps=3, batch_size=4,
                             general_batch=4, n_general_eval=8, eval_every=2,
                             sweep=((0.8, 2), (1.0, 0)))


def tiny_seeded():
    return seeded_lora.SeededConfig(base=TINY_BASE, tasks=("rev", "up"), r=2, alpha=4.0, seed_fraction=0.25,
                                    seed_steps=2, expert_steps=2, batch_size=4, timing_reps=1,
                                    layer_timing_size=(64, 16))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("base-cache")


def test_pretrained_base_is_cached_and_reproducible(tmp_path):
    general = ["the cat sees a ball.", "say:abc=abc", "1 2 3"] * 4
    kw = dict(tiny=TinyConfig(16, 1, 2, 32, 32), steps=3, batch_size=4, progress=False)
    m1, _ = pretrained_base(general, tmp_path / "a", **kw)
    m2, tok = pretrained_base(general, tmp_path / "b", **kw)
    m3, _ = pretrained_base(general, tmp_path / "a", **kw)  # loaded from the cache
    for (n, p1), p2, p3 in zip(m1.state_dict().items(), m2.state_dict().values(), m3.state_dict().values()):
        assert torch.equal(p1, p2), n
        assert torch.equal(p1, p3), n
    folders = list((tmp_path / "a").iterdir())
    assert len(folders) == 1 and (folders[0] / "char_tokenizer.json").is_file()
    assert not [f for f in folders if f.name.endswith(".tmp")]


def test_ilora_runs_end_to_end_and_is_deterministic(tmp_path, cache):
    p1 = ilora.run(tiny_ilora(), tmp_path / "one", cache_dir=cache, progress=False)
    p2 = ilora.run(tiny_ilora(), tmp_path / "two", cache_dir=cache, progress=False)
    for key in ("base", "own_adapter", "methods", "train_final"):
        assert json.dumps(p1[key], sort_keys=True) == json.dumps(p2[key], sort_keys=True), key
    names = list(p1["methods"])
    assert len(names) == 5 and all(len(p1["methods"][n]["scalability"]) == 2 for n in names)
    out = tmp_path / "one"
    for f in ("results.json", "results.md", "single_task.png", "scalability.png"):
        assert (out / f).is_file(), f
    assert (out / "adapters" / "routing" / "rev" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "i-lora" / "adapter_config.json").is_file()
    md = (out / "results.md").read_text()
    assert "Scalability" in md and "ablation a" in md and "ablation b" in md
    saved = json.loads((out / "results.json").read_text())
    assert saved["tasks"] == ["rev", "up"]
    assert [s["rank"] for s in p1["merge_sweep"]] == [2, "full", "full"]
    curve = p1["valid_curves"]["routing"]["rev"]  # validation every 2 steps of 3
    assert [c["step"] for c in curve] == [2] and 0.0 <= curve[0]["acc"] <= 1.0 and curve[0]["loss"] > 0
    # routing tuning actually ran: its KL / activation terms were logged, the plain adapters have none
    assert "kl" in p1["train_final"]["routing"]["rev"] and "kl" not in p1["train_final"]["plain"]["rev"]


def test_seeded_lora_runs_end_to_end(tmp_path, cache):
    p = seeded_lora.run(tiny_seeded(), tmp_path, cache_dir=cache, progress=False)
    names = set(p["results"])
    for kind in seeded_lora.SEED_KINDS:
        assert f"seeded ({kind}), mean" in names
    for agg in ("similarity", "maxpool"):
        assert f"seeded (random), {agg}" in names
    # synthetic domains are equal in size: weighting by size would be the mean, so it is not run, with the reason
    assert "seeded (random), weighted" not in names and "weighted" in p["skipped"]
    # the single-domain seed is rotated over the domains and averaged
    rotations = [f"seeded (domain={d}), mean" for d in p["domains"]]
    assert set(rotations) <= names
    t = p["tasks"][0]
    assert p["results"]["seeded (domain), mean"][t]["acc"] == pytest.approx(
        sum(p["results"][r][t]["acc"] for r in rotations) / len(rotations))
    # equal budgets: the seed's steps are counted for the baselines too
    cfg = tiny_seeded()
    n = len(p["domains"])
    assert p["budgets"]["multi-task LoRA"] == cfg.seed_steps + n * cfg.expert_steps
    assert p["budgets"]["scratch experts (N experts)"] == n * (cfg.expert_steps + round(cfg.seed_steps / n))
    assert {"scratch experts, mean", "multi-task LoRA", "base"} <= names
    assert set(p["held_out"]) == {"last", "min", "revup"}
    for agg, t in p["timing"].items():
        assert t["lora_ops_ms"] > 0 and t["loop_ms"] > 0
        assert t["max_abs_diff"] < 1e-3, agg  # both backends compute the same combination
    assert set(p["layer_timing"]) == set(seeded_lora.AGGREGATIONS)
    assert all(t["max_abs_diff"] < 1e-3 for t in p["layer_timing"].values())
    for f in ("results.json", "results.md", "summary.png", "timing.png"):
        assert (tmp_path / f).is_file(), f


def test_cli_reproduce(tmp_path, cache, monkeypatch, capsys):
    monkeypatch.setattr(ilora, "quick_config", tiny_ilora)
    rc = cli.main(["reproduce", "ilora", "--quick", "--out", str(tmp_path / "o"), "--cache", str(cache),
                   "--no-progress"])
    assert rc == 0
    assert "I-LoRA reproduction" in capsys.readouterr().out
    assert (tmp_path / "o" / "results.json").is_file()
    rc = cli.main(["reproduce", "seeded-lora", "--data", str(tmp_path / "missing")])
    assert rc == 2 and "--data" in capsys.readouterr().err
    assert cli.main(["reproduce", "no-such-recipe"]) == 2


def test_recipe_on_a_user_data_folder(tmp_path, cache):
    from lora_ops.recipes import data

    ds = data.synthetic(seed=5, n_train=16, n_valid=2, n_test=4, n_general=64, tasks=["rev", "up"])
    data.save_dir(ds, tmp_path / "data")
    cfg = tiny_ilora()
    p = ilora.run(cfg, tmp_path / "out", data_dir=tmp_path / "data", cache_dir=cache, progress=False)
    assert p["source"]["data"].endswith("data") and p["tasks"] == ["rev", "up"]


def test_data_folder_without_general_text_fails_clearly(tmp_path, cache):
    from lora_ops.recipes import data

    ds = data.synthetic(seed=5, n_train=4, n_valid=1, n_test=1, n_general=4, tasks=["rev"])
    data.save_dir(ds, tmp_path)
    (tmp_path / "general.jsonl").unlink()
    with pytest.raises(ValueError, match="general"):
        ilora.run(tiny_ilora(), tmp_path / "out", data_dir=tmp_path, cache_dir=cache, progress=False)


def _local_hf_model(path):
    """A folder like a user's --model: a Llama and a fast tokenizer saved with save_pretrained (no download)."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + " .,:;|=+-*()[]<>!?'"
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(str(path))
    from lora_ops.recipes.model import build_tiny_llama

    build_tiny_llama(len(vocab), TinyConfig(16, 1, 2, 32, 128), seed=0).save_pretrained(str(path))


def test_recipes_take_a_local_transformers_model(tmp_path):
    from lora_ops.recipes import data
    from lora_ops.recipes.model import HFTokenizer, load_model

    _local_hf_model(tmp_path / "model")
    model, tok = load_model(tmp_path / "model")
    assert isinstance(tok, HFTokenizer) and tok.encode("ab=") == [3, 4, tok.encode("=")[0]]
    ds = data.synthetic(seed=5, n_train=16, n_valid=2, n_test=4, n_general=64, tasks=["rev", "up"])
    data.save_dir(ds, tmp_path / "data")
    p = seeded_lora.run(tiny_seeded(), tmp_path / "out", data_dir=tmp_path / "data", model_dir=tmp_path / "model",
                        progress=False)
    assert p["source"]["model"].endswith("model") and set(p["tasks"]) == {"rev", "up"}
    assert (tmp_path / "out" / "results.md").is_file()
