"""``topk``: plain class-attention top-k pruning, the baseline the token-pruning papers compare
against (EViT's ablation without fusion, Liang et al., ICLR 2022, Table 6).

In a few blocks, after the attention residual and before the MLP, keep the
``ceil(keep_rate * (N - prefix))`` non-prefix tokens with the highest head-averaged class
attention and drop the others. Output ``[prefix..., kept...]``. Same selection as ``evit``
(shared code: :func:`leanvit.ops.prune.topk_prune`), without the fused token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from leanvit.methods.evit import EViT, check_locations_type, require_class_token
from leanvit.registry import KEEP_RATE_KNOB, Method, ModelInfo, Reducer, check_number, register


@dataclass(frozen=True)
class TopKOptions:
    """Options of ``topk``.

    Attributes:
        keep_rate: fraction of the non-prefix tokens kept at each location, in (0, 1];
            default 0.7, EViT's setting, so the two compare at equal MACs. 1 = no reduction.
        locations: 0-based blocks that prune, after the attention residual. ``None`` = EViT's
            ``(3, 6, 9)`` for a 12-block ViT, scaled to ``(d//4, d//2, 3d//4)`` otherwise.
    """

    keep_rate: float = 0.7
    locations: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        check_number("keep_rate", self.keep_rate, lo=0.0, hi=1.0, lo_open=True)
        check_locations_type("locations", self.locations)


class TopK(EViT):
    """EViT's reducer with fusion off (the options have no ``fuse`` field)."""

    method = "topk"


def build(options: TopKOptions, info: ModelInfo) -> Reducer:
    require_class_token("topk", info)
    return TopK(options, info)


METHOD = register(Method(
    "topk", TopKOptions, build, families=("tokens",), knob=KEEP_RATE_KNOB,
    summary="top-k by class attention, dropping the rest (the papers' pruning baseline)"))
