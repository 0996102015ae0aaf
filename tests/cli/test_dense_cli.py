"""``leanvit probe --dense`` / ``compare --dense`` and the dense helpers, on a tiny model and
generated images (bright shapes on black, so the foreground targets are known)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import leanvit
from leanvit.cli import main
from leanvit.dense import (DenseEvaluation, confusion_matrix, foreground_targets,
                           segmentation_scores)
from leanvit.probe import head_metadata, load_head
from tests.conftest import tiny_vit

MODEL = "deit_tiny_patch16_224"


def test_foreground_targets_against_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    raw = torch.rand(2, 3, 32, 48, generator=g) ** 3  # many dark pixels
    images = (raw - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    got = foreground_targets(images, mean, std, (16, 8), threshold=0.2)
    assert got.shape == (2, 2, 6)
    for b in range(2):
        for i in range(2):
            for j in range(6):
                tile = raw[b, :, 16 * i:16 * (i + 1), 8 * j:8 * (j + 1)]
                share = float((tile.mean(0) > 0.2).float().mean())
                assert got[b, i, j] == int(share > 0.5)
    with pytest.raises(ValueError, match="whole number"):
        foreground_targets(images, mean, std, 7)


def test_segmentation_scores_by_hand():
    target = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 1, 0, 1, 0])
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[2, 1, 0], [1, 3, 0], [1, 0, 0]]
    s = segmentation_scores(conf)
    assert s["pixel_accuracy"] == pytest.approx(100 * 5 / 8)
    # IoU: class 0: 2 / (2+1+2) ; class 1: 3 / (3+1+1) ; class 2: 0 / (0+0+1)
    assert s["iou"] == pytest.approx([40.0, 60.0, 0.0])
    assert s["miou"] == pytest.approx(100 / 3)
    # a class absent from targets and predictions has no IoU and is left out of the mean
    s2 = segmentation_scores(confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), 3))
    assert s2["miou"] == 100.0 and np.isnan(s2["iou"][2])


def test_dense_evaluation_keep_all_matches_unpatched():
    model = tiny_vit(depth=2, img_size=32)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 3, 32, 32, generator=g), torch.zeros(3)) for _ in range(2)]
    head = torch.nn.Linear(model.embed_dim, 2)
    ev = DenseEvaluation(head)
    base = ev(model, batches, progress=False, throughput=False)
    same = ev(leanvit.patch(tiny_vit(depth=2, img_size=32), "tome", r=0), batches,
              progress=False, throughput=False)
    assert base["cosine"] == 1.0 and same["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert same["confusion"] == base["confusion"] and same["patches"] == 2 * 3 * 4
    reduced = ev(leanvit.patch(tiny_vit(depth=2, img_size=32), "tome", r=1), batches,
                 progress=False, throughput=False)
    assert reduced["gmacs"] < base["gmacs"] and reduced["cosine"] < 1.0
    # GMACs: the backbone's count_macs (without its classifier) plus the per-patch head
    report = leanvit.count_macs(model, batches[0][0])
    macs = report.total - report.head + 4 * model.embed_dim * 2
    assert base["gmacs"] == pytest.approx(macs / 1e9)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    torch.manual_seed(0)
    m = timm.create_model(MODEL, img_size=32, num_classes=0)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, root / "backbone.safetensors")
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 4)):
        for c in ("a", "b"):
            d = root / "data" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                img = np.zeros((32, 32, 3), np.uint8)
                y, x = rng.integers(0, 17, 2)
                img[y:y + 16, x:x + 16] = 200  # a bright square: foreground
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def _args(setup):
    return [MODEL, "--img-size", "32", "--checkpoint", str(setup / "backbone.safetensors")]


def test_probe_dense_then_compare_dense(setup, capsys):
    head = setup / "dense.safetensors"
    assert main(["probe", *_args(setup), "--data", str(setup / "data"), "--out", str(head),
                 "--dense", "--threshold", "0.3", "--no-progress", "--cache",
                 str(setup / "cache"), "--json", str(setup / "probe.json")]) == 0
    probe = json.loads((setup / "probe.json").read_text())
    assert probe["classes"] == ["background", "foreground"]
    assert probe["train_rows"] == 20 * 4  # 20 images x 2x2 patches
    meta = head_metadata(head)
    assert meta["dense"] is True and meta["threshold"] == 0.3 and meta["width"] == 192
    assert load_head(head).in_features == 192
    assert "mIoU" in capsys.readouterr().out
    out = setup / "cmp"
    assert main(["compare", *_args(setup), "--data", str(setup / "data"), "--dense",
                 "--head", str(head), "--methods", "none; evit keep_rate=0.5", "--out", str(out),
                 "--no-progress", "--repeats", "1"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    none, evit = rows
    # the unmodified model in compare sees what the probe saw on val
    assert none["pixel_accuracy"] == pytest.approx(probe["val_accuracy"])
    assert none["miou"] == pytest.approx(probe["val_miou"])
    assert none["cosine"] == 1.0 and evit["gmacs"] < none["gmacs"]
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "mIoU (%)" in (out / "results.md").read_text()


def test_dense_head_errors(setup, capsys):
    head = setup / "dense.safetensors"
    if not head.exists():
        pytest.skip("needs the head of test_probe_dense_then_compare_dense")
    # a dense head is not a classifier
    rc = main(["eval", *_args(setup), "--head", str(head), "--data", str(setup / "data"),
               "--no-progress"])
    assert rc == 2 and "dense" in capsys.readouterr().err
    rc = main(["compare", *_args(setup), "--data", str(setup / "data"), "--dense",
               "--methods", "none", "--out", str(setup / "x"), "--no-progress"])
    assert rc == 2 and "--dense needs --head" in capsys.readouterr().err
