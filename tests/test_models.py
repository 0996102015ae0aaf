"""Creating models from local checkpoints: loads what fits, rejects what does not."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from leanvit.models import create_model


def test_loads_a_local_safetensors_checkpoint(tmp_path):
    src = timm.create_model("deit_tiny_patch16_224", depth=2, img_size=64)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    model = create_model("deit_tiny_patch16_224", depth=2, img_size=64,
                         checkpoint=tmp_path / "w.safetensors")
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_headless_checkpoint_gives_a_headless_model(tmp_path):
    src = timm.create_model("deit_tiny_patch16_224", depth=2, img_size=64, num_classes=0)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    model = create_model("deit_tiny_patch16_224", depth=2, img_size=64,
                         checkpoint=tmp_path / "w.safetensors")
    assert model.num_classes == 0


def test_bad_checkpoints_and_names_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        create_model("deit_tiny_patch16_224", checkpoint=tmp_path / "missing.pth")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        create_model("deit_tiny_patch16_224", checkpoint=bad)
    badpth = tmp_path / "bad.pth"
    badpth.write_bytes(b"garbage, not a pickle")
    with pytest.raises(ValueError, match="could not load checkpoint"):
        create_model("deit_tiny_patch16_224", checkpoint=badpth)
    other = timm.create_model("deit_small_patch16_224", depth=2, img_size=64)
    save_file(other.state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="could not load checkpoint .* into deit_tiny"):
        create_model("deit_tiny_patch16_224", depth=2, img_size=64,
                     checkpoint=tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="unknown timm model"):
        create_model("deit_smol")
    with pytest.raises(ValueError, match="img_size"):
        create_model("deit_tiny_patch16_224", img_size=-3)
