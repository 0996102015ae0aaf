"""Packed token batches: the real tokens of a padded batch laid end to end, and attention that
stays inside each image.

A padded batch ``[B, N, C]`` with a padding mask ``valid`` ``[B, N]`` (per-image token counts,
e.g. ATS) spends every per-token operation on its padding too. Packed, the same tokens are
``[T, C]`` (``T`` = the real tokens of the whole batch, image after image, each image's tokens
in their padded order), so linear layers, norms and the MLP run on real tokens only. The
attention stays block-diagonal (each image's queries see that image's keys only): the
engine pads q, k, v back (:func:`pad_heads`) for one masked SDPA over the batch, which on a
CPU measured faster than one call per image (``docs/ats.md``).

Pure functions of tensors (no :class:`~leanvit.state.TokenState`). Shapes: ``B`` batch, ``N``
padded width, ``T`` packed tokens, ``H`` heads, ``D`` head width.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


def check_packed(mode: object) -> object:
    """``mode`` if it is a value of the ``packed`` option (``"auto"``, ``True``, ``False``),
    else a one-line ``ValueError``."""
    if not (mode is True or mode is False or (isinstance(mode, str) and mode == "auto")):
        raise ValueError(f"packed must be 'auto', True or False, got {mode!r}")
    return mode


class Packing(NamedTuple):
    """Where the packed tokens sit in the padded ``[B, N]`` layout.

    Attributes:
        index: ``[T]`` long, the flat row ``b * N + j`` of each packed token; ``None`` when no
            row is padding (``T = B * N``: packing is a reshape).
        counts: ``[B]`` long, real tokens per image.
        sizes: ``counts`` on the host (a tuple of ints), to slice the images apart.
        batch: ``B``; ``width``: ``N``.
    """

    index: Optional[Tensor]
    counts: Tensor
    sizes: tuple
    batch: int
    width: int

    @property
    def total(self) -> int:
        """``T``, the packed tokens."""
        return sum(self.sizes)

    @property
    def pad_share(self) -> float:
        """Share of the padded layout's ``B * N`` rows that are padding (no host sync)."""
        return 1.0 - self.total / max(self.batch * self.width, 1)

    @property
    def uniform(self) -> bool:
        """Whether every image has ``N`` real tokens (no padding)."""
        return self.index is None


def packing(valid: Optional[Tensor], batch: int, width: int, device=None) -> Packing:
    """The :class:`Packing` of a ``[batch, width]`` layout whose real rows ``valid`` marks
    (``[B, N]`` bool; ``None``: all real). One host sync (the counts) when ``valid`` is set."""
    if valid is None:
        counts = torch.full((batch,), width, dtype=torch.long, device=device)
        return Packing(None, counts, (width,) * batch, batch, width)
    counts = valid.sum(1)
    index = valid.reshape(-1).nonzero().squeeze(1)
    return Packing(index, counts, tuple(counts.tolist()), batch, width)


def pad_fraction(valid: Tensor) -> float:
    """Share of the rows of a padded ``[B, N]`` layout that are padding (host sync)."""
    return 1.0 - float(valid.sum()) / max(valid.numel(), 1)


def pack(x: Tensor, pk: Packing) -> Tensor:
    """The real rows of ``x`` ``[B, N, ...]`` in packed order, ``[T, ...]``."""
    flat = x.reshape((pk.batch * pk.width,) + x.shape[2:])
    return flat if pk.index is None else flat.index_select(0, pk.index)


def unpack(xp: Tensor, pk: Packing) -> Tensor:
    """``xp`` ``[T, ...]`` back in the padded layout ``[B, N, ...]``; padding rows are 0."""
    shape = (pk.batch, pk.width) + xp.shape[1:]
    if pk.index is None:
        return xp.reshape(shape)
    out = xp.new_zeros((pk.batch * pk.width,) + xp.shape[1:])
    return out.index_copy_(0, pk.index, xp).view(shape)


def pad_heads(t: Tensor, pk: Packing) -> Tensor:
    """Per-head packed ``t`` ``[1, H, T, D]`` -> padded ``[B, H, N, D]`` (padding rows 0)."""
    return unpack(t[0].transpose(0, 1), pk).transpose(1, 2)


def moved_rows(old: Packing, rows: Tensor, new: Packing) -> Tensor:
    """Which packed token of ``old`` each packed token of ``new`` is, ``[T']`` long, when the
    padded layout was gathered by ``rows`` ``[B, K]`` (``new[b, j] = old[b, rows[b, j]]``,
    e.g. ATS's query rows)."""
    flat = rows + torch.arange(old.batch, device=rows.device)[:, None] * old.width
    if old.index is not None:  # padded row -> packed row
        lut = torch.zeros(old.batch * old.width, dtype=torch.long, device=rows.device)
        lut.index_copy_(0, old.index, torch.arange(old.index.numel(), device=rows.device))
        flat = lut[flat]
    flat = flat.reshape(-1)
    return flat if new.index is None else flat.index_select(0, new.index)
