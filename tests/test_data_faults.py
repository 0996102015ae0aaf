"""Faulty data (issue 13): a symlink loop, truncated and garbage images, an empty class folder.
Each is refused with one line naming the cause and the file, in the library and in every
command that reads images (eval, probe, compare, search, viz, train)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from leanvit.cli import main
from leanvit.data import image_folder

MODEL = "deit_tiny_patch16_224"


def _images(d, n, rng, size=32):
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """DIR/train, DIR/val with 2 classes x 4 images; val/b/1.png truncated; a headless tiny
    backbone and a probe head for it."""
    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            _images(root / "data" / split / c, 4, rng)
    _truncate(root / "data" / "val" / "b" / "1.png")
    torch.manual_seed(0)
    m = timm.create_model(MODEL, img_size=32, num_classes=0)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, root / "w.safetensors")
    m = timm.create_model(MODEL, img_size=32, num_classes=2)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, root / "w2.safetensors")
    return root


def _one_line_naming(err: str, name: str) -> None:
    # besides the notice that a model without --checkpoint has (seeded) random weights
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and "random weights" not in ln]
    assert len(lines) == 1, err
    assert name in lines[0], err


def test_a_symlink_loop_is_refused_not_read_many_times(tmp_path):
    """Issue 13.6: 8 files read as 168 through a loop link."""
    rng = np.random.default_rng(0)
    _images(tmp_path / "a", 4, rng)
    _images(tmp_path / "b", 4, rng)
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")
    with pytest.raises(ValueError, match="symlink loop"):
        image_folder(tmp_path, transform=lambda x: x)


def test_a_folder_without_loops_reads_each_image_once(tmp_path):
    rng = np.random.default_rng(0)
    _images(tmp_path / "root" / "a", 3, rng)
    _images(tmp_path / "elsewhere", 2, rng)
    os.symlink(tmp_path / "elsewhere", tmp_path / "root" / "b")  # a linked class folder: fine
    ds = image_folder(tmp_path / "root", transform=lambda x: x)
    assert len(ds) == 5 and ds.classes == ["a", "b"]


def test_an_unreadable_image_names_its_file(tmp_path):
    rng = np.random.default_rng(0)
    _images(tmp_path / "a", 2, rng)
    (tmp_path / "a" / "2.png").write_bytes(b"this is not a png")
    _truncate(tmp_path / "a" / "1.png")
    ds = image_folder(tmp_path, transform=lambda x: x)
    ds[0]
    for i in (1, 2):
        with pytest.raises(ValueError, match=rf"cannot read image .*a/{i}\.png"):
            ds[i]


def test_eval_names_the_truncated_file(data, capsys):
    head = data / "head.safetensors"
    args = [MODEL, "--img-size", "32", "--checkpoint", str(data / "w.safetensors")]
    # probe: train is fine, val holds the truncated image
    assert main(["probe", *args, "--data", str(data / "data"), "--out", str(head),
                 "--batch-size", "4", "--no-progress"]) == 2
    _one_line_naming(capsys.readouterr().err, "val/b/1.png")
    # eval and compare with a 2-class classifier
    args = [MODEL, "--img-size", "32", "--checkpoint", str(data / "w2.safetensors")]
    assert main(["eval", *args, "--data", str(data / "data"), "--no-progress",
                 "--repeats", "1", "--batch-size", "4"]) == 2
    _one_line_naming(capsys.readouterr().err, "val/b/1.png")
    assert main(["compare", *args, "--data", str(data / "data"), "--methods", "none",
                 "--out", str(data / "cmp"), "--no-progress", "--repeats", "1"]) == 2
    _one_line_naming(capsys.readouterr().err, "val/b/1.png")


def test_eval_with_loader_workers_still_one_line(data, capsys):
    assert main(["eval", MODEL, "--img-size", "32", "--checkpoint", str(data / "w2.safetensors"),
                 "--data", str(data / "data"),
                 "--no-progress", "--repeats", "1", "--batch-size", "4", "--workers", "1"]) == 2
    _one_line_naming(capsys.readouterr().err, "val/b/1.png")


def test_search_and_viz_name_the_bad_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    _images(tmp_path / "d" / "train" / "a", 3, rng, 40)
    _images(tmp_path / "d" / "train" / "b", 3, rng, 40)
    (tmp_path / "d" / "train" / "b" / "2.png").write_bytes(b"\x89PNG garbage")
    assert main(["search", MODEL, "--img-size", "32", "--target-gmacs", "0.01",
                 "--data", str(tmp_path / "d"), "--images", "6", "--epochs", "1",
                 "--batch-size", "3", "--out", str(tmp_path / "s.json")]) == 2
    _one_line_naming(capsys.readouterr().err, "b/2.png")
    assert main(["viz", str(tmp_path / "d" / "train" / "b" / "2.png"), "--model", MODEL,
                 "--img-size", "32", "--method", "evit", "--out", str(tmp_path / "v.png")]) == 2
    _one_line_naming(capsys.readouterr().err, "b/2.png")


def _train_folder(root, rng):
    for split, n in (("train", 8), ("val", 2)):
        for c in ("ants", "bees"):
            _images(root / split / c, n, rng)
    return root


def test_training_stops_at_a_bad_image_with_its_name(tmp_path):
    """Documented choice: training stops at the first unreadable image, naming it."""
    from leanvit.train import TrainConfig, train

    folder = _train_folder(tmp_path / "d", np.random.default_rng(0))
    _truncate(folder / "train" / "bees" / "3.png")
    cfg = TrainConfig(model="vit_tiny_patch16_224", img_size=32,
                      model_kwargs={"depth": 2, "patch_size": 8, "embed_dim": 32, "num_heads": 2},
                      data=str(folder), output=str(tmp_path / "out"), method="none", epochs=1,
                      batch_size=4, workers=0, progress=False, lr=1e-3, distill=False)
    with pytest.raises(ValueError, match=r"train/bees/3\.png"):
        train(cfg)


def test_training_refuses_an_empty_class_folder(tmp_path):
    from leanvit.train import TrainConfig, train

    folder = _train_folder(tmp_path / "d", np.random.default_rng(0))
    (folder / "train" / "wasps").mkdir()
    (folder / "val" / "wasps").mkdir()
    cfg = TrainConfig(model="vit_tiny_patch16_224", img_size=32,
                      model_kwargs={"depth": 2, "patch_size": 8, "embed_dim": 32, "num_heads": 2},
                      data=str(folder), output=str(tmp_path / "out"), method="none", epochs=1,
                      batch_size=4, workers=0, progress=False, lr=1e-3, distill=False)
    with pytest.raises(ValueError, match="wasps"):
        train(cfg)
