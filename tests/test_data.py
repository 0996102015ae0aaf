"""ImageFolder handling, the model's timm transform, and the Fashion-MNIST export."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from leanvit.data import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, balanced_indices,
                          check_image_folder, data_config, eval_transform, export_fashion_mnist,
                          fixed_subset, image_folder, read_idx, split_dir)
from tests.conftest import tiny_vit


def _write_idx(path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fake_idx(tmp_path):
    """IDX files shaped like Fashion-MNIST: 10 classes, 6 train / 4 test images each, every
    image a constant grey level that encodes its index."""
    src = tmp_path / "idx"
    src.mkdir()
    for prefix, per in (("train", 6), ("t10k", 4)):
        labels = np.repeat(np.arange(10), per)
        images = np.stack([np.full((28, 28), i, np.uint8) for i in range(len(labels))])
        _write_idx(src / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return src


def test_transform_is_timms_at_the_models_size_not_the_pretrained_one():
    model = tiny_vit("vit_small_patch14_dinov2", img_size=28, num_classes=0)
    cfg = resolve_data_config(model=model)
    assert cfg["input_size"] == (3, 518, 518)  # what DINOv2's pretrained config says
    assert data_config(model)["input_size"] == (3, 28, 28)
    expected = create_transform(**{**cfg, "input_size": (3, 28, 28)}, is_training=False)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8))
    got = eval_transform(model)(img)
    assert got.shape == (3, 28, 28)
    assert torch.equal(got, expected(img))
    assert repr(eval_transform(model)) == repr(expected)


def test_export_writes_balanced_fixed_rgb_subset(fake_idx, tmp_path):
    out = export_fashion_mnist(tmp_path / "a", train=20, val=10, source=fake_idx)
    again = export_fashion_mnist(tmp_path / "b", train=20, val=10, source=fake_idx)
    for split, per in (("train", 2), ("val", 1)):
        assert check_image_folder(out / split) == sorted(FASHION_MNIST_CLASSES)
        for c in FASHION_MNIST_CLASSES:
            files = sorted(p.name for p in (out / split / c).glob("*.png"))
            assert len(files) == per
            assert files == sorted(p.name for p in (tmp_path / "b" / split / c).glob("*.png"))
    # class of each file is its label; pixels are the source grey level in all 3 channels
    f = next((out / "train" / "coat").glob("*.png"))
    idx = int(f.stem)
    assert idx // 6 == FASHION_MNIST_CLASSES.index("coat")
    arr = np.asarray(Image.open(f))
    assert arr.shape == (28, 28, 3) and (arr == idx).all()
    assert again.exists()


def test_export_refuses_bad_requests(fake_idx, tmp_path):
    with pytest.raises(ValueError, match="only 6"):
        export_fashion_mnist(tmp_path / "x", train=100, val=10, source=fake_idx)
    assert not (tmp_path / "x").exists()  # nothing half-written
    with pytest.raises(ValueError, match="positive"):
        export_fashion_mnist(tmp_path / "y", train=0, source=fake_idx)
    with pytest.raises(ValueError, match="not found"):
        export_fashion_mnist(tmp_path / "z", train=10, val=10, source=tmp_path)
    export_fashion_mnist(tmp_path / "w", train=10, val=10, source=fake_idx)
    with pytest.raises(ValueError, match="not empty"):
        export_fashion_mnist(tmp_path / "w", train=10, val=10, source=fake_idx)


def test_balanced_indices_spread_the_remainder():
    labels = np.repeat(np.arange(3), 10)
    idx = balanced_indices(labels, 8, seed=1)
    assert np.bincount(labels[idx]).tolist() == [3, 3, 2]
    assert np.array_equal(idx, balanced_indices(labels, 8, seed=1))


def test_read_idx_rejects_other_files(tmp_path):
    p = tmp_path / "x.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"PNG not an idx")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(p)


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_labels_are_balanced():
    labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10


def test_not_an_image_folder_is_a_clear_error(tmp_path):
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(ValueError, match="not an ImageFolder"):
        check_image_folder(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(ValueError, match="hold no images"):
        check_image_folder(tmp_path)
    with pytest.raises(ValueError, match="no 'val' split"):
        split_dir(tmp_path, "val")
    with pytest.raises(ValueError, match="does not exist"):
        split_dir(tmp_path / "missing", "val")


def test_fixed_subset_is_seeded_and_spans_classes(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(10):
            Image.new("RGB", (8, 8)).save(tmp_path / c / f"{i}.png")
    ds = image_folder(tmp_path, transform=lambda im: 0)
    sub = fixed_subset(ds, 6)
    assert list(sub.indices) == list(fixed_subset(ds, 6).indices)
    assert {ds.targets[i] for i in sub.indices} == {0, 1}
    assert fixed_subset(ds, None) is ds


def test_randaugment_posterize_with_zero_bits_gives_black_not_an_error():
    from PIL import Image, ImageOps
    from timm.data.auto_augment import AugmentOp, rand_augment_transform

    from leanvit.data import fix_randaugment_posterize

    fix_randaugment_posterize()
    fix_randaugment_posterize()  # idempotent
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    # magnitude 10 of PosterizeIncreasing keeps 4 - int(10 / 10 * 4) = 0 bits
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10, hparams={"magnitude_std": 0})
    out = np.asarray(op(img))
    assert out.shape == (16, 16, 3) and not out.any()
    # other bit counts are Pillow's own posterize
    op2 = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5, hparams={"magnitude_std": 0})
    assert np.array_equal(np.asarray(op2(img)), np.asarray(ImageOps.posterize(img, 2)))
    # DeiT's policy, whose magnitude noise reaches 10, runs through many draws
    tf = rand_augment_transform("rand-m9-mstd0.5-inc1", {"img_mean": (124, 116, 104)})
    for _ in range(300):
        tf(img)
