"""Per-forward token state.

A :class:`TokenState` is created fresh at the start of every forward pass and travels with
the hidden states ``x`` from block to block. Methods return a new state when they change the
token set; nothing is shared between forward passes or stored on modules.

Shapes: ``B`` batch, ``N`` tokens currently present (prefix tokens included), ``N0`` tokens
at the first block.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from leanvit.ops.tokens import gather_rows, gather_tokens, remap_where
from leanvit.recorder import MacRecorder


@dataclass
class TokenState:
    """What a forward pass knows about its tokens besides their features.

    Attributes:
        prefix: number of prefix tokens (class, distillation, register tokens) at the front of
            the sequence; never pruned or merged.
        n0: number of tokens entering the first block (prefix included).
        size: ``[B, N]`` float, how many original patches each token stands for; ``None``
            means every token has size 1 (nothing merged yet).
        source: ``[B, N, N0]`` 0/1 float, which original tokens each token holds; only kept
            when a method traces sources (visualisation).
        valid: ``[B, N]`` bool, ``False`` marks padding (batch-variable token counts); ``None``
            means every token is real.
        mask: ``[B, N]`` float in [0, 1], a soft keep-mask used while training (DynamicViT,
            DiffRate search): tokens stay in place and dropped keys are masked out of the
            attention (:func:`leanvit.ops.attention.masked_softmax`). ``None`` in inference.
        prop_attn: add ``log(size)`` to the attention logits of each key (proportional
            attention, ToMe).
        recorder: a :class:`~leanvit.recorder.MacRecorder` while MACs are being counted.
        aux: side outputs of the method for training losses and inspection, an immutable
            tuple of ``(name, tensor)`` pairs that hooks extend with
            ``state.replace(aux=state.aux + ((name, t),))`` (e.g. DynamicViT's per-stage keep
            decisions ``[B, N0 - prefix]``). Not per-token: :meth:`gather` leaves it as it is.
        where: ``[B, N0]`` long, only while dense features are traced
            (:func:`leanvit.dense_features`): the row of the current token that holds each
            original token, ``-1`` once it has left the sequence (pruned, or fused into a token
            that holds no patch of its own). An index map, updated by :meth:`gather` and by
            every merge (:func:`leanvit.ops.tokens.remap_where`); the cheap replacement of ``source`` for this use.
        left: features of the tokens that left, recorded with :func:`record_departures` when
            ``where`` is traced: a tuple of ``(flat index [D] into B * N0, features [D, C])``
            pairs, one per hook that removed tokens.
        positions: ``[B, N]`` long, the original index (``0 .. N0-1``, prefix included) of the
            position each token takes in position-dependent attention; ``None`` while every
            token is still at its own index (nothing gathered yet). :meth:`gather` fills it, so
            kept tokens keep their positions; a merged token keeps its destination's (ToMe,
            DiffRate: :meth:`merged_positions`); EViT's fused token takes index 0, the class
            token's position, since a token fused from all over the image has no one position.
            Backbones with a relative position bias (timm ``Beit``) look up their bias rows and
            columns by it (``docs/beit.md``); others ignore it.
        rope: ``[N0, R]`` (or ``[B, N0, R]`` when it differs per image) the rotary position
            table of a backbone with rotary positions (timm ``Eva``: ``R = 2 * head_dim``,
            timm's ``sin | cos``), one row per ORIGINAL index, the prefix rows the identity
            rotation (sin 0, cos 1). Not per-token: constant through the forward pass; each
            token's rotation is the row at its :attr:`positions` (so the rules above give a
            merged token its destination's rotation and EViT's fused token none, like the class
            token); ``None`` for other backbones.
    """

    prefix: int
    n0: int
    size: Optional[Tensor] = None
    source: Optional[Tensor] = None
    valid: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    prop_attn: bool = False
    recorder: Optional[MacRecorder] = None
    aux: tuple = ()
    where: Optional[Tensor] = None
    left: tuple = ()
    positions: Optional[Tensor] = None
    rope: Optional[Tensor] = None

    def replace(self, **changes) -> "TokenState":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def gather(self, index: Tensor) -> "TokenState":
        """Keep the tokens at ``index`` (``[B, K]`` long) in every per-token field."""
        return self.replace(
            size=None if self.size is None else self.size.gather(1, index),
            source=None if self.source is None else gather_tokens(self.source, index),
            valid=None if self.valid is None else self.valid.gather(1, index),
            mask=None if self.mask is None else self.mask.gather(1, index),
            where=None if self.where is None else remap_where(
                self.where, gather_rows(index, self.n0 + index.shape[1])),
            positions=self.merged_positions(index),
        )

    def merged_positions(self, index: Tensor) -> Tensor:
        """:attr:`positions` of the tokens at ``index`` (``[B, K]`` long): what a gather, or a
        merge whose output rows are the input rows ``index`` (ToMe's ``keep``, DiffRate's
        first ``k``) with the merged tokens folded into them, leaves."""
        if self.positions is None:
            return index
        return self.positions.gather(1, index)

    def aux_values(self, name: str) -> list[Tensor]:
        """The tensors recorded in :attr:`aux` under ``name``, in the order they were added."""
        return [t for n, t in self.aux if n == name]

    def sizes_like(self, x: Tensor) -> Tensor:
        """``size`` as a ``[B, N]`` tensor in ``x``'s dtype (ones when nothing is merged)."""
        if self.size is None:
            return x.new_ones(x.shape[:2])
        return self.size.to(x.dtype)

    def token_counts(self, x: Tensor) -> Tensor:
        """Real (non-padding) tokens per image, ``[B]`` float."""
        if self.valid is None:
            return torch.full((x.shape[0],), float(x.shape[1]))
        return self.valid.sum(1).float()


def attention_bias(state: TokenState, dtype: torch.dtype) -> Optional[Tensor]:
    """Additive attention bias over keys, ``[B, 1, 1, N]``, or ``None`` when there is none.

    ``log(size)`` when proportional attention is on and tokens were merged (ToMe, Bolya et
    al. 2023, eq. 1), and ``-inf`` at padding positions.
    """
    bias = None
    if state.prop_attn and state.size is not None:
        size = state.size if state.size.dtype == dtype else state.size.to(dtype)
        bias = size.log().reshape(size.shape[0], 1, 1, size.shape[1])
    if state.valid is not None:
        pad = torch.zeros(state.valid.shape, dtype=dtype, device=state.valid.device)
        pad = pad.masked_fill(~state.valid, float("-inf"))[:, None, None, :]
        bias = pad if bias is None else bias + pad
    return bias


def record_departures(x: Tensor, before: TokenState, after: TokenState) -> TokenState:
    """``after`` with the features of the original tokens that one hook removed.

    Args:
        x: ``[B, N, C]`` the tokens the hook received (their features when they left).
        before: the state the hook received; ``after``: the state it returned.

    A token counts as present while ``where >= 0`` and its row is not padding (``valid``,
    ATS); in ``after``, ``where`` is set to ``-1`` wherever it is not present, so that a later
    gather cannot bring it back. Returns ``after`` unchanged when ``where`` is not traced. One
    host sync (how many tokens left) per hook call; the copy is of those ``D`` rows only.
    """
    if after.where is None or before.where is None:
        return after
    was = present(before)
    now = present(after)
    gone = was & ~now
    b, p = gone.nonzero(as_tuple=True)
    where = after.where.masked_fill(~now, -1)
    if b.numel() == 0:
        return after.replace(where=where)
    feats = x[b, before.where[b, p]]  # [D, C]
    return after.replace(where=where, left=after.left + ((b * before.n0 + p, feats),))


def present(state: TokenState) -> Tensor:
    """``[B, N0]`` bool: which original tokens are still held by a real (non-padding) token."""
    ok = state.where >= 0
    if state.valid is not None:
        ok = ok & state.valid.gather(1, state.where.clamp_min(0))
    return ok
