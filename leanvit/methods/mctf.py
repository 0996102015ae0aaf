"""``mctf``: Multi-criteria token fusion (Lee et al., "Multi-criteria Token Fusion with
One-step-ahead Attention for Efficient Vision Transformers", CVPR 2024; code mlvlab/MCTF,
``utils/mctf.py``).

ToMe merges by similarity alone. MCTF scores every A-B pair of the alternating split (A = even
positions, B = odd) by three criteria, each a factor in ``[0, 1]`` sharpened by a temperature:

- similarity ``((cos(x_a, x_b) + 1) / 2) ** (1 / tau_sim)`` of the tokens' hidden states;
- informativeness ``(I_a I_b) ** (1 / tau_info)``, ``I = (1 / attn) / max(1 / attn)`` with
  ``attn`` the attention a token receives, averaged over heads and queries: tokens that few
  attend to merge first;
- size ``(S_a S_b) ** (1 / tau_size)``, ``S = (1 / size) / max(1 / size)``: large merged tokens
  merge last.

Bidirectional fusion: the ``r // 2`` best-scored A tokens merge into their best B partner, then
the ``r - r // 2`` best-scored B tokens (with what they just received) into their best remaining
A partner, both by the same scores. A group becomes the average of its tokens weighted by size
times received attention (the authors' attention pooling; ``pooling="size"``: by size, as
ToMe). Prefix tokens never merge. Proportional attention (``+log(size)``) as ToMe.

Where: after the attention residual of block ``i``, before its MLP (where leanvit's reducers
act), with block ``i``'s own attention map for the informativeness. The authors fuse at the
START of block ``i`` with block ``i``'s attention computed on the unfused tokens (their
"one-step-ahead attention") and then reuse that map, fused, for the attention of the fused
tokens; leanvit's reducer hooks have no place between a block's attention map and its product
with the values, so here the block's attention runs on the unfused tokens and the fusion saves
from its MLP on (``docs/token_reduction.md``, section MCTF, lists every deviation).

Needs no training (the authors fine-tune for their best numbers); ``r=0`` changes nothing
(bit-identical). In float32/float64 a fusing block's attention is computed explicitly, a chunk
of images or query rows at a time, and each chunk's map summed while it is in cache
(``reads_received``: the whole map is never kept, no second ``q k^T``); in half precision the
map is formed once more in float32 (counted in ``signals``). The ``A x B`` similarity product
is counted (``similarity``).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from leanvit.methods.evit import check_locations_type
from leanvit.methods.tome import RSpec, _check_r, schedule
from leanvit.ops.assign import (Assignment, assignment, merge_sum, merge_weighted,
                                merge_where_assigned)
from leanvit.ops.merge import max_merges
from leanvit.registry import (R_KNOB, Method, ModelInfo, Reducer, check_bool,
                              check_locations, check_number, register)
from leanvit.signals import Signals
from leanvit.state import TokenState

#: The authors keep at least this many tokens in a fusing block (``if t - r < 10: r = t - 10``).
MIN_TOKENS = 10
POOLINGS = ("attention", "size")


def max_fusions(n_tokens: int, prefix: int) -> int:
    """Tokens one MCTF step may remove from ``n_tokens``: at most half the non-prefix ones
    (as ToMe) and never below :data:`MIN_TOKENS` left (the authors' rule)."""
    return max(0, min(max_merges(n_tokens, prefix), n_tokens - MIN_TOKENS))


def _factor(outer: Tensor, tau: float) -> Tensor:
    """``outer ** (1 / tau)``; a criterion with ``tau == 0`` is off (the authors' ``if tau``)."""
    return outer.clamp_min(0).pow(1.0 / tau)


def pair_scores(metric: Tensor, attn: Optional[Tensor], size: Optional[Tensor], prefix: int,
                tau_sim: float, tau_info: float, tau_size: float) -> Tensor:
    """MCTF's multi-criteria score of every (A, B) pair, ``[B, nA, nB]`` (A = even positions,
    B = odd), ``-inf`` where either token is a prefix token.

    Args:
        metric: ``[B, N, C]`` hidden states (cosine similarity).
        attn: ``[B, N]`` attention each token receives (head and query mean) or ``None``.
        size: ``[B, N]`` tokens' sizes or ``None`` (all 1: the size factor is 1).
        tau_sim, tau_info, tau_size: temperatures (authors: 1, 20, 40); 0 turns one off.
    """
    m = F.normalize(metric, p=2, dim=-1)
    a, b = m[:, ::2], m[:, 1::2]
    # the informativeness and size factors are products of one factor per token:
    # (I_a I_b)^(1/t) = I_a^(1/t) I_b^(1/t); f = all of a token's factors together
    f = None
    for value, tau in ((attn, tau_info), (size, tau_size)):
        if tau > 0 and value is not None:
            inv = 1.0 / value.to(m.dtype)
            inv = _factor(inv / inv.amax(dim=1, keepdim=True), tau)
            f = inv if f is None else f * inv
    if tau_sim == 1 and f is not None:
        # ((cos + 1) / 2) f_a f_b = ([a f_a, f_a] . [b f_b, f_b]) / 2: one product, no pass
        # over the [nA, nB] scores but the clamp (cos >= -1, f >= 0: zero up to rounding)
        fa, fb = f[:, ::2, None], f[:, 1::2, None]
        scores = torch.cat([a * fa, fa], -1) @ torch.cat([b * fb, fb], -1).transpose(-1, -2)
        scores = scores.mul_(0.5).clamp_min_(0)
    else:
        if tau_sim > 0:
            scores = _factor((a @ b.transpose(-1, -2)).add_(1).div_(2), tau_sim)
        else:
            scores = a.new_ones(a.shape[0], a.shape[1], b.shape[1])
        if f is not None:
            scores.mul_(f[:, ::2, None]).mul_(f[:, None, 1::2])
    pa, pb = (prefix + 1) // 2, prefix // 2
    scores[:, :pa] = -math.inf  # a prefix token neither merges away
    scores[:, :, :pb] = -math.inf  # nor receives
    return scores


def _best_first(score: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` entries of ``score`` ``[B, n]`` with the highest values (highest first, ties by
    position) and the others in position order."""
    order = score.argsort(dim=-1, descending=True, stable=True)
    return order[:, :k], order[:, k:].sort(dim=-1).values


def mctf_assignment(scores: Tensor, r: int, bidirection: bool = True) -> Assignment:
    """Which tokens fuse where in one MCTF step, from :func:`pair_scores` ``[B, nA, nB]``.

    Forward: the ``r1`` A tokens with the best best-partner score merge into that B partner;
    backward (``bidirection``): the ``r2`` B tokens with the best score to a remaining A token
    merge into it (carrying what they received). ``r1, r2 = r // 2, r - r // 2`` (``r, 0``
    without ``bidirection``). Returns the :class:`~leanvit.ops.assign.Assignment` to
    ``N - r`` tokens (``N = nA + nB``) in input order.
    """
    B, n_a, n_b = scores.shape
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    dev = scores.device
    with torch.no_grad():
        node_max, node_idx = scores.max(dim=-1)  # each A token's best B partner
        src, unm = _best_first(node_max, r1)
        rep = torch.arange(n_a + n_b, device=dev).repeat(B, 1)
        rep.scatter_(1, 2 * src, 2 * node_idx.gather(1, src) + 1)
        if r2 > 0:  # each B token's best remaining A partner (merged-away A rows masked)
            back = scores.scatter(1, src.unsqueeze(-1).expand(-1, -1, n_b), -math.inf)
            node_max2, node_idx2 = back.max(dim=1)
            src2, _ = _best_first(node_max2, r2)
            dst2 = node_idx2.gather(1, src2)
            rep.scatter_(1, 2 * src2 + 1, 2 * dst2)
            rep = rep.gather(1, rep)  # an A token whose B partner moved on follows it
    return assignment(rep, n_a + n_b - r)


@dataclass(frozen=True)
class MCTFOptions:
    """Options of ``mctf``. Defaults: the authors' DeiT-S/T evaluation (``run/eval_deit_s_
    mctf.sh``: ``--r_evals [16]``, ``--mctf_type [16,0,0,1,1,1,20,40,1,1,0]``,
    ``--activate_layer [1..11]``).

    Attributes:
        r: tokens fused per fusing block: an int (authors' 16), an ``(r, inflect)`` schedule
            or a per-block list (as ``tome``'s ``r``); clamped with a warning to half the
            non-prefix tokens and to at least 10 tokens left (:func:`max_fusions`).
        locations: blocks that fuse; ``None`` = every block but the first (the authors'
            ``activate_layer``).
        tau_sim, tau_info, tau_size: temperatures of the three criteria (authors' 1, 20, 40);
            0 turns a criterion off.
        bidirection: fuse A -> B then B -> A (authors' default on).
        pooling: ``"attention"``: a group is the average of its tokens weighted by size times
            received attention (authors' ``pooling_type=1``); ``"size"``: by size (``0``).
        prop_attn: proportional attention, ``+log(size)`` on each key's logits (authors' on).
        trace_source: keep ``state.source`` ``[B, N, N0]`` (visualisation; authors' off).
        consistency_r: training only (the token-reduction-consistency loss, ``leanvit train
            --consistency-weight``): the milder view fuses ``r'`` tokens in every fusing block,
            ``r'`` drawn uniformly from ``0 .. consistency_r - 1`` at each step (authors'
            ``r_teacher_max``, ``mctf_type[1]`` = 8 in their DeiT-S fine-tuning command); 0:
            the milder view is the unreduced model. Inference ignores it.
    """

    r: RSpec = 16
    locations: Optional[tuple[int, ...]] = None
    tau_sim: float = 1.0
    tau_info: float = 20.0
    tau_size: float = 40.0
    bidirection: bool = True
    pooling: str = "attention"
    prop_attn: bool = True
    trace_source: bool = False
    consistency_r: int = 8

    def __post_init__(self) -> None:
        _check_r(self.r)
        check_locations_type("locations", self.locations)
        for name in ("tau_sim", "tau_info", "tau_size"):
            check_number(name, getattr(self, name), lo=0.0)
        check_bool("bidirection", self.bidirection)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(map(repr, POOLINGS))}, got "
                             f"{self.pooling!r}")
        check_bool("prop_attn", self.prop_attn)
        check_bool("trace_source", self.trace_source)
        check_number("consistency_r", self.consistency_r, lo=0, integer=True)


def plan(options: MCTFOptions, info: ModelInfo) -> tuple[list[int], list[int]]:
    """Tokens fused per block (0 outside ``locations``), clamped block by block to
    :func:`max_fusions`; returns ``(schedule, blocks that were clamped)``."""
    locs = (range(1, info.depth) if options.locations is None
            else check_locations("locations", options.locations, info.depth))
    wanted = [r if i in locs else 0 for i, r in enumerate(schedule(options.r, info.depth))]
    n = info.num_patches + info.num_prefix_tokens
    out, clamped = [], []
    for i, r in enumerate(wanted):
        cap = max_fusions(n, info.num_prefix_tokens)
        if r > cap:
            clamped.append(i)
            r = cap
        out.append(r)
        n -= r
    return out, clamped


class MCTF(Reducer):
    """Multi-criteria bidirectional fusion after the attention of every fusing block."""

    def __init__(self, options: MCTFOptions, info: ModelInfo):
        super().__init__(options, info)
        self.r_per_block, clamped = plan(options, info)
        if clamped:
            warnings.warn(
                f"mctf: r={options.r!r} asks for more fusions than the tokens allow in blocks "
                f"{clamped} (at most half the non-prefix tokens, at least {MIN_TOKENS} left); "
                f"clamped to {self.r_per_block}", stacklevel=4)

    def acts_after(self, i: int) -> bool:
        return self.r_per_block[i] > 0

    def consistency_view(self, generator: torch.Generator) -> Optional["MCTF"]:
        """MCTF's token-reduction-consistency view (the authors' "teacher" pass, Lee et al. 2024
        sec. 3.4; ``models/deit.py``): the same blocks fusing ``r'`` tokens each, ``r'`` drawn
        uniformly from ``0 .. consistency_r - 1`` (the authors' ``torch.randint(0,
        r_teacher_max)``), clamped per block as ``r`` is. No learned state, so a fresh reducer
        is the whole view."""
        high = self.options.consistency_r
        r = int(torch.randint(0, high, (1,), generator=generator)) if high > 0 else 0
        opts = dataclasses.replace(self.options, r=r)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a clamped r' was warned about for r already
            view = MCTF(opts, self.info)
        view.method_name = getattr(self, "method_name", "mctf")
        return view.train(self.training)

    def reads_received(self, i: int) -> bool:
        return self.r_per_block[i] > 0 and (self.options.tau_info > 0
                                            or self.options.pooling == "attention")

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
            raise ValueError("mctf needs fixed token counts (no padding or training keep-mask "
                             "from another method)")
        n, p = x.shape[1], state.prefix
        r = min(self.r_per_block[i], max_fusions(n, p))  # another input size may leave fewer
        if r <= 0:
            return x, state
        o = self.options
        attn = None
        if o.tau_info > 0 or o.pooling == "attention":  # from the block's own attention
            attn = signals.attn_received
        with torch.no_grad():
            dtype = torch.promote_types(x.dtype, torch.float32)
            scores = pair_scores(x.detach().to(dtype), attn, state.size, p, o.tau_sim,
                                 o.tau_info, o.tau_size)
        a = mctf_assignment(scores, r, o.bidirection)
        if state.recorder is not None and o.tau_sim > 0:  # the A x B cosines of the states
            state.recorder.add_extra("similarity", ((n + 1) // 2) * (n // 2) * x.shape[2])
        size = state.sizes_like(x)
        weight = size * attn.to(x.dtype) if o.pooling == "attention" else size
        return merge_weighted(a, x, weight), state.replace(
            size=merge_sum(a, size),
            source=None if state.source is None else merge_sum(a, state.source),
            where=merge_where_assigned(a, state.where),
            positions=state.merged_positions(a.keep))


def build(options: MCTFOptions, info: ModelInfo) -> Reducer:
    return MCTF(options, info)


METHOD = register(Method(
    "mctf", MCTFOptions, build, families=("tokens",), knob=R_KNOB,
    summary="MCTF: fuse r tokens per block by similarity, informativeness and size, "
            "bidirectionally (Lee 2024)"))
