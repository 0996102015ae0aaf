"""hMHSA and cFFN modules (Xu et al., arXiv 2306.10875), one attention class per backbone family.

- :class:`MixHallucination` / :class:`DWConvHallucination`: the cheap operation generating the
  hallucinated heads' logits from the computed heads' logits (:mod:`leanvit.ops.hallucinate`).
- :class:`HallucinatedAttention`: the family-independent part (head split, materialised maps,
  MACs); :class:`ViTHallucinatedAttention`, :class:`PvtHallucinatedAttention`,
  :class:`NextVitHallucinatedAttention` keep their timm originals' submodule names and
  ``forward`` signatures, with query/key projections for the computed heads only.
- :class:`RepLinear` and :class:`CompactProjection`: cFFN's factorised hidden-to-output
  projection with ``branches`` parallel linear+BatchNorm branches per factor (RepVGG-style),
  merged into plain layers by :meth:`CompactProjection.reparameterize_`.
"""
from __future__ import annotations

from functools import cached_property
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from leanvit.ops.attention import attention, attention_logits
from leanvit.ops.hallucinate import (dwconv_logits, fuse_linear_bn, hallucinated_attention,
                                     mix_logits, split_heads)
from leanvit.signals import Signals

HALLUCINATIONS = ("mix", "dwconv")


# --------------------------------------------------------------------------------------------
# The cheap operations


class MixHallucination(nn.Module):
    """Hallucinated logits as learned mixtures across the computed heads' logits.

    ``weight`` ``[Hh, Hc]`` starts as a copy (hallucinated head ``j`` = computed head ``j``),
    so an untrained compacted model starts from duplicated maps and learns to diverge. Acts
    row by row (exact under query selection). ``Hh * Hc * Nq * Nk`` MACs per image.
    """

    context_rows = 0  # rows of the map each output row depends on, beyond itself

    def __init__(self, computed: int, hallucinated: int):
        super().__init__()
        w = torch.zeros(hallucinated, computed)
        w[torch.arange(hallucinated), torch.arange(hallucinated)] = 1.0
        self.weight = nn.Parameter(w)

    def forward(self, logits: Tensor) -> Tensor:
        return mix_logits(logits, self.weight)

    def macs(self, n_q, n_kv):
        return self.weight.numel() * n_q * n_kv


class DWConvHallucination(nn.Module):
    """Hallucinated logits by a depthwise ``k x k`` convolution of computed head ``j``'s map
    (GhostNet's cheap operation on ``Nq x Nk`` maps). Starts as a copy (centred delta kernel).
    ``Hh * k^2 * Nq * Nk`` MACs per image; default ``k = 3`` (GhostNet's ``dw_size``)."""

    def __init__(self, computed: int, hallucinated: int, kernel_size: int = 3):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
        w = torch.zeros(hallucinated, 1, kernel_size, kernel_size)
        w[:, :, kernel_size // 2, kernel_size // 2] = 1.0
        self.weight = nn.Parameter(w)
        self.context_rows = kernel_size // 2

    def forward(self, logits: Tensor) -> Tensor:
        return dwconv_logits(logits, self.weight)

    def macs(self, n_q, n_kv):
        return self.weight.numel() * n_q * n_kv


def make_hallucination(kind: str, computed: int, hallucinated: int, kernel_size: int = 3
                       ) -> nn.Module:
    if kind == "mix":
        return MixHallucination(computed, hallucinated)
    if kind == "dwconv":
        return DWConvHallucination(computed, hallucinated, kernel_size)
    raise ValueError(f"hallucination must be one of {', '.join(HALLUCINATIONS)}, got {kind!r}")


# --------------------------------------------------------------------------------------------
# Attention


class HallucinatedSignals(Signals):
    """:class:`~leanvit.signals.Signals` of an hMHSA block.

    ``q``/``k`` hold the computed heads only; the class-token row of every head, hallucinated
    ones included, is rebuilt from the first ``1 + context_rows`` query rows (exact: zero
    padding means row 0 of a ``k x k`` convolution sees rows ``0 .. k//2`` only). ``keys``
    averages the computed heads' keys (the hallucinated heads have none).
    """

    def __init__(self, q, k, v, scale, bias, hallucinate: Optional[nn.Module]):
        super().__init__(q, k, v, scale, bias)
        self.hallucinate = hallucinate

    @cached_property
    def cls_attn_heads(self) -> Tensor:
        ctx = 0 if self.hallucinate is None else self.hallucinate.context_rows
        rows = min(1 + ctx, self.q.shape[2])
        logits = attention_logits(self.q[:, :, :rows], self.k, self.scale)
        self.macs += self.k.shape[1] * self.k.shape[3] * self.num_tokens * rows
        if self.hallucinate is not None:
            logits = torch.cat([logits, self.hallucinate(logits)], dim=1)
            self.macs += float(self.hallucinate.macs(rows, self.num_tokens))
        logits = logits[:, :, :1]
        if self.bias is not None:
            logits = logits + self.bias
        return logits.softmax(dim=-1).squeeze(2)


class HallucinatedAttention(nn.Module):
    """Family-independent part of hMHSA.

    ``num_heads`` heads, ``computed_heads = ceil(H/2)`` of which compute ``q k^T`` maps and
    ``hallucinated_heads = floor(H/2)`` of which get theirs from ``self.hallucinate``. All
    heads keep their own values. With one head nothing is hallucinated (plain attention, fused
    SDPA); otherwise maps are materialised (the cost is in :meth:`attention_macs`).
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float, hallucination: str,
                 kernel_size: int, attn_drop: float, fused_attn: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.computed_heads, self.hallucinated_heads = split_heads(num_heads)
        self.hallucination = hallucination
        self.fused_attn = fused_attn
        self.hallucinate = (make_hallucination(hallucination, self.computed_heads,
                                               self.hallucinated_heads, kernel_size)
                            if self.hallucinated_heads else None)
        self.attn_drop = nn.Dropout(attn_drop)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None,
               keep: Optional[Tensor] = None, rows: Optional[Tensor] = None) -> Tensor:
        """``q``/``k`` ``[B, Hc, N*, D]``, ``v`` ``[B, H, Nk, D]`` -> ``[B, H, Nq', D]``."""
        if self.hallucinate is None:  # one head: plain attention (fused where it can be)
            return attention(q, k, v, self.scale, bias=bias, keep=keep, rows=rows,
                             fused=self.fused_attn, dropout=self.attn_drop)
        row_wise = self.hallucinate is None or self.hallucinate.context_rows == 0
        return hallucinated_attention(q, k, v, self.scale, self.hallucinate, bias=bias,
                                      keep=keep, dropout=self.attn_drop, rows=rows,
                                      row_wise=row_wise)

    @torch.no_grad()
    def attention_maps(self, q: Tensor, k: Tensor) -> Tensor:
        """Post-softmax maps of all heads ``[B, H, Nq, Nk]`` (for analysis)."""
        logits = attention_logits(q, k, self.scale)
        if self.hallucinate is not None:
            logits = torch.cat([logits, self.hallucinate(logits)], dim=1)
        return logits.softmax(-1)

    def attention_macs(self, n_q, n_kv, n_map=None):
        """MACs per image of the maps and the value weighting (projections excluded):
        ``Hc D Nm Nk`` (``q k^T``) + the cheap operation on ``Nm x Nk`` maps + ``H D Nq Nk``
        (``attn @ v``); ``Nm`` = rows of the maps computed (``n_map``, default ``n_q``)."""
        d = self.head_dim
        n_map = n_q if n_map is None else n_map
        m = self.computed_heads * d * n_map * n_kv + self.num_heads * d * n_q * n_kv
        if self.hallucinate is not None:
            m = m + self.hallucinate.macs(n_map, n_kv)
        return m


def _rows(linear: nn.Linear, idx: Sequence[int], head_dim: int) -> tuple[Tensor, Optional[Tensor]]:
    """Weight rows (and bias entries) of the heads ``idx`` of a per-head output projection."""
    sel = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in idx])
    w = linear.weight.detach()[sel]
    b = None if linear.bias is None else linear.bias.detach()[sel]
    return w, b


def _load_rows(dst: nn.Linear, parts: list[tuple[Tensor, Optional[Tensor]]]) -> None:
    with torch.no_grad():
        dst.weight.copy_(torch.cat([w for w, _ in parts]))
        if dst.bias is not None:
            dst.bias.copy_(torch.cat([b for _, b in parts]))


def _permute_in(linear: nn.Linear, order: Sequence[int], head_dim: int) -> nn.Linear:
    """``linear`` with its input columns reordered head-wise (for the output projection)."""
    sel = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in order])
    with torch.no_grad():
        linear.weight.copy_(linear.weight[:, sel])
    return linear


def _permute_channels(module: nn.Module, order: Sequence[int], head_dim: int) -> nn.Module:
    """Reorder per-channel affine parameters (a scale-norm over the heads' channels)."""
    sel = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in order])
    with torch.no_grad():
        for p in (getattr(module, "weight", None), getattr(module, "bias", None)):
            if isinstance(p, Tensor) and p.dim() == 1 and p.shape[0] == sel.shape[0]:
                p.copy_(p[sel])
    return module


def head_order(num_heads: int, computed: Optional[Sequence[int]]) -> list[int]:
    """Heads in the compacted module's order: the computed ones first (in the given order),
    then the hallucinated ones (ascending). ``computed=None``: the first ``ceil(H/2)``."""
    n_c, _ = split_heads(num_heads)
    computed = list(range(n_c)) if computed is None else list(computed)
    if len(computed) != n_c or len(set(computed)) != n_c or not all(
            0 <= h < num_heads for h in computed):
        raise ValueError(f"computed heads must be {n_c} distinct indices < {num_heads}, "
                         f"got {computed}")
    return computed + [h for h in range(num_heads) if h not in computed]


class ViTHallucinatedAttention(HallucinatedAttention):
    """hMHSA for timm's ViT ``Attention``: ``qkv`` projects to ``[q_c, k_c, v]`` (computed
    heads' queries and keys, all heads' values), ``(2 Hc + H) D`` outputs instead of ``3 H D``.

    Also the leanvit ViT adapter's attention contract: :meth:`leanvit_forward` (with attention
    bias, training keep-mask and query selection) and :meth:`leanvit_macs`.
    """

    def __init__(self, src: nn.Module, hallucination: str = "mix", kernel_size: int = 3,
                 computed: Optional[Sequence[int]] = None):
        """Built from a timm ``Attention`` ``src``, copying its weights; ``computed``: the
        original heads that keep their q/k projections (default the first ``ceil(H/2)``)."""
        H, D = src.num_heads, src.head_dim
        super().__init__(H, D, src.scale, hallucination, kernel_size, src.attn_drop.p,
                         src.fused_attn)
        order = head_order(H, computed)
        self.head_order = order
        self.attn_dim = H * D
        dim = src.qkv.in_features
        Hc = self.computed_heads
        self.qkv = nn.Linear(dim, (2 * Hc + H) * D, bias=src.qkv.bias is not None)
        self.qkv.to(src.qkv.weight)
        qkv = src.qkv
        q_part = _rows(qkv, order[:Hc], D)
        k_part = _rows(qkv, [H + h for h in order[:Hc]], D)
        v_part = _rows(qkv, [2 * H + h for h in order], D)
        _load_rows(self.qkv, [q_part, k_part, v_part])
        self.q_norm, self.k_norm = src.q_norm, src.k_norm
        self.norm = _permute_channels(src.norm, order, D)
        self.gate = src.gate if getattr(src, "gate", None) is not None else None
        if self.gate is not None:
            _load_rows(self.gate, [_rows(self.gate, order, D)])
        self.proj = _permute_in(src.proj, order, D)
        self.proj_drop = src.proj_drop

    def leanvit_qkv(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``y`` ``[B, N, C]`` -> q, k ``[B, Hc, N, D]`` (normed), v ``[B, H, N, D]``."""
        B, N, _ = y.shape
        Hc, H, D = self.computed_heads, self.num_heads, self.head_dim
        qkv = self.qkv(y)
        q = qkv[..., : Hc * D].reshape(B, N, Hc, D).transpose(1, 2)
        k = qkv[..., Hc * D: 2 * Hc * D].reshape(B, N, Hc, D).transpose(1, 2)
        v = qkv[..., 2 * Hc * D:].reshape(B, N, H, D).transpose(1, 2)
        return self.q_norm(q), self.k_norm(k), v

    def _finish(self, out: Tensor, gate: Optional[Tensor]) -> Tensor:
        B, _, Nq, _ = out.shape
        out = out.transpose(1, 2).reshape(B, Nq, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False
                ) -> Tensor:
        """timm's ``Attention.forward`` signature; ``x`` ``[B, N, C]``."""
        if is_causal:
            raise ValueError("hMHSA does not support causal attention")
        q, k, v = self.leanvit_qkv(x)
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(
                ~attn_mask, float("-inf"))
        return self._finish(self.attend(q, k, v, bias=attn_mask), gate)

    # -- the ViT adapter's contract (leanvit/adapters/vit.py: _attention)
    def leanvit_forward(self, y: Tensor, bias: Optional[Tensor], keep: Optional[Tensor],
                        select: Optional[Callable[[Signals], Optional[Tensor]]]
                        ) -> tuple[Tensor, Signals, Optional[Tensor]]:
        """Attention with the adapter's additions: ``bias`` ``[B, 1, 1, N]`` (proportional
        attention / padding), ``keep`` ``[B, N]`` training keep-mask, ``select(signals)`` ->
        query rows ``[B, K]`` or ``None``. Returns (output ``[B, K, C]``, signals, rows)."""
        q, k, v = self.leanvit_qkv(y)
        gate = self.gate(y).sigmoid() if self.gate is not None else None
        signals = HallucinatedSignals(q, k, v, self.scale, bias, self.hallucinate)
        rows = select(signals) if select is not None else None
        if rows is not None:
            if keep is not None:
                raise ValueError("query selection and a training keep-mask cannot be combined")
            if gate is not None:
                gate = gate.gather(1, rows[..., None].expand(-1, -1, gate.shape[-1]))
        out = self.attend(q, k, v, bias=bias, keep=keep, rows=rows)
        return self._finish(out, gate), signals, rows

    def leanvit_macs(self, n_q, n_kv):
        """MACs per image with ``n_q`` query rows and ``n_kv`` tokens (numbers or ``[B]``)."""
        m = n_kv * self.qkv.in_features * self.qkv.out_features
        if self.gate is not None:
            m = m + n_kv * self.gate.in_features * self.gate.out_features
        # under query selection (n_q < n_kv) a convolution still needs every row's logits
        wide = self.hallucinate is not None and self.hallucinate.context_rows > 0
        return m + self.attention_macs(n_q, n_kv, n_kv if wide else n_q) + \
            n_q * self.proj.in_features * self.proj.out_features


class PvtHallucinatedAttention(HallucinatedAttention):
    """hMHSA for PVTv2's spatial-reduction ``Attention``: ``q`` on all ``N`` tokens for the
    computed heads, ``kv`` on the ``N' = N / sr^2`` (or 7x7 pooled) reduced tokens giving the
    computed heads' keys and all heads' values. Maps are ``N x N'`` (not square): both cheap
    operations work on any map shape (the convolution slides over queries and reduced keys)."""

    def __init__(self, src: nn.Module, hallucination: str = "mix", kernel_size: int = 3,
                 computed: Optional[Sequence[int]] = None):
        H, D = src.num_heads, src.head_dim
        super().__init__(H, D, src.scale, hallucination, kernel_size, src.attn_drop.p,
                         src.fused_attn)
        order = head_order(H, computed)
        self.head_order = order
        self.dim = src.dim
        Hc = self.computed_heads
        self.q = nn.Linear(self.dim, Hc * D, bias=src.q.bias is not None).to(src.q.weight)
        _load_rows(self.q, [_rows(src.q, order[:Hc], D)])
        self.kv = nn.Linear(self.dim, (Hc + H) * D, bias=src.kv.bias is not None
                            ).to(src.kv.weight)
        _load_rows(self.kv, [_rows(src.kv, order[:Hc], D), _rows(src.kv, [H + h for h in order],
                                                                  D)])
        self.proj = _permute_in(src.proj, order, D)
        self.proj_drop = src.proj_drop
        self.pool, self.sr, self.norm, self.act = src.pool, src.sr, src.norm, src.act

    def _reduce(self, x: Tensor, feat_size: List[int]) -> Tensor:
        B, N, C = x.shape
        H, W = feat_size
        if self.pool is not None:
            x = x.permute(0, 2, 1).reshape(B, C, H, W)
            x = self.sr(self.pool(x)).reshape(B, C, -1).permute(0, 2, 1)
            return self.act(self.norm(x))
        if self.sr is not None:
            x = x.permute(0, 2, 1).reshape(B, C, H, W)
            x = self.sr(x).reshape(B, C, -1).permute(0, 2, 1)
            return self.norm(x)
        return x

    def qkv(self, x: Tensor, feat_size: List[int]) -> tuple[Tensor, Tensor, Tensor]:
        B, N, _ = x.shape
        Hc, H, D = self.computed_heads, self.num_heads, self.head_dim
        q = self.q(x).reshape(B, N, Hc, D).transpose(1, 2)
        kv = self.kv(self._reduce(x, feat_size))
        k = kv[..., : Hc * D].reshape(B, -1, Hc, D).transpose(1, 2)
        v = kv[..., Hc * D:].reshape(B, -1, H, D).transpose(1, 2)
        return q, k, v

    def forward(self, x: Tensor, feat_size: List[int]) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x, feat_size)
        out = self.attend(q, k, v).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(out))


class NextVitHallucinatedAttention(HallucinatedAttention):
    """hMHSA for NextViT's ``EfficientAttention`` (E-MHSA): ``q``/``k`` for the computed
    heads, ``v`` for all; keys/values from the average-pooled (``sr^2``) tokens, so maps are
    ``N x N / sr^2``. Keeps the ``q``, ``k``, ``v``, ``norm`` names so that timm's
    ``NextTransformerBlock.reparameterize`` (BatchNorm folding) still works."""

    def __init__(self, src: nn.Module, hallucination: str = "mix", kernel_size: int = 3,
                 computed: Optional[Sequence[int]] = None):
        H, D = src.num_heads, src.head_dim
        super().__init__(H, D, src.scale, hallucination, kernel_size, src.attn_drop.p,
                         src.fused_attn)
        order = head_order(H, computed)
        self.head_order = order
        self.dim, self.out_dim = src.dim, src.out_dim
        Hc = self.computed_heads
        self.q = nn.Linear(self.dim, Hc * D, bias=src.q.bias is not None).to(src.q.weight)
        self.k = nn.Linear(self.dim, Hc * D, bias=src.k.bias is not None).to(src.k.weight)
        _load_rows(self.q, [_rows(src.q, order[:Hc], D)])
        _load_rows(self.k, [_rows(src.k, order[:Hc], D)])
        self.v = src.v
        _load_rows(self.v, [_rows(src.v, order, D)])
        self.proj = _permute_in(src.proj, order, D)
        self.proj_drop = src.proj_drop
        self.sr_ratio, self.N_ratio = src.sr_ratio, src.N_ratio
        self.sr, self.norm = src.sr, src.norm

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, _ = x.shape
        Hc, H, D = self.computed_heads, self.num_heads, self.head_dim
        q = self.q(x).reshape(B, N, Hc, D).transpose(1, 2)
        if self.sr is not None:
            x = self.sr(x.transpose(1, 2))
            x = self.norm(x).transpose(1, 2)
        k = self.k(x).reshape(B, -1, Hc, D).transpose(1, 2)
        v = self.v(x).reshape(B, -1, H, D).transpose(1, 2)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x)
        out = self.attend(q, k, v).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(out))


# --------------------------------------------------------------------------------------------
# cFFN


class RepLinear(nn.Module):
    """``sum_b BN_b(W_b x)``: ``branches`` parallel linear maps (no bias) each followed by a
    BatchNorm (RepVGG's training form); :meth:`reparameterize_` merges them into one linear map
    with bias (``self.fused``). ``conv=True``: 1x1 convolutions on ``[B, C, H, W]`` (NextViT's
    ``ConvMlp``); otherwise linear on ``[..., C]`` with BatchNorm over all tokens."""

    def __init__(self, in_features: int, out_features: int, branches: int, conv: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.conv = in_features, out_features, conv
        if conv:
            self.branches = nn.ModuleList(nn.Sequential(
                nn.Conv2d(in_features, out_features, 1, bias=False), nn.BatchNorm2d(out_features))
                for _ in range(branches))
        else:
            self.branches = nn.ModuleList(nn.Sequential(
                nn.Linear(in_features, out_features, bias=False), nn.BatchNorm1d(out_features))
                for _ in range(branches))
        self.fused: Optional[nn.Module] = None

    def forward(self, x: Tensor) -> Tensor:
        if self.fused is not None:
            return self.fused(x)
        if self.conv:
            return sum(b(x) for b in self.branches)
        flat = x.reshape(-1, self.in_features)
        out = sum(b(flat) for b in self.branches)
        return out.reshape(*x.shape[:-1], self.out_features)

    def set_branch_weights(self, weights: Sequence[Tensor]) -> None:
        """Set each branch's ``[out, in]`` weight and make its BatchNorm the identity in eval
        mode (running mean 0, running var 1, gamma ``sqrt(1 + eps)``, beta 0)."""
        with torch.no_grad():
            for (lin, bn), w in zip(self.branches, weights):
                lin.weight.copy_(w.reshape(lin.weight.shape))
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0)
                bn.weight.fill_((1.0 + bn.eps) ** 0.5)
                bn.bias.zero_()

    def merged(self) -> tuple[Tensor, Tensor]:
        """The eval-mode map as ``(weight [out, in], bias [out])``."""
        w_sum, b_sum = 0.0, 0.0
        for lin, bn in self.branches:
            w, b = fuse_linear_bn(lin.weight.reshape(self.out_features, self.in_features),
                                  bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
            w_sum, b_sum = w_sum + w, b_sum + b
        return w_sum, b_sum

    @torch.no_grad()
    def reparameterize_(self) -> None:
        """Merge the branches into ``self.fused`` (deploy form); in place, idempotent."""
        if self.fused is not None:
            return
        w, b = self.merged()
        ref = self.branches[0][0].weight
        if self.conv:
            fused = nn.Conv2d(self.in_features, self.out_features, 1, bias=True)
            w = w[:, :, None, None]
        else:
            fused = nn.Linear(self.in_features, self.out_features, bias=True)
        fused.to(ref)
        fused.weight.copy_(w)
        fused.bias.copy_(b)
        self.fused = fused
        del self.branches


class CompactProjection(nn.Module):
    """cFFN's hidden-to-output projection ``m -> rank -> C``: two :class:`RepLinear` factors
    (no activation between them, as a matrix factorisation), ``rank = ffn_ratio * C``.
    Deploy cost per token: ``m * rank + rank * C`` MACs instead of ``m * C``."""

    def __init__(self, in_features: int, out_features: int, rank: int, branches: int,
                 conv: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = RepLinear(in_features, rank, branches, conv)
        self.second = RepLinear(rank, out_features, branches, conv)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    @torch.no_grad()
    def reparameterize_(self) -> None:
        self.first.reparameterize_()
        self.second.reparameterize_()

    @property
    def deployed(self) -> bool:
        return self.first.fused is not None
