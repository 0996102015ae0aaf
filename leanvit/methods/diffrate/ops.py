"""DiffRate's tensor arithmetic (knows nothing of timm or of the reducers): the class-attention
sort, the merge of a sorted tail into its head, the straight-through estimators of the rate
search, and the class-token attention row under a soft keep-mask.

Used by :mod:`leanvit.methods.diffrate.deploy` and :mod:`leanvit.methods.diffrate.search_mode`. Source: Chen et al., "DiffRate: Differentiable Compression Rate for
Efficient Vision Transformers", ICCV 2023 (OpenGVLab/DiffRate).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from leanvit.ops.attention import attention_logits, masked_softmax
from leanvit.ops.merge import first_best
from leanvit.ops.tokens import remap_where
from leanvit.signals import Signals


def sort_order(cls_attn: Tensor, prefix: int, k: int, alive: Optional[Tensor] = None
               ) -> Tensor:
    """Indices of the ``k`` tokens to keep, ``[B, k]`` long: the ``prefix`` tokens first, then
    the others by descending class attention ``cls_attn`` ``[B, N]``, compared exactly (no
    offset added to the values), ties in token order.

    ``alive`` ``[B, N]`` bool (the search's unmasked tokens): alive tokens come before masked
    ones whatever their attention, each group by descending attention; a lexicographic order
    by two stable sorts, not ``attn + c * alive``, which in float32 rounds the attention to
    multiples of ``ulp(c)`` and reorders near-tied tokens.
    """
    B, N = cls_attn.shape
    rest = torch.sort(cls_attn[:, prefix:], dim=1, descending=True, stable=True).indices
    if alive is not None:
        first = alive[:, prefix:].gather(1, rest).to(torch.uint8)
        rest = rest.gather(1, torch.sort(first, dim=1, descending=True, stable=True).indices)
    pre = torch.arange(prefix, device=cls_attn.device).expand(B, prefix)
    return torch.cat([pre, rest[:, :k - prefix] + prefix], dim=1)


def merge_tail(x: Tensor, size: Tensor, prefix: int, k: int, end: Optional[int] = None,
               source: Optional[Tensor] = None, keep_sources: bool = False,
               where: Optional[Tensor] = None) -> tuple:
    """Merge tokens ``k .. end-1`` of ``x`` ``[B, N, C]`` into their most similar token among
    ``prefix .. k-1`` (cosine of ``x``; prefix tokens never receive).

    Destination ``d`` becomes the plain mean of itself and its sources; its size (``size``
    ``[B, N]``) adds each source's size times its cosine to ``d`` (clamped at 0); ``source``
    ``[B, N, N0]`` is combined with ``max``. Returns the ``k`` merged tokens (and sizes,
    sources) followed by the tokens from ``end`` on, untouched (``end=None``: none follow).
    With ``keep_sources`` the merged sources also stay in place (search mode masks them):
    the result then has all ``N`` tokens. With ``where`` (the ``[B, N0]`` index map of
    :attr:`leanvit.state.TokenState.where`) a fourth item is returned: the map after the merge
    (sources follow their destination).
    """
    B, N, C = x.shape
    end = N if end is None else end
    S = end - k
    dst, src = x[:, :k], x[:, k:end]
    with torch.no_grad():
        # cosine without writing a normalised copy of x: the best destination of a source
        # only depends on the destinations' norms; its cosine then divides by the source's.
        # Prefix tokens are left out of the candidates (never a destination).
        norms = torch.linalg.vector_norm(x[:, :end], dim=-1).clamp_min(1e-12)  # [B, end]
        sim = (src @ dst[:, prefix:].transpose(1, 2)).div_(norms[:, None, prefix:k])
        # ties (within rounding, as between copies of a token) go to the first destination
        idx = first_best(sim, scale=norms[:, k:end])  # [B, S]
        best = sim.gather(-1, idx.unsqueeze(-1)).squeeze(-1) / norms[:, k:end]
        idx = idx + prefix
        # one-hot assignment [B, S, k]: the sums become one small batched matmul
        # (index_add / scatter_add serialise their atomic adds on CPU)
        onehot = (idx[..., None] == torch.arange(k, device=x.device)).to(x.dtype)
        count = onehot.sum(1).add_(1.0)  # [B, k]: the destination itself plus its sources
    merged = torch.baddbmm(dst, onehot.transpose(1, 2), src).div_(count[..., None])
    gain = size[:, k:end] * best.clamp_min(0).to(size.dtype)  # [B, S]
    new_size = size[:, :k] + (onehot.to(size.dtype) * gain[..., None]).sum(1)
    new_source = None
    if source is not None:
        new_source = source[:, :k].scatter_reduce(
            1, idx[..., None].expand(-1, -1, source.shape[-1]), source[:, k:end], reduce="amax",
            include_self=True)
    rest = k if keep_sources else end
    if rest < N:
        merged = torch.cat([merged, x[:, rest:]], dim=1)
        new_size = torch.cat([new_size, size[:, rest:]], dim=1)
        if source is not None:
            new_source = torch.cat([new_source, source[:, rest:]], dim=1)
    if where is None:
        return merged, new_size, new_source
    rows = torch.arange(N, device=x.device).expand(B, N)
    # destinations stay, sources go to theirs, the tokens after ``end`` move up by what left
    new_row = torch.cat([rows[:, :k], idx, rows[:, end:] - (rest - k)], dim=1)
    return merged, new_size, new_source, remap_where(where, new_row)


def ste_ceil(x: Tensor) -> Tensor:
    """``ceil(x)`` forward, identity gradient (the authors' ``STE_Ceil``)."""
    return x + (torch.ceil(x) - x).detach()


def ste_min(n: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``min(n, a, b)`` forward; gradient flows to ``a`` and ``b`` only (the authors'
    ``STE_Min``): each block's MAC term reaches that block's own rates."""
    value = torch.minimum(torch.minimum(n.detach(), a.detach()), b.detach())
    return value + (a - a.detach()) + (b - b.detach())



def masked_cls_attn(signals: Signals, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """Head-averaged class-token row of the eps-masked softmax
    (:func:`leanvit.ops.attention.masked_softmax`), ``[B, N]``, float32."""
    logits = attention_logits(signals.q[:, :, :1], signals.k, signals.scale, signals.bias)
    rows = torch.zeros(1, dtype=torch.long, device=logits.device)  # the class query is key 0
    a = masked_softmax(logits, mask.detach(), eps, rows=rows)  # [B, H, 1, N]
    return a.mean(dim=1).squeeze(1)
