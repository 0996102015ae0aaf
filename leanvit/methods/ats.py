"""``ats``: Adaptive Token Sampling (Fayyaz et al., ECCV 2022), parameter-free, off-the-shelf.

In each ATS block the attention computes only some query ROWS; all keys and values of the
block still count. Which rows is decided from the block's own attention:

1. score ``s_j = A_cls,j * ||V_j||`` for every non-prefix token ``j``, with ``A_cls`` the
   class-token attention row SUMMED over heads and ``||V_j||`` the L2 norm of the token's
   value vector with all heads concatenated; normalised to sum 1 over the tokens;
2. inverse-transform sampling, deterministic: the scores sorted ascending, their cumulative
   sum min-max normalised to [0, 1] (the CDF), ``K - prefix`` sample points evenly spaced from
   the smallest non-zero CDF value to 1, each picking the token whose CDF value is nearest;
3. duplicate picks removed, so an image keeps ``K' <= K`` tokens, prefix tokens always kept.

Images of a batch keep different counts: the kept tokens are packed to the front (prefix
first, then the kept tokens in their previous order) and the batch is padded to the largest
count; ``state.valid`` marks the padding, which the adapter turns into a ``-inf`` key bias, so
padding never influences a real token, and MAC accounting counts real tokens only.

Differences from the authors' code (``adaptivetokensampling/ATS``), all deliberate:

- Their batched code puts earlier padding (score 0) at the front of the sorted scores, so the
  min-max normalisation of an image depends on how much padding the batch gave it. Here the
  CDF is computed over each image's real tokens only, which is what their code computes for
  an image run alone: results do not depend on the batch an image is in.
- They left-pad the CDF with zeros to ``K - 1`` entries when fewer tokens remain; every sample
  point lies at or above the smallest non-zero CDF value, so a zero entry is never the
  nearest and the padding changes nothing: it is left out here.
- Kept tokens stay in their previous order (theirs: ascending score). Attention is
  permutation-equivariant, so outputs are the same up to that order.
- Their duplicate removal marks the last sorted pick as a duplicate when its index is 1 (a
  ``pad(..., value=1)`` quirk, only reachable with 3 tokens); not reproduced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from leanvit.ops.packed import check_packed
from leanvit.registry import (
    Knob, Method, ModelInfo, Reducer, check_locations, check_number, register,
)
from leanvit.signals import Signals
from leanvit.state import TokenState

#: The authors' floor on the token budget (``n_tokens < 8 -> 8`` in their sampler).
MIN_TOKENS = 8


def default_locations(depth: int) -> tuple[int, ...]:
    """The authors' ATS blocks 3..11 of a 12-block ViT, scaled: ``depth // 4 .. depth - 1``."""
    return tuple(range(depth // 4, depth))


@dataclass(frozen=True)
class ATSOptions:
    """Options of ``ats``.

    Attributes:
        locations: blocks (0-based) whose attention samples its query rows. ``None``: the
            authors' DeiT-S setting, blocks 3..11 of 12 (Fayyaz et al. 2022, Sec. 4 and their
            DeiT-S config), scaled to ``depth // 4 .. depth - 1`` for other depths.
        max_tokens: ``K``, the most tokens (prefix included) a block keeps: ``K - prefix``
            sample points. ``None``: the ORIGINAL token count ``N0`` in every ATS block (the
            authors' DeiT-S setting, ``K = 197``), where only duplicate picks reduce the count.
            At least 8 (the authors' floor on the budget).
        packed: how blocks run once images keep different counts: ``"auto"`` (default) packs
            the real tokens of the batch into one sequence when at least
            :data:`leanvit.adapters.tokens.PACK_MIN_PADDING` of a block's padded rows would be
            padding, ``True`` packs whenever there is padding, ``False`` always pads the batch
            to its largest count (``docs/ats.md``). Same outputs up to float rounding.
    """

    locations: Optional[tuple[int, ...]] = None
    max_tokens: Optional[int] = None
    packed: Union[str, bool] = "auto"

    def __post_init__(self) -> None:
        if self.locations is not None:
            if isinstance(self.locations, int) and not isinstance(self.locations, bool):
                object.__setattr__(self, "locations", (self.locations,))
            elif isinstance(self.locations, list):
                object.__setattr__(self, "locations", tuple(self.locations))
            locs = self.locations
            if not isinstance(locs, tuple) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in locs):
                raise TypeError(f"locations must be None or a tuple of block indices, "
                                f"got {locs!r}")
            if any(v < 0 for v in locs):
                raise ValueError(f"locations must be block indices >= 0, got {locs!r}")
            # the model's depth is checked in build()
        if self.max_tokens is not None:
            check_number("max_tokens", self.max_tokens, lo=MIN_TOKENS, integer=True)
        check_packed(self.packed)


def sample_tokens(scores: Tensor, valid: Optional[Tensor], num_samples: int) -> Tensor:
    """ATS's deterministic inverse-transform sampling; which tokens each image keeps.

    Args:
        scores: ``[B, L]`` non-negative significance scores of the candidate tokens (the
            non-prefix tokens); need not be normalised.
        valid: ``[B, L]`` bool, ``False`` for padding (never kept), or ``None``.
        num_samples: sample points on the CDF (``K - prefix``), at least 2.

    Returns:
        ``[B, L]`` bool, the kept tokens (duplicates removed, so at most ``num_samples``).
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    B, L = scores.shape
    if valid is None:
        valid = torch.ones(B, L, dtype=torch.bool, device=scores.device)
    s = scores.masked_fill(~valid, 0.0)
    s = s / s.sum(dim=1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    # Padding sorts first (key -1), real tokens ascending by score; stable so ties break by
    # position and an image gives the same result in any batch.
    order = s.masked_fill(~valid, -1.0).argsort(dim=1, stable=True)
    s_sorted = s.gather(1, order)
    real = valid.gather(1, order)
    cdf = s_sorted.cumsum(dim=1)
    first_real = (~valid).sum(dim=1, keepdim=True)  # index of the smallest real score
    lo = cdf.gather(1, first_real.clamp_max(L - 1))
    span = cdf[:, -1:] - lo
    ncdf = (cdf - lo) / torch.where(span > 0, span, torch.ones_like(span))
    ncdf = ncdf.masked_fill(~real, float("inf"))  # padding is never the nearest
    start = ncdf.masked_fill(~(ncdf > 0), float("inf")).amin(dim=1, keepdim=True)
    start = torch.where(torch.isinf(start), torch.ones_like(start), start)  # one real token
    steps = torch.arange(num_samples, device=s.device, dtype=s.dtype)
    ys = start + steps * (1.0 - start) / (num_samples - 1)  # [B, M], from start to 1
    pick = (ys[:, :, None] - ncdf[:, None, :]).abs().argmin(dim=2)  # first nearest: [B, M]
    keep_sorted = torch.zeros(B, L, dtype=torch.bool, device=s.device)
    keep_sorted.scatter_(1, pick, True)
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)
    return keep & valid


def pack_kept(keep: Tensor, prefix: int) -> tuple[Tensor, Optional[Tensor]]:
    """Row indices that move kept tokens to the front, and the padding mask.

    Args:
        keep: ``[B, L]`` bool over the non-prefix tokens.
        prefix: prefix tokens in front of them (always kept).

    Returns:
        ``rows`` ``[B, prefix + K_max]`` long (prefix, then each image's kept tokens in their
        order, then filler rows), and ``valid`` ``[B, prefix + K_max]`` bool marking real rows,
        or ``None`` when every image keeps the same count (no padding).
    """
    B, L = keep.shape
    counts = keep.sum(dim=1)
    if B == 0:  # an empty batch keeps its (empty) shape, as the unpatched model does
        return torch.zeros(0, prefix + L, dtype=torch.long, device=keep.device), None
    lo, hi = (int(v) for v in torch.aminmax(counts))  # host sync: the shape depends on data
    # Kept tokens first, each group in position order (stable sort of 0 = kept, 1 = dropped).
    order = (~keep).to(torch.uint8).argsort(dim=1, stable=True)[:, :hi]
    pre = torch.arange(prefix, device=keep.device).expand(B, prefix)
    rows = torch.cat([pre, order + prefix], dim=1)
    if lo == hi:
        return rows, None
    slot = torch.arange(hi, device=keep.device)[None, :] < counts[:, None]
    valid = torch.cat([torch.ones(B, prefix, dtype=torch.bool, device=keep.device), slot], 1)
    return rows, valid


class ATSReducer(Reducer):
    """Selects query rows in the blocks in ``locations``; see the module docstring."""

    def __init__(self, options: ATSOptions, info: ModelInfo, locations: tuple[int, ...]):
        super().__init__(options, info)
        self.locations = frozenset(locations)

    def selects_queries(self, i: int) -> bool:
        return i in self.locations

    def select_queries(self, i: int, signals: Signals, state: TokenState
                       ) -> tuple[Optional[Tensor], TokenState]:
        p = state.prefix
        budget = max(self.options.max_tokens or state.n0, MIN_TOKENS)
        # Authors' score: class attention summed over heads times the all-head value norm.
        scores = signals.cls_attn_heads.sum(dim=1)[:, p:] * signals.value_norm[:, p:]
        valid = None if state.valid is None else state.valid[:, p:]
        keep = sample_tokens(scores.float(), valid, budget - p)
        rows, new_valid = pack_kept(keep, p)
        return rows, state.gather(rows).replace(valid=new_valid)


def build(options: ATSOptions, info: ModelInfo) -> Reducer:
    if not info.has_class_token:
        raise ValueError("ats scores tokens by the class token's attention, and this model has "
                         "no class token (class_token=False); use a method without class "
                         "attention, e.g. tome")
    if options.locations is None:
        locations = default_locations(info.depth)
    else:
        locations = check_locations("locations", options.locations, info.depth)
    n0 = info.num_patches + info.num_prefix_tokens
    if options.max_tokens is not None and options.max_tokens > n0:
        raise ValueError(f"max_tokens={options.max_tokens} exceeds the model's {n0} tokens "
                         f"({info.num_patches} patches + {info.num_prefix_tokens} prefix); "
                         "use None for the original count")
    if max(options.max_tokens or n0, MIN_TOKENS) - info.num_prefix_tokens < 2:
        raise ValueError(f"max_tokens leaves fewer than 2 sample points after the "
                         f"{info.num_prefix_tokens} prefix tokens")
    return ATSReducer(options, info, locations)


METHOD = register(Method(
    "ats", ATSOptions, build, families=("tokens",),
    # the most tokens sampled per block: from 2 to all of them; fewer cost fewer MACs
    knob=Knob("max_tokens", 2, None, True, False),
    summary="adaptive token sampling (Fayyaz et al. 2022): class attention x value norm, "
            "inverse-transform sampling of query rows, per-image counts",
))
