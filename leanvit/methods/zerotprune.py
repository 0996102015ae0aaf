"""``zerotprune``: Zero-TPrune (Wang, Dedhia and Jha, "Zero-TPrune: Zero-Shot Token Pruning
through Leveraging of the Attention Graph in Pre-Trained Transformers", CVPR 2024, arXiv
2305.17328).

The attention map of a block is the adjacency matrix of a directed graph over its tokens
(token ``i`` gives weight ``A[i, j]`` to token ``j``). Weighted PageRank (WPR) ranks the tokens on
it: a token is important when important tokens attend to it, ``s <- A^T s`` per head from a
uniform start (the class token starts ``sqrt(N)`` times higher), the heads combined by the root
mean square ("emphasizing informative region", EIR). In every block with ``r > 0``, after the
attention residual and before the MLP, one pruning layer in the paper's order I' -> S -> I:

- I' (pre-ranking): one WPR step, nothing pruned;
- S (similarity): the non-prefix tokens sorted by that importance, the less important half is
  group A, the rest group B ("sequential" partition); each A token's most similar B token by
  cosine of the head-averaged keys; the ``r_s`` A tokens with the most similar partner are
  pruned (dropped, not merged: they have a near copy);
- I (importance): WPR with the block's iteration count on the attention graph of the tokens
  left (the map restricted to them, rows renormalised), and the ``r - r_s`` least important
  non-prefix tokens are pruned.

Survivors keep their order; prefix tokens are never pruned. ``r=0`` changes nothing
(bit-identical). Deviations from the paper: ``docs/token_reduction.md`` (section Zero-TPrune).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from leanvit.methods.tome import RSpec, _check_r, planned_r
from leanvit.ops.attention import image_groups
from leanvit.ops.merge import max_merges
from leanvit.ops.tokens import gather_tokens
from leanvit.registry import R_KNOB, Method, ModelInfo, Reducer, check_bool, check_number, register
from leanvit.signals import Signals
from leanvit.state import TokenState

#: WPR iterations in the first three, the middle and the last three blocks: the lower ends of
#: the paper's 30-50, 5-10 and 1 (enough to converge there, by the authors' ablation).
AUTHORS_ITERATIONS = (30, 5, 1)


def default_iterations(depth: int) -> list[int]:
    """WPR iterations per block: 30 in the first ``e``, 1 in the last ``e``, 5 between, with
    ``e = 3`` at depth 12 and ``max(1, depth // 4)`` otherwise (the paper's three of twelve)."""
    e = 3 if depth == 12 else max(1, depth // 4)
    first, mid, last = AUTHORS_ITERATIONS
    return [first if i < e else last if i >= depth - e else mid for i in range(depth)]




def wpr(attn: Tensor, init: Tensor, iterations: int, keep: Optional[Tensor] = None) -> Tensor:
    """Weighted PageRank on an attention graph, per head.

    Args:
        attn: ``[B, H, N, N]`` post-softmax attention (row ``i``: what query ``i`` attends to).
        init: ``[B, N]`` starting scores (summing to 1).
        iterations: steps ``s <- A^T s`` (at least 1).
        keep: ``[B, N]`` bool, the tokens of the graph (``None``: all): the map restricted to
            them, rows renormalised (the attention among the kept tokens alone), without
            forming it: ``s_j <- m_j sum_i (s_i m_i / z_i) A[i, j]`` with ``z_i = sum_j A[i, j]
            m_j``; the others score 0.

    Returns:
        ``[B, H, N]`` scores per head (each summing to 1 over the graph's tokens).
    """
    B, H, N, _ = attn.shape
    s = init.to(attn.dtype)[:, None, :].expand(B, H, N)
    inv = m = None
    if keep is not None:
        m = keep.to(attn.dtype)[:, None, :]  # [B, 1, N]
        z = (attn @ m.unsqueeze(-1)).squeeze(-1)  # [B, H, N]: kept mass of each row
        inv = m / z.clamp_min(torch.finfo(attn.dtype).tiny)
    # a group of images whose maps stay in cache runs all its PageRank steps in one go
    # (eager code), instead of streaming the whole batch's maps from memory once per step;
    # compiled code: one group, one batched product per step
    parts = [_steps(attn[g], s[g], iterations, None if inv is None else inv[g],
                    None if m is None else m[g])
             for g in image_groups(B, H * N * N * attn.element_size())]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _steps(attn: Tensor, s: Tensor, iterations: int, inv: Optional[Tensor],
           m: Optional[Tensor]) -> Tensor:
    """``iterations`` PageRank steps of :func:`wpr` on ``attn`` ``[b, H, N, N]`` from ``s``
    ``[b, H, N]`` (``inv``, ``m``: the restriction to the kept tokens, or ``None``)."""
    if inv is None:
        for _ in range(iterations):
            s = (s.unsqueeze(2) @ attn).squeeze(2)  # s_j <- sum_i s_i A[i, j]
        return s
    # restricted: u = s * inv carried between steps; m * inv == inv (inv is 0 off the kept
    # tokens), so ((u @ A) * m) * inv is (u @ A) * inv exactly, one product per step
    u = s * inv
    for _ in range(iterations - 1):
        u = (u.unsqueeze(2) @ attn).squeeze(2).mul_(inv)
    return (u.unsqueeze(2) @ attn).squeeze(2).mul_(m)


def eir(scores: Tensor) -> Tensor:
    """Heads combined by the root mean square (EIR): ``[B, H, N]`` -> ``[B, N]``; a token very
    important to a few heads outranks one moderately important to all."""
    return scores.square().mean(1).sqrt()


def initial_scores(keep: Tensor, cls_boost: bool) -> Tensor:
    """WPR's start ``[B, N]``: uniform over the kept tokens (``keep`` ``[B, N]`` bool), the class
    token (index 0) ``sqrt(n)`` times the others when ``cls_boost`` (``n`` tokens kept)."""
    s = keep.to(torch.float32)
    if cls_boost:
        n = s.sum(1, keepdim=True)
        s = torch.cat([s[:, :1] * n.sqrt(), s[:, 1:]], dim=1)
    return s / s.sum(1, keepdim=True)


def similarity_prune(importance: Tensor, metric: Tensor, prefix: int, r: int) -> Tensor:
    """Zero-TPrune's S-stage: ``[B, N]`` bool, ``False`` at the ``r`` pruned tokens.

    The non-prefix tokens sorted by ``importance`` ``[B, N]`` ascending (stable): the first
    ``(N - prefix) // 2`` are group A, the rest group B. Each A token's best cosine similarity
    (``metric`` ``[B, N, D]``) to a B token; the ``r`` A tokens with the highest go (ties: the
    less important first). ``0 <= r <= (N - prefix) // 2``.
    """
    B, N, _ = metric.shape
    n_a = (N - prefix) // 2
    order = importance[:, prefix:].argsort(dim=1, stable=True) + prefix  # ascending importance
    a_idx, b_idx = order[:, :n_a], order[:, n_a:]
    f = metric / metric.norm(dim=-1, keepdim=True)
    sim = gather_tokens(f, a_idx) @ gather_tokens(f, b_idx).transpose(1, 2)  # [B, nA, nB]
    best = sim.amax(dim=-1)
    gone = a_idx.gather(1, best.argsort(dim=1, descending=True, stable=True)[:, :r])
    return torch.ones(B, N, dtype=torch.bool, device=metric.device).scatter(1, gone, False)


def importance_prune(importance: Tensor, keep: Tensor, prefix: int, n_keep: int) -> Tensor:
    """Zero-TPrune's I-stage selection: ``[B, prefix + n_keep]`` long, the positions of the
    prefix tokens and of the ``n_keep`` most important non-prefix tokens among ``keep``
    ``[B, N]`` bool (the S-stage's survivors), in their order. Ties: the earlier position."""
    B = keep.shape[0]
    score = importance[:, prefix:].masked_fill(~keep[:, prefix:], -math.inf)
    kept = score.argsort(dim=1, descending=True, stable=True)[:, :n_keep].sort(dim=1).values
    head = torch.arange(prefix, device=keep.device).expand(B, prefix)
    return torch.cat([head, kept + prefix], dim=1)


IterSpec = Union[None, int, Sequence[int]]


@dataclass(frozen=True)
class ZeroTPruneOptions:
    """Options of ``zerotprune``.

    Attributes:
        r: tokens pruned per block (an int, an ``(r, inflect)`` schedule or a per-block list, as
            ToMe's ``r``: :func:`leanvit.methods.tome.schedule`; clamped with a warning to half
            the non-prefix tokens). Default 11: on DeiT-S the MACs closest to the paper's
            setting of 34.7% fewer FLOPs; the paper gives no rate per block.
        similarity_share: fraction of each block's ``r`` pruned by the S-stage (rounded), the
            rest by the I-stage. 0.5 by default: the paper uses both stages in every pruning
            layer but does not state the split.
        iterations: WPR iterations of the I-stage: ``None`` = :func:`default_iterations` (30 in
            the first three blocks, 5 in the middle, 1 in the last three), an int for every
            block or a per-block list.
        cls_boost: start the class token's WPR score ``sqrt(N)`` times the others' (the paper's
            "Zero-TPrune"; ``False``: its "Zero-TPrune-uni"). No effect without a class token.
    """

    r: RSpec = 11
    similarity_share: float = 0.5
    iterations: IterSpec = None
    cls_boost: bool = True

    def __post_init__(self) -> None:
        _check_r(self.r)
        check_number("similarity_share", self.similarity_share, lo=0.0, hi=1.0)
        it = self.iterations
        if it is not None and not isinstance(it, (list, tuple)):
            check_number("iterations", it, lo=1, integer=True)
        elif it is not None:
            if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
                       for v in it):
                raise ValueError(f"iterations as a list must hold ints >= 1, got {it!r}")
        check_bool("cls_boost", self.cls_boost)


class ZeroTPrune(Reducer):
    """I' -> S -> I pruning on the attention graph in every block with ``r > 0``."""

    def __init__(self, options: ZeroTPruneOptions, info: ModelInfo):
        super().__init__(options, info)
        self.r_per_block = planned_r("zerotprune", options.r, info, "tokens")
        it = options.iterations
        if it is None:
            self.iterations = default_iterations(info.depth)
        elif isinstance(it, (list, tuple)):
            if len(it) != info.depth:
                raise ValueError(f"iterations has {len(it)} entries but the model has "
                                 f"{info.depth} blocks")
            self.iterations = [int(v) for v in it]
        else:
            self.iterations = [int(it)] * info.depth
        self.cls_boost = bool(options.cls_boost and info.has_class_token)

    def acts_after(self, i: int) -> bool:
        return self.r_per_block[i] > 0

    def needs_attention_map(self, i: int) -> bool:
        return self.r_per_block[i] > 0

    def reads_map(self, i: int) -> bool:
        return self.r_per_block[i] > 0

    def _counts(self, i: int, n: int, prefix: int) -> tuple[int, int]:
        """Block ``i``'s ``(r, r_s)`` on ``n`` tokens: pruned in all, pruned by the S-stage."""
        r = min(self.r_per_block[i], max_merges(n, prefix))
        return r, int(round(self.options.similarity_share * r))

    def read_map(self, i: int, weights: Tensor, signals: Signals, state: TokenState,
                 images: slice) -> Tensor:
        """The survivors' positions of the images ``images``, ``[b, N - r]``, ranked on their
        map ``weights`` ``[b, H, N, N]`` while it is in cache (:meth:`select`)."""
        r, r_s = self._counts(i, weights.shape[-1], state.prefix)
        if r <= 0:
            return weights.new_zeros(weights.shape[0], 0, dtype=torch.long)
        return self.select(i, weights, signals.keys[images], state.prefix, r, r_s)

    def select(self, i: int, attn: Tensor, keys: Tensor, prefix: int, r: int, r_s: int
               ) -> Tensor:
        """I' -> S -> I on the map ``attn`` ``[B, H, N, N]`` with the head-averaged keys
        ``keys`` ``[B, N, D]``: the positions of the ``N - r`` survivors, ``[B, N - r]``
        (``r_s`` of the ``r`` pruned by the S-stage)."""
        B, _, N, _ = attn.shape
        everyone = torch.ones(B, N, dtype=torch.bool, device=attn.device)
        pre = eir(wpr(attn, initial_scores(everyone, self.cls_boost), 1))  # I'-stage
        keep = similarity_prune(pre, keys, prefix, r_s) if r_s else everyone  # S-stage
        final = eir(wpr(attn, initial_scores(keep, self.cls_boost), self.iterations[i],
                        keep if r_s else None))
        return importance_prune(final, keep, prefix, N - prefix - r)  # I-stage

    def after_attention(self, i: int, x: Tensor, signals: Optional[Signals],
                        state: TokenState) -> tuple[Tensor, TokenState]:
        """``x`` ``[B, N, C]`` -> ``[B, N - r, C]``."""
        if state.valid is not None or state.mask is not None:
            raise ValueError("zerotprune needs fixed token counts (no padding or training "
                             "keep-mask from another method)")
        N, p = x.shape[1], state.prefix
        r, r_s = self._counts(i, N, p)
        if r <= 0:
            return x, state
        index = signals.map_read  # ranked chunk by chunk on the block's own map
        if index is None:  # half precision: the map formed once more, in float32
            index = self.select(i, signals.attn, signals.keys, p, r, r_s)
        if state.recorder is not None:
            H, D = signals.k.shape[1], signals.k.shape[-1]
            n_a = (N - p) // 2
            # I' (1 step), the kept mass of each row when restricted (1), the I-stage's steps
            steps = 1 + (1 if r_s else 0) + self.iterations[i]
            state.recorder.add_extra("pagerank", H * N * N * steps)
            if r_s:
                state.recorder.add_extra("similarity", n_a * (N - p - n_a) * D)
        return gather_tokens(x, index), state.gather(index)


def build(options: ZeroTPruneOptions, info: ModelInfo) -> Reducer:
    return ZeroTPrune(options, info)


METHOD = register(Method(
    "zerotprune", ZeroTPruneOptions, build, families=("tokens",), knob=R_KNOB,
    summary="Zero-TPrune: prune by weighted PageRank on the attention graph and by key "
            "similarity to more important tokens (Wang 2024)"))
