"""Every token method on open_clip's ``VisionTransformer`` against two independent references:

- the same weights copied into the equivalent timm ``VisionTransformer`` (``ln_pre`` ->
  ``norm_pre``, ``in_proj_weight`` -> ``qkv``, ``ln_post`` -> ``norm``), patched with the same
  method: tokens, sizes and pooled features agree (float64);
- a per-image forward written here against open_clip's modules themselves (materialised
  attention from ``in_proj_weight``, ``out_proj``), with the plainly written ToMe and EViT
  reductions of ``test_tome`` / ``test_evit`` inserted after each attention residual.
"""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

import leanvit
from leanvit.adapters import open_clip as oc_adapter
from leanvit.adapters import vit as vit_adapter
from tests.methods.test_evit import evit_reference
from tests.methods.test_tome import tome_reference

open_clip = pytest.importorskip("open_clip")
from open_clip.transformer import VisionTransformer  # noqa: E402

torch.set_num_threads(1)

DEPTH, N0 = 4, 17
#: options that reduce tokens on the 4-block, 17-token model (every registered method)
REDUCING = {
    "none": {}, "tome": dict(r=3), "pitome": dict(r=3), "mctf": dict(r=2), "tofu": dict(r=3),
    "zerotprune": dict(r=3), "evit": dict(keep_rate=0.5, locations=(1, 2)),
    "topk": dict(keep_rate=0.5, locations=(1, 2)), "random": dict(keep_rate=0.5, seed=3),
    "divprune": dict(keep_rate=0.5, locations=(1, 2)), "ats": dict(locations=(1, 2)),
    "dynamicvit": dict(keep_rate=0.5, locations=(1, 2)),
    "diffrate": dict(schedule=([17, 15, 10, 6], [17, 12, 6, 6])),
}


def oc_model(pool_type: str = "tok", ls: float | None = None) -> VisionTransformer:
    """open_clip ViT, 32x32 images, 8x8 patches, width 32, 4 heads, 4 blocks, float64; weights
    redrawn with a large spread so attention rows are peaked and rankings far from ties."""
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, width=32, layers=DEPTH, heads=4,
                              mlp_ratio=2, output_dim=16, pool_type=pool_type,
                              ls_init_value=ls)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name:
                continue
            fan_in = p[0].numel() if p.dim() > 1 else 1
            std = 1.5 / math.sqrt(fan_in) if p.dim() > 1 else 0.1
            if name in ("class_embedding", "positional_embedding"):
                std = 1.0
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.double().eval()


def timm_copy(model: VisionTransformer) -> nn.Module:
    """The timm ViT computing what ``model`` computes, with its weights."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    ls = not isinstance(model.transformer.resblocks[0].ls_1, nn.Identity)
    t = TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=DEPTH, num_heads=4, mlp_ratio=2,
                num_classes=0, global_pool="avg" if model.pool_type == "avg" else "token",
                pre_norm=True, fc_norm=False, init_values=1.0 if ls else None,
                norm_layer=partial(nn.LayerNorm, eps=1e-5)).double().eval()
    with torch.no_grad():
        t.patch_embed.proj.weight.copy_(model.conv1.weight)
        t.cls_token.copy_(model.class_embedding.view(1, 1, -1))
        t.pos_embed.copy_(model.positional_embedding[None])
        t.norm_pre.load_state_dict(model.ln_pre.state_dict())
        t.norm.load_state_dict(model.ln_post.state_dict())
        for blk, ob in zip(t.blocks, model.transformer.resblocks):
            blk.norm1.load_state_dict(ob.ln_1.state_dict())
            blk.norm2.load_state_dict(ob.ln_2.state_dict())
            blk.attn.qkv.weight.copy_(ob.attn.in_proj_weight)
            blk.attn.qkv.bias.copy_(ob.attn.in_proj_bias)
            blk.attn.proj.load_state_dict(ob.attn.out_proj.state_dict())
            blk.mlp.fc1.load_state_dict(ob.mlp.c_fc.state_dict())
            blk.mlp.fc2.load_state_dict(ob.mlp.c_proj.state_dict())
            if ls:
                blk.ls1.gamma.copy_(ob.ls_1.gamma)
                blk.ls2.gamma.copy_(ob.ls_2.gamma)
    return t


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3),
                       dtype=torch.float64)


def test_timm_copy_is_the_same_function():
    model = oc_model("avg", ls=0.5)
    x = images()
    with torch.no_grad():
        pooled = timm_copy(model).forward_head(timm_copy(model).forward_features(x),
                                               pre_logits=True)
        torch.testing.assert_close(model(x), pooled @ model.proj, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pool", ["tok", "avg"])
@pytest.mark.parametrize("method", sorted(leanvit.available_methods()))
def test_method_equals_the_same_method_on_the_timm_copy(method, pool):
    if method not in REDUCING:
        pytest.fail(f"add reducing options for the new method {method!r} to REDUCING")
    model, x = oc_model(pool, ls=0.5 if pool == "avg" else None), images()
    twin = timm_copy(model)
    leanvit.patch(model, method, **REDUCING[method])
    leanvit.patch(twin, method, **REDUCING[method])
    twin.leanvit.load_state_dict(model.leanvit.state_dict())  # DynamicViT's predictors
    with torch.no_grad():
        x_oc, s_oc = oc_adapter.forward_features(model, x)
        x_tm, s_tm = vit_adapter.forward_features(twin, x)
        pooled = oc_adapter.forward_head(model, x_oc, s_oc, pre_logits=True)
        want = vit_adapter.forward_head(twin, x_tm, s_tm, pre_logits=True)
        out = oc_adapter.forward_head(model, x_oc, s_oc)  # through proj
    assert x_oc.shape == x_tm.shape
    if method != "none":
        assert x_oc.shape[1] < N0, "the options must reduce tokens"
    torch.testing.assert_close(x_oc, x_tm, rtol=1e-9, atol=1e-9)
    if s_tm.size is not None:
        torch.testing.assert_close(s_oc.size, s_tm.size)
    torch.testing.assert_close(pooled, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out, want @ model.proj, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------
# A per-image reference on open_clip's modules


def _attention(attn: nn.MultiheadAttention, y, size):
    """nn.MultiheadAttention written out for one image ``y`` ``[N, C]``: (out ``[N, C]``,
    attention ``[H, N, N]``, keys ``[H, N, D]``); ``size`` ``[N]`` or ``None``: log(size) added
    to every key's logits (proportional attention)."""
    n, c = y.shape
    h = attn.num_heads
    q, k, v = (y @ attn.in_proj_weight.t() + attn.in_proj_bias).split(c, dim=-1)
    q, k, v = (t.reshape(n, h, c // h).transpose(0, 1) for t in (q, k, v))
    logits = q @ k.transpose(-1, -2) / math.sqrt(c // h)
    if size is not None:
        logits = logits + size.log()[None, None, :]
    a = logits.softmax(-1)
    out = (a @ v).transpose(0, 1).reshape(n, c)
    return attn.out_proj(out), a, k


def oc_reference(model: VisionTransformer, image, reduce, prop_attn: bool):
    """One image through open_clip's modules with ``reduce`` after each attention residual:
    final tokens (``ln_post``) ``[N', C]``, their sizes ``[N']``, pooled features ``[out]``."""
    t = model.conv1(image[None]).flatten(2)[0].t()  # [N0 - 1, C]
    x = model.ln_pre(torch.cat([model.class_embedding[None], t]) + model.positional_embedding)
    size, source = x.new_ones(len(x)), torch.eye(len(x), dtype=x.dtype)
    for i, blk in enumerate(model.transformer.resblocks):
        out, a, k = _attention(blk.attn, blk.ln_1(x), size if prop_attn else None)
        x = x + blk.ls_1(out)
        x, size, source = reduce(i, x, a, k, size, source, 1)
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    x = model.ln_post(x)
    if model.pool_type == "avg":
        pooled = (x[1:] * size[1:, None]).sum(0) / size[1:].sum()
    else:
        pooled = x[0]
    return x, size, pooled @ model.proj


@pytest.mark.parametrize("pool", ["tok", "avg"])
@pytest.mark.parametrize("method,opts,reduce,prop_attn", [
    ("tome", dict(r=3), tome_reference([3] * DEPTH), True),
    ("tome", dict(r=3, prop_attn=False), tome_reference([3] * DEPTH), False),
    ("evit", dict(keep_rate=0.5, locations=(1, 2)), evit_reference(0.5, (1, 2)), False),
])
def test_method_equals_a_per_image_reference_on_open_clip_modules(method, opts, reduce,
                                                                   prop_attn, pool):
    model, x = oc_model(pool), images()
    leanvit.patch(model, method, **opts)
    with torch.no_grad():
        feats, state = oc_adapter.forward_features(model, x)
        out = model(x)
        for b in range(len(x)):
            ref_x, ref_size, ref_out = oc_reference(model, x[b], reduce, prop_attn)
            torch.testing.assert_close(feats[b], ref_x, rtol=1e-9, atol=1e-9)
            if method == "tome":  # EViT tracks no sizes: its avg pool counts each token once
                torch.testing.assert_close(state.size[b].reshape(-1), ref_size)
                torch.testing.assert_close(out[b], ref_out, rtol=1e-9, atol=1e-9)
            elif pool == "tok":
                torch.testing.assert_close(out[b], ref_out, rtol=1e-9, atol=1e-9)
