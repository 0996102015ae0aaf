"""``divprune``: DivPrune (Alvar, Singh, Akbari and Zhang, "DivPrune: Diversity-based Visual
Token Pruning for Large Multimodal Models", CVPR 2025, arXiv 2503.02175).

The kept tokens are a max-min diverse subset: with ``d = 1 - cos`` between token features, the
first kept token is the one whose nearest other token is farthest, and each next one the token
farthest (by its distance to the nearest kept token) from those already kept: greedy
farthest-point selection (:func:`diverse_subset`). No attention score is read, so it does not
trust the class token.

Inside a ViT (the paper prunes the visual tokens once, before the language model): in a few
blocks (EViT's stages by default), after the attention residual and before the MLP, keep
``round(keep_rate * (N - prefix))`` of the non-prefix tokens, chosen on the tokens' own
features ``x`` (what the next layer reads, as the paper's visual tokens), in their order;
prefix tokens are always kept. ``keep_rate=1`` changes nothing (bit-identical). Why these
choices and the deviations: ``docs/token_reduction.md`` (section DivPrune).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from leanvit.methods.evit import check_locations_type, resolve_locations
from leanvit.ops.tokens import gather_tokens
from leanvit.registry import KEEP_RATE_KNOB, Method, ModelInfo, Reducer, check_number, register
from leanvit.signals import Signals
from leanvit.state import TokenState


def num_diverse(keep_rate: float, n: int) -> int:
    """Tokens kept of ``n``: ``int(round(keep_rate * n))`` as the authors (Python's round, half
    to even), at least 1 when ``n > 0``."""
    return min(n, max(1, int(round(keep_rate * n)))) if n > 0 else 0


def cosine_distances(features: Tensor) -> Tensor:
    """``1 - cos`` between all pairs: ``[B, n, C]`` -> ``[B, n, n]`` (at least float32)."""
    f = features.to(torch.promote_types(features.dtype, torch.float32))
    f = f / torch.linalg.vector_norm(f, dim=-1, keepdim=True)
    return 1.0 - f @ f.transpose(1, 2)


def diverse_subset(dist: Tensor, k: int) -> Tensor:
    """Greedy max-min selection of ``k`` of ``n`` tokens from pairwise distances ``dist``
    ``[B, n, n]`` (symmetric): ``[B, k]`` long, in the order chosen.

    First: the token whose second-smallest distance (its nearest other token; the smallest is
    its distance to itself) is largest; then repeatedly the token whose distance to the nearest
    chosen token is largest. Ties: the first index (``argmax``). A chosen token is never chosen
    again (the authors rely on its distance 0 to itself).
    """
    B, n, _ = dist.shape
    rows = torch.arange(B, device=dist.device)
    first = dist.topk(2, dim=1, largest=False).values[:, 1].argmax(dim=1)  # [B]
    picks = [first]
    # distance of each token to the nearest chosen token; -inf once chosen itself
    nearest = dist[rows, first].scatter(1, first[:, None], -torch.inf)  # [B, n]
    for _ in range(k - 1):
        nxt = nearest.argmax(dim=1)
        picks.append(nxt)
        nearest = torch.minimum(nearest, dist[rows, nxt]).scatter_(1, nxt[:, None], -torch.inf)
    return torch.stack(picks, dim=1)


def divprune_index(x: Tensor, prefix: int, k: int) -> Tensor:
    """Positions kept: the prefix tokens, then the ``k`` diverse non-prefix tokens of ``x``
    ``[B, N, C]`` in their order: ``[B, prefix + k]`` long."""
    B = x.shape[0]
    picked = diverse_subset(cosine_distances(x[:, prefix:]), k).sort(dim=1).values + prefix
    head = torch.arange(prefix, device=x.device).expand(B, prefix)
    return torch.cat([head, picked], dim=1)


@dataclass(frozen=True)
class DivPruneOptions:
    """Options of ``divprune``.

    Attributes:
        keep_rate: fraction of the non-prefix tokens kept at each location, in (0, 1]. 0.7
            (EViT's rate at the same stages; the paper's own 0.098 is the share of an LMM's
            visual tokens kept once, too few for the inside of a ViT). 1 = no reduction.
        locations: 0-based blocks that prune, after the attention residual; ``None`` = EViT's
            ``(3, 6, 9)`` at depth 12, ``(d//4, d//2, 3d//4)`` otherwise.
    """

    keep_rate: float = 0.7
    locations: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        check_number("keep_rate", self.keep_rate, lo=0.0, hi=1.0, lo_open=True)
        check_locations_type("locations", self.locations)


class DivPrune(Reducer):
    """Max-min diverse subset of the tokens' features at a few blocks."""

    def __init__(self, options: DivPruneOptions, info: ModelInfo):
        super().__init__(options, info)
        self.keep_rate = float(options.keep_rate)
        locs = resolve_locations(options.locations, info)
        # keep_rate == 1 keeps every token: no hook at all, the unpatched code path runs
        self.locations = frozenset(locs) if self.keep_rate < 1.0 else frozenset()

    def acts_after(self, i: int) -> bool:
        return i in self.locations

    def needs_signals(self, i: int) -> bool:
        return False  # the tokens' own features only: the attention stays timm's module

    def after_attention(self, i: int, x: Tensor, signals: Optional[Signals],
                        state: TokenState) -> tuple[Tensor, TokenState]:
        """``x`` ``[B, N, C]`` -> ``[B, prefix + k, C]``."""
        if state.valid is not None or state.mask is not None:
            raise ValueError("divprune needs fixed token counts (no padding or training "
                             "keep-mask from another method)")
        n = x.shape[1] - state.prefix
        k = num_diverse(self.keep_rate, n)
        if k >= n:
            return x, state
        index = divprune_index(x, state.prefix, k)
        if state.recorder is not None:  # the cosines of all pairs of non-prefix tokens
            state.recorder.add_extra("diversity", n * n * x.shape[2])
        return gather_tokens(x, index), state.gather(index)


def build(options: DivPruneOptions, info: ModelInfo) -> Reducer:
    return DivPrune(options, info)


METHOD = register(Method(
    "divprune", DivPruneOptions, build, families=("tokens",), knob=KEEP_RATE_KNOB,
    summary="DivPrune: keep a max-min diverse subset of the tokens by cosine distance "
            "(Alvar 2025)"))
