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
- ``MoARouter`` / ``moa_state`` / ``moa_router_loss`` / ``moa_select``: the sequence-level per-layer router of
  "Mixture-of-LoRAs" (arXiv 2403.03432): mean-pooled hidden state of a sequence -> ``Linear(d, N)``, trained with
  cross-entropy against domain labels, top-1 expert per sequence at inference (per layer, by the last router, or
  by a vote over all routers).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from lora_ops import ops

__all__ = [
    "MoARouter", "moa_routers", "moa_state", "moa_router_loss", "moa_select", "MOA_SELECT_MODES",
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


# ---- MoA: sequence-level routers, one per adapted layer ----


class MoARouter(nn.Module):
    """The Mixture-of-LoRAs router of one layer: ``Linear(d_in, N)`` on the mean-pooled hidden state of a sequence.

    ``forward(x [B, S, d_in]) -> (ids, weights)`` is a ``MultiLoRALinear`` router (``MultiLoRALinear(base, bank,
    router=MoARouter(d_in, N))``); every call records its logits ``[B, N]`` in ``last_logits`` so a loss or a vote
    can read them after the model's forward. What it returns:

    - ``forced_ids [B]`` set (gold domains in training, or a decision from ``moa_select``): those ids for every
      token of the sequence (``-1`` = base model only), weight 1;
    - ``mode="top1"`` (default): the arg-max expert of the sequence (lowest index on ties), weight 1;
    - ``mode="soft"``: every expert, weights ``softmax(logits)`` (a dense per-sequence mixture; work grows with N).
      Gradients reach the router through the weights, so this mode trains without domain labels.

    ``pool_mask [B, S]`` (bool) chooses the tokens that are averaged, e.g. only the prompt so that the router of a
    teacher-forced pass never sees the answer; without it every token counts. A sequence with no masked token pools
    to zeros (its logits are the bias). Set both with :func:`moa_state`. A 2-D ``x [B, d_in]`` is one token per row.
    """

    def __init__(self, d_in: int, num_experts: int, *, mode: str = "top1", bias: bool = True):
        super().__init__()
        if not isinstance(d_in, int) or d_in < 1:
            raise ValueError(f"MoARouter: d_in must be an int >= 1, got {d_in!r}")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"MoARouter: num_experts must be an int >= 1, got {num_experts!r}")
        if mode not in ("top1", "soft"):
            raise ValueError(f"MoARouter: mode must be 'top1' or 'soft', got {mode!r}")
        self.proj = nn.Linear(d_in, num_experts, bias=bias)
        self.mode = mode
        self.pool_mask: Optional[torch.Tensor] = None
        self.forced_ids: Optional[torch.Tensor] = None
        self.last_logits: Optional[torch.Tensor] = None

    @property
    def num_experts(self) -> int:
        return self.proj.out_features

    def pool(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean of ``x [B, S, d]`` over the positions where ``mask [B, S]`` is true (all when None) -> ``[B, d]``."""
        if x.dim() == 2:
            return x
        if x.dim() != 3:
            raise ValueError(f"MoARouter: x must be [B, S, d_in] or [B, d_in], got {list(x.shape)}")
        if mask is None:
            return x.mean(dim=1)
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"MoARouter: pool_mask must have shape [B, S] = {list(x.shape[:2])}, got "
                             f"{list(mask.shape)}")
        m = mask.to(device=x.device, dtype=x.dtype).unsqueeze(-1)
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)

    def logits(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Router logits ``[B, N]`` of ``x [B, S, d_in]`` (mean over ``mask``)."""
        if x.shape[-1] != self.proj.in_features:
            raise ValueError(f"MoARouter: x has width {x.shape[-1]}, the router expects {self.proj.in_features}")
        pooled = self.pool(x, mask)
        return self.proj(pooled.to(self.proj.weight.dtype))

    def forward(self, x: torch.Tensor) -> tuple:
        logits = self.logits(x, self.pool_mask)
        self.last_logits = logits
        lead = tuple(x.shape[:-1])
        b = lead[0]
        view = (b,) + (1,) * (len(lead) - 1)
        if self.forced_ids is not None:
            ids = torch.as_tensor(self.forced_ids, device=x.device).to(torch.int64)
            if tuple(ids.shape) != (b,):
                raise ValueError(f"MoARouter: forced_ids must have shape [B] = [{b}], got {list(ids.shape)}")
            if bool(((ids < -1) | (ids >= self.num_experts)).any()):
                raise IndexError(f"MoARouter: forced_ids must be in [-1, {self.num_experts}), got "
                                 f"{ids.min().item()}..{ids.max().item()}")
            return ids.reshape(view).expand(lead).contiguous(), None
        if self.mode == "top1":
            return logits.argmax(dim=-1).reshape(view).expand(lead).contiguous(), None
        n = self.num_experts
        probs = torch.softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)
        ids = torch.arange(n, device=x.device).expand(*lead, n).contiguous()
        weights = probs.reshape(view + (n,)).expand(*lead, n).contiguous()
        return ids, weights

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, mode={self.mode!r}"


def moa_routers(model: nn.Module) -> list:
    """The model's ``MoARouter`` modules in registration order (for a transformers model: forward order)."""
    return [m for m in model.modules() if isinstance(m, MoARouter)]


@contextlib.contextmanager
def moa_state(model: nn.Module, *, pool_mask: Optional[torch.Tensor] = None,
              forced_ids: Optional[torch.Tensor] = None, mode: Optional[str] = None):
    """``with moa_state(model, pool_mask=..., forced_ids=..., mode=...): model(...)`` sets the per-batch state of
    every ``MoARouter`` in ``model`` (``mode`` overrides each router's mode) and restores it afterwards."""
    routers = moa_routers(model)
    if not routers:
        raise ValueError("moa_state: the model has no MoARouter (MultiLoRALinear(..., router=MoARouter(d, N)))")
    if mode is not None and mode not in ("top1", "soft"):
        raise ValueError(f"moa_state: mode must be 'top1' or 'soft', got {mode!r}")
    saved = [(r.pool_mask, r.forced_ids, r.mode) for r in routers]
    for r in routers:
        r.pool_mask, r.forced_ids, r.last_logits = pool_mask, forced_ids, None
        r.mode = mode or r.mode
    try:
        yield routers
    finally:
        for r, (m, f, md) in zip(routers, saved):
            r.pool_mask, r.forced_ids, r.mode = m, f, md


def moa_router_loss(routers: Sequence[MoARouter], labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of every router's last logits against the domain ``labels [B]``, averaged over routers.

    ``reduction`` applies over the batch (``"mean"`` or ``"sum"``; a sum lets data-parallel training divide by the
    global batch size). Call after the forward whose logits it should score.
    """
    if not routers:
        raise ValueError("moa_router_loss: no routers")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"moa_router_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    losses = []
    for i, r in enumerate(routers):
        if r.last_logits is None:
            raise ValueError(f"moa_router_loss: router {i} has no logits (run the model's forward first)")
        if r.last_logits.shape[0] != labels.shape[0]:
            raise ValueError(f"moa_router_loss: labels has {labels.shape[0]} rows, router {i} saw "
                             f"{r.last_logits.shape[0]}")
        losses.append(torch.nn.functional.cross_entropy(r.last_logits.float(), labels.to(r.last_logits.device),
                                                        reduction=reduction))
    return torch.stack(losses).mean()


MOA_SELECT_MODES = ("last", "vote")


def moa_select(logits: Union[torch.Tensor, Sequence[torch.Tensor]], mode: str) -> torch.Tensor:
    """One expert per sequence from the logits of all routers, ``[L, B, N]`` (or a list of L ``[B, N]``).

    ``"last"``: the arg-max of the last router. ``"vote"``: the expert that most routers rank first; ties between
    experts with equally many votes go to the one with the larger summed probability over routers, then to the
    lower index. Returns int64 ``[B]``.
    """
    stack = logits if isinstance(logits, torch.Tensor) else torch.stack(list(logits))
    if stack.dim() != 3 or stack.shape[0] == 0:
        raise ValueError(f"moa_select: logits must be [L, B, N] with L >= 1, got {list(stack.shape)}")
    if mode == "last":
        return stack[-1].argmax(dim=-1)
    if mode != "vote":
        raise ValueError(f"moa_select: mode must be one of {MOA_SELECT_MODES}, got {mode!r}")
    n = stack.shape[-1]
    votes = torch.nn.functional.one_hot(stack.argmax(dim=-1), n).sum(dim=0).double()  # [B, N]
    prob = torch.softmax(stack.double(), dim=-1).sum(dim=0)  # [B, N], < L <= 1 vote apart
    # votes dominate: probability sums are < L, a vote is worth L + 1
    return (votes * (stack.shape[0] + 1) + prob).argmax(dim=-1)


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
