"""``diffrate``: sort by class attention, prune the tail, merge the rest of the tail, with
per-block counts searched to a MAC budget (DiffRate, Chen et al., ICCV 2023).

Deploy (``leanvit.patch(model, "diffrate", schedule=...)``). In every block whose schedule
changes the token count, after the attention residual and before the MLP:

1. sort the tokens by head-averaged class attention (prefix tokens stay first);
2. prune: keep the first ``prune_kept[i]`` (prefix included), drop the rest;
3. merge: each token beyond ``merge_kept[i]`` joins its most similar token among the first
   ``merge_kept[i]`` (cosine of the hidden states ``x``, never a prefix token). The merged token
   is the plain mean of the destination and its sources (not size-weighted), and each source
   adds ``size x cosine`` to the destination's size (the authors' code, OpenGVLab/DiffRate
   ``patch/deit.py``; ``cosine`` is clamped at 0 here so that a non-positive similarity cannot
   shrink a size to zero and make ``log(size)`` NaN);
4. proportional attention with the token sizes in all later blocks (always on, as the
   authors).

Search (``"diffrate-search"``, driven by :func:`search`): per compressible block and per
operation, learnable logits over candidate kept counts (``P, P-g, ..., > 0`` patches,
granularity ``g`` = 4 for DeiT at 224: the authors' default), zero-initialised. Expected kept
count = straight-through ``ceil(candidates . softmax(logits))`` + prefix; the mask of token
position ``j`` is the probability that the kept count exceeds ``j``, hardened
straight-through. Tokens are masked (the adapter's masked attention) instead of removed, and
the loss is ``task + 5 (GMACs - target)^2`` (the authors' ``main.py``: AdamW lr 0.01, cosine
to 0.001, weight decay 0), with the backbone frozen.

Token sizes: the authors clamp sizes at 1 during their search but not at deploy; here both
modes use the same rule (size + source size x max(cosine, 0)), so a searched schedule is
evaluated exactly as it is deployed.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanvit.registry import Method, ModelInfo, Reducer, check_bool, check_number, register
from leanvit.schedule import Schedule, as_schedule, effective_counts
from leanvit.signals import Signals
from leanvit.state import TokenState, gather_tokens, remap_where

# --------------------------------------------------------------------------------------------
# Tensor arithmetic (knows nothing of timm)


def sort_order(cls_attn: Tensor, prefix: int, k: int) -> Tensor:
    """Indices of the ``k`` tokens to keep, ``[B, k]`` long: the ``prefix`` tokens first, then
    the others by descending class attention ``cls_attn`` ``[B, N]``."""
    B, N = cls_attn.shape
    top = cls_attn[:, prefix:].topk(k - prefix, dim=1, largest=True, sorted=True).indices
    pre = torch.arange(prefix, device=cls_attn.device).expand(B, prefix)
    return torch.cat([pre, top + prefix], dim=1)


def merge_tail(x: Tensor, size: Tensor, prefix: int, k: int, end: Optional[int] = None,
               source: Optional[Tensor] = None, keep_sources: bool = False,
               where: Optional[Tensor] = None) -> tuple:
    """Merge tokens ``k .. end-1`` of ``x`` ``[B, N, C]`` into their most similar token among
    ``prefix .. k-1`` (cosine of ``x``; prefix tokens never receive).

    Destination ``d`` becomes the plain mean of itself and its sources; its size (``size``
    ``[B, N]``) adds each source's size times its cosine to ``d`` (clamped at 0); ``source``
    ``[B, N, N0]`` is combined with ``max``. Returns the ``k`` merged tokens (and sizes,
    sources) followed by the tokens from ``end`` on, untouched (``end=None``: none follow).
    With ``keep_sources`` the merged sources also stay in place (search mode masks them):
    the result then has all ``N`` tokens. With ``where`` (the ``[B, N0]`` index map of
    :attr:`leanvit.state.TokenState.where`) a fourth item is returned: the map after the merge
    (sources follow their destination).
    """
    B, N, C = x.shape
    end = N if end is None else end
    S = end - k
    dst, src = x[:, :k], x[:, k:end]
    with torch.no_grad():
        # cosine without writing a normalised copy of x: the best destination of a source
        # only depends on the destinations' norms; its cosine then divides by the source's.
        # Prefix tokens are left out of the candidates (never a destination).
        norms = torch.linalg.vector_norm(x[:, :end], dim=-1).clamp_min(1e-12)  # [B, end]
        sim = (src @ dst[:, prefix:].transpose(1, 2)).div_(norms[:, None, prefix:k])
        best, idx = sim.max(dim=-1)  # [B, S]
        best = best / norms[:, k:]
        idx = idx + prefix
        # one-hot assignment [B, S, k]: the sums become one small batched matmul
        # (index_add / scatter_add are an order of magnitude slower on CPU here)
        onehot = (idx[..., None] == torch.arange(k, device=x.device)).to(x.dtype)
        count = onehot.sum(1).add_(1.0)  # [B, k]: the destination itself plus its sources
    merged = torch.baddbmm(dst, onehot.transpose(1, 2), src).div_(count[..., None])
    gain = size[:, k:end] * best.clamp_min(0).to(size.dtype)  # [B, S]
    new_size = size[:, :k] + (onehot.to(size.dtype) * gain[..., None]).sum(1)
    new_source = None
    if source is not None:
        new_source = source[:, :k].scatter_reduce(
            1, idx[..., None].expand(-1, -1, source.shape[-1]), source[:, k:end], reduce="amax",
            include_self=True)
    rest = k if keep_sources else end
    if rest < N:
        merged = torch.cat([merged, x[:, rest:]], dim=1)
        new_size = torch.cat([new_size, size[:, rest:]], dim=1)
        if source is not None:
            new_source = torch.cat([new_source, source[:, rest:]], dim=1)
    if where is None:
        return merged, new_size, new_source
    rows = torch.arange(N, device=x.device).expand(B, N)
    # destinations stay, sources go to theirs, the tokens after ``end`` move up by what left
    new_row = torch.cat([rows[:, :k], idx, rows[:, end:] - (rest - k)], dim=1)
    return merged, new_size, new_source, remap_where(where, new_row)


def ste_ceil(x: Tensor) -> Tensor:
    """``ceil(x)`` forward, identity gradient (the authors' ``STE_Ceil``)."""
    return x + (torch.ceil(x) - x).detach()


def ste_min(n: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``min(n, a, b)`` forward; gradient flows to ``a`` and ``b`` only (the authors'
    ``STE_Min``): each block's MAC term reaches that block's own rates."""
    value = torch.minimum(torch.minimum(n.detach(), a.detach()), b.detach())
    return value + (a - a.detach()) + (b - b.detach())


# --------------------------------------------------------------------------------------------
# Deploy


@dataclass(frozen=True)
class DiffRateOptions:
    """Options of ``diffrate`` (deploy a schedule).

    Attributes:
        schedule: a schedule file's path, a :class:`leanvit.schedule.Schedule`, or a pair of
            per-block lists ``(prune_kept, merge_kept)`` (prefix tokens included). Required.
        trace_source: keep ``state.source`` (which patches each token holds) for
            visualisation; off by default (costs ``O(N N0)`` per token).
    """

    schedule: Any = None
    trace_source: bool = False

    def __post_init__(self) -> None:
        if self.schedule is None:
            raise ValueError("diffrate needs schedule=...: a schedule file, a Schedule, or a pair "
                             "(prune_kept, merge_kept); get one with 'leanvit search MODEL "
                             "--method diffrate --target-gmacs G ...'")
        if not isinstance(self.schedule, (str, os.PathLike, Schedule, tuple, list, dict)):
            raise TypeError("schedule must be a path, a Schedule or a pair of lists "
                            f"(prune_kept, merge_kept), got {self.schedule!r}")
        check_bool("trace_source", self.trace_source)


def resolve_schedule(value: Any, info: ModelInfo) -> Schedule:
    """``value`` as a :class:`Schedule` checked against the model described by ``info``."""
    num_tokens = info.num_patches + info.num_prefix_tokens
    schedule = as_schedule(value, model=info.name, img_size=info.img_size, num_tokens=num_tokens,
                           prefix_tokens=info.num_prefix_tokens)
    schedule.check_model(depth=info.depth, num_tokens=num_tokens,
                         prefix_tokens=info.num_prefix_tokens, img_size=info.img_size,
                         model=info.name)
    return schedule


def _needs_class_token(info: ModelInfo) -> None:
    if not info.has_class_token:
        raise ValueError("diffrate sorts tokens by class-token attention; this model has no "
                         "class token")


class DiffRateReducer(Reducer):
    """Applies a fixed schedule: static token counts per block (``torch.compile``-friendly)."""

    def __init__(self, options: DiffRateOptions, info: ModelInfo):
        super().__init__(options, info)
        _needs_class_token(info)
        self.schedule = resolve_schedule(options.schedule, info)
        self.prefix = info.num_prefix_tokens
        # (tokens in, kept after pruning, kept after merging) per block, from the schedule
        n, plan = self.schedule.num_tokens, []
        for p, m in zip(*effective_counts(self.schedule.prune_kept, self.schedule.merge_kept,
                                          self.schedule.num_tokens)):
            plan.append((n, p, m))
            n = m
        self.plan = plan

    def acts_after(self, i: int) -> bool:
        n, _, m = self.plan[i]
        return m < n

    def init_state(self, state: TokenState, x: Tensor) -> TokenState:
        state = state.replace(prop_attn=True)
        if self.options.trace_source and state.source is None:
            B, N, _ = x.shape
            state = state.replace(source=torch.eye(N, dtype=x.dtype, device=x.device)
                                  .expand(B, N, N))
        return state

    def after_attention(self, i: int, x: Tensor, signals: Optional[Signals], state: TokenState
                        ) -> tuple[Tensor, TokenState]:
        N = x.shape[1]
        _, kp, km = self.plan[i]
        kp, km = min(kp, N), min(km, N)  # a count larger than the tokens present: no change
        if km >= N:
            return x, state
        if state.size is None:
            state = state.replace(size=state.sizes_like(x))
        order = sort_order(signals.cls_attn, self.prefix, kp)
        x = gather_tokens(x, order)
        state = state.gather(order)
        if km < kp:
            if state.recorder is not None:  # cosine similarities of the merge, per image
                state.recorder.add_extra("diffrate_merge", (kp - km) * km * x.shape[2])
            x, size, source, *where = merge_tail(x, state.size, self.prefix, km,
                                                 source=state.source, where=state.where)
            state = state.replace(size=size, source=source, where=where[0] if where else None)
        return x, state


def _build(options: DiffRateOptions, info: ModelInfo) -> Reducer:
    return DiffRateReducer(options, info)


METHOD = register(Method(
    "diffrate", DiffRateOptions, _build, families=("vit",),
    summary="DiffRate: searched per-block prune+merge counts (schedule=FILE)"))


# --------------------------------------------------------------------------------------------
# Search mode


def default_granularity(num_patches: int) -> int:
    """Candidate spacing: 4 tokens for 196 patches (the authors' DeiT default), scaled with
    the patch count so every model gets ~49 candidates (256 patches -> 5)."""
    return max(1, round(num_patches / 49))


@dataclass(frozen=True)
class DiffRateSearchOptions:
    """Options of ``diffrate-search`` (the training-time mode :func:`search` uses).

    Attributes:
        granularity: spacing of candidate kept counts; ``None`` = :func:`default_granularity`.
        first_block: first compressible block (the authors leave block 0 alone: 1).
        mac_model: per-image MAC coefficients ``{"constant", "attn_token", "attn_pair",
            "mlp_token"}`` for the differentiable MAC estimate (:func:`mac_model`); ``None``
            gives the plain ViT formula ``4NC^2 + 2N^2C + 8NC^2`` (no stem/head).
    """

    granularity: Optional[int] = None
    first_block: int = 1
    mac_model: Optional[dict] = None

    def __post_init__(self) -> None:
        if self.granularity is not None:
            check_number("granularity", self.granularity, lo=1, integer=True)
        check_number("first_block", self.first_block, lo=0, integer=True)
        if self.mac_model is not None:
            if not isinstance(self.mac_model, dict) or set(self.mac_model) != set(_MAC_KEYS):
                raise ValueError(f"mac_model must be a dict with keys {', '.join(_MAC_KEYS)}")


_MAC_KEYS = ("constant", "attn_token", "attn_pair", "mlp_token")


class DiffRateSearchReducer(Reducer):
    """Learnable kept-count distributions; masks tokens instead of removing them.

    Parameters: ``prune_logits`` and ``merge_logits`` ``[depth, K]`` over the candidates
    ``candidates`` ``[K]`` (patch counts, prefix excluded); rows of blocks before
    ``first_block`` are unused.
    """

    def __init__(self, options: DiffRateSearchOptions, info: ModelInfo):
        super().__init__(options, info)
        _needs_class_token(info)
        if options.first_block >= info.depth:
            raise ValueError(f"first_block {options.first_block} must be below the depth "
                             f"{info.depth}")
        self.prefix = info.num_prefix_tokens
        self.num_tokens = info.num_patches + self.prefix
        g = options.granularity or default_granularity(info.num_patches)
        cand = torch.arange(info.num_patches, 0, -g, dtype=torch.float32)
        self.register_buffer("candidates", cand, persistent=False)
        positions = torch.arange(self.num_tokens, dtype=torch.float32)
        # exceeds[c, j] = 1 if a kept count of candidate c (+ prefix) keeps position j
        self.register_buffer("exceeds", (positions[None, :] < cand[:, None] + self.prefix)
                             .float(), persistent=False)
        self.prune_logits = nn.Parameter(torch.zeros(info.depth, len(cand)))
        self.merge_logits = nn.Parameter(torch.zeros(info.depth, len(cand)))
        C = info.embed_dim
        self.macs = dict(options.mac_model or {"constant": 0.0, "attn_token": 4.0 * C * C,
                                               "attn_pair": 2.0 * C, "mlp_token": 8.0 * C * C})

    def compressible(self, i: int) -> bool:
        return i >= self.options.first_block

    def acts_after(self, i: int) -> bool:
        return self.compressible(i)

    # -- the differentiable counts
    def expected_count(self, logits: Tensor) -> Tensor:
        """Straight-through ceil of the expected candidate count, plus the prefix (scalar)."""
        return ste_ceil(self.candidates @ logits.softmax(-1)) + self.prefix

    def kept_counts(self) -> tuple[list[Tensor], list[Tensor]]:
        """Per block, the expected (prune, merge) kept counts as scalar tensors with grads."""
        full = self.candidates.new_tensor(float(self.num_tokens))
        prune, merge = [], []
        for i in range(self.info.depth):
            if self.compressible(i):
                prune.append(self.expected_count(self.prune_logits[i]))
                merge.append(self.expected_count(self.merge_logits[i]))
            else:
                prune.append(full)
                merge.append(full)
        return prune, merge

    def expected_gmacs(self) -> Tensor:
        """Differentiable MACs per image in 1e9 (the authors' ``calculate_flop_training``)."""
        c = self.macs
        prune, merge = self.kept_counts()
        n = self.candidates.new_tensor(float(self.num_tokens))
        total = n.new_tensor(float(c["constant"]))
        for i in range(self.info.depth):
            total = total + n * c["attn_token"] + n * n * c["attn_pair"]
            if self.compressible(i):
                n = ste_min(n, prune[i], merge[i])
            total = total + n * c["mlp_token"]
        return total / 1e9

    def _op_mask(self, logits: Tensor, kept: int, present: int) -> Tensor:
        """``[N0]`` mask: 0 at positions ``kept .. present-1`` (1 elsewhere), plus the
        straight-through probability that the kept count exceeds each position."""
        prob = logits.softmax(-1) @ self.exceeds
        hard = torch.ones_like(prob)
        hard[kept:present] = 0
        return hard + prob - prob.detach()

    # -- hooks
    def init_state(self, state: TokenState, x: Tensor) -> TokenState:
        B, N, _ = x.shape
        if N != self.num_tokens:
            raise ValueError(f"search built for {self.num_tokens} tokens, got {N}")
        return state.replace(prop_attn=True, mask=x.new_ones(B, N), size=x.new_ones(B, N))

    def after_attention(self, i: int, x: Tensor, signals: Optional[Signals], state: TokenState
                        ) -> tuple[Tensor, TokenState]:
        mask = state.mask
        alive = mask.detach() > 0.5
        # class attention under the same eps-masked softmax as the block's attention; alive
        # tokens first whatever their attention (a masked token's eps weight could otherwise
        # outrank an alive token with a near-zero weight)
        attn = _masked_cls_attn(signals, mask)
        order = sort_order(attn + 2.0 * alive.to(attn.dtype), self.prefix, x.shape[1])
        x = gather_tokens(x, order)
        state = state.gather(order)
        mask = state.mask
        present = int(alive[0].sum())
        kp_t, km_t = self.expected_count(self.prune_logits[i]), \
            self.expected_count(self.merge_logits[i])
        kp, km = int(kp_t.detach()), int(km_t.detach())
        if kp < present:
            mask = mask * self._op_mask(self.prune_logits[i], kp, present)[None]
        mid = min(present, kp)
        if km < mid:
            # merged sources stay in place, masked out (as the authors' search)
            x, size, source = merge_tail(x, state.size, self.prefix, km, end=mid,
                                         source=state.source, keep_sources=True)
            state = state.replace(size=size, source=source)
            mask = mask * self._op_mask(self.merge_logits[i], km, mid)[None]
        return x, state.replace(mask=mask)

    def to_schedule(self, model: str = "", img_size: Optional[Sequence[int]] = None,
                    obtained: Optional[dict] = None) -> Schedule:
        """The current hard counts as a deployable :class:`Schedule` (effective counts)."""
        prune, merge = self.kept_counts()
        p = [int(v.detach()) for v in prune]
        m = [int(v.detach()) for v in merge]
        p, m = effective_counts(p, m, self.num_tokens)
        return Schedule(model=model, img_size=tuple(img_size or self.info.img_size),
                        num_tokens=self.num_tokens, prefix_tokens=self.prefix, prune_kept=p,
                        merge_kept=m, obtained=dict(obtained or {"how": "search"}))


def _masked_cls_attn(signals: Signals, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """Head-averaged class-token row of the eps-masked softmax
    (:func:`leanvit.ops.attention.masked_softmax`), ``[B, N]``, float32."""
    q0 = signals.q[:, :, :1] * signals.scale
    logits = q0 @ signals.k.transpose(-2, -1)  # [B, H, 1, N]
    if signals.bias is not None:
        logits = logits + signals.bias
    logits = logits.float()
    N = logits.shape[-1]
    m = mask.detach().float()[:, None, None, :].clone()
    m[..., 0] = 1.0  # the class query's own key (the diagonal) is always kept
    a = (logits - logits.amax(-1, keepdim=True)).exp() * m
    a = (a + eps / N) / (a.sum(-1, keepdim=True) + eps)
    return a.mean(dim=1).squeeze(1)


def _build_search(options: DiffRateSearchOptions, info: ModelInfo) -> Reducer:
    return DiffRateSearchReducer(options, info)


SEARCH_METHOD = register(Method(
    "diffrate-search", DiffRateSearchOptions, _build_search, families=("vit",),
    summary="DiffRate's training-time rate search mode (used by 'leanvit search')"))


# --------------------------------------------------------------------------------------------
# The search loop


def mac_model(model: nn.Module) -> dict:
    """Per-image MAC coefficients of a ViT for the differentiable estimate, read off
    :func:`leanvit.count_macs` of the dense model: ``constant`` (patch embedding, head),
    ``attn_token`` (q/k/v and output projections per token), ``attn_pair`` (scores and
    weighted values per query-key pair), ``mlp_token`` (MLP per token)."""
    from leanvit.adapters import find_adapter
    from leanvit.macs import count_macs

    info = find_adapter(model).describe(model)
    h, w = info.img_size
    p = next(model.parameters())
    report = count_macs(model, torch.zeros(1, 3, h, w, device=p.device, dtype=p.dtype))
    n = info.num_patches + info.num_prefix_tokens
    b = report.per_block[0]
    attn_pair = 2.0 * info.embed_dim  # q k^T and attn @ v: 2 N^2 C
    return {"constant": report.stem + report.head, "attn_token": (b.attention - attn_pair * n * n)
            / n, "attn_pair": attn_pair, "mlp_token": b.mlp / n}


@dataclass
class SearchResult:
    """What :func:`search` returns: the schedule (its ``gmacs`` from :func:`count_macs` of the
    deployed model) and the per-step history (loss, task loss, expected GMACs, lr)."""

    schedule: Schedule
    history: list = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


OBJECTIVES = ("auto", "ce", "distill-logits", "distill-features")


def _features(x: Tensor, state: Optional[TokenState], prefix: int) -> Tensor:
    """Class token concatenated with the size- (and mask-) weighted mean of the patch tokens,
    ``[B, 2C]`` from final tokens ``x`` ``[B, N, C]`` (the probe's feature)."""
    w = x.new_ones(x.shape[:2])
    if state is not None:
        if state.size is not None:
            w = w * state.size
        if state.mask is not None:
            w = w * state.mask
    w = w[:, prefix:]
    mean = (x[:, prefix:] * w[..., None]).sum(1) / w.sum(1, keepdim=True)
    return torch.cat([x[:, 0], mean], dim=-1)


def search(
    model: nn.Module,
    target_gmacs: float,
    images: Any,
    *,
    labels: Optional[Tensor] = None,
    objective: str = "auto",
    epochs: int = 3,
    batch_size: int = 32,
    num_images: Optional[int] = None,
    lr: float = 0.01,
    min_lr: float = 0.001,
    mac_weight: float = 5.0,
    granularity: Optional[int] = None,
    first_block: int = 1,
    seed: int = 0,
    progress: bool = True,
    log: Optional[Callable[[dict], None]] = None,
) -> SearchResult:
    """Search DiffRate's per-block kept counts for ``model`` to ``target_gmacs``.

    The backbone is frozen (restored afterwards) and only the rate logits are trained: AdamW
    (weight decay 0) at ``lr`` 0.01 with a per-step cosine to ``min_lr`` 0.001, loss =
    task + ``mac_weight`` (5) x (GMACs - target)^2 (the authors' defaults). What the frozen
    blocks before ``first_block`` compute is cached once.

    Args:
        model: an unpatched timm ViT (with a class token), eval mode.
        target_gmacs: MACs per image, in 1e9.
        images: ``[M, 3, H, W]`` preprocessed images, or an ImageFolder directory.
        labels: ``[M]`` class indices (objective ``"ce"``; read from the folder for a path).
        objective: ``"ce"`` (cross-entropy with labels and the model's head),
            ``"distill-logits"`` (KL to the unpatched model's logits), ``"distill-features"``
            (relative MSE to the unpatched model's class token + mean patch token, for
            headless models such as DINOv2), or ``"auto"``: features when the model has no
            head, logits otherwise. Distillation needs no labels.
        epochs: passes over the images (the paper: ~1000 images suffice).
        batch_size: images per step.
        num_images: use this many images of the folder (a fixed random subset, ``seed``).
        granularity / first_block: see :class:`DiffRateSearchOptions`.
        log: called with each step's record.

    Returns:
        :class:`SearchResult` with the deployable schedule; ``schedule.gmacs`` is measured by
        :func:`leanvit.count_macs` on the model with the schedule deployed.
    """
    from leanvit.adapters import find_adapter
    from leanvit.macs import count_macs
    from leanvit.patching import is_patched, patch, unpatch

    check_number("target_gmacs", target_gmacs, lo=0, lo_open=True)
    check_number("epochs", epochs, lo=1, integer=True)
    check_number("batch_size", batch_size, lo=1, integer=True)
    check_number("mac_weight", mac_weight, lo=0)
    check_number("lr", lr, lo=0, lo_open=True)
    check_number("min_lr", min_lr, lo=0)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if is_patched(model):
        raise ValueError("search needs an unpatched model; call leanvit.unpatch(model) first")
    adapter = find_adapter(model)
    info = adapter.describe(model)
    if isinstance(images, (str, os.PathLike)):
        images, folder_labels = _image_folder(images, model, num_images, seed)
        labels = folder_labels if labels is None else labels
    elif num_images is not None:
        images = images[:num_images]
        labels = None if labels is None else labels[:num_images]
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise TypeError("images must be a [M, 3, H, W] tensor or an ImageFolder directory")
    has_head = getattr(model, "num_classes", 0) > 0
    if objective == "auto":
        objective = "distill-logits" if has_head else "distill-features"
    if objective in ("ce", "distill-logits") and not has_head:
        raise ValueError(f"objective {objective!r} needs a classifier head; this model has none "
                         "(use distill-features)")
    if objective == "ce" and labels is None:
        raise ValueError("objective 'ce' needs labels")

    dense_gmacs = count_macs(model, images[:1]).gmacs
    if target_gmacs >= dense_gmacs:
        raise ValueError(f"target_gmacs {target_gmacs} is not below the dense model's "
                         f"{dense_gmacs:.4f} GMACs")
    grad_flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    history: list[dict] = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        coeffs = mac_model(model)
        # cache the frozen prefix and the teacher's outputs
        patch(model, "none")
        cache, teacher = [], []
        with torch.no_grad():
            for s in range(0, len(images), batch_size):
                xb = images[s:s + batch_size].to(device)
                x, state = adapter.embed(model, xb)
                x, state = adapter.run_blocks(model, x, state, 0, first_block)
                cache.append(x)
                if objective != "ce":
                    y, st = adapter.run_blocks(model, x, state, first_block)
                    teacher.append(adapter.forward_head(model, y, st)
                                   if objective == "distill-logits"
                                   else _features(y, st, info.num_prefix_tokens))
        cache_t = torch.cat(cache)
        target_t = torch.cat(teacher) if teacher else labels.to(device)
        unpatch(model)

        patch(model, "diffrate-search", granularity=granularity, first_block=first_block,
              mac_model=coeffs)
        reducer: DiffRateSearchReducer = model.leanvit
        opt = torch.optim.AdamW(reducer.parameters(), lr=lr, weight_decay=0.0)
        steps_per_epoch = math.ceil(len(cache_t) / batch_size)
        total = epochs * steps_per_epoch
        gen = torch.Generator().manual_seed(seed)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="diffrate search", unit="step")
        step = 0
        for epoch in range(epochs):
            perm = torch.randperm(len(cache_t), generator=gen)
            for s in range(0, len(cache_t), batch_size):
                idx = perm[s:s + batch_size].to(device)
                cur_lr = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / total))
                for group in opt.param_groups:
                    group["lr"] = cur_lr
                x0 = cache_t[idx]
                state = reducer.init_state(TokenState(prefix=info.num_prefix_tokens,
                                                      n0=x0.shape[1]), x0)
                y, state = adapter.run_blocks(model, x0, state, first_block)
                if objective == "distill-features":
                    f, t = _features(y, state, info.num_prefix_tokens), target_t[idx]
                    task = (f - t).square().mean() / t.square().mean()
                else:
                    out = adapter.forward_head(model, y, state)
                    if objective == "ce":
                        task = F.cross_entropy(out, target_t[idx])
                    else:
                        task = F.kl_div(out.log_softmax(-1), target_t[idx].log_softmax(-1),
                                        reduction="batchmean", log_target=True)
                gmacs = reducer.expected_gmacs()
                loss = task + mac_weight * (gmacs - target_gmacs) ** 2
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                rec = {"step": step, "epoch": epoch, "loss": loss.item(), "task": task.item(),
                       "gmacs": gmacs.item(), "lr": cur_lr}
                history.append(rec)
                if log is not None:
                    log(rec)
                if bar is not None:
                    bar.set_postfix(task=f"{rec['task']:.4f}", gmacs=f"{rec['gmacs']:.3f}")
                    bar.update(1)
                step += 1
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            expected = float(reducer.expected_gmacs())
        obtained = {
            "how": "search", "method": "diffrate", "target_gmacs": float(target_gmacs),
            "objective": objective, "images": int(len(cache_t)), "epochs": epochs,
            "steps": step, "batch_size": batch_size, "lr": lr, "min_lr": min_lr,
            "mac_weight": mac_weight, "granularity": int(reducer.candidates[0] -
                                                         reducer.candidates[1])
            if len(reducer.candidates) > 1 else 1,
            "first_block": first_block, "expected_gmacs": expected,
            "seconds": round(seconds, 1), "seed": seed,
            "leanvit": _version(),
        }
        schedule = reducer.to_schedule(info.name, info.img_size, obtained)
        unpatch(model)
        patch(model, "diffrate", schedule=schedule)
        deployed = count_macs(model, images[:1].to(device)).gmacs
        unpatch(model)
        schedule = Schedule(**{**_fields(schedule), "gmacs": round(deployed, 6)})
        return SearchResult(schedule=schedule, history=history, seconds=seconds, steps=step)
    finally:
        if is_patched(model):
            unpatch(model)
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
        model.train(was_training)


def _version() -> str:
    import leanvit

    return leanvit.__version__


def _fields(s: Schedule) -> dict:
    return {"model": s.model, "img_size": s.img_size, "num_tokens": s.num_tokens,
            "prefix_tokens": s.prefix_tokens, "prune_kept": s.prune_kept,
            "merge_kept": s.merge_kept, "gmacs": s.gmacs, "obtained": s.obtained}


def _image_folder(path: Any, model: nn.Module, num_images: Optional[int], seed: int
                  ) -> tuple[Tensor, Tensor]:
    """Images of an ImageFolder directory (``path/<class>/*.png``), preprocessed with the
    model's timm eval transform, as ``[M, 3, H, W]`` and labels ``[M]``; a fixed random subset
    of ``num_images``. (Private stand-in until :mod:`leanvit.data` is on main.)"""
    from pathlib import Path

    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"data directory {root} does not exist")
    cfg = resolve_data_config({}, model=model)
    from leanvit.adapters import find_adapter

    h, w = find_adapter(model).describe(model).img_size
    cfg["input_size"] = (3, h, w)
    try:
        ds = ImageFolder(str(root), transform=create_transform(**cfg))
    except (FileNotFoundError, RuntimeError) as e:
        raise ValueError(f"{root} is not an ImageFolder directory (class sub-folders of "
                         f"images): {e}") from None
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    if num_images is not None:
        order = order[:num_images]
    xs, ys = zip(*(ds[int(i)] for i in order))
    return torch.stack(xs), torch.tensor(ys)
