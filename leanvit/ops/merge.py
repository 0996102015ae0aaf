"""Token merging by bipartite soft matching (ToMe, Bolya et al., ICLR 2023).

Pure tensor functions: :func:`bipartite_soft_matching` decides which tokens merge (a
:class:`Matching` of index tensors), :func:`merge_tokens` applies it to any per-token tensor,
:func:`merge_wavg` does ToMe's size-weighted average and :func:`merge_source` keeps the
[B, N, N0] source map right.

Token split: A = even positions, B = odd positions of the whole sequence (prefix included),
as the authors. Prefix tokens (class, distillation, register) are protected: their rows in A
and their columns in B can never match, so they are never merged, and the output keeps them
in front in their original order. With one class token the output is the authors'
``[unmerged A (class token first), B]``; with a distillation token at position 1 it is their
``[cls, dist, unmerged A, B]``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from leanvit.ops.tokens import add_tokens_, gather_tokens, remap_where


class Matching(NamedTuple):
    """Which tokens merge where, as absolute positions (shapes fixed by ``N``, ``r``, prefix).

    The output of a merge is ``x[keep]`` with each ``x[src[k]]`` reduced into output row
    ``dst[k]``.

    Attributes:
        keep: ``[B, N - r]`` input positions of the output tokens, in output order: the prefix
            tokens, the unmerged A tokens by position, then the B tokens by position.
        src: ``[B, r]`` input positions of the A tokens that merge away (best match first).
        dst: ``[B, r]`` output rows they merge into (their B partners).
    """

    keep: Tensor
    src: Tensor
    dst: Tensor

    @property
    def r(self) -> int:
        return self.src.shape[1]


def max_merges(n_tokens: int, prefix: int) -> int:
    """The most tokens one matching can remove from ``n_tokens``: ``(N - prefix) // 2``.

    The authors' cap (``min(r, (t - protected) // 2)``); at most half the unprotected tokens
    can leave, since each needs a partner on the other side.
    """
    return max(0, (n_tokens - prefix) // 2)


def bipartite_soft_matching(metric: Tensor, r: int, prefix: int = 0) -> Matching:
    """ToMe's matching: the ``r`` A tokens most similar to some B token merge into it.

    Args:
        metric: ``[B, N, D]`` per-token features compared by cosine similarity (ToMe: the
            attention keys averaged over heads); L2-normalised here.
        r: tokens to remove, ``0 < r <= max_merges(N, prefix)`` (the caller clamps).
        prefix: leading tokens that never merge.

    Returns:
        a :class:`Matching`; its shapes depend only on ``N``, ``r`` and ``prefix``.

    Each A token's partner is its most similar B token, ties going to the first B token
    (:func:`first_best`: scores within a few units of rounding count as tied, so copies of a
    token, as from identical patches, tie whatever the BLAS kernel's rounding). A tokens are
    ranked by that similarity, recomputed per pair (:func:`pair_scores`: copies score
    bit-identically), highest first; equal scores go by position (a stable sort, as the
    tests' plain reference; the authors' unstable ``argsort`` leaves that order to the sort
    implementation) and NaN ranks highest (as ``torch.sort``). Eager code sorts; under
    ``torch.compile`` the same ranks come from comparisons that inductor fuses with the merge
    (:func:`_select_by_rank`), since a sort is an opaque library call at batch 1. Both give
    the same :class:`Matching`.
    """
    B, N, _ = metric.shape
    if not 0 < r <= max_merges(N, prefix):
        raise ValueError(f"r must be in [1, {max_merges(N, prefix)}] for {N} tokens with "
                         f"{prefix} protected, got {r}")
    with torch.no_grad():  # indices only: no gradient flows through the decision
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        pa, pb = (prefix + 1) // 2, prefix // 2  # prefix tokens on each side
        a_free = a[:, pa:]  # the unprotected A rows
        scores = _similarity(a_free, b)  # [B, nA - pa, nB]
        if pb:
            scores[:, :, :pb] = -math.inf  # nothing merges into a protected B token
        # each A token's best B partner, ties (within rounding) to the first; its score
        # recomputed by one dot product so that copies of a token rank equal
        node_idx = first_best(scores)
        node_max = pair_scores(a_free, b, node_idx)
        if torch.compiler.is_compiling():
            order = _select_by_rank(node_max, r)
            src_idx, unm_idx = order[:, :r], order[:, r:]
        else:
            edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)
            src_idx, unm_idx = edge_idx[:, :r], edge_idx[:, r:].sort(dim=-1).values
        # src_idx: the r merging A rows, best first; unm_idx: the others by position (both
        # counted among the unprotected A rows)
        dst_idx = node_idx.gather(1, src_idx)  # positions within B
        n_a = a.shape[1]
        b_rest = torch.arange(2 * pb + 1, N, 2, device=metric.device).expand(B, -1)
        keep = torch.cat([torch.arange(prefix, device=metric.device).expand(B, -1),
                          torch.add(2 * pa, unm_idx, alpha=2), b_rest], dim=1)
        # Output row of B token j >= pb: prefix + (n_a - r - pa) unmerged A + (j - pb).
        dst = dst_idx + (n_a - r)
    return Matching(keep, torch.add(2 * pa, src_idx, alpha=2), dst)


def _similarity(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b^T`` ``[B, n, D] x [B, m, D] -> [B, n, m]``: the one product whose last bits
    depend on the BLAS kernel (the tests perturb it to check that no decision does)."""
    return a @ b.transpose(-1, -2)


def _select_by_rank(score: Tensor, r: int) -> Tensor:
    """The permutation ``[B, n]`` that puts the ``r`` highest of ``score`` ``[B, n]`` first
    (highest first) and the others after them by position: ``cat(argsort(score, descending,
    stable)[:, :r], sorted(rest))``, without a sort.

    Each entry's rank is counted by comparisons (``[B, n, n]``: entries above it, or equal
    and before it; NaN counts as highest, as in ``torch.sort``), and one scatter writes every
    index to its slot. Pure pointwise work and sums, which inductor fuses into neighbouring
    kernels; for eager code a sort is faster (fewer, larger operations).
    """
    B, n = score.shape
    v = torch.where(score != score, math.inf, score)  # NaN; `!=` vectorises, isnan does not
    pos = torch.arange(n, device=score.device)
    before = pos[None, :] < pos[:, None]  # [i, j]: j comes before i
    vi, vj = v[:, :, None], v[:, None, :]
    rank = ((vj > vi) | ((vj == vi) & before)).sum(-1)  # [B, n], a permutation of 0..n-1
    merged = rank < r
    merged_before = (merged[:, None, :] & before).sum(-1)  # merged entries ahead of i
    slot = torch.where(merged, rank, r + pos - merged_before)
    return torch.empty_like(slot).scatter_(1, slot, pos.expand(B, n))


#: Scores within this many units of rounding (``eps`` of float32, or of float64 for float64
#: scores) of a row's best are tied with it. A matrix product may give two identical copies
#: of a token scores that differ in the last bits, depending on how the BLAS kernel blocks
#: the columns (so on the CPU, the library and its version); ties must not depend on that.
#: Sixteen units cover the reordered sums of a length-64 to length-1024 dot product of unit
#: vectors many times over and are far below any similarity gap that means something.
TIE_ULPS = 16


def first_best(scores: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """The index of each row's best score, ties going to the first position: ``[..., m]`` ->
    ``[...]`` long.

    A score counts as tied with the row's maximum when it is within ``TIE_ULPS * eps *
    scale`` of it (``eps`` of float32 for half and float32 scores, of float64 for float64;
    ``scale`` ``[...]`` is a bound on the dot products' terms, e.g. the norm of the row's
    query vector; ``None``: 1, for cosine similarities), so which of several identical tokens
    wins depends on the position, not on last-bit rounding. A row holding NaN picks its
    first NaN (as ``torch.max``); ``-inf`` entries never win unless all are ``-inf``.

    Three passes over the scores: their maximum, one comparison against the lowered
    maximum, and the first position that is not below it (``argmin`` of the comparison, which
    returns the first of equal values). NaN entries never compare below, so a row holding NaN
    (whose maximum is NaN, its threshold then ``+inf``) picks its first NaN.
    """
    best = scores.amax(dim=-1, keepdim=True)  # NaN propagates
    eps = torch.finfo(torch.promote_types(scores.dtype, torch.float32)).eps
    tol = TIE_ULPS * eps
    if scale is not None:
        tol = scale.unsqueeze(-1) * tol
    threshold = torch.where(best != best, math.inf, best - tol)  # [..., 1]
    # int32, not uint8: inductor's vectorised CPU argmin over uint8 returns wrong indices
    # (torch 2.14: all 0 for rows of 100 or more, out of range at 685; int32 is exact)
    return (scores < threshold).to(torch.int32).argmin(dim=-1)


def pair_scores(a: Tensor, b: Tensor, idx: Tensor) -> Tensor:
    """``sum(a[..., i, :] * b[..., idx[..., i], :])``: the score of each row of ``a`` ``[B, n,
    D]`` with its chosen row of ``b`` ``[B, m, D]`` (``idx`` ``[B, n]``), each computed by the
    same elementwise product and sum, so that identical pairs give bit-identical scores
    (unlike the entries of a matrix product)."""
    chosen = b.gather(1, idx.unsqueeze(-1).expand(-1, -1, b.shape[-1]))
    return (a * chosen).sum(dim=-1)


def merge_tokens(m: Matching, x: Tensor, mode: str = "sum") -> Tensor:
    """Apply a matching to ``x`` ``[B, N, ...]`` -> ``[B, N - r, ...]``.

    Each merged A token is reduced into its B partner with ``mode`` (``"sum"``, ``"amax"``,
    ``"mean"``: ``torch.scatter_reduce`` including the B token itself). Output order: the
    prefix tokens in their order, the unmerged A tokens, then the B tokens.
    """
    out = gather_tokens(x, m.keep)
    src = gather_tokens(x, m.src)
    idx = m.dst.reshape(m.dst.shape + (1,) * (x.dim() - 2)).expand(src.shape)
    if mode == "sum":
        return out.scatter_add_(1, idx, src)
    return out.scatter_reduce_(1, idx, src, reduce=mode, include_self=True)


def merge_wavg(m: Matching, x: Tensor, size: Optional[Tensor] = None
               ) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge (ToMe's ``merge_wavg``).

    A destination ``j`` that receives tokens ``i`` becomes ``(s_j x_j + sum_i s_i x_i) / S_j``
    with ``S_j = s_j + sum_i s_i``, computed as ``x_j + sum_i (s_i / S_j) (x_i - x_j)``: only the
    ``r`` merged rows are touched (the authors' form multiplies and divides every token by its
    size; here the one full pass is the gather of the kept tokens, and every token that takes
    part in no merge is copied bit for bit).

    Args:
        x: ``[B, N, C]`` tokens.
        size: ``[B, N]`` patches each token stands for; ``None`` = all ones.

    Returns:
        ``([B, N - r, C], [B, N - r])``: the merged tokens and their summed sizes.
    """
    out = gather_tokens(x, m.keep)
    x_src = gather_tokens(x, m.src)  # [B, r, C]
    if size is None:
        keep_size = x.new_ones(m.keep.shape)
        src_size = x.new_ones(m.src.shape)
    else:
        keep_size = size.gather(1, m.keep)
        src_size = size.gather(1, m.src)
    if torch.compiler.is_compiling():
        return _merge_wavg_by_rows(m, out, x_src, keep_size, src_size)
    new_size = keep_size.scatter_add(1, m.dst, src_size)
    coef = (src_size / new_size.gather(1, m.dst)).unsqueeze(-1)  # [B, r, 1]
    delta = (x_src - gather_tokens(out, m.dst)) * (coef if coef.dtype == x.dtype
                                                    else coef.to(x.dtype))
    return add_tokens_(out, m.dst, delta), new_size


def _merge_wavg_by_rows(m: Matching, out: Tensor, x_src: Tensor, keep_size: Tensor,
                        src_size: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`merge_wavg` for ``torch.compile``, where a scatter-add of the merged rows
    (``index_add_``, ``scatter_add``) becomes one atomic add per element on CPU (about 20 us
    per DeiT-S block at batch 1, more when many tokens merge into one).

    The merges into one destination are summed first: ``[B, r, r]`` "same destination" times
    the ``[B, r, C]`` deltas (one small matrix product), so each destination row is written
    once; then every output row reads its sum, if any, by an index (the first merge into it),
    a gather that inductor fuses with the next LayerNorm. Same result as the eager path up to
    the order of the additions (sizes: exact, they are whole numbers); a non-finite delta
    makes every merged row of its image non-finite here (``0 * inf`` in the product), where
    the eager path limits it to its destination row.
    """
    B, K = m.keep.shape
    r = m.src.shape[1]
    same = m.dst.unsqueeze(2) == m.dst.unsqueeze(1)  # [B, r, r]: into the same output row
    into = (same * src_size.unsqueeze(1)).sum(-1)  # [B, r]: size added to row dst[q]
    coef = src_size / (keep_size.gather(1, m.dst) + into)
    delta = (x_src - gather_tokens(out, m.dst)) * coef.unsqueeze(-1).to(out.dtype)
    with torch.autocast(out.device.type, enabled=False):  # keep the residual stream's dtype
        summed = same.to(out.dtype) @ delta  # [B, r, C]: all merges into row dst[q]
    # which[b, k]: the first merge into output row k (-1: none). Every merge into one row
    # writes that same index, so the scatter's result does not depend on its write order.
    first = torch.where(same, torch.arange(r, device=out.device), r).amin(-1)  # [B, r]
    which = torch.full((B, K), -1, dtype=first.dtype, device=out.device).scatter(1, m.dst, first)
    hit = which >= 0
    which = which.clamp(min=0)
    out = out + torch.where(hit.unsqueeze(-1), gather_tokens(summed, which), 0)
    return out, keep_size + torch.where(hit, into.gather(1, which), 0)


def merge_source(m: Matching, source: Tensor) -> Tensor:
    """Merge the ``[B, N, N0]`` 0/1 source map (union of the merged tokens' patches)."""
    return merge_tokens(m, source, "amax")


def merge_where(m: Matching, where: Tensor, n: int) -> Tensor:
    """Follow the ``[B, N0]`` index map (:attr:`leanvit.state.TokenState.where`) through a
    merge of ``n`` tokens: kept tokens go to their output row, merged ones to their partner's."""
    B = m.keep.shape[0]
    rows = torch.arange(m.keep.shape[1], device=m.keep.device).expand(B, -1)
    new_row = torch.full((B, n), -1, dtype=torch.long, device=m.keep.device)
    new_row.scatter_(1, m.keep, rows).scatter_(1, m.src, m.dst)
    return remap_where(where, new_row)
