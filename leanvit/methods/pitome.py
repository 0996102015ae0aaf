"""``pitome``: PiToMe (Tran et al., "Accelerating Transformers with Spectrum-Preserving Token
Merging", NeurIPS 2024; code hchautran/PiToMe, ``algo/pitome/``).

ToMe merges the best-matched half of an alternating split, which in later blocks also merges
small, isolated (informative) tokens. PiToMe first gives every token an *energy score* from
the token-similarity graph: ``E_i = mean_j ELU(cos(k_i, k_j) - m)`` over the non-prefix tokens
(cosine of the attention keys averaged over heads), high for tokens in large clusters of similar
tokens, low for isolated ones. In a block that merges ``r`` tokens:

1. the ``2r`` highest-energy tokens may merge, the others are *protected* (kept as they are);
2. the mergeable ones, in descending energy, are split alternately: A = 1st, 3rd, ...,
   B = 2nd, 4th, ... (``r`` each);
3. every A token merges into its most similar B token (cosine), by a size-weighted average.

Prefix tokens never merge. Merged sizes add up and, with proportional attention, each key's
logit gets ``+log(size)`` (as ToMe). The margin ``m`` falls with depth (the authors' schedule
``0.9 - 0.8 * i / depth`` for block ``i``), so later blocks protect more.

Acts after the attention residual, before the MLP (where ToMe acts). Needs no training;
``r=0`` changes nothing (bit-identical). Deliberate deviations from the authors' code
(``docs/token_reduction.md``, section PiToMe): the output keeps the tokens in their input order
(the authors: ``[cls, protected by energy, B]``; order only, the outputs are the same); ties in
the energy ranking go by position (a stable sort); the number of merges is ``r`` per block with
ToMe's schedules (the authors' released classification code takes a keep ratio per block,
``r = floor(T (1 - ratio))``); any number of prefix tokens is protected (the authors: the
class token only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from leanvit.methods.tome import RSpec, _check_r, planned_r
from leanvit.ops.assign import (Assignment, assignment, merge_sum, merge_weighted,
                                merge_where_assigned)
from leanvit.ops.merge import max_merges
from leanvit.ops.tokens import gather_tokens
from leanvit.registry import R_KNOB, Method, ModelInfo, Reducer, check_bool, check_number, register
from leanvit.signals import Signals
from leanvit.state import TokenState


def default_margin(i: int, depth: int) -> float:
    """The authors' margin of block ``i`` of ``depth``: ``0.9 - 0.8 * i / depth``
    (``algo/pitome/patch/deit.py``), from 0.9 in the first block down to about 0.1."""
    return 0.9 - 0.8 * (i / depth)


#: Bytes of the ``[rows, T]`` cosine block formed at a time in :func:`energy_scores`: the
#: products, the ELU and the row sums of one block stay in cache, instead of three passes over
#: the whole ``[B, T, T]`` matrix (at 1369 tokens one image's is 7.5 MB).
ENERGY_CHUNK_BYTES = 1 << 21


def energy_scores(metric: Tensor, margin: float, alpha: float = 1.0) -> Tensor:
    """PiToMe's energy of each token, ``energy_i = mean_j ELU(cos_ij - m)``, ``j`` over all
    ``T`` tokens, itself included (as the authors).

    Args:
        metric: ``[B, T, D]`` token features (the non-prefix tokens' head-averaged keys).
        margin: ``m``; similarities below it count ``alpha * (exp(cos - m) - 1)`` (< 0).
        alpha: the ELU's scale (authors: 1.0).

    Returns:
        ``[B, T]`` energies. The cosines are formed a block of rows at a time
        (:data:`ENERGY_CHUNK_BYTES`) and never kept; the ELU's sum is taken as
        ``sum(relu(z)) + alpha * (sum(exp(min(z, 0))) - T)`` with ``z = cos - m``, the same
        values as ``F.elu`` up to rounding (about 1e-7) at a fifth of its cost on the CPU,
        where ``F.elu`` evaluates ``expm1`` element by element.
    """
    B, T, _ = metric.shape
    m = F.normalize(metric, p=2, dim=-1)
    mt = m.transpose(-1, -2)
    rows = T if torch.compiler.is_compiling() else max(
        1, ENERGY_CHUNK_BYTES // max(1, T * m.element_size()))
    parts = []
    for r in range(0, T, rows):
        z = (m[:, r:r + rows] @ mt).sub_(margin)  # [B, rows, T]
        below = z.clamp_max(0).exp_().sum(dim=-1)
        parts.append(z.clamp_min_(0).sum(dim=-1).add_(below.sub_(T), alpha=alpha))
    total = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return total / T


def pitome_assignment(metric: Tensor, r: int, prefix: int, margin: float,
                      alpha: float = 1.0) -> Assignment:
    """Which tokens merge where in one PiToMe step.

    Args:
        metric: ``[B, N, D]`` per-token features of all ``N`` tokens (prefix included).
        r: tokens to remove, ``0 < r <= (N - prefix) // 2``.
        prefix: leading tokens that never merge.
        margin, alpha: of :func:`energy_scores`.

    Returns:
        an :class:`~leanvit.ops.assign.Assignment` to ``N - r`` tokens, in input order.
    """
    B, N, _ = metric.shape
    if not 0 < r <= max_merges(N, prefix):
        raise ValueError(f"r must be in [1, {max_merges(N, prefix)}] for {N} tokens with "
                         f"{prefix} protected, got {r}")
    with torch.no_grad():  # indices only
        dtype = torch.promote_types(metric.dtype, torch.float32)
        feats = metric[:, prefix:].to(dtype)
        order = energy_scores(feats, margin, alpha).argsort(dim=-1, descending=True,
                                                           stable=True)  # [B, T]
        a_idx, b_idx = order[:, 0:2 * r:2], order[:, 1:2 * r:2]  # [B, r] each
        f = F.normalize(feats, p=2, dim=-1)
        sim_ab = gather_tokens(f, a_idx) @ gather_tokens(f, b_idx).transpose(1, 2)  # [B, r, r]
        dst = b_idx.gather(1, sim_ab.argmax(dim=-1))  # each A token's B partner
        rep = torch.arange(N, device=metric.device).repeat(B, 1)
        rep.scatter_(1, a_idx + prefix, dst + prefix)
    return assignment(rep, N - r)


@dataclass(frozen=True)
class PiToMeOptions:
    """Options of ``pitome``.

    Attributes:
        r: tokens merged per block, as ``tome``'s ``r`` (an int, an ``(r, inflect)`` schedule
            or a per-block list; clamped with a warning to ``(N - prefix) // 2``). Default 13,
            ToMe's off-the-shelf setting, to compare the two at the same MACs (the authors'
            classification code sets a keep ratio per block instead).
        margin: the energy margin ``m`` in every block; ``None`` = the authors' schedule
            ``0.9 - 0.8 * i / depth`` (:func:`default_margin`).
        alpha: scale of the ELU below the margin (authors' 1.0).
        prop_attn: proportional attention, ``+log(size)`` on each key's logits (authors' default
            on, ``apply_patch(prop_attn=True)``).
        trace_source: keep ``state.source`` ``[B, N, N0]`` (visualisation; authors' default off).
    """

    r: RSpec = 13
    margin: Optional[float] = None
    alpha: float = 1.0
    prop_attn: bool = True
    trace_source: bool = False

    def __post_init__(self) -> None:
        _check_r(self.r)
        if self.margin is not None:
            check_number("margin", self.margin, lo=-1.0, hi=1.0)
        check_number("alpha", self.alpha, lo=0.0, lo_open=True)
        check_bool("prop_attn", self.prop_attn)
        check_bool("trace_source", self.trace_source)


class PiToMe(Reducer):
    """Energy-protected bipartite merging after the attention of every block with ``r > 0``."""

    def __init__(self, options: PiToMeOptions, info: ModelInfo):
        super().__init__(options, info)
        self.r_per_block = planned_r("pitome", options.r, info, "merges")
        self.margins = [default_margin(i, info.depth) if options.margin is None
                        else float(options.margin) for i in range(info.depth)]

    def acts_after(self, i: int) -> bool:
        return self.r_per_block[i] > 0

    def init_state(self, state: TokenState, x: Tensor) -> TokenState:
        state = state.replace(prop_attn=self.options.prop_attn)
        if self.options.trace_source and state.source is None:
            B, N, _ = x.shape
            state = state.replace(source=torch.eye(N, dtype=x.dtype, device=x.device).repeat(
                B, 1, 1))
        return state

    def after_attention(self, i: int, x: Tensor, signals: Optional[Signals],
                        state: TokenState) -> tuple[Tensor, TokenState]:
        """``x`` ``[B, N, C]`` -> ``[B, N - r, C]``."""
        if state.valid is not None or state.mask is not None:
            raise ValueError("pitome needs fixed token counts (no padding or training "
                             "keep-mask from another method)")
        n, p = x.shape[1], state.prefix
        r = min(self.r_per_block[i], max_merges(n, p))  # another input size may leave fewer
        if r <= 0:
            return x, state
        metric = signals.keys  # [B, N, D]
        a = pitome_assignment(metric, r, p, self.margins[i], self.options.alpha)
        if state.recorder is not None:  # the cosines among the non-prefix tokens
            state.recorder.add_extra("energy", (n - p) ** 2 * metric.shape[-1])
        size = state.sizes_like(x)
        out = merge_weighted(a, x, size)
        return out, state.replace(
            size=merge_sum(a, size),
            source=None if state.source is None else merge_sum(a, state.source),
            where=merge_where_assigned(a, state.where),
            positions=state.merged_positions(a.keep))


def build(options: PiToMeOptions, info: ModelInfo) -> Reducer:
    return PiToMe(options, info)


METHOD = register(Method(
    "pitome", PiToMeOptions, build, families=("tokens",), knob=R_KNOB,
    summary="PiToMe: merge r tokens per block, isolated (low-energy) tokens protected "
            "(Tran 2024)"))
