"""Top-k token pruning by a per-token score, with optional fusion of the dropped tokens.

Shared by EViT (Liang et al., ICLR 2022; fusion on) and the plain class-attention top-k
baseline (fusion off). Prefix tokens (class, distillation, register) are never scored,
dropped or fused: they stay in front, in their order.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from leanvit.ops.tokens import gather_tokens


class TopK(NamedTuple):
    """Result of :func:`topk_prune`.

    Attributes:
        x: ``[B, prefix + keep (+ 1 if fused), C]`` the prefix tokens, the kept tokens in
            descending score order (as ``torch.topk(sorted=True)`` in the authors' code), and
            the fused token last when fusing.
        index: ``[B, prefix + keep]`` long, positions in the input of the prefix and kept tokens
            (what :meth:`~leanvit.state.TokenState.gather` takes).
        dropped: ``[B, N]`` bool, ``True`` at the input positions that were not kept.
        weights: ``[B, N]`` the fusion weights (the score at dropped positions, 0 elsewhere) or
            ``None`` without fusion.
    """

    x: Tensor
    index: Tensor
    dropped: Tensor
    weights: Optional[Tensor]


def num_kept(keep_rate: float, n_tokens: int, prefix: int) -> int:
    """Non-prefix tokens kept out of ``n_tokens - prefix``: ``ceil(keep_rate * (N - prefix))``.

    The float expression as in the EViT authors' code (``0.7 * 10`` is 7.000000000000001, so
    it keeps 8); never fewer than 1 when any non-prefix token exists.
    """
    n = n_tokens - prefix
    if n <= 0:
        return 0
    return max(1, min(n, math.ceil(keep_rate * n)))


def topk_prune(x: Tensor, scores: Tensor, prefix: int, keep: int, fuse: bool = False) -> TopK:
    """Keep the ``keep`` highest-scoring non-prefix tokens; optionally fuse the rest into one.

    Args:
        x: ``[B, N, C]`` tokens.
        scores: ``[B, N]`` per-token scores (EViT: head-averaged class-token attention); only
            ``scores[:, prefix:]`` is read for selection.
        prefix: number of leading tokens always kept, in order.
        keep: how many non-prefix tokens to keep (see :func:`num_kept`), ``<= N - prefix``.
        fuse: append one token ``sum_j scores[j] * x[j]`` over the dropped tokens ``j``, with the
            raw (not renormalised) scores, as the EViT authors do.

    Returns:
        :class:`TopK`. Shapes depend only on ``N``, ``prefix`` and ``keep`` (static shapes for
        ``torch.compile``).
    """
    B, N, _ = x.shape
    if not 0 <= keep <= N - prefix:
        raise ValueError(f"keep must be in [0, {N - prefix}], got {keep}")
    kept = scores[:, prefix:].topk(keep, dim=1, largest=True, sorted=True).indices + prefix
    if prefix:
        head = torch.arange(prefix, device=x.device).expand(B, prefix)
        index = torch.cat([head, kept], dim=1)
    else:
        index = kept
    # The complement as a mask (scatter), not as indices: fusion needs no gather of it.
    dropped = torch.ones(B, N, dtype=torch.bool, device=x.device).scatter(1, index, False)
    out = gather_tokens(x, index)
    weights = None
    if fuse:
        # Weighted sum over the dropped tokens as one batched [1, N] x [N, C] product: no gather
        # of the dropped tokens (the kept and prefix positions simply get weight 0).
        weights = scores.masked_fill(~dropped, 0.0).to(x.dtype)
        fused = weights.unsqueeze(1) @ x  # [B, 1, C]
        out = torch.cat([out, fused], dim=1)
    return TopK(out, index, dropped, weights)
