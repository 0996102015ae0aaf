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

from leanvit.state import gather_tokens


class Matching(NamedTuple):
    """Which tokens merge where; index tensors are positions *within* A and within B.

    Attributes:
        unm_idx: ``[B, nA - r]`` unmerged A tokens, ascending (so A's prefix tokens come first).
        src_idx: ``[B, r]`` A tokens that merge away, best match first.
        dst_idx: ``[B, r]`` the B token each of them merges into.
        prefix: number of protected prefix tokens (positions ``0..prefix-1``).
    """

    unm_idx: Tensor
    src_idx: Tensor
    dst_idx: Tensor
    prefix: int

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]


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
    """
    B, N, _ = metric.shape
    if not 0 < r <= max_merges(N, prefix):
        raise ValueError(f"r must be in [1, {max_merges(N, prefix)}] for {N} tokens with "
                         f"{prefix} protected, got {r}")
    with torch.no_grad():  # indices only: no gradient flows through the decision
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # [B, nA, nB] cosine similarities
        pa, pb = (prefix + 1) // 2, prefix // 2  # prefix tokens on each side
        if pa:
            scores[:, :pa, :] = -math.inf  # a protected A token never leaves
        if pb:
            scores[:, :, :pb] = -math.inf  # nothing merges into a protected B token
        node_max, node_idx = scores.max(dim=-1)  # each A token's best B partner
        edge_idx = node_max.argsort(dim=-1, descending=True)
        src_idx = edge_idx[:, :r]
        unm_idx = edge_idx[:, r:].sort(dim=-1).values
        dst_idx = node_idx.gather(1, src_idx)
    return Matching(unm_idx, src_idx, dst_idx, prefix)


def merge_tokens(m: Matching, x: Tensor, mode: str = "sum") -> Tensor:
    """Apply a matching to ``x`` ``[B, N, ...]`` -> ``[B, N - r, ...]``.

    Each merged A token is reduced into its B partner with ``mode`` (``"sum"``, ``"amax"``,
    ``"mean"``: ``torch.scatter_reduce`` including the B token itself). Output order: the
    prefix tokens in their order, the unmerged A tokens, then the B tokens.
    """
    a, b = x[:, ::2], x[:, 1::2]
    unm = gather_tokens(a, m.unm_idx)
    src = gather_tokens(a, m.src_idx)
    idx = m.dst_idx.reshape(m.dst_idx.shape + (1,) * (x.dim() - 2)).expand(src.shape)
    if mode == "sum":
        dst = b.scatter_add(1, idx, src)
    else:
        dst = b.scatter_reduce(1, idx, src, reduce=mode, include_self=True)
    pa, pb = (m.prefix + 1) // 2, m.prefix // 2
    if pb == 0:  # at most a class token: it is unm[:, 0] already
        return torch.cat([unm, dst], dim=1)
    # Prefix positions 0, 1, 2, ... alternate between A and B: restore their order.
    head = [(unm if j % 2 == 0 else dst)[:, j // 2: j // 2 + 1] for j in range(m.prefix)]
    return torch.cat(head + [unm[:, pa:], dst[:, pb:]], dim=1)


def merge_wavg(m: Matching, x: Tensor, size: Optional[Tensor] = None
               ) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge (ToMe's ``merge_wavg``).

    Args:
        x: ``[B, N, C]`` tokens.
        size: ``[B, N]`` patches each token stands for; ``None`` = all ones.

    Returns:
        ``([B, N - r, C], [B, N - r])``: merged tokens ``sum(size * x) / sum(size)`` and their
        summed sizes.
    """
    if size is None:
        size = x.new_ones(x.shape[:2])
        weighted = x  # all weights are 1: skip the multiply
    else:
        weighted = x * size.unsqueeze(-1)
    x = merge_tokens(m, weighted, "sum")
    size = merge_tokens(m, size, "sum")
    return x / size.unsqueeze(-1), size


def merge_source(m: Matching, source: Tensor) -> Tensor:
    """Merge the ``[B, N, N0]`` 0/1 source map (union of the merged tokens' patches)."""
    return merge_tokens(m, source, "amax")
