"""Plainly written reference ViT forward for testing token-reduction methods.

Written from timm's ``Block`` / ``Attention`` (pre-norm block, materialised N x N attention),
independent of leanvit's adapter and ops: the reduction is a per-image Python function
inserted after the attention residual, exactly where the papers put it.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn


def tiny_vit(seed: int = 0, **kwargs) -> nn.Module:
    """A random 4-block ViT on 32x32 images (16 patches of 8x8 + prefix), float64, eval mode.

    float64 so that a comparison at 1e-5 tests the algorithm, not float32 summation order.

    Weights are redrawn with a larger spread than timm's init, so attention rows are peaked and
    rankings are far from ties (timm's 0.02-std init gives almost uniform attention).
    """
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=5)
    cfg.update(kwargs)
    cls = cfg.pop("cls", VisionTransformer)
    torch.manual_seed(seed)
    model = cls(**cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(max(fan_in, 1))))
                if name.endswith(("cls_token", "dist_token", "reg_token", "pos_embed")):
                    p.copy_(torch.randn(p.shape, generator=g))
            elif "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.double().eval()


def attention(attn: nn.Module, x: Tensor, size: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """timm Attention written out: returns (output [B,N,C], attention [B,H,N,N], k [B,H,N,D]).

    ``size`` [B, N] adds log(size) to every key's logits (proportional attention).
    """
    B, N, C = x.shape
    H = attn.num_heads
    D = C // H
    qkv = x @ attn.qkv.weight.t()
    if attn.qkv.bias is not None:
        qkv = qkv + attn.qkv.bias
    qkv = qkv.reshape(B, N, 3, H, D)
    q = attn.q_norm(qkv[:, :, 0].transpose(1, 2))
    k = attn.k_norm(qkv[:, :, 1].transpose(1, 2))
    v = qkv[:, :, 2].transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    if size is not None:
        logits = logits + size.log()[:, None, None, :]
    a = logits.softmax(-1)
    out = (a @ v).transpose(1, 2).reshape(B, N, C)
    out = out @ attn.proj.weight.t() + attn.proj.bias
    return out, a, k


#: reduce(i, x [N, C], attn [H, N, N], keys [H, N, D], size [N], source [N, N0], prefix)
#:   -> (x, size, source) for ONE image
Reduce = Callable[[int, Tensor, Tensor, Tensor, Tensor, Tensor, int], tuple[Tensor, Tensor, Tensor]]


def forward(model: nn.Module, images: Tensor, reduce: Reduce, prop_attn: bool = False
            ) -> tuple[Tensor, Tensor, Tensor]:
    """Final tokens (after the final norm) ``[B, N', C]``, their sizes ``[B, N']`` and sources
    ``[B, N', N0]``; ``reduce`` is called per block and per image after the attention residual.
    """
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.norm_pre(x)
    B, N0, _ = x.shape
    p = model.num_prefix_tokens
    size = x.new_ones(B, N0)
    source = torch.eye(N0, dtype=x.dtype).repeat(B, 1, 1)
    for i, blk in enumerate(model.blocks):
        out, a, k = attention(blk.attn, blk.norm1(x), size if prop_attn else None)
        x = x + blk.ls1(out)
        per_image = [reduce(i, x[b], a[b], k[b], size[b], source[b], p) for b in range(B)]
        x = torch.stack([t[0] for t in per_image])
        size = torch.stack([t[1] for t in per_image])
        source = torch.stack([t[2] for t in per_image])
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.norm(x), size, source


def head(model: nn.Module, x: Tensor, size: Tensor) -> Tensor:
    """The classifier on final tokens: timm's own for token pooling; for ``avg`` pooling the
    mean of the non-prefix tokens weighted by how many patches each stands for."""
    if model.global_pool != "avg":
        return type(model).forward_head(model, x)
    p = model.num_prefix_tokens
    w = size[:, p:, None]
    pooled = (x[:, p:] * w).sum(1) / w.sum(1)
    return model.head(model.fc_norm(pooled))


def identity_reduce(i, x, a, k, size, source, p):
    return x, size, source
