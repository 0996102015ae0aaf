"""The ConvNeXt adapter: found by find_adapter, exact identity through the adapter, exact
restore after unpatch, MACs against torch's FLOP counter, the distillation tokens."""
from __future__ import annotations

import pytest
import timm
import torch

import leanvit
from leanvit.adapters import convnext, find_adapter
from leanvit.macs import traced_macs
from tests._hier_models import images, tiny_convnext


def test_found_and_described():
    model = tiny_convnext()
    assert find_adapter(model) is convnext
    info = convnext.describe(model)
    assert info.family == "convnext" and info.stage_depths == (1, 1, 5, 1)
    assert info.stage_dims == (16, 32, 64, 128) and info.depth == 8 and info.embed_dim == 128


def test_unsupported_variant_and_family_errors_name_what_is_supported():
    with pytest.raises(ValueError, match="conv_mlp"):
        find_adapter(timm.create_model("convnext_atto", depths=(1, 1, 1, 1)))
    with pytest.raises(ValueError, match="GRN"):  # ConvNeXt-V2: GRN pools over all positions
        find_adapter(timm.create_model("convnextv2_atto", depths=(1, 1, 1, 1), conv_mlp=False))
    with pytest.raises(ValueError, match="supported families: vit .*convnext .*swin"):
        find_adapter(timm.create_model("resnet10t"))


def test_none_and_unpatch_are_bit_identical():
    model = tiny_convnext()
    x = images(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
        leanvit.patch(model, "none")
        assert torch.equal(model(x), ref)
        leanvit.unpatch(model)
        leanvit.patch(model, "dynamicvit", keep_rate=0.7)
        assert not torch.equal(model(x), ref)
        leanvit.unpatch(model)
        assert torch.equal(model(x), ref)
    assert type(model) is timm.models.convnext.ConvNeXt and not hasattr(model, "leanvit")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_dense_macs_equal_torch_flop_counter():
    model = tiny_convnext()
    x = images(model, b=1)
    assert leanvit.count_macs(model, x).total == traced_macs(model, x)


def test_routed_macs_equal_torch_flop_counter_of_the_inference_path():
    """In eval mode each path runs only on its own tokens, so the FLOP counter on the actual
    forward is an independent count: slow MLP on K tokens, fast path on N - K, predictors."""
    model = leanvit.patch(tiny_convnext(), "dynamicvit", keep_rate=0.7)
    x = images(model, b=2)
    report = leanvit.count_macs(model, x)
    assert report.total == pytest.approx(traced_macs(model, x), rel=0, abs=0.5)
    assert set(report.extra) == {"predictor", "fast_path"}


def test_loss_tokens_are_the_head_norm_per_position():
    model = tiny_convnext()
    x = images(model)
    with torch.no_grad():
        f = model.forward_features(x)
        tokens, keep = convnext.loss_tokens(model, f, None)
        B, C, H, W = f.shape
        for b in range(B):
            for i in range(H):
                for j in range(W):
                    v = f[b, :, i, j]
                    ref = torch.nn.functional.layer_norm(v, (C,), model.head.norm.weight,
                                                         model.head.norm.bias, 1e-6)
                    torch.testing.assert_close(tokens[b, i * W + j], ref)
    assert keep.shape == (B, H * W) and bool((keep == 1).all())


def test_conv_mlp_error_names_the_timm_models_that_build_it_and_the_way_out():
    model = timm.create_model("convnext_atto", depths=(1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"conv_mlp=True .*convnext_atto.*conv_mlp=False"):
        leanvit.patch(model, "dynamicvit")  # a method that serves ConvNeXt: the variant's fault
    leanvit.patch(timm.create_model("convnext_atto", depths=(1, 1, 1, 1), conv_mlp=False), "none")
