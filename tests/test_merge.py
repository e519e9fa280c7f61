"""lora_ops.merge: every method on factors, and PEFT parity of merge_peft_adapters with add_weighted_adapter."""

import copy
import functools

import pytest
import torch
from torch import nn

from lora_ops import merge as M
from lora_ops.merge import merge, merge_peft_adapters

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402


def _bank(n=3, r=4, d_in=24, d_out=20, dtype=torch.float64):
    return torch.randn(n, r, d_in, dtype=dtype), torch.randn(n, d_out, r, dtype=dtype)


def _dense(a, b, w):
    return torch.einsum("n,nor,nri->oi", torch.as_tensor(w, dtype=a.dtype), b, a)


def _rel(x, y):
    return ((x - y).norm() / max(y.norm(), 1e-30)).item()


# ----- factor-level semantics ------------------------------------------------------------------------------------

def test_linear_averages_factors_not_products():
    a, b = _bank()
    w = [0.5, 0.3, 0.2]
    ma, mb = merge(a, b, w, "linear")
    wa = torch.tensor(w, dtype=a.dtype).sqrt()
    torch.testing.assert_close(ma, (wa[:, None, None] * a).sum(0))
    torch.testing.assert_close(mb, (wa[:, None, None] * b).sum(0))
    assert _rel(mb @ ma, _dense(a, b, w)) > 0.1  # cross terms: not the average of products


def test_linear_negative_weight_and_single_adapter_roundtrip():
    a, b = _bank(n=1)
    ma, mb = merge(a, b, [-2.0], "linear", scales=[0.5])
    torch.testing.assert_close(mb @ ma, -(b[0] @ a[0]))


def test_cat_is_exact_average_of_products():
    a, b = _bank(r=3)
    w, s = [0.2, -0.7, 1.1], [2.0, 0.5, 1.0]
    ma, mb = merge(a, b, w, "cat", scales=s)
    assert ma.shape == (9, 24) and mb.shape == (20, 9)
    torch.testing.assert_close(mb @ ma, _dense(a, b, [wi * si for wi, si in zip(w, s)]))


def test_svd_is_truncation_of_products():
    a, b = _bank(r=4)
    w = [0.4, 0.4, 0.2]
    ma, mb = merge(a, b, w, "svd", rank=5)
    u, s, vh = torch.linalg.svd(_dense(a, b, w))
    torch.testing.assert_close(mb @ ma, (u[:, :5] * s[:5]) @ vh[:5])


def test_max_pool_takes_largest_magnitude_then_low_rank():
    a, b = _bank(r=2, d_in=10, d_out=8)
    ma, mb = merge(a, b, [1.0, 1.0, 1.0], "max_pool", rank=8)  # full rank: the pooled delta itself
    deltas = b @ a
    pooled = deltas.gather(0, deltas.abs().argmax(0, keepdim=True))[0]
    torch.testing.assert_close(mb @ ma, pooled)
    assert (pooled.abs() == deltas.abs().amax(0)).all()


def test_iterative_max_truncates_each_delta_by_energy():
    a, b = _bank(n=2, r=4, d_in=16, d_out=16)
    ma, mb = merge(a, b, None, "iterative_max", rank=16, energy=0.8)
    expected = None
    for i in range(2):
        u, s, vh = torch.linalg.svd(b[i] @ a[i])
        k = M.truncate_by_energy(s, 0.8)
        t = (u[:, :k] * s[:k]) @ vh[:k]
        expected = t if expected is None else torch.where(t.abs() > expected.abs(), t, expected)
    torch.testing.assert_close(mb @ ma, expected)
    # energy 1 keeps each delta whole: max-pool of the full deltas
    ma1, mb1 = merge(a, b, None, "iterative_max", rank=16, energy=1.0)
    mp_a, mp_b = merge(a, b, None, "max_pool", rank=16)
    torch.testing.assert_close(mb1 @ ma1, mp_b @ mp_a)


def test_truncate_by_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert M.truncate_by_energy(s, 0.5) == 1
    assert M.truncate_by_energy(s, 0.9) == 2
    assert M.truncate_by_energy(s, 1.0) == 3
    assert M.truncate_by_energy(torch.zeros(3), 0.8) == 1
    with pytest.raises(ValueError, match="energy"):
        M.truncate_by_energy(s, 0.0)


def test_ties_sign_election_by_hand():
    # two adapters, r=1: entries with disagreeing signs keep only the majority side
    a = torch.tensor([[[1.0, -2.0]], [[3.0, 1.0]]])
    b = torch.tensor([[[1.0]], [[1.0]]])
    ma, _ = merge(a, b, [1.0, 1.0], "ties", density=1.0)
    torch.testing.assert_close(ma, torch.tensor([[2.0, -2.0]]))  # (1+3)/2 ; total -1 < 0 -> keep -2 only


@pytest.mark.parametrize("method", M.METHODS)
def test_every_method_runs_in_half_precision(method):
    a, b = _bank(dtype=torch.bfloat16)
    ma, mb = merge(a, b, [0.3, 0.3, 0.4], method, density=0.5, rank=4)
    assert ma.dtype == torch.bfloat16 and mb.dtype == torch.bfloat16
    assert ma.shape[1] == 24 and mb.shape[0] == 20 and ma.shape[0] == mb.shape[1]
    assert torch.isfinite(mb.float() @ ma.float()).all()


def test_bad_arguments():
    a, b = _bank()
    with pytest.raises(ValueError, match="method must be one of"):
        merge(a, b, None, "average")
    with pytest.raises(ValueError, match="needs density"):
        merge(a, b, None, "ties")
    with pytest.raises(ValueError, match="density must be in"):
        merge(a, b, None, "ties", density=1.5)
    with pytest.raises(ValueError, match="weights must have one value per adapter"):
        merge(a, b, [1.0, 2.0], "svd")
    with pytest.raises(ValueError, match="weights must be finite"):
        merge(a, b, [1.0, float("nan"), 1.0], "svd")
    with pytest.raises(ValueError, match="lora_a must be"):
        merge(a[0], b, None, "svd")


# ----- PEFT parity -----------------------------------------------------------------------------------------------

class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 12)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@functools.lru_cache(maxsize=None)
def _peft_model(n=3, r=4, alphas=(8, 4, 16), rslora=False):
    """(model, adapters): callers deepcopy the model before changing it (see _peft_merge)."""
    torch.manual_seed(0)
    base = _Tiny()
    cfg = lambda alpha: LoraConfig(r=r, lora_alpha=alpha, target_modules=["up", "down"], init_lora_weights=False,
                                   use_rslora=rslora)
    model = get_peft_model(base, cfg(alphas[0]), adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", cfg(alphas[i]))
    adapters = [(get_peft_model_state_dict(model, adapter_name=f"a{i}"), model.peft_config[f"a{i}"].to_dict())
                for i in range(n)]
    return model, adapters


def _products(sd):
    mods = sorted({k.rsplit(".lora_", 1)[0] for k in sd})
    return {m: sd[f"{m}.lora_B.weight"] @ sd[f"{m}.lora_A.weight"] for m in mods}


def _peft_merge(model, method, weights, **kw):
    model = copy.deepcopy(model)
    model.add_weighted_adapter([f"a{i}" for i in range(len(weights))], weights, "m", combination_type=method, **kw)
    return get_peft_model_state_dict(model, adapter_name="m"), model.peft_config["m"]


class _CountedBernoulli:
    """Stands in for torch.bernoulli: the k-th call's mask comes from a generator seeded with k. PEFT also draws
    random weights for the new adapter before merging, so the global RNG stream cannot be aligned; this checks that
    both sides draw one mask per adapter factor, in the same order, with the same keep probability."""

    _real = staticmethod(torch.bernoulli)

    def __init__(self):
        self.calls = 0

    def __call__(self, p, *args, generator=None, **kw):
        self.calls += 1
        return self._real(p, generator=torch.Generator().manual_seed(self.calls))


PEFT_CASES = [
    ("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 6}),
    ("ties", {"density": 0.5}), ("ties", {"density": 0.6, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.5}), ("dare_linear", {"density": 0.7}), ("dare_ties", {"density": 0.7}),
    ("ties_svd", {"density": 0.5}), ("magnitude_prune_svd", {"density": 0.4}), ("dare_linear_svd", {"density": 0.6}),
    ("dare_ties_svd", {"density": 0.6}),
]


@pytest.mark.parametrize(("method", "kw"), PEFT_CASES, ids=[f"{m}-{'-'.join(map(str, k.values()))}" for m, k in PEFT_CASES])
def test_matches_peft_add_weighted_adapter(method, kw):
    model, adapters = _peft_model()
    weights = [0.6, -0.3, 0.9]
    ours_kw = {"density": kw.get("density"), "majority_sign_method": kw.get("majority_sign_method", "total"),
               "rank": kw.get("svd_rank")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "bernoulli", _CountedBernoulli())
        ref_sd, ref_cfg = _peft_merge(model, method, weights, **kw)
        mp.setattr(torch, "bernoulli", _CountedBernoulli())
        sd, cfg = merge_peft_adapters(adapters, weights, method, **ours_kw)
    assert set(sd) == set(ref_sd)
    assert cfg["r"] == ref_cfg.r and cfg["lora_alpha"] == ref_cfg.lora_alpha  # scale 1 on both sides
    ref, ours = _products(ref_sd), _products(sd)
    for m in ref:  # factors may differ by sign/rotation (svd); the products may not
        assert _rel(ours[m], ref[m]) < 1e-5, (m, _rel(ours[m], ref[m]))
    if method in ("linear", "ties", "magnitude_prune", "dare_linear", "dare_ties", "cat"):
        for k in ref_sd:  # no rotation freedom: the factors themselves agree
            torch.testing.assert_close(sd[k], ref_sd[k], rtol=1e-5, atol=1e-6)


def test_matches_peft_with_rslora_scales():
    model, adapters = _peft_model(rslora=True)
    ref_sd, _ = _peft_merge(model, "cat", [1.0, 0.5, 0.25])
    sd, _ = merge_peft_adapters(adapters, [1.0, 0.5, 0.25], "cat")
    for m, p in _products(ref_sd).items():
        assert _rel(_products(sd)[m], p) < 1e-6


def test_merged_folder_loads_in_peft(tmp_path):
    from lora_ops._io import write_peft_adapter_dir
    from peft import PeftModel

    _, adapters = _peft_model()
    dirs = []
    for i in range(3):
        d = tmp_path / f"ad{i}"
        write_peft_adapter_dir(d, adapters[i][0], {**adapters[i][1], "target_modules": ["up", "down"]})
        dirs.append(d)
    sd, cfg = merge_peft_adapters(dirs, [1 / 3] * 3, "svd", rank=4)
    cfg["target_modules"] = list(cfg["target_modules"])
    cfg = {k: (list(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    write_peft_adapter_dir(tmp_path / "merged", sd, cfg)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(_Tiny(), tmp_path / "merged")
    got = get_peft_model_state_dict(loaded)
    for k in sd:
        torch.testing.assert_close(got[k], sd[k])
    x = torch.randn(5, 16)
    with loaded.disable_adapter():
        y0 = loaded(x)
    assert not torch.allclose(loaded(x), y0)  # the merged adapter is active


def test_peft_errors(tmp_path):
    _, adapters = _peft_model()
    with pytest.raises(ValueError, match="3 adapters"):
        merge_peft_adapters(adapters, [1.0], "svd")
    with pytest.raises(ValueError, match="method must be one of"):
        merge_peft_adapters(adapters, None, "mean")
    with pytest.raises(FileNotFoundError):
        merge_peft_adapters([tmp_path / "missing"], None, "svd")
    bad = ({**adapters[0][0], "x.bias": torch.zeros(3)}, adapters[0][1])
    with pytest.raises(NotImplementedError, match="x.bias"):
        merge_peft_adapters([bad, adapters[1]], None, "svd")
    _, r8 = _peft_model(r=8)
    with pytest.raises(ValueError, match="same rank"):
        merge_peft_adapters([adapters[0], r8[1]], None, "linear")
    sd, cfg = merge_peft_adapters([adapters[0], r8[1]], None, "cat")  # mixed ranks: fine for cat
    assert cfg["r"] == 12


def test_svd_merges_all_layers_in_one_call(monkeypatch):
    _, adapters = _peft_model()  # layers of two shapes (16 -> 24 and 24 -> 12)
    calls = []
    real = M.merge_lowrank
    monkeypatch.setattr(M, "merge_lowrank", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    sd, _ = merge_peft_adapters(adapters, [0.2, 0.3, 0.5], "svd", rank=3)
    assert calls == [(2, 3, 4, 24)]  # both layers, padded to d_in = 24
    assert sd["base_model.model.up.lora_A.weight"].shape == (3, 16)
    assert sd["base_model.model.down.lora_B.weight"].shape == (12, 3)


def test_svd_batches_split_by_shape_when_padding_is_wasteful():
    shapes = {"emb": (1, 4, 4096, 8), "q": (1, 4, 8, 8), "k": (1, 4, 8, 8), "v": (1, 4, 8, 8), "o": (1, 4, 8, 8)}

    def bank(name):
        n, r, d_in, d_out = shapes[name]
        return torch.zeros(n, r, d_in), torch.zeros(n, d_out, r), None, None, None

    assert sorted(map(sorted, M._svd_batches(list(shapes), bank))) == [["emb"], ["k", "o", "q", "v"]]
