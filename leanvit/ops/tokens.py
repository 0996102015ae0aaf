"""Tensor helpers over token sequences: gather, scatter-add and the index map of the original
tokens.

Pure functions of tensors (no :class:`~leanvit.state.TokenState`); shapes: ``B`` batch, ``N``
tokens currently present, ``K`` tokens selected, ``N0`` tokens at the first block.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _flat_rows(index: Tensor, n: int) -> Tensor:
    """``[B, K]`` token indices into ``N = n`` tokens -> ``[B * K]`` row indices of the
    ``[B * N, ...]`` flattened tensor."""
    if index.shape[0] == 1:  # one image (batch-1 latency): no offsets to add
        return index.reshape(-1)
    offset = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * n
    return (index + offset).reshape(-1)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, k]]`` for ``x`` of shape ``[B, N, ...]`` and ``index`` ``[B, K]``.

    A contiguous ``x`` is read as ``[B * N, ...]`` rows with one ``index_select`` (it reads
    one index per row, where ``gather`` with an index expanded over the channels reads one per
    element; timings in ``docs/gpu.md``); others (e.g. an expanded ``source`` map) use
    ``gather``, which reads them without a copy. Same values either way.
    """
    if x.dim() >= 2 and x.is_contiguous():
        B, N = x.shape[:2]
        rows = x.reshape((B * N,) + x.shape[2:]).index_select(0, _flat_rows(index, N))
        return rows.reshape(index.shape + x.shape[2:])
    shape = index.shape + x.shape[2:]
    idx = index.reshape(index.shape + (1,) * (x.dim() - 2)).expand(shape)
    return x.gather(1, idx)


def add_tokens_(out: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """``out[b, index[b, k]] += src[b, k]`` in place (repeated indices accumulate), for
    ``out`` ``[B, N, ...]`` contiguous, ``index`` ``[B, K]``, ``src`` ``[B, K, ...]``; returns
    ``out``. One ``index_add_`` on the flattened rows (the counterpart of
    :func:`gather_tokens`; ``scatter_add_`` with an expanded index is as slow as ``gather``)."""
    B, N = out.shape[:2]
    flat = out.view((B * N,) + out.shape[2:])
    src = src.reshape((-1,) + src.shape[2:])
    flat.index_add_(0, _flat_rows(index, N), src if src.dtype == out.dtype else src.to(out.dtype))
    return out


def gather_rows(index: Tensor, n: int) -> Tensor:
    """Where each input row goes under a gather by ``index`` ``[B, K]``: ``[B, n]`` long, the
    output row of input row ``j`` (``-1`` for rows not gathered).

    ``n`` is any bound above the input's token count (the rows are scattered, not counted:
    no host sync); :meth:`leanvit.state.TokenState.gather` passes ``n0 + K``, since tokens are only ever
    removed (EViT appends one fused token while it removes at least one).
    """
    B, K = index.shape
    rows = torch.arange(K, device=index.device).expand(B, K)
    return torch.full((B, n), -1, dtype=torch.long, device=index.device).scatter_(1, index, rows)


def remap_where(where: Tensor, new_row: Tensor) -> Tensor:
    """Follow the ``[B, N0]`` index map through one gather or merge.

    Args:
        where: ``[B, N0]`` long, the current row of each original token (``-1``: left).
        new_row: ``[B, n]`` long, the row each current row becomes (``-1``: removed); ``n``
            at least the current token count.

    Returns:
        ``[B, N0]`` long; an original token that had left stays at ``-1``.
    """
    return new_row.gather(1, where.clamp_min(0)).masked_fill_(where < 0, -1)
