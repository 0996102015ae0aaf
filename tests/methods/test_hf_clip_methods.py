"""Token methods on transformers' CLIP / SigLIP towers (``hf_clip``) against independent
references: (1) the same weights copied into the equivalent timm ``VisionTransformer``
(CLIP: class token, ``pre_norm``; SigLIP: no class token, ``global_pool='map'``), patched
with the same method; (2) a per-image loop written against the HF modules directly, with
ToMe's and EViT's plainly written per-image reductions (tests.methods.test_tome / test_evit).
"""
from __future__ import annotations

import math

import pytest
import torch

import leanvit
from leanvit.adapters import vit as vit_adapter

pytest.importorskip("transformers")

from tests.adapters.test_hf_clip import build, images  # noqa: E402
from tests.methods.test_evit import evit_reference  # noqa: E402
from tests.methods.test_tome import tome_reference  # noqa: E402

torch.set_num_threads(1)


def to_timm(hf):
    """The timm ViT with ``hf``'s weights (float64, eval)."""
    from timm.models.vision_transformer import VisionTransformer

    t = hf.vision_model if hasattr(hf, "vision_model") else hf
    clip = hasattr(t, "pre_layrnorm")
    C = t.config.hidden_size
    model = VisionTransformer(
        img_size=64, patch_size=16, embed_dim=C, depth=len(t.encoder.layers),
        num_heads=t.config.num_attention_heads, mlp_ratio=t.config.intermediate_size / C,
        num_classes=0, class_token=clip, pre_norm=clip, global_pool="token" if clip else "map")
    sd = {"patch_embed.proj.weight": t.embeddings.patch_embedding.weight,
          "pos_embed": t.embeddings.position_embedding.weight[None],
          "norm.weight": t.post_layernorm.weight, "norm.bias": t.post_layernorm.bias}
    if clip:
        sd.update({"cls_token": t.embeddings.class_embedding[None, None],
                   "norm_pre.weight": t.pre_layrnorm.weight, "norm_pre.bias": t.pre_layrnorm.bias})
    else:
        sd["patch_embed.proj.bias"] = t.embeddings.patch_embedding.bias
        h = t.head
        w, b = h.attention.in_proj_weight, h.attention.in_proj_bias
        sd.update({"attn_pool.latent": h.probe, "attn_pool.q.weight": w[:C], "attn_pool.q.bias": b[:C],
                   "attn_pool.kv.weight": w[C:], "attn_pool.kv.bias": b[C:],
                   "attn_pool.proj.weight": h.attention.out_proj.weight,
                   "attn_pool.proj.bias": h.attention.out_proj.bias,
                   "attn_pool.norm.weight": h.layernorm.weight, "attn_pool.norm.bias": h.layernorm.bias,
                   "attn_pool.mlp.fc1.weight": h.mlp.fc1.weight, "attn_pool.mlp.fc1.bias": h.mlp.fc1.bias,
                   "attn_pool.mlp.fc2.weight": h.mlp.fc2.weight, "attn_pool.mlp.fc2.bias": h.mlp.fc2.bias})
    for i, layer in enumerate(t.encoder.layers):
        a, p = layer.self_attn, f"blocks.{i}."
        sd.update({p + "norm1.weight": layer.layer_norm1.weight, p + "norm1.bias": layer.layer_norm1.bias,
                   p + "norm2.weight": layer.layer_norm2.weight, p + "norm2.bias": layer.layer_norm2.bias,
                   p + "attn.qkv.weight": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                   p + "attn.qkv.bias": torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
                   p + "attn.proj.weight": a.out_proj.weight, p + "attn.proj.bias": a.out_proj.bias,
                   p + "mlp.fc1.weight": layer.mlp.fc1.weight, p + "mlp.fc1.bias": layer.mlp.fc1.bias,
                   p + "mlp.fc2.weight": layer.mlp.fc2.weight, p + "mlp.fc2.bias": layer.mlp.fc2.bias})
    model.load_state_dict(sd, strict=True)
    return model.double().eval()


def _timm_pooled(model, x):
    feats, state = vit_adapter.forward_features(model, x)
    return feats, vit_adapter.forward_head(model, feats, state, pre_logits=True)


def test_unpatched_models_agree():
    for kind in ("clip", "siglip"):
        hf = build(kind, dtype=torch.float64)
        timm_model = to_timm(hf)
        x = images(dtype=torch.float64)
        with torch.no_grad():
            out = hf(x)
            torch.testing.assert_close(out.pooler_output, timm_model.forward_head(
                timm_model.forward_features(x), pre_logits=True), rtol=1e-9, atol=1e-9)


SETTINGS = [
    ("tome", dict(r=3)), ("tome", dict(r=3, prop_attn=False)), ("pitome", dict(r=3)),
    ("mctf", dict(r=3)), ("tofu", dict(r=3)), ("zerotprune", dict(r=3)),
    ("divprune", dict(keep_rate=0.5, locations=(1,))),
    ("dynamicvit", dict(keep_rate=0.5, locations=(1,))),
    ("evit", dict(keep_rate=0.5, locations=(1,))), ("topk", dict(keep_rate=0.5, locations=(1,))),
    ("ats", dict(locations=(1,))),
]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["clip_proj", "siglip"])
def test_each_method_equals_the_timm_model_with_the_same_weights(kind, impl):
    hf = build(kind, impl, dtype=torch.float64)
    timm_model = to_timm(hf)
    x = images(3, dtype=torch.float64)
    # transformers' eager attention takes its softmax in float32 even in a float64 model (the
    # blocks a method leaves unexposed run it): agreement to 1e-5 there, 1e-7 under SDPA
    tol = dict(rtol=1e-5, atol=1e-5) if impl == "eager" else dict(rtol=1e-7, atol=1e-7)
    for method, opts in SETTINGS:
        if method in ("evit", "topk", "ats") and kind == "siglip":
            continue  # need a class token: refused (tests/adapters/test_hf_clip.py)
        leanvit.patch(hf, method, **opts)
        leanvit.patch(timm_model, method, **opts)
        if method == "dynamicvit":  # the same predictor weights
            timm_model.leanvit.load_state_dict(hf.leanvit.state_dict())
        with torch.no_grad():
            out = hf(x)
            feats, pooled = _timm_pooled(timm_model, x)
        tower = hf.vision_model if kind == "clip_proj" else hf
        tokens = out.last_hidden_state
        if kind == "clip_proj":  # timm norms every token; CLIP's last_hidden_state is not normed
            tokens = tower.post_layernorm(tokens)
            torch.testing.assert_close(out.image_embeds, hf.visual_projection(pooled), **tol)
        else:
            torch.testing.assert_close(out.pooler_output, pooled, **tol, msg=method)
        assert tokens.shape == feats.shape and tokens.shape[1] < 16, method
        torch.testing.assert_close(tokens, feats, **tol, msg=method)
        leanvit.unpatch(hf)
        leanvit.unpatch(timm_model)


# --------------------------------------------------------------------------------------------
# A per-image loop on the HF modules


def _hf_attention(attn, x, size):
    """transformers' CLIP/SigLIP attention written out, ``log(size)`` on the keys:
    (output [B, N, C], attention [B, H, N, N], keys [B, H, N, D])."""
    B, N, C = x.shape
    H = attn.num_heads
    D = C // H
    q, k, v = (proj(x).reshape(B, N, H, D).transpose(1, 2)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    logits = q @ k.transpose(-1, -2) / math.sqrt(D)
    if size is not None:
        logits = logits + size.log()[:, None, None, :]
    a = logits.softmax(-1)
    return attn.out_proj((a @ v).transpose(1, 2).reshape(B, N, C)), a, k


def _hf_reference(tower, x, reduce, prop_attn):
    """Final tokens and sizes, ``reduce`` per block and image after the attention residual."""
    clip = hasattr(tower, "pre_layrnorm")
    h = tower.embeddings(x)
    h = tower.pre_layrnorm(h) if clip else h
    B, N0, _ = h.shape
    p = int(clip)
    size, source = h.new_ones(B, N0), torch.eye(N0, dtype=h.dtype).repeat(B, 1, 1)
    for i, layer in enumerate(tower.encoder.layers):
        out, a, k = _hf_attention(layer.self_attn, layer.layer_norm1(h),
                                  size if prop_attn else None)
        h = h + out
        per = [reduce(i, h[b], a[b], k[b], size[b], source[b], p) for b in range(B)]
        h, size, source = (torch.stack([t[j] for t in per]) for j in range(3))
        h = h + layer.mlp(layer.layer_norm2(h))
    return h, size


def _probe_pool(head, h, size):
    """SigLIP's pooling head written out: the probe attends to the tokens, ``log(size)`` keys."""
    mha = head.attention
    B, N, C = h.shape
    H, D = mha.num_heads, C // mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    q = (head.probe @ w[:C].T + b[:C]).reshape(1, 1, H, D).transpose(1, 2)
    k = (h @ w[C:2 * C].T + b[C:2 * C]).reshape(B, N, H, D).transpose(1, 2)
    v = (h @ w[2 * C:].T + b[2 * C:]).reshape(B, N, H, D).transpose(1, 2)
    a = (q @ k.transpose(-1, -2) / math.sqrt(D) + size.log()[:, None, None, :]).softmax(-1)
    o = mha.out_proj((a @ v).transpose(1, 2).reshape(B, 1, C))
    return (o + head.mlp(head.layernorm(o)))[:, 0]


@pytest.mark.parametrize("kind,method,opts,reduce", [
    ("clip", "tome", dict(r=3), tome_reference([3, 3])),
    ("siglip", "tome", dict(r=3), tome_reference([3, 3])),
    ("clip", "evit", dict(keep_rate=0.5, locations=(0, 1)), evit_reference(0.5, (0, 1))),
])
def test_method_equals_a_per_image_loop_on_the_hf_modules(kind, method, opts, reduce):
    hf = build(kind, "eager", dtype=torch.float64)
    x = images(3, dtype=torch.float64)
    with torch.no_grad():
        ref, size = _hf_reference(hf, x, reduce, prop_attn=method == "tome")
        if kind == "clip":
            pooled = hf.post_layernorm(ref[:, 0])
        else:
            ref = hf.post_layernorm(ref)
            pooled = _probe_pool(hf.head, ref, size)
        leanvit.patch(hf, method, **opts)
        out = hf(x)
    torch.testing.assert_close(out.last_hidden_state, ref, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(out.pooler_output, pooled, rtol=1e-7, atol=1e-7)
