"""``tofu``: Token Fusion (Kim et al., "Token Fusion: Bridging the Gap between Token Pruning and
Token Merging", WACV 2024, arXiv 2312.01026).

ToMe's bipartite soft matching (:mod:`leanvit.ops.merge`: A = even positions, B = odd, cosine
of the head-averaged keys, the ``r`` best A->B edges) decides which ``r`` tokens leave in each
block, after the attention residual and before the MLP. What happens to them depends on the
block:

- in the first ``prune_blocks`` blocks, where a ViT responds far from linearly to an
  interpolation of its inputs (the paper's analysis), the matched A tokens are **pruned**:
  dropped, their B partner unchanged;
- in the later blocks, where it responds nearly linearly, they are **merged** by MLERP
  (:func:`mlerp_merge`): the size-weighted average of the group (ToMe's merge), rescaled to
  the largest norm in the group, so merging does not shrink feature norms (an average of
  vectors pointing apart is shorter than each of them) and shift the distribution the next
  block sees.

Prefix tokens never leave. Proportional attention (``+log(size)`` on each key) as ToMe; a
pruned token's size is not passed on. ``r=0`` changes nothing (bit-identical). Deviations from
the paper: ``docs/token_reduction.md`` (section ToFu).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from leanvit.methods.tome import RSpec, _check_r, planned_r
from leanvit.ops.merge import (Matching, bipartite_soft_matching, max_merges, merge_source,
                              merge_wavg, merge_where)
from leanvit.ops.tokens import gather_tokens
from leanvit.registry import (R_KNOB, Method, ModelInfo, Reducer, check_bool, check_number,
                              register)
from leanvit.signals import Signals
from leanvit.state import TokenState


def default_prune_blocks(depth: int) -> int:
    """Blocks that prune before merging starts: ``depth // 4`` (3 of DeiT/ViT's 12).

    The paper prunes in the early blocks where the model is far from linear and merges in the
    rest; the split is our reading of its analysis (its exact per-model layer is not public).
    """
    return depth // 4


def mlerp_merge(m: Matching, x: Tensor, size: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """MLERP merge (ToFu): ToMe's size-weighted average, rescaled to the largest norm of the
    tokens it merges.

    A destination row ``j`` that receives tokens ``i`` becomes ``avg / ||avg|| * max(||x_j||,
    max_i ||x_i||)`` with ``avg`` the size-weighted mean (:func:`leanvit.ops.merge.merge_wavg`);
    every other row is copied bit for bit. Norms in at least float32 (a half-precision square
    sum of a large-norm token overflows).

    Args:
        m: the matching (:func:`leanvit.ops.merge.bipartite_soft_matching`).
        x: ``[B, N, C]`` tokens.
        size: ``[B, N]`` patches per token; ``None`` = all ones.

    Returns:
        ``([B, N - r, C], [B, N - r])``: merged tokens and their summed sizes.
    """
    out, new_size = merge_wavg(m, x, size)
    dtype = torch.promote_types(x.dtype, torch.float32)
    norms = torch.linalg.vector_norm(x.to(dtype), dim=-1)  # [B, N]
    # the largest norm of each output row's group: its own, or a source's merged into it
    top = norms.gather(1, m.keep).scatter_reduce(1, m.dst, norms.gather(1, m.src), "amax")
    rows = gather_tokens(out, m.dst)  # [B, r, C]: the merged rows (repeated per source)
    ratio = top.gather(1, m.dst) / torch.linalg.vector_norm(rows.to(dtype), dim=-1)
    # only the merged rows change; a row written by several sources gets the same value
    B, K, C = out.shape
    flat = (m.dst + torch.arange(B, device=out.device).unsqueeze(1) * K).reshape(-1)
    scaled = (rows * ratio.unsqueeze(-1).to(out.dtype)).reshape(-1, C)
    return out.reshape(B * K, C).index_copy(0, flat, scaled).reshape(B, K, C), new_size


def prune_matched(m: Matching, x: Tensor) -> Tensor:
    """ToFu's pruning: the matched A tokens (``m.src``) are dropped, every other token is kept
    as it is: ``[B, N, C]`` -> ``[B, N - r, C]`` in the matching's output order."""
    return gather_tokens(x, m.keep)


@dataclass(frozen=True)
class ToFuOptions:
    """Options of ``tofu``.

    Attributes:
        r: tokens removed per block, as ToMe's ``r`` (an int, an ``(r, inflect)`` schedule or a
            per-block list, :func:`leanvit.methods.tome.schedule`); 13 as ToMe's off-the-shelf
            ViT-S/B setting, which ToFu compares against at equal ``r``. Clamped, with a
            warning, where fewer tokens are left.
        prune_blocks: how many blocks, from the first, prune instead of merging; ``None`` =
            :func:`default_prune_blocks` (``depth // 4``). 0 = MLERP merging everywhere.
        prop_attn: proportional attention (``+log(size)`` on each key), ToMe's default for
            supervised ViTs, which ToFu keeps.
        trace_source: keep ``state.source`` ``[B, N, N0]`` for visualisation (default off).
    """

    r: RSpec = 13
    prune_blocks: Optional[int] = None
    prop_attn: bool = True
    trace_source: bool = False

    def __post_init__(self) -> None:
        _check_r(self.r)
        if self.prune_blocks is not None:
            check_number("prune_blocks", self.prune_blocks, lo=0, integer=True)
        check_bool("prop_attn", self.prop_attn)
        check_bool("trace_source", self.trace_source)


class ToFu(Reducer):
    """Bipartite soft matching in every block with ``r > 0``: prune early, MLERP-merge later."""

    def __init__(self, options: ToFuOptions, info: ModelInfo):
        super().__init__(options, info)
        self.r_per_block = planned_r("tofu", options.r, info, "tokens")
        pb = options.prune_blocks
        self.prune_blocks = default_prune_blocks(info.depth) if pb is None else pb
        if self.prune_blocks > info.depth:
            raise ValueError(f"prune_blocks={pb} exceeds the model's {info.depth} blocks")

    def acts_after(self, i: int) -> bool:
        return self.r_per_block[i] > 0

    def init_state(self, state: TokenState, x: Tensor) -> TokenState:
        state = state.replace(prop_attn=self.options.prop_attn)
        if self.options.trace_source and state.source is None:
            B, N, _ = x.shape
            eye = torch.eye(N, dtype=x.dtype, device=x.device)
            state = state.replace(source=eye.expand(B, N, N))
        return state

    def after_attention(self, i: int, x: Tensor, signals: Optional[Signals],
                        state: TokenState) -> tuple[Tensor, TokenState]:
        """``x`` ``[B, N, C]`` -> ``[B, N - r, C]``."""
        if state.valid is not None or state.mask is not None:
            raise ValueError("tofu needs fixed token counts (no padding or training keep-mask "
                             "from another method)")
        r = min(self.r_per_block[i], max_merges(x.shape[1], state.prefix))
        if r <= 0:
            return x, state
        metric = signals.keys  # [B, N, D]: keys averaged over heads, as ToMe
        m = bipartite_soft_matching(metric, r, state.prefix)
        n, C = x.shape[1], x.shape[2]
        if state.recorder is not None:  # the cosines of the unprotected A rows with all of B
            rows = (n + 1) // 2 - (state.prefix + 1) // 2
            state.recorder.add_extra("matching", rows * (n // 2) * metric.shape[-1])
        if i < self.prune_blocks:
            return prune_matched(m, x), state.gather(m.keep)
        if state.recorder is not None:  # the norms of the input tokens and of the merged rows
            state.recorder.add_extra("mlerp", (n + r) * C)
        x, size = mlerp_merge(m, x, state.size)
        source = None if state.source is None else merge_source(m, state.source)
        where = None if state.where is None else merge_where(m, state.where, n)
        return x, state.replace(size=size, source=source, where=where,
                                positions=state.merged_positions(m.keep))


def build(options: ToFuOptions, info: ModelInfo) -> Reducer:
    return ToFu(options, info)


METHOD = register(Method(
    "tofu", ToFuOptions, build, families=("tokens",), knob=R_KNOB,
    summary="ToFu: ToMe's matching, pruning in early blocks, norm-keeping MLERP merging later "
            "(Kim 2024)"))
