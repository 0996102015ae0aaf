"""Token merges given as an assignment: every input token goes to one output row.

The merges of PiToMe and MCTF are not one bipartite step (ToMe's :class:`~leanvit.ops.merge.
Matching`): MCTF's bidirectional fusion chains two steps (an A token into a B token that then
merges into another A token). Here any such merge is described by where each input token ends
up, and applied by one weighted segment sum. Pure tensor functions, static shapes (``N``, the
number of merges ``r``), no host synchronisation.

Shapes: ``B`` batch, ``N`` input tokens, ``K = N - r`` output tokens, ``C`` channels.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from leanvit.ops.tokens import add_tokens_, remap_where


class Assignment(NamedTuple):
    """Where each input token goes.

    Attributes:
        keep: ``[B, K]`` long, the input position that represents each output row (the
            destination its group merged into), in increasing position order, so prefix tokens
            stay in front in their order.
        group: ``[B, N]`` long, the output row of every input token (a representative's own
            row, a merged token's destination's row).
    """

    keep: Tensor
    group: Tensor


def assignment(rep: Tensor, n_out: int) -> Assignment:
    """The :class:`Assignment` of a representative map.

    Args:
        rep: ``[B, N]`` long, for each input position the position of the token it merges into
            (itself for the ``n_out`` tokens that stay); every representative must be its own
            representative (one step: no chains left to follow).
        n_out: ``K``, how many tokens stay (the same for every image).

    Output rows are the representatives in position order.
    """
    B, N = rep.shape
    pos = torch.arange(N, device=rep.device)
    is_rep = rep == pos
    # the K representatives by position: a stable sort puts them (key 0) first, in order
    keep = torch.sort((~is_rep).to(torch.uint8), dim=1, stable=True).indices[:, :n_out]
    row_of = torch.full((B, N), -1, dtype=torch.long, device=rep.device)
    row_of.scatter_(1, keep, torch.arange(n_out, device=rep.device).expand(B, n_out))
    return Assignment(keep, row_of.gather(1, rep))


def merge_weighted(a: Assignment, x: Tensor, weight: Tensor) -> Tensor:
    """Weighted average of each output row's group: ``[B, N, C]`` -> ``[B, K, C]``.

    Row ``k`` becomes ``sum_j w_j x_j / sum_j w_j`` over the input tokens ``j`` with
    ``group[j] = k``. ``weight`` ``[B, N]`` positive (ToMe-style: token sizes; MCTF: size times
    the attention the token receives). Summed in ``x``'s dtype.
    """
    B, K = a.keep.shape
    w = weight.to(x.dtype)
    num = add_tokens_(x.new_zeros(B, K, x.shape[2]), a.group, x * w.unsqueeze(-1))
    den = add_tokens_(w.new_zeros(B, K), a.group, w)
    return num / den.unsqueeze(-1)


def merge_sum(a: Assignment, t: Tensor) -> Tensor:
    """Sum of each output row's group, ``[B, N, ...]`` -> ``[B, K, ...]`` (token sizes; the
    ``[B, N, N0]`` 0/1 source map, where groups are disjoint so the sum is their union)."""
    B, K = a.keep.shape
    out = t.new_zeros((B, K) + t.shape[2:])
    return add_tokens_(out, a.group, t)


def merge_where_assigned(a: Assignment, where: Optional[Tensor]) -> Optional[Tensor]:
    """Follow the ``[B, N0]`` index map of dense features (``TokenState.where``) through the
    merge: every current row goes to its group's row."""
    return None if where is None else remap_where(where, a.group)
