"""Compacted models under the ViT adapter: token methods on top, query selection, MACs."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import leanvit
from leanvit import registry
from leanvit.macs import traced_macs
from leanvit.registry import Method, Reducer
from tests.compaction.test_compaction import images, tiny

KEEP = 9  # tokens kept by the test reducer after block 0's attention


@dataclass(frozen=True)
class _NoOptions:
    pass


class _DropTail(Reducer):
    """Keeps the first KEEP tokens after block 0's attention (a minimal token reducer)."""

    def acts_after(self, i):
        return i == 0

    def after_attention(self, i, x, signals, state):
        assert signals is not None and signals.cls_attn.shape == (x.shape[0], x.shape[1])
        return x[:, :KEEP], state.replace(size=None)


class _SelectRows(Reducer):
    """Computes only some query rows of block 0 (ATS-style query selection)."""

    def selects_queries(self, i):
        return i == 0

    def select_queries(self, i, signals, state):
        B, N = signals.q.shape[0], signals.q.shape[2]
        rows = torch.tensor([0, 2, 3, 7, N - 1]).expand(B, -1)
        return rows, state


@pytest.fixture
def methods():
    added = [registry.register(Method("_test_drop_tail", _NoOptions,
                                      lambda o, info: _DropTail(o, info))),
             registry.register(Method("_test_select_rows", _NoOptions,
                                      lambda o, info: _SelectRows(o, info)))]
    yield
    for m in added:
        registry._METHODS.pop(m.name, None)


def _compacted(hallucination="mix"):
    model = leanvit.compact(tiny(), hallucination=hallucination)
    with torch.no_grad():  # move the cheap operation away from a copy
        for blk in model.blocks:
            blk.attn.hallucinate.weight.add_(0.3 * torch.randn_like(blk.attn.hallucinate.weight))
    return model.eval()


@pytest.mark.parametrize("hallucination", ["mix", "dwconv"])
def test_patch_none_on_a_compacted_model_is_bit_identical(hallucination):
    model = _compacted(hallucination)
    x = images()
    with torch.no_grad():
        ref = model(x)
        leanvit.patch(model, "none")
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def _block_by_hand(blk, x, after_attn=None, rows=None):
    """timm Block.forward written out, with a token cut or query rows in the middle."""
    a = blk.attn(blk.norm1(x))
    if rows is not None:
        a, x = a[:, rows], x[:, rows]
    x = x + blk.ls1(a)
    if after_attn is not None:
        x = after_attn(x)
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


@pytest.mark.parametrize("hallucination", ["mix", "dwconv"])
def test_token_reducer_on_a_compacted_model_matches_blocks_run_by_hand(methods, hallucination):
    model = _compacted(hallucination)
    x = images()
    with torch.no_grad():
        h = model._pos_embed(model.patch_embed(x))
        h = _block_by_hand(model.blocks[0], h, after_attn=lambda t: t[:, :KEEP])
        h = _block_by_hand(model.blocks[1], h)
        ref = model.forward_head(model.norm(h))
        leanvit.patch(model, "_test_drop_tail")
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hallucination", ["mix", "dwconv"])
def test_query_selection_gives_the_selected_rows_of_the_full_attention(methods, hallucination):
    model = _compacted(hallucination)
    x = images()
    rows = [0, 2, 3, 7, 16]
    with torch.no_grad():
        h = model._pos_embed(model.patch_embed(x))
        h = _block_by_hand(model.blocks[0], h, rows=rows)
        h = _block_by_hand(model.blocks[1], h)
        ref = model.forward_head(model.norm(h))
        leanvit.patch(model, "_test_select_rows")
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_cls_attention_signal_includes_hallucinated_heads(methods):
    model = _compacted("dwconv")
    blk = model.blocks[0]
    x = images()
    seen = {}

    class _Spy(Reducer):
        def acts_after(self, i):
            return i == 0

        def after_attention(self, i, t, signals, state):
            seen["heads"] = signals.cls_attn_heads
            return t, state

    registry.register(Method("_test_spy", _NoOptions, lambda o, info: _Spy(o, info)))
    try:
        with torch.no_grad():
            y = blk.norm1(model._pos_embed(model.patch_embed(x)))
            q, k, v = blk.attn.leanvit_qkv(y)
            full = blk.attn.attention_maps(q, k)  # [B, H, N, N]
            leanvit.patch(model, "_test_spy")
            model(x)
    finally:
        registry._METHODS.pop("_test_spy", None)
    torch.testing.assert_close(seen["heads"], full[:, :, 0], atol=1e-6, rtol=1e-5)


def test_tome_composes_with_compaction():
    if "tome" not in leanvit.available_methods():
        pytest.skip("the tome method is not in this branch (issue 4a)")
    model = _compacted()
    leanvit.patch(model, "tome", r=2)
    assert model(images()).shape == (2, 1000)
    assert leanvit.count_macs(model, images()).total < leanvit.count_macs(_compacted(),
                                                                         images()).total


@pytest.mark.parametrize("hallucination,op_macs", [("mix", 1 * 2), ("dwconv", 1 * 9)])
def test_count_macs_of_a_compacted_vit_follows_the_hand_formula(hallucination, op_macs):
    model = leanvit.compact(tiny(), hallucination=hallucination)
    leanvit.reparameterize(model)
    x = images()
    N, C, D, H, Hc, m, r = 17, 192, 64, 3, 2, 768, 128
    attn = N * C * (2 * Hc + H) * D + Hc * D * N * N + op_macs * N * N + H * D * N * N + N * C * C
    mlp = N * (C * m + m * r + r * C)
    stem, head = 16 * 192 * 3 * 16 * 16, 192 * 1000
    report = leanvit.count_macs(model, x)
    assert report.total == stem + head + 2 * (attn + mlp)
    assert traced_macs(model, x) == report.total  # the traced count agrees
    base = tiny()
    assert leanvit.count_macs(base, x).total > report.total


def test_traced_macs_see_pvt_and_nextvit_savings():
    x = images(1)
    base = traced_macs(tiny("pvt_v2_b0"), x)
    model = leanvit.reparameterize(leanvit.compact(tiny("pvt_v2_b0")))
    assert traced_macs(model, x) < base
    base = traced_macs(tiny("nextvit_small"), x)  # attention only: no SVD of wide layers
    assert traced_macs(leanvit.compact(tiny("nextvit_small"), ffn=None), x) < base


class _SoftMask(Reducer):
    """Sets a training keep-mask before block 0 (as DynamicViT does while training)."""

    def acts_before(self, i):
        return i == 0

    def before_block(self, i, x, state):
        keep = torch.ones(x.shape[0], x.shape[1])
        keep[:, 3::2] = 0.0
        keep[1, 4] = 0.5
        return x, state.replace(mask=keep)


def _masked_block_by_hand(blk, x, keep):
    """hMHSA (mix) with the eps-softmax keep-mask, per head from the raw qkv weights."""
    from leanvit.ops.attention import masked_softmax

    attn = blk.attn
    B, N, C = x.shape
    Hc, H, D = attn.computed_heads, attn.num_heads, attn.head_dim
    y = blk.norm1(x)
    qkv = y @ attn.qkv.weight.T + attn.qkv.bias
    q = [qkv[..., h * D:(h + 1) * D] for h in range(Hc)]
    k = [qkv[..., (Hc + h) * D:(Hc + h + 1) * D] for h in range(Hc)]
    v = [qkv[..., (2 * Hc + h) * D:(2 * Hc + h + 1) * D] for h in range(H)]
    logits = [attn.scale * q[h] @ k[h].transpose(1, 2) for h in range(Hc)]
    w = attn.hallucinate.weight
    logits += [sum(w[j, c] * logits[c] for c in range(Hc)) for j in range(H - Hc)]
    a = masked_softmax(torch.stack(logits, 1), keep)
    out = torch.cat([a[:, h] @ v[h] for h in range(H)], dim=-1)
    x = x + blk.ls1(attn.proj(out))
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


def test_training_keep_mask_runs_through_hallucinated_heads(methods):
    model = _compacted("mix")
    registry.register(Method("_test_soft_mask", _NoOptions, lambda o, info: _SoftMask(o, info)))
    x = images()
    try:
        with torch.no_grad():
            h = model._pos_embed(model.patch_embed(x))
            keep = torch.ones(h.shape[0], h.shape[1])
            keep[:, 3::2] = 0.0
            keep[1, 4] = 0.5
            for blk in model.blocks:
                h = _masked_block_by_hand(blk, h, keep)
            ref = model.forward_head(model.norm(h))
            leanvit.patch(model, "_test_soft_mask")
            out = model(x)
    finally:
        registry._METHODS.pop("_test_soft_mask", None)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hallucination", ["mix", "dwconv"])
def test_query_selection_macs_match_what_runs(methods, hallucination):
    """With query selection, mix maps only the selected rows; dwconv needs all rows' logits:
    the adapter's count equals what the flop counter sees in the attention."""
    model = _compacted(hallucination)
    leanvit.patch(model, "_test_select_rows")
    x = images()
    counted = leanvit.count_macs(model, x)
    traced = traced_macs(model, x)
    # the signals the test reducer does not read cost nothing; the rest is the same products
    assert counted.total == pytest.approx(traced, rel=1e-9)
