"""``leanvit viz`` end to end on a tiny random model."""
from __future__ import annotations

import numpy as np
from PIL import Image

from leanvit.cli import main


def test_viz_writes_png(tmp_path, capsys):
    img = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)
                    ).save(img)
    out = tmp_path / "viz.png"
    rc = main(["viz", str(img), "--model", "vit_tiny_patch16_224", "--img-size", "64",
               "--method", "ats", "--set", "locations=(9, 11)", "--out", str(out)])
    assert rc == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "3 panels" in capsys.readouterr().out


def test_viz_missing_image_is_a_clear_error(tmp_path, capsys):
    rc = main(["viz", str(tmp_path / "nope.png"), "--model", "vit_tiny_patch16_224",
               "--img-size", "64", "--out", str(tmp_path / "x.png")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err
