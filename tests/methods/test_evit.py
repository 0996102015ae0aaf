"""EViT against a plainly written reference (materialised attention, per-image loops)."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled

import leanvit
from leanvit.adapters import vit as vit_adapter
from leanvit.methods.evit import default_locations

from tests.methods._vit_reference import forward, head, tiny_vit


def evit_reference(keep_rate: float, locations, fuse: bool = True):
    """EViT's reduction for one image, written from the paper and methods.md."""

    def reduce(i, x, a, k, size, source, p):
        if i not in locations:
            return x, size, source
        n = x.shape[0] - p
        left = math.ceil(keep_rate * n)
        cls = a[:, 0, p:].mean(0)  # head-averaged class attention over non-prefix tokens
        order = sorted(range(n), key=lambda j: -float(cls[j]))
        kept, dropped = order[:left], order[left:]
        rows = [x[j] for j in range(p)] + [x[p + j] for j in kept]
        sizes = [size[j] for j in range(p)] + [size[p + j] for j in kept]
        srcs = [source[j] for j in range(p)] + [source[p + j] for j in kept]
        if fuse and dropped:
            fused = torch.zeros_like(x[0])
            for j in dropped:
                fused = fused + cls[j] * x[p + j]
            rows.append(fused)
            sizes.append(sum(size[p + j] for j in dropped))
            srcs.append(torch.stack([source[p + j] for j in dropped]).amax(0))
        return torch.stack(rows), torch.stack(sizes), torch.stack(srcs)

    return reduce


def _trace_sources(model):
    """Make the patched model keep ``state.source`` (as a visualiser does) to see which
    original tokens each output token holds."""
    reducer = model.leanvit

    def init_state(state, x):
        B, N, _ = x.shape
        return state.replace(source=torch.eye(N, dtype=x.dtype).expand(B, N, N),
                             size=x.new_ones(B, N))

    reducer.init_state = init_state


def _check_against_reference(model, keep_rate, locations, fuse=True, trace=True, batch=3):
    images = torch.randn(batch, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        ref_x, ref_size, ref_src = forward(model, images, evit_reference(keep_rate, locations, fuse))
        # EViT tracks no sizes: an average-pooling head counts every token once (the fused
        # token included), as a plain mean over the tokens in the authors' code would.
        ref_logits = head(model, ref_x, torch.ones_like(ref_size))
        leanvit.patch(model, "evit", keep_rate=keep_rate, locations=locations, fuse=fuse)
        logits = model(images)
        if trace:
            _trace_sources(model)
        x, state = vit_adapter.forward_features(model, images)
    assert x.shape == ref_x.shape
    torch.testing.assert_close(x, ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    if trace:  # the same original tokens kept and fused, in the same order
        assert torch.equal(state.source, ref_src)
        torch.testing.assert_close(state.size, ref_size)
    return x


def test_matches_reference_kept_and_fused_tokens():
    x = _check_against_reference(tiny_vit(), 0.7, (1, 2, 3))
    # 17 tokens: 16 -> ceil(11.2)=12 (+fused) -> 13 -> ceil(9.1)=10 (+1) -> 11 -> ceil(7.7)=8 (+1)
    assert x.shape[1] == 1 + 8 + 1


def test_matches_reference_keep_half_single_location():
    _check_against_reference(tiny_vit(seed=4), 0.5, (2,))


def test_kept_count_is_the_authors_float_expression():
    # 0.56 * 25 is 14.000000000000002 in floating point: the authors' ceil keeps 15, not 14.
    # (0.7 * 10 is exactly 7.0 in binary floating point, so it keeps 7.)
    model = tiny_vit(img_size=40)  # 25 patches + cls
    leanvit.patch(model, "evit", keep_rate=0.56, locations=(1,))
    with torch.no_grad():
        x, _ = vit_adapter.forward_features(model, torch.randn(1, 3, 40, 40, dtype=torch.float64))
    assert x.shape[1] == 1 + 15 + 1


def test_distilled_model_keeps_both_prefix_tokens_in_front():
    model = tiny_vit(cls=VisionTransformerDistilled)
    assert model.num_prefix_tokens == 2
    x = _check_against_reference(model, 0.6, (1, 3))
    # the distillation head reads x[:, 1]: it must still be the distillation token
    assert x.shape[1] == 2 + math.ceil(0.6 * (math.ceil(0.6 * 16) + 1)) + 1


def test_register_tokens_stay_in_front():
    model = tiny_vit(reg_tokens=3)
    assert model.num_prefix_tokens == 4
    _check_against_reference(model, 0.7, (0, 2))


def test_avg_pool_model_with_class_token():
    _check_against_reference(tiny_vit(global_pool="avg"), 0.7, (1, 2))


def test_no_fusion_equals_reference_without_fused_token():
    _check_against_reference(tiny_vit(seed=2), 0.7, (1, 2, 3), fuse=False)


def test_keep_rate_one_is_bit_identical():
    model = tiny_vit(seed=5)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = model(images)
        leanvit.patch(model, "evit", keep_rate=1.0)
        after = model(images)
    assert torch.equal(before, after)


def test_default_locations_scale_with_depth():
    assert default_locations(12) == (3, 6, 9)
    assert default_locations(24) == (6, 12, 18)
    assert default_locations(4) == (1, 2, 3)
    model = tiny_vit(depth=8)
    leanvit.patch(model, "evit")
    assert sorted(model.leanvit.locations) == [2, 4, 6]


@pytest.mark.parametrize("keep_rate", [0.0, -0.1, 1.01])
def test_keep_rate_outside_range_is_rejected(keep_rate):
    with pytest.raises(ValueError, match="keep_rate"):
        leanvit.patch(tiny_vit(), "evit", keep_rate=keep_rate)


def test_bad_types_are_rejected():
    with pytest.raises(TypeError):
        leanvit.patch(tiny_vit(), "evit", keep_rate="0.7")
    with pytest.raises(TypeError):
        leanvit.patch(tiny_vit(), "evit", locations="3,6,9")
    with pytest.raises(TypeError):
        leanvit.patch(tiny_vit(), "evit", fuse=1)


def test_locations_beyond_depth_are_rejected_and_model_unchanged():
    model = tiny_vit()
    with pytest.raises(ValueError, match="outside the model's blocks"):
        leanvit.patch(model, "evit", locations=(3, 6, 9))
    assert not leanvit.is_patched(model)


def test_model_without_class_token_is_rejected():
    model = tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="no class token"):
        leanvit.patch(model, "evit")


def test_wrong_input_size_is_a_clear_error():
    model = leanvit.patch(tiny_vit(), "evit")
    with pytest.raises(ValueError, match="built for 32x32"):
        model(torch.randn(1, 3, 48, 48))


@pytest.fixture(scope="module")
def deit_small():
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224").eval()


@pytest.mark.parametrize("keep_rate, published", [(0.7, 3.0), (0.5, 2.3)])
def test_macs_on_deit_small_match_the_paper(deit_small, keep_rate, published):
    images = torch.randn(1, 3, 224, 224)
    leanvit.patch(deit_small, "evit", keep_rate=keep_rate)
    try:
        gmacs = leanvit.count_macs(deit_small, images).gmacs
    finally:
        leanvit.unpatch(deit_small)
    assert gmacs == pytest.approx(published, rel=0.02)
