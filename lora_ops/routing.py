"""Routing over a library of LoRAs ("Towards Modular LLMs by Building and Reusing a Library of LoRAs",
arXiv 2405.11157): Arrow (per-token top-k by prototype), Mu (uniform average) and MBC clustering.

- ``arrow_prototypes`` / ``ArrowRouter`` / ``arrow_forward``: training-free routing. A router is any callable
  ``router(x) -> (ids [..., k], weights [..., k])``; ``lora_ops.nn.MultiLoRALinear(..., router=ArrowRouter(...))``
  uses it, and ``arrow_forward`` is the same computation on a bare bank (route + ``grouped_lora`` top-k).
- ``mu_factors`` / ``MuRouter``: the uniform library average, as one merged adapter of averaged factors (the
  paper's Mu) or as an output average over every adapter (ids = all N, weights 1/N).
- ``mbc_cluster``: model-based clustering of private adapters by the similarity of their parameters.
- ``arrow_from_peft`` / ``set_peft_prototypes``: interop with PEFT's Arrow (``ArrowConfig``,
  ``create_arrow_model``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from lora_ops import ops

__all__ = [
    "arrow_prototypes", "ArrowRouter", "arrow_forward", "mu_factors", "MuRouter", "MBCResult", "mbc_cluster",
    "ArrowLayer", "arrow_from_peft", "set_peft_prototypes",
]


# ---- Arrow ----


def general_knowledge_subtraction(lora_a: torch.Tensor, lora_b: torch.Tensor,
                                  general: Optional[tuple] = None) -> tuple:
    """GenKnowSub: subtract the mean A and the mean B of the general adapters from every adapter's A and B.

    ``general = (general_a [..., G, r, d_in], general_b [..., G, d_out, r])``; without it the library's own mean
    is subtracted (each adapter minus the library average). Means are over the adapter dim (-3), separately for
    A and B (factor averaging, as PEFT's ``use_gks`` does). Returns new ``(lora_a, lora_b)``; inputs unchanged.
    """
    ga, gb = general if general is not None else (lora_a, lora_b)
    if ga.shape[-2:] != lora_a.shape[-2:] or gb.shape[-2:] != lora_b.shape[-2:]:
        raise ValueError(f"general_knowledge_subtraction: general adapters must have the factor shapes of the "
                         f"library {list(lora_a.shape[-2:])} / {list(lora_b.shape[-2:])}, got "
                         f"{list(ga.shape[-2:])} / {list(gb.shape[-2:])}")
    return lora_a - ga.mean(dim=-3, keepdim=True), lora_b - gb.mean(dim=-3, keepdim=True)


def arrow_prototypes(lora_a: torch.Tensor, lora_b: torch.Tensor, *, use_gks: bool = False,
                     general: Optional[tuple] = None) -> torch.Tensor:
    """Arrow prototypes ``[..., N, d_in]`` of a bank ``lora_a [..., N, r, d_in]``, ``lora_b [..., N, d_out, r]``
    (exact; see ``lora_ops.arrow_prototypes``). ``use_gks`` first applies general knowledge subtraction with the
    ``general`` adapters' mean (or the library mean when ``general`` is None)."""
    if general is not None and not use_gks:
        raise ValueError("arrow_prototypes: general adapters were given but use_gks is False")
    if use_gks:
        lora_a, lora_b = general_knowledge_subtraction(lora_a, lora_b, general)
    return ops.arrow_prototypes(lora_a, lora_b)


class ArrowRouter(nn.Module):
    """Per-token Arrow router of one layer: ``forward(x [..., d_in]) -> (ids [..., top_k] int64, weights
    [..., top_k] float32)``, the top_k experts by ``|<x, prototype>|`` with a softmax over the chosen.

    ``prototypes [N, d_in]`` is a (non-persistent) buffer, so ``.to(device)`` moves it with the module.
    """

    def __init__(self, prototypes: torch.Tensor, top_k: int, temperature: float = 1.0):
        super().__init__()
        if prototypes.dim() != 2:
            raise ValueError(f"ArrowRouter: prototypes must have shape [N, d_in], got {list(prototypes.shape)}")
        n = prototypes.shape[0]
        if not isinstance(top_k, int) or not 1 <= top_k <= n:
            raise ValueError(f"ArrowRouter: top_k must be an int in [1, N] = [1, {n}], got {top_k!r}")
        if not temperature > 0 or temperature == float("inf"):
            raise ValueError(f"ArrowRouter: temperature must be a finite number > 0, got {temperature!r}")
        self.register_buffer("prototypes", prototypes.detach(), persistent=False)
        self.top_k = top_k
        self.temperature = float(temperature)

    @classmethod
    def from_adapters(cls, lora_a: torch.Tensor, lora_b: torch.Tensor, top_k: int, temperature: float = 1.0, *,
                      use_gks: bool = False, general: Optional[tuple] = None) -> "ArrowRouter":
        """Router over the bank ``lora_a [N, r, d_in]``, ``lora_b [N, d_out, r]`` (prototypes computed here)."""
        return cls(arrow_prototypes(lora_a, lora_b, use_gks=use_gks, general=general), top_k, temperature)

    @property
    def num_experts(self) -> int:
        return self.prototypes.shape[0]

    def forward(self, x: torch.Tensor) -> tuple:
        return ops.arrow_route(x, self.prototypes, self.top_k, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, temperature={self.temperature}"


def arrow_forward(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scales: Optional[torch.Tensor],
                  prototypes: torch.Tensor, top_k: int, temperature: float = 1.0) -> torch.Tensor:
    """Arrow's LoRA delta ``[..., d_out]`` for ``x [..., d_in]``: route, then ``grouped_lora`` over the top_k
    chosen experts only (work grows with k, not with the library size N).

    ``sum_j w[t, j] * scales[i_j] * lora_b[i_j] @ lora_a[i_j] @ x[t]`` with ``(i, w) = arrow_route(x, ...)``;
    equal to PEFT's all-experts einsum masked to the top-k.
    """
    ids, weights = ops.arrow_route(x, prototypes, top_k, temperature=temperature)
    return ops.grouped_lora(x, lora_a, lora_b, ids, scales=scales, weights=weights, check_ids=False)


# ---- Mu: the uniform average of the library ----


def mu_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, scales: Optional[torch.Tensor] = None) -> tuple:
    """Mu as one merged adapter: the mean A and the mean B over the N adapters (factor averaging, the paper's Mu;
    not the mean of the products B_i A_i).

    Shapes: ``lora_a [..., N, r, d_in]``, ``lora_b [..., N, d_out, r]``, ``scales [N]`` or None. Returns
    ``(a [..., r, d_in], b [..., d_out, r], scale)``: with equal (or no) scales ``scale`` is that common value;
    with different scales each B_i is multiplied by its scale before averaging and ``scale`` is 1.0.
    """
    if scales is None:
        return lora_a.mean(dim=-3), lora_b.mean(dim=-3), 1.0
    if scales.shape != (lora_a.shape[-3],):
        raise ValueError(f"mu_factors: scales must have shape [N] = [{lora_a.shape[-3]}], got {list(scales.shape)}")
    if bool((scales == scales[0]).all()):
        return lora_a.mean(dim=-3), lora_b.mean(dim=-3), float(scales[0])
    scaled_b = lora_b * scales.to(lora_b.dtype)[:, None, None]
    return lora_a.mean(dim=-3), scaled_b.mean(dim=-3), 1.0


class MuRouter(nn.Module):
    """Mu as a router: every row uses all N adapters with weight 1/N, i.e. the average of the adapters' outputs
    (``forward(x [..., d]) -> (ids [..., N] int64, weights [..., N] float32)``; work grows with N).

    That is the output average (mean of the products B_i A_i). The paper's Mu averages the factors instead:
    ``MuRouter.merge(lora_a, lora_b, scales)`` (= ``mu_factors``) returns that single merged adapter, which costs
    one adapter per token. ``mode`` records which one a caller such as ``MultiLoRALinear`` should apply:
    ``"factors"`` (default, the paper's) or ``"outputs"``.
    """

    def __init__(self, num_adapters: int, mode: str = "factors"):
        super().__init__()
        if not isinstance(num_adapters, int) or num_adapters < 1:
            raise ValueError(f"MuRouter: num_adapters must be an int >= 1, got {num_adapters!r}")
        if mode not in ("factors", "outputs"):
            raise ValueError(f"MuRouter: mode must be 'factors' or 'outputs', got {mode!r}")
        self.num_adapters = num_adapters
        self.mode = mode

    @staticmethod
    def merge(lora_a: torch.Tensor, lora_b: torch.Tensor, scales: Optional[torch.Tensor] = None) -> tuple:
        """The paper's Mu: ``mu_factors(lora_a, lora_b, scales)``."""
        return mu_factors(lora_a, lora_b, scales)

    def forward(self, x: torch.Tensor) -> tuple:
        lead = x.shape[:-1]
        n = self.num_adapters
        ids = torch.arange(n, device=x.device).expand(*lead, n)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return ids, torch.full((*lead, n), 1.0 / n, dtype=acc, device=x.device)

    def extra_repr(self) -> str:
        return f"num_adapters={self.num_adapters}, mode={self.mode!r}"


# ---- MBC: model-based clustering ----


@dataclass
class MBCResult:
    """``labels [n]`` int64 cluster of each adapter (0..k-1); ``similarity [n, n]`` float64 cosine similarity of
    the sparsified, flattened adapters; ``embedding [n, c]`` the reduced vectors k-means ran on (L2-normalised)."""

    labels: torch.Tensor
    similarity: torch.Tensor
    embedding: torch.Tensor


AdapterLike = Union[torch.Tensor, Mapping[str, torch.Tensor], Sequence[torch.Tensor]]


def _flatten_adapter(adapter: AdapterLike) -> torch.Tensor:
    """One adapter's parameters as a float32 vector: a tensor, a state dict (keys sorted, so every adapter of a
    library lays its layers out the same way) or a sequence of tensors (e.g. every layer's A and B)."""
    if isinstance(adapter, torch.Tensor):
        parts = [adapter]
    elif isinstance(adapter, Mapping):
        parts = [adapter[key] for key in sorted(adapter)]
    else:
        parts = list(adapter)
    if not parts or not all(isinstance(p, torch.Tensor) for p in parts):
        raise TypeError("mbc_cluster: each adapter must be a tensor, a mapping of name -> tensor or a sequence of "
                        "tensors")
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in parts])


def _keep_largest(v: torch.Tensor, fraction: float) -> torch.Tensor:
    """v with all but its ceil(fraction * len) largest-magnitude entries zeroed (per adapter)."""
    keep = max(1, int(round(fraction * v.numel())))
    if keep >= v.numel():
        return v
    idx = v.abs().topk(keep, sorted=False).indices
    return torch.zeros_like(v).index_copy_(0, idx, v.index_select(0, idx))


def mbc_cluster(adapters: Sequence[AdapterLike], k: int, seed: int = 0, *, keep_fraction: float = 0.2,
                n_components: Optional[int] = None, n_init: int = 10) -> MBCResult:
    """Model-based clustering (MBC) of adapters by the similarity of their parameters.

    Each adapter's parameters (all layers' A and B) are flattened; all but the ``keep_fraction`` largest
    magnitudes are zeroed (small entries are mostly noise of the private training runs); the vectors are reduced
    to ``n_components`` dimensions (exact PCA-style projection onto the top right singular vectors, computed from
    the n x n Gram matrix, so it never forms anything D x D; default: all n components, which keeps every cosine
    similarity exact) and L2-normalised; scikit-learn's KMeans on the unit vectors (spherical k-means proxy, Euclidean
    distance between unit vectors is monotone in cosine similarity) with ``random_state=seed`` groups them. The
    paper then trains one LoRA per cluster on the union of its tasks' data.

    Args:
        adapters: n adapters, each a tensor, a state dict (e.g. PEFT's) or a sequence of tensors; all of the same
            total size.
        k: number of clusters, ``1 <= k <= n``.
        seed: k-means seed; the same seed gives the same labels.
        keep_fraction: share of each adapter's entries kept by magnitude (1.0 disables sparsification; the
            default 0.2 is this library's choice, not a value from the paper: tune it on your library).
        n_components: dimensions kept by the reduction (default n).
        n_init: k-means restarts (scikit-learn's ``n_init``).

    Returns:
        ``MBCResult(labels [n], similarity [n, n], embedding [n, c])``.
    """
    try:
        from sklearn.cluster import KMeans
    except ImportError as e:
        raise ImportError("mbc_cluster needs scikit-learn: pip install 'lora_ops[routing]'") from e
    vectors = [_flatten_adapter(a) for a in adapters]
    n = len(vectors)
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"mbc_cluster: k must be an int in [1, n] = [1, {n}] (n = number of adapters), got {k!r}")
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"mbc_cluster: keep_fraction must be in (0, 1], got {keep_fraction!r}")
    sizes = {v.numel() for v in vectors}
    if len(sizes) != 1:
        raise ValueError(f"mbc_cluster: adapters must all have the same number of parameters, got sizes {sorted(sizes)}")
    x = torch.stack([_keep_largest(v, keep_fraction) for v in vectors])  # [n, D]
    # The Gram matrix carries everything the method needs: cosine similarities, and the projection onto the top
    # singular directions (X = U S V^T -> X V = U S), at O(n^2 D) and O(n^2) memory.
    gram = (x.double() @ x.double().T)
    norms = gram.diagonal().clamp_min(1e-300).sqrt()
    similarity = gram / norms[:, None] / norms[None, :]
    c = n if n_components is None else n_components
    if not isinstance(c, int) or not 1 <= c <= n:
        raise ValueError(f"mbc_cluster: n_components must be an int in [1, n] = [1, {n}], got {n_components!r}")
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(0)[:c].clamp_min(0), evecs.flip(1)[:, :c]
    embedding = evecs * evals.sqrt()
    embedding = embedding / embedding.norm(dim=1, keepdim=True).clamp_min(1e-300)
    km = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit(embedding.numpy())
    labels = torch.as_tensor(km.labels_, dtype=torch.int64)
    return MBCResult(labels=labels, similarity=similarity, embedding=embedding)


# ---- PEFT interop ----


@dataclass
class ArrowLayer:
    """The Arrow library of one PEFT LoRA layer as a lora_ops bank, with an exact router.

    ``lora_a [N, r, d_in]``, ``lora_b [N, d_out, r]``, ``scales [N]`` (after GenKnowSub when the PEFT model uses
    it), ``router`` an ``ArrowRouter`` with PEFT's top_k and temperature; ``names`` the task adapters in order.
    """

    names: list
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scales: torch.Tensor
    router: ArrowRouter

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's Arrow LoRA delta ``[..., d_out]`` (route + grouped_lora top-k)."""
        return arrow_forward(x, self.lora_a, self.lora_b, self.scales, self.router.prototypes, self.router.top_k,
                             self.router.temperature)


def _arrow_modules(peft_model: nn.Module, router_name: str):
    found = [(name, m) for name, m in peft_model.named_modules()
             if hasattr(m, "lora_arrow") and router_name in m.lora_arrow]
    if not found:
        raise ValueError(f"arrow_from_peft: no LoRA layer of the model has an Arrow router named {router_name!r} "
                         "(set it up with peft.create_arrow_model or a LoraConfig with arrow_config)")
    return found


@torch.no_grad()
def arrow_from_peft(peft_model: nn.Module, *, router_name: str = "arrow_router") -> dict:
    """Read a PEFT model set up for Arrow into ``{module name: ArrowLayer}`` with exact prototypes.

    Reads, never modifies, the PEFT model. When its ArrowConfig has ``use_gks`` and PEFT has not yet applied
    GenKnowSub (it does so in place on the first forward), the same subtraction (mean of the ``gks_*`` general
    adapters' A and of their B) is applied to the copies here; once PEFT has applied it, its weights are used
    as they are.
    """
    layers = {}
    for name, module in _arrow_modules(peft_model, router_name):
        arrow = module.lora_arrow[router_name]
        names = list(arrow.task_adapter_names)
        lora_a = torch.stack([module.lora_A[n].weight for n in names]).detach().clone()
        lora_b = torch.stack([module.lora_B[n].weight for n in names]).detach().clone()
        if arrow.use_gks and not arrow.gks_done:
            general = (torch.stack([module.lora_A[n].weight for n in arrow.gks_adapter_names]),
                       torch.stack([module.lora_B[n].weight for n in arrow.gks_adapter_names]))
            lora_a, lora_b = general_knowledge_subtraction(lora_a, lora_b, general)
        scales = torch.tensor([float(module.scaling[n]) for n in names], device=lora_a.device)
        router = ArrowRouter(ops.arrow_prototypes(lora_a, lora_b), arrow.top_k, arrow.temperature)
        layers[name] = ArrowLayer(names, lora_a, lora_b, scales, router)
    return layers


@torch.no_grad()
def set_peft_prototypes(peft_model: nn.Module, layers: Mapping[str, ArrowLayer], *,
                        router_name: str = "arrow_router") -> None:
    """Replace PEFT's power-iteration prototypes with the exact ones of ``layers`` (from ``arrow_from_peft``), so
    PEFT's own Arrow forward routes exactly. GenKnowSub is applied by PEFT first when it is still pending."""
    for name, module in _arrow_modules(peft_model, router_name):
        if name not in layers:
            raise ValueError(f"set_peft_prototypes: no layer named {name!r} in layers")
        arrow = module.lora_arrow[router_name]
        arrow.gen_know_sub(module.lora_A, module.lora_B)  # PEFT would do it before building its prototypes
        weight = module.lora_A[arrow.task_adapter_names[0]].weight
        arrow.register_buffer("prototypes", layers[name].router.prototypes.to(weight), persistent=False)
        arrow._protos_ready = True  # PEFT rebuilds only when this flag is cleared (adapters added or removed)
