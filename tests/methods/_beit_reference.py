"""Plainly written reference BEiT forward for testing token methods on timm's ``Beit``.

Written from the BEiT paper (Bao et al. 2022, Sec. 2.2 and its relative position bias) and
timm's ``Block`` / ``Attention`` read as a specification, independent of leanvit: ONE image at
a time, the relative position index built with plain loops, each head's logits written out
with the bias of the query's and the key's ORIGINAL positions added by hand. Token methods
plug in per image as plain functions that return the new tokens, their sizes and positions.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import timm
import torch
from torch import Tensor, nn


def tiny_beit(seed: int = 0, **kwargs) -> nn.Module:
    """A random 4-block BEiT on 32x32 images (a 4x4 grid of 8x8 patches + class token = 17
    tokens), float64, eval mode. Every weight is redrawn with a large spread (timm zeroes the
    relative bias tables and q/v biases and scales LayerScale to 0.1), so the bias, the
    LayerScale and the rankings all matter and are far from ties."""
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=5)
    cfg.update(kwargs)
    torch.manual_seed(seed)
    model = timm.create_model("beit_base_patch16_224", **cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 2.0)
            elif name.endswith(("gamma_1", "gamma_2")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "norm" in name:
                continue
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(p.shape[-1])))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.double().eval()


def relative_index(grid: tuple[int, int]) -> list[list[int]]:
    """``idx[a][b]``: the row of the bias table for query token ``a`` and key token ``b``
    (token 0 the class token, token ``1 + r * W + c`` the patch in row ``r``, column ``c``).

    BEiT: patch pairs by their offset ``(dr, dc)``, ``(dr + H - 1) * (2W - 1) + dc + W - 1``;
    then three learned entries: class->patch, patch->class, class->class."""
    H, W = grid
    m = (2 * H - 1) * (2 * W - 1)
    n = H * W + 1
    idx = [[0] * n for _ in range(n)]
    for a in range(n):
        for b in range(n):
            if a == 0 and b == 0:
                idx[a][b] = m + 2
            elif a == 0:
                idx[a][b] = m
            elif b == 0:
                idx[a][b] = m + 1
            else:
                ra, ca = divmod(a - 1, W)
                rb, cb = divmod(b - 1, W)
                idx[a][b] = (ra - rb + H - 1) * (2 * W - 1) + (ca - cb + W - 1)
    return idx


def bias_of(model: nn.Module, i: int, pos_q: list[int], pos_k: list[int]) -> Tensor:
    """``[H, len(pos_q), len(pos_k)]``: block ``i``'s relative bias (its own table plus the
    shared one) between the given ORIGINAL positions, looked up entry by entry."""
    idx = relative_index(model.patch_embed.grid_size)
    tables = []
    if model.blocks[i].attn.relative_position_bias_table is not None:
        tables.append(model.blocks[i].attn.relative_position_bias_table)
    if model.rel_pos_bias is not None:
        tables.append(model.rel_pos_bias.relative_position_bias_table)
    H = model.blocks[i].attn.num_heads
    out = torch.zeros(H, len(pos_q), len(pos_k), dtype=torch.float64)
    for t in tables:
        for a, pa in enumerate(pos_q):
            for b, pb in enumerate(pos_k):
                out[:, a, b] += t[idx[pa][pb]]
    return out


def attention(model: nn.Module, i: int, x: Tensor, positions: list[int],
              size: Optional[Tensor], rows: Optional[list[int]] = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Block ``i``'s attention on ONE image ``x`` ``[N, C]`` written out.

    Returns (output ``[K, C]`` for the query ``rows`` (all when ``None``), attention
    ``[H, K, N]``, keys ``[H, N, D]``, values ``[H, N, D]``). ``size`` ``[N]`` adds
    ``log(size)`` to each key's logits (proportional attention)."""
    attn = model.blocks[i].attn
    N, C = x.shape
    H = attn.num_heads
    D = attn.qkv.out_features // 3 // H
    qkv = x @ attn.qkv.weight.t()
    if attn.q_bias is not None:
        qkv = qkv + torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    q, k, v = (qkv[:, j * H * D:(j + 1) * H * D].reshape(N, H, D).transpose(0, 1)
               for j in range(3))
    rows = list(range(N)) if rows is None else rows
    bias = bias_of(model, i, [positions[r] for r in rows], positions)
    logits = (q[:, rows] @ k.transpose(-1, -2)) / math.sqrt(D) + bias
    if size is not None:
        logits = logits + size.log()[None, None, :]
    a = logits.softmax(-1)
    out = (a @ v).transpose(0, 1).reshape(len(rows), H * D)
    return out @ attn.proj.weight.t() + attn.proj.bias, a, k, v


#: reduce(i, x [N, C], attn [H, N, N], keys [H, N, D], size [N], positions, prefix)
#:   -> (x, size, positions) for ONE image, after the attention residual
Reduce = Callable[[int, Tensor, Tensor, Tensor, Tensor, list, int], tuple[Tensor, Tensor, list]]
#: select(i, attn [H, N, N], values [H, N, D], prefix) -> query rows kept (list) or None
Select = Callable[[int, Tensor, Tensor, int], Optional[list]]
#: before(i, x [N, C], size, positions, prefix) -> (x, size, positions), before block i
Before = Callable[[int, Tensor, Tensor, list, int], tuple[Tensor, Tensor, list]]


def forward_image(model: nn.Module, image: Tensor, reduce: Optional[Reduce] = None,
                  select: Optional[Select] = None, before: Optional[Before] = None,
                  prop_attn: bool = False) -> tuple[Tensor, Tensor, list]:
    """ONE image ``[3, H, W]`` through the BEiT: final tokens (after the final norm)
    ``[N', C]``, their sizes ``[N']`` and original positions."""
    x = model.patch_embed(image[None])[0]
    x = torch.cat([model.cls_token[0], x])
    if model.pos_embed is not None:
        x = x + model.pos_embed[0]
    p = 1
    positions = list(range(x.shape[0]))
    size = torch.ones(x.shape[0], dtype=x.dtype)
    for i, blk in enumerate(model.blocks):
        if before is not None:
            x, size, positions = before(i, x, size, positions, p)
        rows = None
        if select is not None:
            _, a, _, v = attention(model, i, blk.norm1(x), positions,
                                   size if prop_attn else None)
            rows = select(i, a, v, p)
        out, a, k, _ = attention(model, i, blk.norm1(x), positions,
                                 size if prop_attn else None, rows)
        if rows is not None:
            x, size, positions = x[rows], size[rows], [positions[r] for r in rows]
        x = x + blk.gamma_1 * out
        if reduce is not None:
            x, size, positions = reduce(i, x, a, k, size, positions, p)
        x = x + blk.gamma_2 * blk.mlp(blk.norm2(x))
    return model.norm(x), size, positions


def head(model: nn.Module, x: Tensor, size: Tensor) -> Tensor:
    """Classifier on ONE image's final tokens ``[N, C]``: the patch tokens averaged weighted
    by how many patches each stands for (``avg``), or the class token (``token``)."""
    if model.global_pool == "avg":
        w = size[1:, None]
        pooled = (x[1:] * w).sum(0) / w.sum()
    else:
        pooled = x[0]
    return model.head(model.fc_norm(pooled))
