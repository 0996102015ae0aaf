"""Dense-feature PCA in leanvit.viz and ``leanvit viz --pca``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import leanvit
from leanvit.cli import main
from leanvit.viz import pca_rgb, visualize_pca
from tests.conftest import tiny_vit


def test_pca_rgb_projects_every_input_on_the_reference_components():
    g = torch.Generator().manual_seed(0)
    # features with three dominant directions
    basis = torch.linalg.qr(torch.randn(16, 3, generator=g))[0]  # [C, 3]
    codes = torch.randn(5, 7, 3, generator=g) * torch.tensor([5.0, 3.0, 2.0])
    ref = codes @ basis.T + 0.01 * torch.randn(5, 7, 16, generator=g)
    same = pca_rgb([ref, ref.clone(), ref + 100 * basis[:, 0]])[1:]
    rgb_ref = pca_rgb([ref])[0]
    assert rgb_ref.shape == (5, 7, 3) and rgb_ref.min() >= 0 and rgb_ref.max() <= 1
    np.testing.assert_allclose(same[0], rgb_ref)  # the same features, the same colours
    # a far shift along the first component saturates channel 0 only (sign of the SVD aside)
    ch0 = same[1][..., 0]
    assert np.all((ch0 == 0) | (ch0 == 1))
    # the first component carries the most variance: channel 0 follows codes[..., 0]
    corr = np.corrcoef(rgb_ref[..., 0].ravel(), codes[..., 0].numpy().ravel())[0, 1]
    assert abs(corr) > 0.95


def test_visualize_pca_writes_three_panels(tmp_path):
    img = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
                    ).save(img)
    model = leanvit.patch(tiny_vit(depth=4), "tome", r=3)
    r = visualize_pca(model, img, tmp_path / "pca.png")
    assert (tmp_path / "pca.png").read_bytes()[:4] == b"\x89PNG"
    assert r["method"] == "tome" and -1.0 <= r["cosine"] <= 1.0 + 1e-6
    assert leanvit.is_patched(model)  # left patched as it came
    leanvit.unpatch(model)
    with pytest.raises(ValueError, match="patch the model first"):
        visualize_pca(model, img, tmp_path / "x.png")


def test_visualize_pca_keep_all_has_cosine_one(tmp_path):
    img = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
                    ).save(img)
    r = visualize_pca(leanvit.patch(tiny_vit(), "tome", r=0), img, tmp_path / "pca.png")
    assert r["cosine"] == pytest.approx(1.0, abs=1e-6)


def test_cli_viz_pca(tmp_path, capsys):
    img = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)
                    ).save(img)
    out = tmp_path / "pca.png"
    rc = main(["viz", str(img), "--model", "vit_tiny_patch16_224", "--img-size", "64",
               "--method", "evit", "--set", "keep_rate=0.5", "--pca", "--out", str(out)])
    assert rc == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "dense-feature PCA" in capsys.readouterr().out
