"""Cheap statistics of a block's attention that token methods read.

Computed lazily from the ``q``, ``k``, ``v`` the attention already has, so a method pays only
for what it reads and the main attention stays fused (SDPA). The class-token attention row is
one query: ``softmax(q_cls k^T / sqrt(d) + bias)``, ``O(N C)`` instead of ``O(N^2 C)``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from leanvit.ops.attention import attention


class Signals:
    """Lazily computed attention statistics of one block.

    Args:
        q, k, v: ``[B, H, N, D]`` after q/k normalisation (what the attention uses).
        scale: the attention's softmax scale (``D ** -0.5`` in timm).
        bias: additive attention bias ``[B, 1, 1, N]`` or ``None``.

    ``macs`` counts the multiply-accumulates spent so far, per image.
    """

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Optional[Tensor]):
        self.q, self.k, self.v, self.scale, self.bias = q, k, v, scale, bias
        self.macs = 0
        # Computed on first read. Plain attributes rather than functools.cached_property,
        # whose lock torch.compile cannot trace (it would break the graph in every block).
        self._cls_attn_heads: Optional[Tensor] = None
        self._cls_attn: Optional[Tensor] = None
        self._keys: Optional[Tensor] = None
        self._value_norm: Optional[Tensor] = None
        self._attn_received: Optional[Tensor] = None
        #: the whole map; the engine fills it from the block's own attention when the method
        #: asks for it (Reducer.needs_attention_map), so reading it then costs nothing
        self._attn: Optional[Tensor] = None
        #: the method's per-image statistic of the map, ``[B, ...]``, when it reads the map
        #: chunk by chunk (``Reducer.reads_map``: the engine fills it, the whole map is then
        #: never kept); ``None`` otherwise
        self.map_read: Optional[Tensor] = None

    @property
    def num_tokens(self) -> int:
        return self.k.shape[2]

    @property
    def cls_attn_heads(self) -> Tensor:
        """Post-softmax attention row of the class-token query, ``[B, H, N]``, at least float32
        (all keys)."""
        if self._cls_attn_heads is not None:
            return self._cls_attn_heads
        # in at least float32 (one query row: cheap), as autocast runs softmax: in bf16 the
        # probabilities of ~200 tokens keep 2-3 significant digits and rankings tie
        dtype = torch.promote_types(self.q.dtype, torch.float32)  # float64 stays float64
        _, weights = attention(self.q[:, :, :1].to(dtype), self.k.to(dtype), None, self.scale,
                               bias=self.bias, return_weights=True)  # [B, H, 1, N]
        self.macs += self.k.shape[1] * self.k.shape[3] * self.num_tokens
        self._cls_attn_heads = weights.squeeze(2)
        return self._cls_attn_heads

    @property
    def cls_attn(self) -> Tensor:
        """Class-token attention averaged over heads, ``[B, N]``, at least float32 (EViT,
        DiffRate, top-k)."""
        if self._cls_attn is None:
            self._cls_attn = self.cls_attn_heads.mean(dim=1)
        return self._cls_attn

    @property
    def keys(self) -> Tensor:
        """Keys averaged over heads, ``[B, N, D]`` (ToMe's matching metric)."""
        if self._keys is None:
            k = self.k
            if k.dtype in (torch.float32, torch.float64) and k.shape[1] > 1:
                # the heads added one after the other (``k.mean(1)`` up to rounding, equal bit
                # for bit at DeiT-S's shapes): 2.5x faster than the strided reduction on the
                # CPU, where ``k`` is a view into the block's qkv output
                acc = k[:, 0] + k[:, 1]
                for h in range(2, k.shape[1]):
                    acc += k[:, h]
                self._keys = acc.div_(k.shape[1])
            else:  # half precision: mean accumulates in float32
                self._keys = k.mean(dim=1)
        return self._keys

    @property
    def value_norm(self) -> Tensor:
        """L2 norm of each token's value vector, all heads concatenated, ``[B, N]`` (ATS)."""
        if self._value_norm is None:
            B, H, N, D = self.v.shape
            self.macs += H * D * N
            self._value_norm = torch.linalg.vector_norm(
                self.v.transpose(1, 2).reshape(B, N, H * D), dim=-1)
        return self._value_norm

    # -- the full attention map (Zero-TPrune's attention graph) ---------------------------------
    #: The additive logit bias of EVERY query row, where it differs from :attr:`bias` (a bias
    #: per query and key, e.g. BEiT's relative position bias): a tensor broadcastable to
    #: ``[B, H, N, N]`` or a sequence of them, added in order, or a function of no argument
    #: that returns them (looked up only when the map is formed here). ``None``: :attr:`bias`
    #: is a bias per key and applies to every row. Set by the adapter after construction.
    full_bias = None

    @property
    def attn(self) -> Tensor:
        """Post-softmax attention map of every query, ``[B, H, N, N]``, at least float32 (all
        keys; rows sum to 1): the attention graph Zero-TPrune ranks tokens on. Free when the
        engine filled it from the block's own explicit attention (the method's
        ``needs_attention_map``); otherwise ``q k^T`` once more (``O(N^2 C)``, counted), since
        the main attention stays fused and keeps no map."""
        if self._attn is not None:
            return self._attn
        dtype = torch.promote_types(self.q.dtype, torch.float32)
        bias = self.bias if self.full_bias is None else self.full_bias
        if callable(bias):  # looked up on demand (a bias per image and query row)
            bias = bias()
        if isinstance(bias, Tensor):
            bias = bias.to(dtype)
        elif bias is not None:
            bias = [b.to(dtype) for b in bias if b is not None]
        _, weights = attention(self.q.to(dtype), self.k.to(dtype), None, self.scale,
                               bias=bias, return_weights=True)  # [B, H, N, N]
        self.macs += self.k.shape[1] * self.k.shape[3] * self.num_tokens * self.q.shape[2]
        self._attn = weights
        return weights

    @property
    def attn_received(self) -> Tensor:
        """Attention each token receives, ``[B, N]``, at least float32: the post-softmax map
        (:attr:`attn`) averaged over heads and over ALL query rows (MCTF's informativeness,
        ``attn.mean(dim=[1, 2])`` in the authors' code).

        Reads the whole ``[B, H, N, N]`` map (:attr:`attn`: free when the engine handed over
        the block's own map, else one more ``q k^T`` product, counted).
        """
        if self._attn_received is None:
            self._attn_received = self.attn.mean(dim=(1, 2))
        return self._attn_received

