"""Attention-pool heads (timm ``AttentionPoolLatent``, ``global_pool='map'``): MACs against a
formula written out here and against PyTorch's FLOP counter, and the pool on reduced tokens
(merged tokens weighted by size, padding left out) against a plainly written pool."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import leanvit
from leanvit.adapters.attention_pool import attention_pool_macs

torch.set_num_threads(1)


def tiny_siglip(**kw) -> nn.Module:
    """SigLIP's architecture (no class token, ``global_pool='map'``) at toy size, float64."""
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=4, depth=3, num_classes=5)
    cfg.update(kw)
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_siglip_224", **cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # spread-out weights: peaked attention, no near-ties in rankings
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(p.shape[-1], 1)))
    return model.double().eval()


def flop_counter_macs(model: nn.Module, x: torch.Tensor) -> float:
    """FlopCounterMode total / 2 per image with materialised attention everywhere (the
    counter does not see CPU fused SDPA)."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    model.requires_grad_(False)  # AttentionPoolLatent's latent.expand trips the counter's
    with FlopCounterMode(display=False) as counter:  # module tracker under no_grad
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]


def test_pool_macs_formula_written_out():
    from timm.layers import AttentionPoolLatent

    pool = AttentionPoolLatent(48, num_heads=4, mlp_ratio=2.0, latent_len=3)
    n, e, L = 10, 48, 3
    expected = (L * e * e            # q on the latent queries
                + n * e * 2 * e      # keys and values of the n tokens
                + 2 * L * n * e      # q k^T and attention @ v
                + L * e * e          # output projection
                + L * 2 * e * 2 * e)  # MLP fc1 + fc2 (ratio 2)
    assert attention_pool_macs(pool, n) == expected
    assert torch.equal(attention_pool_macs(pool, torch.tensor([10.0, 4.0])),
                       torch.tensor([expected, expected - 6 * (2 * e * e + 2 * L * e)]))


def test_unknown_pool_with_parameters_is_an_error():
    with pytest.raises(ValueError, match="cannot count the MACs of the pooling module Linear"):
        attention_pool_macs(nn.Linear(4, 4), 3)
    assert attention_pool_macs(nn.Identity(), 3) == 0


@pytest.mark.parametrize("method,options", [("none", {}), ("tome", {"r": 3}),
                                            ("ats", {"locations": (1,)})])
def test_count_macs_matches_flop_counter_with_attention_pool(method, options):
    model = tiny_siglip(class_token=True) if method == "ats" else tiny_siglip()
    g = torch.Generator().manual_seed(0)  # ATS keeps 15, 14, 15, 13 tokens: padded batch
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=g)
    expected = flop_counter_macs(model, x)  # unpatched: the dense model
    leanvit.patch(model, method, **options)
    report = leanvit.count_macs(model, x)
    if method == "none":
        assert report.total == pytest.approx(expected, rel=1e-12)
        return
    # a token method: the counter, run on one image at a time, sees only real tokens
    per_image = [flop_counter_macs(model, x[b:b + 1]) for b in range(4)]
    if method == "ats":  # + ATS's value norms (H*D per token of block 1), no matmul for the
        per_image = [m + 32 * 17 for m in per_image]  # counter; padding counts in neither
        assert len(set(per_image)) > 1  # the images kept different token counts
    assert report.total == pytest.approx(sum(per_image) / 4, rel=1e-12)
    assert report.total < expected


def test_dense_count_includes_the_pool():
    model = tiny_siglip()
    report = leanvit.count_macs(model, torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert report.head == attention_pool_macs(model.attn_pool, 16) + 32 * 5


def ref_pool(pool, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """timm's AttentionPoolLatent for ONE image ``x`` ``[N, C]`` written out, each key's
    logits + log(size) (a token standing for s patches weighs as s tokens)."""
    H, D = pool.num_heads, pool.head_dim
    q = pool.q(pool.latent[0]).reshape(-1, H, D).transpose(0, 1)  # [H, L, D]
    kv = pool.kv(x).reshape(-1, 2, H, D)
    k, v = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)  # [H, N, D]
    a = ((q @ k.transpose(-1, -2)) / math.sqrt(D) + size.log()).softmax(-1)
    out = (a @ v).transpose(0, 1).reshape(q.shape[1], H * D)
    out = pool.proj(out)
    out = out + pool.mlp(pool.norm(out))
    return out[0]


def test_pool_weighs_merged_tokens_by_size_and_skips_padding():
    from leanvit.adapters import vit as vit_adapter

    model = leanvit.patch(tiny_siglip(), "tome", r=3)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        feats, state = vit_adapter.forward_features(model, x)
        out = model(x)
        for b in range(2):
            pooled = ref_pool(model.attn_pool, feats[b], state.size[b])
            ref = model.head(model.fc_norm(pooled))
            torch.testing.assert_close(out[b], ref, rtol=1e-9, atol=1e-9)
        # padding: the same tokens with two padded rows appended give the same pooled output
        pad = torch.cat([feats, torch.randn(2, 2, feats.shape[2], dtype=feats.dtype)], 1)
        valid = torch.cat([torch.ones(2, feats.shape[1], dtype=torch.bool),
                           torch.zeros(2, 2, dtype=torch.bool)], 1)
        size = torch.cat([state.size, torch.ones(2, 2, dtype=state.size.dtype)], 1)
        padded = vit_adapter.pool(model, pad, state.replace(size=size, valid=valid))
        torch.testing.assert_close(padded, vit_adapter.pool(model, feats, state),
                                   rtol=1e-12, atol=1e-12)


def test_unreduced_pool_is_timms_bit_for_bit():
    model = tiny_siglip()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        leanvit.patch(model, "tome", r=0)
        assert torch.equal(model(x), ref)
