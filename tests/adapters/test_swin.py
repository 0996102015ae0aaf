"""The Swin adapter: found by find_adapter, exact identity through the adapter, exact
restore after unpatch, MACs against torch's FLOP counter (shifted and padded windows)."""
from __future__ import annotations

import pytest
import timm
import torch

import leanvit
from leanvit.adapters import find_adapter, swin
from leanvit.macs import traced_macs
from tests._hier_models import images, tiny_swin


def test_found_and_described():
    model = tiny_swin()
    assert find_adapter(model) is swin
    info = swin.describe(model)
    assert info.family == "swin" and info.stage_depths == (1, 1, 5, 1)
    assert info.stage_dims == (32, 64, 128, 256) and info.img_size == (128, 128)
    assert any(model.layers[2].blocks[1].shift_size)  # the test model has shifted windows


def test_none_and_unpatch_are_bit_identical():
    model = tiny_swin()
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
    assert type(model) is timm.models.swin_transformer.SwinTransformer
    assert not hasattr(model, "leanvit")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("img_size", [128, 96])  # 96: stage maps 24, 12, 6 pad to windows of 4
def test_dense_macs_equal_torch_flop_counter(img_size):
    model = tiny_swin(img_size=img_size)
    x = images(model, b=1)
    assert leanvit.count_macs(model, x).total == traced_macs(model, x)


def test_routed_macs_equal_torch_flop_counter_of_the_inference_path():
    model = leanvit.patch(tiny_swin(), "dynamicvit", keep_rate=0.7)
    x = images(model, b=2)
    report = leanvit.count_macs(model, x)
    assert report.total == pytest.approx(traced_macs(model, x), rel=0, abs=0.5)
    assert [b.tokens_in for b in report.per_block] == [1024, 256, 64, 64, 64, 64, 64, 16]


def test_wrong_image_size_is_a_clear_error():
    model = leanvit.patch(tiny_swin(), "none")
    with pytest.raises(ValueError, match="built for 128x128"):
        model(torch.randn(1, 3, 64, 64))
