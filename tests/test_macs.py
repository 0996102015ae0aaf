"""MAC accounting: the numbers users know, and a cross-check against PyTorch's own counter."""
from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import leanvit
from tests.conftest import tiny_vit


@pytest.mark.parametrize("name,expected", [("deit_small_patch16_224", 4.6),
                                           ("deit_base_patch16_224", 17.6)])
def test_known_model_macs(name, expected):
    model = timm.create_model(name)
    report = leanvit.count_macs(model, torch.randn(1, 3, 224, 224))
    assert report.gmacs == pytest.approx(expected, rel=0.01)
    assert float(report) == report.total == pytest.approx(report.gmacs * 1e9)
    assert len(report.per_block) == 12
    assert all(b.tokens_in == b.tokens_out == 197 for b in report.per_block)
    assert not leanvit.is_patched(model)  # measured through "none", then restored


def test_per_block_formula_deit_small():
    """4NC^2 + 2N^2C (attention) + 8NC^2 (MLP) per block, C=384, N=197."""
    model = timm.create_model("deit_small_patch16_224", depth=1)
    report = leanvit.count_macs(model, torch.randn(1, 3, 224, 224))
    n, c = 197, 384
    assert report.per_block[0].macs == 4 * n * c * c + 2 * n * n * c + 8 * n * c * c
    assert report.stem == 196 * (3 * 16 * 16) * c
    assert report.head == c * 1000


@pytest.mark.parametrize("name,kw", [
    ("deit_tiny_patch16_224", {}),
    ("deit_small_distilled_patch16_224", {}),
    ("vit_base_patch16_224", {"global_pool": "avg", "depth": 1}),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 70}),
    ("vit_small_patch16_224", {"num_classes": 0, "qk_norm": True}),
])
def test_matches_pytorch_flop_counter_with_math_attention(name, kw):
    model = tiny_vit(name, **kw)
    for blk in model.blocks:
        blk.attn.fused_attn = False  # materialised attention: FlopCounterMode sees two bmm's
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    expected = counter.get_total_flops() / 2 / x.shape[0]  # FLOPs = 2 MACs, per image
    assert leanvit.count_macs(model, x).total == expected


def test_count_macs_restores_mode_and_patch_state():
    model = leanvit.patch(tiny_vit(), "none").train()
    leanvit.count_macs(model, torch.randn(1, 3, 64, 64))
    assert model.training and leanvit.is_patched(model)


def test_report_table_and_dict():
    report = leanvit.count_macs(tiny_vit(), torch.randn(2, 3, 64, 64))
    assert "GMACs per image" in report.table()
    d = report.to_dict()
    assert d["total"] == report.total and len(d["per_block"]) == 2 and d["images"] == 2


def test_report_table_shows_extra_names_whole():
    model = leanvit.patch(tiny_vit(), "dynamicvit", keep_rate=0.7, locations=(1,)).eval()
    table = leanvit.count_macs(model, torch.randn(1, 3, 64, 64)).table()
    row = next(line for line in table.splitlines() if "predictor" in line)
    assert row.split()[0] == "predictor"  # not cut to 5 characters


@pytest.mark.parametrize("images,match", [
    (torch.randn(0, 3, 64, 64), r"needs at least one image: got an empty batch \[0, 3, 64, 64\]"),
    (torch.randn(1, 3, 0, 0), r"images \[1, 3, 0, 0\] hold no pixels"),
])
def test_count_macs_refuses_an_empty_batch_instead_of_returning_nan(images, match):
    """MACs are per image, averaged over the batch: over no image the mean was NaN."""
    from leanvit.macs import forward_with_macs, traced_macs

    model = tiny_vit()
    for count in (leanvit.count_macs, forward_with_macs, traced_macs):
        with pytest.raises(ValueError, match=match) as e:
            count(model, images)
        assert "\n" not in str(e.value)
    assert not leanvit.is_patched(model)
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        leanvit.count_macs(model, [[0.0]])
    assert leanvit.count_macs(model, torch.randn(1, 3, 64, 64)).total > 0
