"""Attention with a soft keep-mask over keys, as used while training token methods."""
from __future__ import annotations

import torch
from torch import Tensor


def masked_softmax(logits: Tensor, keep: Tensor, eps: float = 1e-6) -> Tensor:
    """Softmax over keys where dropped keys (``keep`` = 0) get no weight, in float32.

    The authors' ``softmax_with_policy`` (DynamicViT, Rao et al. 2021; reused by DiffRate):
    ``a = exp(l - max) * M; a = (a + eps / N) / (sum(a) + eps)`` with ``M`` the keep mask of the
    keys and the diagonal always kept, so a dropped token still attends to itself and its row
    stays finite. Gradients flow into ``keep`` (straight-through masks stay differentiable).

    Args:
        logits: ``[B, H, Nq, N]`` attention logits (scaled, bias added).
        keep: ``[B, N]`` mask in [0, 1]. Requires ``Nq == N`` (self-attention).
        eps: 1e-6, the authors' value.

    Returns:
        ``[B, H, Nq, N]`` float32 attention weights.
    """
    B, H, Nq, N = logits.shape
    if Nq != N:
        raise ValueError(f"masked_softmax needs square attention, got {Nq} queries x {N} keys")
    logits = logits.float()
    m = keep.float().reshape(B, 1, 1, N)
    eye = torch.eye(N, dtype=m.dtype, device=m.device).reshape(1, 1, N, N)
    m = m + (1.0 - m) * eye
    a = (logits - logits.amax(dim=-1, keepdim=True)).exp() * m
    return (a + eps / N) / (a.sum(dim=-1, keepdim=True) + eps)
