"""Source tracking and the per-stage drawing, checked with reducers written here (independent
of the library's methods) and with ``ats`` and ``none``."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import leanvit
from leanvit.registry import Reducer
from leanvit.ops.tokens import gather_tokens
from leanvit.viz import BLANK, Stage, render, stage_image, trace_stages

torch.set_num_threads(1)


def tiny_vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=64, patch_size=16, embed_dim=48, depth=4, num_heads=3, num_classes=5)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


class KeepTopK(Reducer):
    """Plain top-k by head-averaged class attention in block 1, nothing else (test-only)."""

    k = 6

    def acts_after(self, i):
        return i == 1

    def after_attention(self, i, x, signals, state):
        order = signals.cls_attn[:, 1:].argsort(dim=1, descending=True)[:, : self.k] + 1
        index = torch.cat([torch.zeros_like(order[:, :1]), order.sort(dim=1).values], dim=1)
        return gather_tokens(x, index), state.gather(index)


class MergePairs(Reducer):
    """In block 2, merges token 1 into token 2 (sources united with max); test-only."""

    def acts_after(self, i):
        return i == 2

    def after_attention(self, i, x, signals, state):
        src = state.source.clone()
        src[:, 2] = torch.maximum(src[:, 1], src[:, 2])
        keep = [0] + list(range(2, x.shape[1]))
        return x[:, keep], state.replace(source=src[:, keep])


class ForgetsSource(Reducer):
    def acts_after(self, i):
        return i == 0

    def after_attention(self, i, x, signals, state):
        return x[:, :-1], state


def with_reducer(model, cls):
    leanvit.patch(model, "none")
    reducer = cls(model.leanvit.options, model.leanvit.info)
    reducer.method_name = "test"
    model.leanvit = reducer
    return model


def test_unpatched_model_has_no_stages_and_stays_unpatched():
    model = tiny_vit()
    assert trace_stages(model, torch.randn(3, 64, 64)) == []
    assert not leanvit.is_patched(model)


def test_topk_stage_holds_the_kept_patches():
    model = with_reducer(tiny_vit(), KeepTopK)
    image = torch.randn(1, 3, 64, 64)
    stages = trace_stages(model, image)
    assert [s.block for s in stages] == [1]
    # plain recomputation of block 1's class attention on the unpatched model
    ref = tiny_vit()
    with torch.no_grad():
        x = ref.norm_pre(ref._pos_embed(ref.patch_embed(image)))
        x = ref.blocks[0](x)
        attn = ref.blocks[1].attn
        q, k, _ = attn.qkv(ref.blocks[1].norm1(x)).reshape(1, 17, 3, 3, 16).permute(2, 0, 3, 1, 4)
        cls = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)[0, 0]
    expected = {0} | {int(j) + 1 for j in cls[1:].topk(KeepTopK.k).indices}
    src = stages[0].source
    assert src.shape == (KeepTopK.k + 1, 17)
    assert {int(r.argmax()) for r in src} == expected
    assert torch.all(src.sum(1) == 1)


def test_merged_group_is_traced_and_drawn_in_its_mean_colour():
    model = with_reducer(tiny_vit(), MergePairs)
    stages = trace_stages(model, torch.randn(3, 64, 64))
    assert [(s.block, s.num_tokens) for s in stages] == [(2, 16)]
    assert stages[0].source[1, 1:3].tolist() == [1.0, 1.0]  # patches 0 and 1 in one token
    image = np.random.default_rng(0).random((64, 64, 3))
    drawn = stage_image(image, stages[0], (4, 4))
    mean = image[:16, :32].mean(axis=(0, 1))
    assert np.allclose(drawn[2:14, 2:14], mean) and np.allclose(drawn[2:14, 18:30], mean)
    assert np.allclose(drawn[1:15, 16], mean)  # no outline inside the group ...
    assert np.all(drawn[16, :32] == 0.0) and np.all(drawn[:16, 32] == 0.0)  # ... but around
    assert np.array_equal(drawn[17:], image[17:]) and np.array_equal(drawn[:, 33:], image[:, 33:])


def test_dropped_patches_are_blanked():
    src = torch.zeros(3, 5)
    src[0, 0] = src[1, 1] = src[2, 4] = 1  # cls, patch 0 and patch 3 kept of a 2x2 grid
    image = np.full((4, 4, 3), 0.3)
    drawn = stage_image(image, Stage(block=0, source=src, prefix=1), (2, 2))
    assert np.allclose(drawn[:2, 2:], BLANK) and np.allclose(drawn[2:, :2], BLANK)
    assert np.allclose(drawn[:2, :2], 0.3) and np.allclose(drawn[2:, 2:], 0.3)


def test_method_without_source_tracking_is_a_clear_error():
    model = with_reducer(tiny_vit(), ForgetsSource)
    with pytest.raises(ValueError, match="state.source"):
        trace_stages(model, torch.randn(3, 64, 64))


def test_ats_stages_and_png(tmp_path):
    model = leanvit.patch(tiny_vit(), "ats", locations=(1, 3))
    stages = trace_stages(model, torch.randn(3, 64, 64))
    assert [s.block for s in stages] == [1, 3]
    for s in stages:
        assert torch.all(s.source.sum(1) == 1)  # ATS samples, never merges
        assert s.num_tokens <= 17
    out = tmp_path / "sub" / "ats.png"
    titles = render(np.random.default_rng(0).random((64, 64, 3)), stages, (4, 4), out)
    assert titles == ["input: 16 patches"] + [f"after block {s.block}: {s.num_tokens} tokens"
                                              for s in stages]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(out.parent.iterdir()) == [out]  # no temporary file left


def test_trace_stages_takes_one_image():
    with pytest.raises(ValueError, match="one image"):
        trace_stages(tiny_vit(), torch.randn(2, 3, 64, 64))
