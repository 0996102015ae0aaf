"""The adapter's ``embed`` / ``run_blocks`` split of ``forward_features`` (used to cache the
frozen blocks of a search) and ``ModelInfo.img_size``."""
from __future__ import annotations

import timm
import torch

import leanvit
from leanvit.adapters import vit


def test_embed_then_run_blocks_equals_forward_features():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", depth=3, img_size=56).eval()
    leanvit.patch(model, "none")
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref, _ = vit.forward_features(model, images)
        x, state = vit.embed(model, images)
        whole, _ = vit.run_blocks(model, x, state)
        mid, st = vit.run_blocks(model, x, state, 0, 1)  # no final norm
        rest, _ = vit.run_blocks(model, mid, st, 1)
    assert torch.equal(whole, ref) and torch.equal(rest, ref)


def test_model_info_has_image_size():
    model = timm.create_model("deit_tiny_patch16_224", depth=1, img_size=64)
    assert vit.describe(model).img_size == (64, 64)
