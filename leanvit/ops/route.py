"""Per-token routing between two paths on a token map that keeps its layout (DynamicViT's
hierarchical extension, Rao et al., TPAMI, arXiv 2207.01580: slow/fast MLP paths).

Pure tensor functions, no modules. Shapes: ``B`` images, ``N`` tokens (positions of a
spatial map, flattened row-major), ``C`` channels.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from leanvit.ops.tokens import gather_tokens


def split_by_score(score: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """Token indices sorted by descending ``score`` ``[B, N]``, split after ``keep``:
    ``(kept [B, keep], rest [B, N - keep])`` (long). ``keep`` is clamped to ``[0, N]``.

    The authors rank with ``argsort(descending=True)``; ties are broken the same way for the
    slow and the fast set because both come from one ranking.
    """
    n = score.shape[1]
    keep = max(0, min(int(keep), n))
    order = torch.argsort(score, dim=1, descending=True)
    return order[:, :keep], order[:, keep:]


def scatter_tokens(kept: Tensor, y_kept: Tensor, rest: Tensor, y_rest: Tensor) -> Tensor:
    """The ``[B, N, C]`` map holding ``y_kept`` ``[B, K, C]`` at positions ``kept`` ``[B, K]``
    and ``y_rest`` ``[B, N - K, C]`` at ``rest`` (the two index sets partition ``0..N-1``)."""
    B, K = kept.shape
    n = K + rest.shape[1]
    ref = y_kept if K > 0 else y_rest
    out = ref.new_empty(B, n, ref.shape[-1])
    flat = out.view(B * n, ref.shape[-1])  # rows: index_copy_ instead of scatter_ with an
    offset = torch.arange(B, device=out.device).unsqueeze(1) * n  # index expanded over C
    if K > 0:
        flat.index_copy_(0, (kept + offset).reshape(-1), y_kept.reshape(B * K, -1))
    if rest.shape[1] > 0:
        flat.index_copy_(0, (rest + offset).reshape(-1),
                         y_rest.to(ref.dtype).reshape(B * rest.shape[1], -1))
    return out


def route(h: Tensor, kept: Tensor, rest: Tensor, slow: Callable[[Tensor], Tensor],
          fast: Callable[[Tensor], Tensor]) -> Tensor:
    """``slow`` on the tokens ``kept``, ``fast`` on the ``rest``, scattered back in place:
    ``h`` ``[B, N, C]`` -> ``[B, N, C']``. Each path runs only on its own tokens."""
    y_kept = slow(gather_tokens(h, kept))
    y_rest = fast(gather_tokens(h, rest))
    return scatter_tokens(kept, y_kept, rest, y_rest)


def mix(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """``a * mask + b * (1 - mask)``: per position, ``a`` where the (0/1, possibly
    straight-through) mask is 1, ``b`` where it is 0; ``mask`` broadcasts against ``a``."""
    return a * mask + b * (1 - mask)
