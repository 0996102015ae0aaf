"""The ViT adapter's hooks against plain reference computations."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import leanvit
from leanvit.registry import Method, Reducer
from leanvit.ops.tokens import gather_tokens
from tests.conftest import tiny_vit


@dataclass(frozen=True)
class _NoOptions:
    pass


def _method(name, reducer_cls):
    return Method(name, _NoOptions, lambda o, i: reducer_cls(o, i))


class _Capture(Reducer):
    """Keeps the signals of block 0 so the test can compare them with the full attention."""

    def acts_after(self, i):
        return i == 0

    def after_attention(self, i, x, signals, state):
        self.seen = (signals.cls_attn, signals.cls_attn_heads, signals.keys, signals.value_norm,
                     signals.k, signals.v)
        return x, state


def test_signals_equal_rows_of_the_materialised_attention(temp_method):
    temp_method(_method("_capture", _Capture))
    model = tiny_vit(depth=1)
    x = torch.randn(2, 3, 64, 64)
    leanvit.patch(model, "_capture")
    with torch.no_grad():
        out = model(x)
    cls_attn, cls_heads, keys, vnorm, k, v = model.leanvit.seen
    # plain reference: recompute q, k, v from the block input and the whole attention map
    leanvit.unpatch(model)
    with torch.no_grad():
        ref_out = model(x)
        t = model._pos_embed(model.patch_embed(x))
        blk = model.blocks[0]
        y = blk.norm1(t)
        B, N, C = y.shape
        H = blk.attn.num_heads
        qkv = y @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
        q, kk, vv = qkv.reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        attn = ((q @ kk.transpose(-2, -1)) / (C // H) ** 0.5).softmax(-1)
    torch.testing.assert_close(cls_heads, attn[:, :, 0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cls_attn, attn[:, :, 0].mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(keys, kk.mean(1))
    torch.testing.assert_close(vnorm, vv.transpose(1, 2).reshape(B, N, C).norm(dim=-1))
    assert torch.equal(out, ref_out)  # a method that reads signals changes nothing


class _DuplicateToken(Reducer):
    """After block 0's attention, append a copy of token 5 (no sizes)."""

    def acts_after(self, i):
        return i == 0

    def after_attention(self, i, x, signals, state):
        return torch.cat([x, x[:, 5:6]], dim=1), state


class _SizeTwo(Reducer):
    """After block 0's attention, give token 5 size 2 with proportional attention."""

    def acts_after(self, i):
        return i == 0

    def after_attention(self, i, x, signals, state):
        size = x.new_ones(x.shape[:2])
        size[:, 5] = 2
        return x, state.replace(size=size, prop_attn=True)


def test_size_with_proportional_attention_equals_duplicated_tokens(temp_method):
    """A token of size s with log(s) attention bias and size-weighted average pooling is
    exactly equivalent to s identical tokens: this checks the bias and the pooling."""
    temp_method(_method("_dup", _DuplicateToken))
    temp_method(_method("_size2", _SizeTwo))
    x = torch.randn(2, 3, 64, 64)
    outs = []
    for name in ("_dup", "_size2"):
        model = leanvit.patch(tiny_vit("vit_small_patch16_224", global_pool="avg", depth=3,
                                       class_token=False), name)
        with torch.no_grad():
            outs.append(model(x))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


class _Pad(Reducer):
    """Before block 1, append 3 garbage tokens marked as padding."""

    def acts_before(self, i):
        return i == 1

    def before_block(self, i, x, state):
        pad = torch.randn(x.shape[0], 3, x.shape[2]) * 100
        valid = torch.ones(x.shape[0], x.shape[1] + 3, dtype=torch.bool)
        valid[:, -3:] = False
        return torch.cat([x, pad], 1), state.replace(valid=valid)


def test_padding_never_influences_real_tokens_or_pooling(temp_method):
    temp_method(_method("_pad", _Pad))
    x = torch.randn(2, 3, 64, 64)
    for pool in ("avg", "token", "avgmax"):
        model = tiny_vit("vit_small_patch16_224", global_pool=pool, depth=3)
        with torch.no_grad():
            ref = model(x)
            leanvit.patch(model, "_pad")
            out = model(x)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    report = leanvit.count_macs(model, x)
    assert report.per_block[2].tokens_in == 17  # 16 patches + cls; padding not counted


class _AllRowsReversed(Reducer):
    """Select every query row, in reverse order (a permutation of the tokens)."""

    def selects_queries(self, i):
        return i == 0

    def select_queries(self, i, signals, state):
        B, N = signals.q.shape[0], signals.q.shape[2]
        rows = torch.arange(N - 1, -1, -1).expand(B, N)
        return rows, state.gather(rows) if state.size is not None else state


def test_query_selection_computes_the_selected_rows(temp_method):
    temp_method(_method("_rev", _AllRowsReversed))
    model = tiny_vit(depth=1, num_classes=0, global_pool="")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.forward_features(x)
        leanvit.patch(model, "_rev")
        out = model.forward_features(x)
    rows = torch.arange(ref.shape[1] - 1, -1, -1).expand(2, -1)
    torch.testing.assert_close(out, gather_tokens(ref, rows), atol=1e-5, rtol=1e-5)


class _SoftMask(Reducer):
    """A training keep-mask that drops the last 4 tokens from block 1 on."""

    def acts_before(self, i):
        return i == 1

    def before_block(self, i, x, state):
        mask = x.new_ones(x.shape[:2])
        mask[:, -4:] = 0
        return x, state.replace(mask=mask)


class _Remove(Reducer):
    def acts_before(self, i):
        return i == 1

    def before_block(self, i, x, state):
        return x[:, :-4], state


def test_training_mask_equals_removal_for_kept_tokens(temp_method):
    """Masking keys out (eps-softmax) gives the kept tokens what removing the others gives."""
    temp_method(_method("_mask", _SoftMask))
    temp_method(_method("_remove", _Remove))
    x = torch.randn(2, 3, 64, 64)
    outs = []
    for name in ("_mask", "_remove"):
        model = leanvit.patch(tiny_vit(depth=3, num_classes=0, global_pool=""), name)
        with torch.no_grad():
            outs.append(model.forward_features(x))
    torch.testing.assert_close(outs[0][:, :-4], outs[1], atol=1e-4, rtol=1e-4)
