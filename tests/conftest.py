"""Shared test fixtures: tiny timm models, the real DINOv2 weights when present, and a way to
register throw-away methods."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from leanvit import registry

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DINOV2_WEIGHTS = SHARED / "weights" / "dinov2_vits14_224.safetensors"


def tiny_vit(name: str = "deit_tiny_patch16_224", **kw) -> torch.nn.Module:
    """A small random model of a real timm architecture (2 blocks, 64 px unless told)."""
    kw.setdefault("depth", 2)
    kw.setdefault("img_size", 64)
    torch.manual_seed(0)
    return timm.create_model(name, **kw).eval()


@pytest.fixture
def dinov2():
    if not DINOV2_WEIGHTS.is_file():
        pytest.skip(f"real DINOv2 weights not found at {DINOV2_WEIGHTS} (shared/ not beside repo)")
    return timm.create_model(
        "vit_small_patch14_dinov2", pretrained=True, img_size=224, num_classes=0,
        pretrained_cfg_overlay=dict(file=str(DINOV2_WEIGHTS))).eval()


@pytest.fixture
def temp_method():
    """Register methods for one test; they are removed afterwards."""
    names = []

    def _register(method: registry.Method) -> registry.Method:
        registry.register(method)
        names.append(method.name)
        return method

    yield _register
    for n in names:
        registry._METHODS.pop(n, None)
