"""Plainly written per-image reference of timm's ``Eva`` (EVA02, DINOv3, PE-Core) for testing
token methods on rotary-position backbones.

Independent of leanvit's adapter and of timm's attention code: q/k/v from the weight
matrices, the rotary position applied by hand as an explicit 2x2-block rotation matrix per
token (built from the model's ``sin | cos`` table), a materialised softmax per head, the
attention-pool head written out. Every token carries the index of the patch whose rotation it
uses (``-1``: no rotation, prefix tokens and EViT's fused token); the per-image method
functions below say how a kept, merged or fused token's position is set.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import timm
import torch
from torch import Tensor, nn

#: tiny versions of the three real configs: (timm name, overrides). 16 patches each.
CONFIGS = {
    "eva02": ("eva02_small_patch14_224", dict(img_size=56)),  # 1 prefix, SwiGLU, EvaAttention
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=64)),  # cls + 4 reg, LayerScale, half
    "pe_core": ("vit_pe_core_small_patch16_384", dict(img_size=64, attn_pool_num_heads=4)),
}


def tiny_eva(kind: str, seed: int = 0, depth: int = 3, **kw) -> nn.Module:
    """A random tiny Eva of a real config (width 32, 4 heads, ``depth`` blocks, 5 classes),
    float64, eval mode, weights redrawn with a large spread so that attention is peaked and
    rankings are far from ties (timm's init gives near-uniform attention; DINOv3's LayerScale
    1e-5 nearly skips the blocks)."""
    name, cfg = CONFIGS[kind]
    cfg = dict(cfg, embed_dim=32, num_heads=4, depth=depth, num_classes=5)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = timm.create_model(name, **cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("gamma_1", "gamma_2")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif pname.endswith(("cls_token", "reg_token", "pos_embed", "latent")):
                p.copy_(torch.randn(p.shape, generator=g))
            elif "norm" in pname:
                continue
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(p[0].numel())))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.double().eval()


def rotation(row: Tensor, half: bool) -> Tensor:
    """The ``[D, D]`` rotation of one token from its table row ``sin | cos`` (``2D``): pairs
    ``(j, j + D/2)`` (half layout, DINOv3) or ``(2j, 2j + 1)`` (interleaved)."""
    D = row.shape[0] // 2
    sin, cos = row[:D], row[D:]
    M = torch.zeros(D, D, dtype=row.dtype)
    pairs = [(j, j + D // 2) for j in range(D // 2)] if half else \
        [(2 * j, 2 * j + 1) for j in range(D // 2)]
    for a, b in pairs:
        M[a, a], M[a, b] = cos[a], -sin[a]
        M[b, b], M[b, a] = cos[b], sin[b]
    return M


def attention(attn: nn.Module, x: Tensor, pos: list[int], table: Tensor, size: Optional[Tensor],
              keep: Optional[Tensor] = None):
    """One image's attention ``x`` ``[N, C]`` -> (output ``[N, C]``, map ``[H, N, N]``, rotated
    keys ``[H, N, D]``, values ``[H, N, D]``). ``size`` adds ``log(size)`` to the keys' logits;
    ``keep`` ``[N]`` is a training keep-mask (the authors' eps-softmax, diagonal kept)."""
    N = x.shape[0]
    H, D = attn.num_heads, attn.head_dim
    W = attn.qkv.weight
    if getattr(attn, "q_bias", None) is not None:
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    else:
        bias = attn.qkv.bias if attn.qkv.bias is not None else torch.zeros(W.shape[0],
                                                                           dtype=x.dtype)
    qkv = x @ W.T + bias
    half = getattr(attn, "rotate_half", False)
    outs, maps, keys, values = [], [], [], []
    for h in range(H):
        q = attn.q_norm(qkv[:, h * D:(h + 1) * D])
        k = attn.k_norm(qkv[:, H * D + h * D:H * D + (h + 1) * D])
        v = qkv[:, 2 * H * D + h * D:2 * H * D + (h + 1) * D]
        q = torch.stack([rotation(table[pos[t]], half) @ q[t] if pos[t] >= 0 else q[t]
                         for t in range(N)])
        k = torch.stack([rotation(table[pos[t]], half) @ k[t] if pos[t] >= 0 else k[t]
                         for t in range(N)])
        logits = q @ k.T / math.sqrt(D)
        if size is not None:
            logits = logits + size.log()[None, :]
        if keep is None:
            a = logits.softmax(-1)
        else:
            m = keep[None, :] + (1 - keep[None, :]) * torch.eye(N, dtype=x.dtype)
            e = (logits - logits.max(-1, keepdim=True).values).exp() * m
            a = (e + 1e-6 / N) / (e.sum(-1, keepdim=True) + 1e-6)
        outs.append(a @ v)
        maps.append(a)
        keys.append(k)
        values.append(v)
    out = attn.norm(torch.cat(outs, dim=-1))
    out = out @ attn.proj.weight.T + attn.proj.bias
    return out, torch.stack(maps), torch.stack(keys), torch.stack(values)


#: reduce(i, x [N, C], map [H, N, N], keys [H, N, D], size [N], pos, prefix) -> (x, size, pos)
Reduce = Callable[[int, Tensor, Tensor, Tensor, Tensor, list, int], tuple[Tensor, Tensor, list]]
#: before(i, x [N, C], size [N], pos, prefix) -> (x, size, pos)   (DynamicViT)
Before = Callable[[int, Tensor, Tensor, list, int], tuple[Tensor, Tensor, list]]
#: select(i, map [H, N, N], values [H, N, D], prefix) -> query rows to keep or None   (ATS)
Select = Callable[[int, Tensor, Tensor, int], Optional[list]]


def forward(model: nn.Module, images: Tensor, reduce: Optional[Reduce] = None,
            before: Optional[Before] = None, select: Optional[Select] = None,
            prop_attn: bool = False, keeps: Optional[dict] = None) -> list[tuple]:
    """Per image: final tokens after the final norm ``[N', C]``, their sizes ``[N']`` and
    positions (patch index or -1). ``keeps[i]`` ``[B, N]``: block ``i``'s training keep-mask."""
    x = model.patch_embed(images)
    x, table = model._pos_embed(x)  # embeddings and the rotary table are timm's
    table = table.to(x.dtype)
    x = model.norm_pre(x)
    p = model.num_prefix_tokens
    results = []
    for b in range(x.shape[0]):
        xb = x[b]
        pos = [-1] * p + list(range(xb.shape[0] - p))
        size = torch.ones(xb.shape[0], dtype=xb.dtype)
        for i, blk in enumerate(model.blocks):
            if before is not None:
                xb, size, pos = before(i, xb, size, pos, p)
            keep = None if keeps is None or i not in keeps else keeps[i][b]
            out, a, k, v = attention(blk.attn, blk.norm1(xb), pos, table,
                                     size if prop_attn else None, keep)
            g1 = blk.gamma_1 if blk.gamma_1 is not None else 1.0
            g2 = blk.gamma_2 if blk.gamma_2 is not None else 1.0
            rows = None if select is None else select(i, a, v, p)
            if rows is not None:
                xb, size, pos = xb[rows] + g1 * out[rows], size[rows], [pos[r] for r in rows]
            else:
                xb = xb + g1 * out
            if reduce is not None:
                xb, size, pos = reduce(i, xb, a, k, size, pos, p)
            xb = xb + g2 * blk.mlp(blk.norm2(xb))
        results.append((model.norm(xb), size, pos))
    return results


def head(model: nn.Module, x: Tensor, size: Tensor, prop_attn: bool = True) -> Tensor:
    """One image's logits ``[K]`` from its final tokens ``x`` ``[N, C]``: ``avg`` = the
    size-weighted mean of the patch tokens, ``token`` = the class token, ``map`` = timm's
    attention pool written out, with ``log(size)`` on its keys under proportional attention
    (as the blocks)."""
    p = model.num_prefix_tokens
    if model.attn_pool is not None:
        pool = model.attn_pool
        H, D = pool.num_heads, pool.head_dim
        q = pool.latent[0] @ pool.q.weight.T + pool.q.bias  # [L, C]
        kv = x @ pool.kv.weight.T + pool.kv.bias
        C = kv.shape[1] // 2
        outs = []
        for h in range(H):
            qh, kh, vh = q[:, h * D:(h + 1) * D], kv[:, h * D:(h + 1) * D], \
                kv[:, C + h * D:C + (h + 1) * D]
            logits = qh @ kh.T / math.sqrt(D)
            if prop_attn:
                logits = logits + size.log()[None, :]
            a = logits.softmax(-1)
            outs.append(a @ vh)
        y = torch.cat(outs, -1) @ pool.proj.weight.T + pool.proj.bias
        y = y + pool.mlp(pool.norm(y))
        feat = y[0]
    elif model.global_pool == "avg":
        w = size[p:, None]
        feat = (x[p:] * w).sum(0) / w.sum()
    else:
        feat = x[0]
    return model.head(model.fc_norm(feat))


# -- the methods, one image at a time -----------------------------------------------------------

def tome(r_per_block: list[int]) -> Reduce:
    """ToMe: A = even, B = odd positions; the r A tokens with the most similar B partner
    (cosine of head-averaged rotated keys) merge into it, size-weighted; a merged token takes
    its destination's position."""

    def reduce(i, x, a, k, size, pos, p):
        n = x.shape[0]
        r = min(r_per_block[i], (n - p) // 2)
        if r <= 0:
            return x, size, pos
        metric = k.mean(0)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        A, B = list(range(0, n, 2)), list(range(1, n, 2))
        best = {ia: max((float(metric[ia] @ metric[jb]), jb) for jb in B if jb >= p)
                for ia in A if ia >= p}
        ranked = sorted(best, key=lambda ia: -best[ia][0])
        merged = {ia: best[ia][1] for ia in ranked[:r]}
        members = {jb: [jb] for jb in B}
        for ia, jb in merged.items():
            members[jb].append(ia)
        order = list(range(p)) + [ia for ia in A if ia >= p and ia not in merged] + \
            [jb for jb in B if jb >= p]
        rows, sizes = [], []
        for t in order:
            group = members.get(t, [t])
            w = torch.stack([size[g] for g in group])
            rows.append(sum(size[g] * x[g] for g in group) / w.sum())
            sizes.append(w.sum())
        return torch.stack(rows), torch.stack(sizes), [pos[t] for t in order]

    return reduce


def evit(keep_rate: float, locations, fuse: bool = True) -> Reduce:
    """EViT / top-k: keep the ceil(rate * (N - p)) tokens of highest head-averaged class
    attention (descending); the rest fused into one token weighted by their class attention,
    appended last with no position (no rotation)."""

    def reduce(i, x, a, k, size, pos, p):
        if i not in locations:
            return x, size, pos
        n = x.shape[0] - p
        left = math.ceil(keep_rate * n)
        cls = a[:, 0, p:].mean(0)
        order = sorted(range(n), key=lambda j: -float(cls[j]))
        kept, dropped = order[:left], order[left:]
        rows = [x[j] for j in range(p)] + [x[p + j] for j in kept]
        sizes = [size[j] for j in range(p)] + [size[p + j] for j in kept]
        new_pos = pos[:p] + [pos[p + j] for j in kept]
        if fuse and dropped:
            rows.append(sum(cls[j] * x[p + j] for j in dropped))
            sizes.append(sum(size[p + j] for j in dropped))
            new_pos.append(-1)
        return torch.stack(rows), torch.stack(sizes), new_pos

    return reduce


def diffrate(prune_kept: list[int], merge_kept: list[int]) -> Reduce:
    """DiffRate deploy: sort by class attention (prefix first), keep ``prune_kept[i]``, merge
    each token beyond ``merge_kept[i]`` into its most similar (cosine of x) non-prefix kept
    token by a plain mean, size += source size x max(cos, 0); a merged token keeps its
    destination's position."""

    def reduce(i, x, a, k, size, pos, p):
        n = x.shape[0]
        kp, km = min(prune_kept[i], n), min(merge_kept[i], n)
        if km >= n:
            return x, size, pos
        cls = a[:, 0].mean(0)
        order = list(range(p)) + sorted(range(p, n), key=lambda j: -float(cls[j]))
        order = order[:kp]
        toks, sizes, new_pos = [x[j] for j in order], [size[j] for j in order], \
            [pos[j] for j in order]
        groups = [[toks[d]] for d in range(km)]
        new_sizes = sizes[:km]
        for s in range(km, kp):
            cos = [float(toks[s] @ toks[d] / (toks[s].norm() * toks[d].norm()))
                   for d in range(p, km)]
            d = p + max(range(len(cos)), key=lambda j: cos[j])
            groups[d].append(toks[s])
            new_sizes[d] = new_sizes[d] + sizes[s] * max(cos[d - p], 0.0)
        x = torch.stack([torch.stack(g).mean(0) for g in groups])
        return x, torch.stack(new_sizes), new_pos[:km]

    return reduce


def ats(locations, budget: int) -> Select:
    """ATS: score = class attention summed over heads x all-head value norm; the kept query
    rows by the plain inverse-transform sampler of ``tests/methods/test_ats.py``, prefix
    first, then the picks in position order."""
    from tests.methods.test_ats import ref_sample

    def select(i, a, v, p):
        if i not in locations:
            return None
        n = a.shape[-1]
        cls = a[:, 0, :].sum(0)
        vnorm = v.permute(1, 0, 2).reshape(n, -1).norm(dim=-1)
        scores = [float(cls[j] * vnorm[j]) for j in range(p, n)]
        picked = ref_sample(scores, budget - p)
        return list(range(p)) + sorted(j + p for j in picked)

    return select


def dynamicvit(predictors, keep_rate: float, locations, n0_patches: int) -> Before:
    """DynamicViT inference: before each location, the plain predictor of
    ``tests/methods/test_dynamicvit.py`` scores the patch tokens; the top
    ``int(N0 * rho^(s+1))`` survive in their order, with their positions."""
    from tests.methods.test_dynamicvit import _ref_predictor

    def before(i, x, size, pos, p):
        if i not in locations:
            return x, size, pos
        s = list(locations).index(i)
        keep = int(n0_patches * keep_rate ** (s + 1))
        score = _ref_predictor(predictors[s], x[p:])[:, 0]
        top = sorted(torch.argsort(score, descending=True)[:keep].tolist())
        rows = list(range(p)) + [p + j for j in top]
        return x[rows], size[rows], [pos[r] for r in rows]

    return before
