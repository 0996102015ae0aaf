"""``evit``: EViT (Liang et al., "Not All Patches Are What You Need", ICLR 2022).

In a few blocks, after the attention residual and before the MLP, keep the
``ceil(keep_rate * (N - prefix))`` non-prefix tokens that the class token attends to most
(attention averaged over heads) and fuse the others ("inattentive" tokens) into ONE token,
their sum weighted by their raw class attention. Output ``[prefix..., kept..., fused]``; the
fused token is an ordinary token in later blocks (it can be dropped and fused again).

Needs no training: patch a pretrained model and it is faster at once (the authors fine-tune
for best accuracy). ``keep_rate=1`` changes nothing (bit-identical to the unpatched model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from leanvit.ops.prune import num_kept, topk_prune
from leanvit.registry import (KEEP_RATE_KNOB, Method, ModelInfo, Reducer, check_bool,
                              check_locations, check_number, register)
from leanvit.signals import Signals
from leanvit.state import TokenState

#: The authors' blocks for a 12-block ViT (0-based).
AUTHORS_LOCATIONS = (3, 6, 9)


def default_locations(depth: int) -> tuple[int, ...]:
    """The authors' locations ``(3, 6, 9)`` at depth 12; ``(d//4, d//2, 3d//4)`` otherwise.

    methods.md: "For depths other than 12, scale the locations (e.g. depth/4, depth/2,
    3depth/4)". Repeated blocks (depth < 4) are removed; block 0 is never used, since a
    reduction there would act on the embeddings' first attention only.
    """
    if depth == 12:
        return AUTHORS_LOCATIONS
    locs = sorted({max(1, depth // 4), max(1, depth // 2), max(1, (3 * depth) // 4)})
    return tuple(v for v in locs if v < depth)


def check_locations_type(name: str, locations) -> None:
    """Type check for a ``locations`` option (``None`` or a tuple/list of ints)."""
    if locations is None:
        return
    if isinstance(locations, int) and not isinstance(locations, bool):
        return
    if not isinstance(locations, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in locations
    ):
        raise TypeError(f"{name} must be None or a tuple of block indices, got {locations!r}")


def resolve_locations(locations, info: ModelInfo) -> tuple[int, ...]:
    """``locations`` checked against the model (``None``: :func:`default_locations`)."""
    if locations is None:
        return default_locations(info.depth)
    return check_locations("locations", locations, info.depth)


def require_class_token(method: str, info: ModelInfo) -> None:
    """``ValueError`` for a model without a class token (no class-attention row to rank by)."""
    if not info.has_class_token:
        raise ValueError(
            f"method {method!r} ranks tokens by the class token's attention, but this model "
            f"({info.name or 'this ViT'}) has no class token (class_token=False); use a method "
            "that needs none, e.g. 'tome'"
        )


@dataclass(frozen=True)
class EViTOptions:
    """Options of ``evit``.

    Attributes:
        keep_rate: fraction of the non-prefix tokens kept at each location, in (0, 1]; the
            authors' default 0.7 (their paper also reports 0.5). 1 = no reduction.
        locations: 0-based blocks that reduce, after the attention residual. ``None`` = the
            authors' ``(3, 6, 9)`` for a 12-block ViT, scaled to ``(d//4, d//2, 3d//4)`` for
            another depth ``d``.
        fuse: fuse the dropped tokens into one token weighted by their class attention
            (authors' default ``True``); ``False`` just drops them (same as method ``topk``).
    """

    keep_rate: float = 0.7
    locations: Optional[tuple[int, ...]] = None
    fuse: bool = True

    def __post_init__(self) -> None:
        check_number("keep_rate", self.keep_rate, lo=0.0, hi=1.0, lo_open=True)
        check_locations_type("locations", self.locations)
        check_bool("fuse", self.fuse)


class EViT(Reducer):
    """Top-k by head-averaged class attention, with the dropped tokens fused into one."""

    method = "evit"

    def __init__(self, options: EViTOptions, info: ModelInfo):
        super().__init__(options, info)
        self.keep_rate = float(options.keep_rate)
        self.fuse = bool(getattr(options, "fuse", False))
        # keep_rate == 1 keeps every token: no hook at all, so the unpatched code path runs.
        locs = resolve_locations(options.locations, info)
        self.locations = frozenset(locs) if self.keep_rate < 1.0 else frozenset()

    def acts_after(self, i: int) -> bool:
        return i in self.locations

    def after_attention(self, i: int, x: Tensor, signals: Optional[Signals],
                        state: TokenState) -> tuple[Tensor, TokenState]:
        """``x`` ``[B, N, C]`` -> ``[B, prefix + keep (+1), C]``."""
        if state.valid is not None or state.mask is not None:
            raise ValueError(f"{self.method} needs fixed token counts (no padding or training "
                             "keep-mask from another method)")
        keep = num_kept(self.keep_rate, x.shape[1], state.prefix)
        if keep == x.shape[1] - state.prefix:
            return x, state
        scores = signals.cls_attn  # [B, N], one query row, the main attention stays fused
        res = topk_prune(x, scores, state.prefix, keep, fuse=self.fuse)
        new = state.gather(res.index)
        if self.fuse:
            new = _append_fused(new, state, res.dropped)
            if state.recorder is not None:
                state.recorder.add_extra("fusion", x.shape[1] * x.shape[2])
        return res.x, new


def _append_fused(new: TokenState, old: TokenState, dropped: Tensor) -> TokenState:
    """Per-token state of the fused token appended last: it holds the dropped tokens.

    ``size`` (when tracked): the dropped tokens' sizes summed; ``source`` (when traced): the
    union (max) of their sources; ``positions``: index 0, the class token's position (a token
    fused from all over the image has no one position; see :class:`TokenState`).
    """
    size, source = new.size, new.source
    positions = torch.cat([new.positions, torch.zeros_like(new.positions[:, :1])], dim=1)
    if old.size is not None:
        fused = (old.size * dropped.to(old.size.dtype)).sum(1, keepdim=True)
        size = torch.cat([new.size, fused], dim=1)
    if old.source is not None:
        held = old.source * dropped.to(old.source.dtype).unsqueeze(-1)
        source = torch.cat([new.source, held.amax(1, keepdim=True)], dim=1)
    return new.replace(size=size, source=source, positions=positions)


def build(options: EViTOptions, info: ModelInfo) -> Reducer:
    require_class_token("evit", info)
    return EViT(options, info)


METHOD = register(Method(
    "evit", EViTOptions, build, families=("tokens",), knob=KEEP_RATE_KNOB,
    summary="EViT: keep the top class-attention tokens, fuse the rest into one (Liang 2022)"))
