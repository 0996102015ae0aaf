"""``topk`` (class-attention top-k without fusion) against a plainly written reference."""
from __future__ import annotations

import math

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled

import leanvit
from leanvit.adapters import vit as vit_adapter

from tests.methods._vit_reference import forward, head, tiny_vit


def topk_reference(keep_rate, locations):
    """Keep the prefix and the ceil(keep_rate * (N - prefix)) tokens with the highest
    head-averaged class attention, in descending attention order; drop the rest."""

    def reduce(i, x, a, k, size, source, p):
        if i not in locations:
            return x, size, source
        cls = a[:, 0, :].mean(0)
        rest = sorted(range(p, x.shape[0]), key=lambda j: -float(cls[j]))
        kept = list(range(p)) + rest[:math.ceil(keep_rate * (x.shape[0] - p))]
        return x[kept], size[kept], source[kept]

    return reduce


def _check(model, keep_rate, locations):
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref_x, ref_size, ref_src = forward(model, images, topk_reference(keep_rate, locations))
        ref_logits = head(model, ref_x, ref_size)
        leanvit.patch(model, "topk", keep_rate=keep_rate, locations=locations)
        logits = model(images)
        reducer = model.leanvit
        # trace which original tokens survive, as a visualiser would
        reducer.init_state = lambda state, x: state.replace(
            source=torch.eye(x.shape[1], dtype=x.dtype).expand(x.shape[0], -1, -1))
        x, state = vit_adapter.forward_features(model, images)
    assert torch.equal(state.source, ref_src)
    torch.testing.assert_close(x, ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    return x


def test_matches_reference():
    x = _check(tiny_vit(seed=1), 0.7, (1, 2, 3))
    assert x.shape[1] == 1 + math.ceil(0.7 * math.ceil(0.7 * math.ceil(0.7 * 16)))


def test_distilled_and_register_prefix_tokens_are_kept_in_front():
    _check(tiny_vit(cls=VisionTransformerDistilled, seed=2), 0.5, (0, 2))
    _check(tiny_vit(reg_tokens=2, seed=3), 0.6, (1, 3))


def test_average_pooling():
    _check(tiny_vit(global_pool="avg", seed=4), 0.5, (1,))


def test_default_locations_and_no_fuse_option():
    model = leanvit.patch(tiny_vit(), "topk")
    assert sorted(model.leanvit.locations) == [1, 2, 3]
    with pytest.raises(ValueError, match="unknown option"):
        leanvit.patch(tiny_vit(), "topk", fuse=True)


def test_keep_rate_one_is_bit_identical():
    model = tiny_vit(seed=5)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = model(images)
        leanvit.patch(model, "topk", keep_rate=1.0)
        after = model(images)
    assert torch.equal(before, after)


@pytest.mark.parametrize("options, error", [
    (dict(keep_rate=0.0), ValueError), (dict(keep_rate=1.5), ValueError),
    (dict(keep_rate=None), TypeError), (dict(locations=(1, 4)), ValueError),
    (dict(locations=(1.0,)), TypeError),
])
def test_bad_options(options, error):
    with pytest.raises(error):
        leanvit.patch(tiny_vit(), "topk", **options)


def test_model_without_class_token_is_rejected():
    with pytest.raises(ValueError, match="no class token"):
        leanvit.patch(tiny_vit(class_token=False, global_pool="avg"), "topk")
