"""The token engine (leanvit.adapters.tokens) runs a family that is only a spec: here a small
encoder written with ``nn.MultiheadAttention`` blocks (open_clip's layout: ``ln_pre``,
``ln_1``, fused ``in_proj_weight``, ``out_proj``), registered as a family in the test."""
from __future__ import annotations

import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leanvit
from leanvit import adapters
from leanvit.adapters import base
from leanvit.adapters.tokens import (BlockParts, Embedding, TokenEngine, TokenSpec,
                                     check_images, linear_of, loss_tokens, residual,
                                     token_weights)
from leanvit.registry import ModelInfo

torch.set_num_threads(1)


class ToyBlock(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, h, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Toy(nn.Module):
    """Class token, absolute positions, ``ln_pre``, blocks, ``ln_post``, class-token head."""

    def __init__(self, d: int = 32, h: int = 2, depth: int = 3, size: int = 32, patch: int = 8):
        super().__init__()
        self.size, self.grid = size, size // patch
        self.proj = nn.Conv2d(3, d, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 1 + self.grid ** 2, d))
        self.ln_pre, self.ln_post = nn.LayerNorm(d), nn.LayerNorm(d)
        self.blocks = nn.ModuleList(ToyBlock(d, h) for _ in range(depth))
        self.head = nn.Linear(d, 10)

    def embed(self, x):
        t = self.proj(x).flatten(2).transpose(1, 2)
        return self.ln_pre(torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos)

    def forward(self, x):
        t = self.embed(x)
        for blk in self.blocks:
            t = blk(t)
        return self.head(self.ln_post(t)[:, 0])


class ToySpec(TokenSpec):
    def check_input(self, model, images):
        check_images(images, 3, (model.size, model.size))

    def embed(self, model, images):
        return Embedding(model.embed(images), model.proj.weight.numel() * model.grid ** 2, {})

    def prefix(self, model):
        return 1

    def final_norm(self, model):
        return model.ln_post

    def parts(self, blk):
        return BlockParts(blk, blk.ln_1, blk.attn, None, blk.ln_2, blk.mlp, None)

    def plain_attention(self, attn, y, state, ctx):
        return attn(y, y, y, need_weights=False)[0]

    def qkv(self, attn, y):
        B, N, C = y.shape
        q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        heads = [t.reshape(B, N, attn.num_heads, -1).transpose(1, 2) for t in (q, k, v)]
        return (*heads, None)

    def output(self, attn, out, gate):
        B, H, K, D = out.shape
        return attn.out_proj(out.transpose(1, 2).reshape(B, K, H * D))

    def params(self, attn):
        return attn.head_dim ** -0.5, True, attn.dropout if attn.training else 0.0

    def attention_macs(self, attn, n_kv, n_q):  # in_proj_weight is no nn.Linear: say it
        c = attn.embed_dim
        return n_kv * 3 * c * c + 2 * n_q * n_kv * c + n_q * c * c

    def plain_head(self, model, x, pre_logits):
        return x[:, 0] if pre_logits else model.head(x[:, 0])

    def head(self, model, x, state, pre_logits):
        return self.plain_head(model, x, pre_logits)  # class-token pooling: nothing to weight

    def head_macs(self, model, x, state, pre_logits):
        return 0 if pre_logits else linear_of(model.head)


def _family(monkeypatch) -> None:
    """Register the toy spec as family ``toy`` (first match wins)."""
    engine = TokenEngine(ToySpec(), "_PatchedToy")
    mod = types.ModuleType("toy_adapter")
    (mod.forward_features, mod.forward_head, mod.embed, mod.run_blocks, mod.block_macs,
     mod.PATCHED) = engine.exports()
    mod.FAMILY, mod.KIND, mod.DESCRIPTION = "toy", "tokens", "toy (test)"
    mod.matches = lambda cls: issubclass(cls, Toy)
    mod.check_supported = lambda model: None
    mod.check_input = engine.spec.check_input
    mod.loss_tokens, mod.token_weights = loss_tokens, token_weights
    mod.describe = lambda m: ModelInfo(
        family="toy", depth=len(m.blocks), embed_dim=m.cls.shape[-1],
        num_heads=m.blocks[0].attn.num_heads, num_prefix_tokens=1, has_class_token=True,
        num_patches=m.grid ** 2, global_pool="token", img_size=(m.size, m.size))
    monkeypatch.setattr(adapters, "FAMILIES",
                        {"toy": base.Family.from_module(mod), **adapters.FAMILIES})


def test_residual_skips_identities_and_keeps_timm_order():
    a = torch.randn(2, 3)
    gamma = torch.randn(3)
    assert residual(None, nn.Identity()) is None and residual(nn.Identity(), None) is None
    assert torch.equal(residual(gamma, nn.Identity())(a), gamma * a)
    drop = nn.Dropout(0.5).eval()
    assert residual(None, drop) is drop
    assert torch.equal(residual(gamma, drop)(a), drop(gamma * a))


@pytest.mark.parametrize("method,options", [("none", {}), ("tome", {"r": 0}),
                                            ("evit", {"keep_rate": 1.0}),
                                            ("topk", {"keep_rate": 1.0})])
def test_keep_all_on_a_spec_family_is_bit_identical(monkeypatch, method, options):
    _family(monkeypatch)
    torch.manual_seed(0)
    model = Toy().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        leanvit.patch(model, method, **options)
        assert model.leanvit.info.family == "toy"
        out = model(x)
        leanvit.unpatch(model)
        assert torch.equal(model(x), ref)
    if method in ("none", "tome"):  # the module itself runs: bit for bit
        assert torch.equal(out, ref)
    else:  # signals read: q/k/v computed by the spec, the one attention function
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,options", [("none", {}), ("tome", {"r": 3}),
                                            ("evit", {"keep_rate": 0.5}), ("ats", {})])
def test_a_spec_family_runs_the_methods_and_counts_its_macs(monkeypatch, method, options):
    _family(monkeypatch)
    torch.manual_seed(0)
    model = Toy().eval()
    x = torch.randn(2, 3, 32, 32)
    dense = leanvit.count_macs(model, x)
    leanvit.patch(model, method, **options)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    report = leanvit.count_macs(model, x)
    n, c = 17, 32  # per block: q/k/v and out 4NC^2, q k^T and attn @ v 2N^2C, MLP 8NC^2
    assert [b.attention + b.mlp for b in dense.per_block] == [12 * n * c * c + 2 * n * n * c] * 3
    assert dense.stem == 16 * 3 * 8 * 8 * c and dense.head == c * 10
    if method == "none":
        assert report.total == dense.total
    else:
        assert report.per_block[-1].tokens_out < n and report.total < dense.total


def test_spec_family_refuses_bad_images(monkeypatch):
    _family(monkeypatch)
    model = leanvit.patch(Toy().eval(), "tome", r=2)
    with pytest.raises(ValueError, match="model was built for 32x32 images, got 16x16"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        model([1, 2])
    assert dataclasses.is_dataclass(model.leanvit.info)
