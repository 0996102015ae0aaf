"""Shared test fixtures: tiny timm models, the real DINOv2 weights when present, and a way to
register throw-away methods."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch

from leanvit import registry

#: the project's shared data (real weights, the authors' published schedules): the folder
#: `shared/` beside the checkout, or wherever LEANVIT_SHARED points; tests needing it skip
#: with the path they looked for when it is absent
SHARED = Path(os.environ.get("LEANVIT_SHARED")
              or Path(__file__).resolve().parents[1].parent / "shared")
DINOV2_WEIGHTS = SHARED / "weights" / "dinov2_vits14_224.safetensors"


def tiny_vit(name: str = "deit_tiny_patch16_224", **kw) -> torch.nn.Module:
    """A small random model of a real timm architecture (2 blocks, 64 px unless told)."""
    kw.setdefault("depth", 2)
    kw.setdefault("img_size", 64)
    torch.manual_seed(0)
    return timm.create_model(name, **kw).eval()


def write_brightness_folder(data: Path, counts: dict, levels, size: int, noise: float,
                            rng) -> Path:
    """An ImageFolder ``data/<split>/<class>/<i>.png`` whose classes differ in brightness:
    ``counts`` images per class for each split (e.g. ``{"train": 8, "val": 6}``), ``levels``
    ``(class, mean grey level)`` pairs, ``size`` x ``size`` RGB with Gaussian noise of std
    ``noise`` from the numpy generator ``rng`` (drawn split by split, class by class). Existing
    folders are written into (the same names are replaced). Returns ``data``."""
    import numpy as np
    from PIL import Image

    for split, n in counts.items():
        for c, level in levels:
            d = data / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(level + rng.normal(0, noise, (size, size, 3)), 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i}.png")
    return data


@pytest.fixture
def dinov2():
    if not DINOV2_WEIGHTS.is_file():
        pytest.skip(f"real DINOv2 weights not found at {DINOV2_WEIGHTS} (shared/ not beside repo)")
    from safetensors.torch import load_file

    # built without weights and loaded from the local file: no hub, no network
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224,
                              num_classes=0)
    model.load_state_dict(load_file(str(DINOV2_WEIGHTS)), strict=True)
    return model.eval()


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
