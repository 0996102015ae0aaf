"""Image data for evaluation and probes: ImageFolder splits with the model's own timm transform,
and a fixed, balanced Fashion-MNIST subset exported as an ImageFolder.

Layout leanvit reads (torchvision's ``ImageFolder``)::

    DIR/train/<class name>/*.png
    DIR/val/<class name>/*.png

Classes are the sub-folder names, sorted (label ``i`` = ``i``-th name in sorted order).
"""
from __future__ import annotations

import gzip
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder as _TvImageFolder
from torchvision.datasets.folder import make_dataset as _tv_make_dataset

#: Debian's ``dataset-fashion-mnist`` package installs the IDX files here.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Fashion-MNIST's labels 0..9 (Xiao et al. 2017, the dataset's README), as folder names:
#: lower case, "T-shirt/top" without the slash. Sorted, they are not in label order; the
#: folder name is what a class is called everywhere in leanvit.
FASHION_MNIST_CLASSES = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------------------------
# Transforms

def _posterize_zero_bits_black(img, bits_to_keep, **kwargs):
    """timm's RandAugment ``posterize`` op, with 0 bits kept giving a black image as older
    Pillow did: Pillow 12+ refuses ``ImageOps.posterize(img, 0)``, which timm's
    ``PosterizeIncreasing`` asks for at magnitudes >= 10 (DeiT's ``rand-m9-mstd0.5-inc1``
    reaches them through its magnitude noise, so training crashed at random)."""
    from PIL import Image
    from timm.data import auto_augment

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # all bits dropped: zeros
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def fix_randaugment_posterize() -> None:
    """Make timm's posterize ops accept 0 bits (see :func:`_posterize_zero_bits_black`).

    Idempotent; call before building a RandAugment transform (the trainer does)."""
    from timm.data import auto_augment

    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize_zero_bits_black



def data_config(model: nn.Module) -> dict[str, Any]:
    """The model's timm data config with the input size the model was built for.

    ``timm.data.resolve_data_config(model=model)`` reads the pretrained config, which for a
    model created with another ``img_size`` still names the original size (DINOv2 says 518 px
    while the shared weights run at 224), so ``input_size`` is replaced by
    ``model.patch_embed.img_size`` when the model has one (a Hugging Face model's
    ``config.image_size``; its mean/std are timm's defaults, not its preprocessor's).
    Resize, crop, interpolation and mean/std stay the model's own.
    """
    from timm.data import resolve_data_config

    cfg = dict(resolve_data_config(model=model))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is None:  # a Hugging Face model: its config's image_size
        img_size = getattr(getattr(model, "config", None), "image_size", None)
    if img_size is not None:
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        cfg["input_size"] = (cfg["input_size"][0], int(h), int(w))
    return cfg


def eval_transform(model: nn.Module):
    """``timm.data.create_transform(**data_config(model))``: the evaluation transform."""
    from timm.data import create_transform

    return create_transform(**data_config(model), is_training=False)


# --------------------------------------------------------------------------------------------
# ImageFolder


def check_image_folder(root: str | Path) -> list[str]:
    """Class names of an ImageFolder directory; ``ValueError`` saying what is wrong otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory; expected an ImageFolder "
                         "(<dir>/<class name>/<image files>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = [p.name for p in root.iterdir() if p.is_file()][:3]
        hint = f" (it holds files such as {', '.join(loose)})" if loose else ""
        raise ValueError(f"{root} is not an ImageFolder: no class sub-folders{hint}; expected "
                         "<dir>/<class name>/<image files>")
    empty = [c for c in classes
             if not any(f.suffix.lower() in _IMAGE_EXTENSIONS for f in (root / c).iterdir())]
    if empty:
        raise ValueError(f"{root} is not an ImageFolder: class folder(s) {', '.join(empty[:5])} "
                         f"hold no images ({', '.join(_IMAGE_EXTENSIONS)})")
    return classes


class ImageReadError(ValueError):
    """An image file that cannot be decoded (truncated, not an image); names the file."""


def read_image(path: str) -> Any:
    """The RGB PIL image in ``path`` (fully decoded); :class:`ImageReadError` naming the file
    when it is truncated or not an image (PIL's own error names neither the file nor the
    cause in one line)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise ImageReadError(f"cannot read image {path}: not an image file PIL can read "
                             "(garbage or an unsupported format)") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImageReadError(f"cannot read image {path}: {reason}") from None


def check_no_repeated_folders(root: str | Path) -> None:
    """``ValueError`` when walking ``root`` (following symlinks, as ImageFolder does) reaches a
    folder a second time: a symlink loop (or two links to one folder) would read its images
    many times (a loop of 8 files read as 168)."""
    seen: dict[str, str] = {}
    for dirpath, _, _ in os.walk(str(root), followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            raise ValueError(f"{dirpath} is the folder {seen[real]} again (a symlink loop or a "
                             "second link to it): its images would be read more than once")
        seen[real] = dirpath


class ImageFolder(_TvImageFolder):
    """torchvision's ``ImageFolder`` (same samples, classes, targets), except: a folder
    reached twice (symlink loop) is an error, a class folder without images is a
    ``ValueError`` naming it, and an unreadable image raises :class:`ImageReadError` naming
    its file (in training too: the run stops there, with the file's name)."""

    def __init__(self, root: str | Path, transform=None, target_transform=None):
        check_image_folder(root)
        super().__init__(str(root), transform=transform, target_transform=target_transform,
                         loader=read_image)

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty=False):
        check_no_repeated_folders(directory)
        return _tv_make_dataset(directory, class_to_idx, extensions=extensions,
                                is_valid_file=is_valid_file, allow_empty=allow_empty)


def image_folder(root: str | Path, model: Optional[nn.Module] = None, transform=None) -> Dataset:
    """torchvision ``ImageFolder`` at ``root`` with ``model``'s evaluation transform.

    Args:
        root: ``<dir>/<class name>/<images>`` (a split such as ``DIR/val``).
        model: the timm model whose data config gives the transform (see :func:`data_config`).
        transform: an explicit transform instead (``model`` is then not needed).

    Raises:
        ValueError: ``root`` is missing or not an ImageFolder.
    """
    check_image_folder(root)
    if transform is None:
        if model is None:
            raise ValueError("image_folder needs a model (for its data config) or a transform")
        transform = eval_transform(model)
    return ImageFolder(root, transform=transform)


def split_dir(data: str | Path, split: str) -> Path:
    """``data/split``, with a clear error when the split is missing."""
    data = Path(data)
    if data.exists() and not data.is_dir():
        raise ValueError(f"data directory {data} is a file; a folder is needed "
                         f"({data}/{split}/<class name>/<images>)")
    if not data.is_dir():
        raise ValueError(f"data directory {data} does not exist")
    path = data / split
    if not path.is_dir():
        have = sorted(p.name for p in data.iterdir() if p.is_dir())
        raise ValueError(f"{data} has no {split!r} split (sub-folders: {', '.join(have) or 'none'});"
                         f" expected {data}/{split}/<class name>/<images>")
    return path


def fixed_subset(dataset: Dataset, limit: Optional[int], seed: int = 0) -> Dataset:
    """The first ``limit`` images of a seeded permutation, in dataset order (all if ``None``).

    ImageFolder lists images class by class, so the first ``limit`` would be the first classes
    only; a permutation with a fixed seed gives the same, roughly class-balanced subset every
    run.
    """
    if limit is None or limit >= len(dataset):
        return dataset
    if limit <= 0:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:limit].sort().values
    return Subset(dataset, idx.tolist())


def loader(dataset: Dataset, batch_size: int = 64, workers: int = 0) -> DataLoader:
    """An in-order (not shuffled) loader; ``workers`` processes decode images."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def class_counts(dataset: Dataset) -> list[int]:
    """Images per class (in class order) of an ImageFolder or a Subset of one."""
    idx = None
    while isinstance(dataset, Subset):
        idx = list(dataset.indices) if idx is None else [dataset.indices[i] for i in idx]
        dataset = dataset.dataset
    targets = list(dataset.targets) if idx is None else [dataset.targets[i] for i in idx]
    counts = [0] * len(dataset.classes)
    for t in targets:
        counts[t] += 1
    return counts


def classes_of(dataset: Dataset) -> list[str]:
    """Class names of an ImageFolder or a Subset of one."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return list(dataset.classes)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files) -> ImageFolder


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzip'd or not; LeCun's format: magic ``0 0 dtype ndim``, big-endian sizes)
    as a numpy array (``uint8`` images ``[N, 28, 28]`` or labels ``[N]``)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {arr.size} values for shape {shape}")
    return arr.reshape(shape)


def balanced_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` indices with (nearly) equal counts per class, drawn with a fixed seed.

    Class ``c`` (in label order) gets ``n // K`` images, the first ``n % K`` classes one more;
    within a class the images are a ``numpy.random.default_rng(seed)`` choice without
    replacement. Sorted.
    """
    classes = np.unique(labels)
    k = len(classes)
    rng = np.random.default_rng(seed)
    out = []
    for j, c in enumerate(classes):
        want = n // k + (1 if j < n % k else 0)
        pool = np.flatnonzero(labels == c)
        if want > len(pool):
            raise ValueError(f"asked for {n} images ({want} of class {c}) but class {c} has "
                             f"only {len(pool)}")
        out.append(rng.choice(pool, size=want, replace=False))
    return np.sort(np.concatenate(out))


def _write_split(images: np.ndarray, labels: np.ndarray, idx: np.ndarray, root: Path,
                 classes: Sequence[str]) -> None:
    from PIL import Image

    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in idx:
        # grayscale -> RGB: timm's transforms and ImageNet normalisation expect 3 channels
        img = Image.fromarray(images[i], mode="L").convert("RGB")
        img.save(root / classes[int(labels[i])] / f"{int(i):05d}.png")


def export_fashion_mnist(out_dir: str | Path, train: int = 3000, val: int = 1000, seed: int = 0,
                         source: str | Path = FASHION_MNIST_DIR) -> Path:
    """Write a fixed, class-balanced Fashion-MNIST subset as an ImageFolder.

    ``train`` images come from the official training file (``train-*-idx*``), ``val`` images
    from the official test file (``t10k-*``), so the two never overlap; each split is
    :func:`balanced_indices` with ``seed`` (the same arguments always give the same files).
    Images are 28x28 RGB PNGs (the grayscale value in all three channels), named by their
    index in the source file: ``out_dir/{train,val}/<class name>/<index:05d>.png``, class
    names from :data:`FASHION_MNIST_CLASSES`. Written to a temporary folder and renamed
    into place, so an interrupted export leaves nothing half-written.

    Args:
        out_dir: destination; must not exist yet, or be empty.
        train, val: number of images per split (default 3000 / 1000).
        seed: numpy seed of the subset choice (default 0).
        source: folder with the (gzip'd) IDX files; default Debian's
            ``dataset-fashion-mnist`` location ``/usr/share/datasets/fashion-mnist``.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    source = Path(source)
    for name, v in (("train", train), ("val", val)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int (images), got {v!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not empty; choose a new --out")

    def find(stem: str) -> Path:
        for suffix in (".gz", ""):
            p = source / f"{stem}{suffix}"
            if p.is_file():
                return p
        raise ValueError(f"{source / stem}[.gz] not found; install Debian's "
                         "dataset-fashion-mnist or pass the folder holding the IDX files")

    files = {s: (find(f"{p}-images-idx3-ubyte"), find(f"{p}-labels-idx1-ubyte"))
             for s, p in (("train", "train"), ("val", "t10k"))}
    counts = {"train": train, "val": val}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for split, (img_file, lab_file) in files.items():
            images, labels = read_idx(img_file), read_idx(lab_file)
            if images.ndim != 3 or labels.shape != images.shape[:1]:
                raise ValueError(f"{img_file} / {lab_file}: shapes {images.shape} and "
                                 f"{labels.shape} do not match")
            idx = balanced_indices(labels, counts[split], seed)
            _write_split(images, labels, idx, tmp / split, FASHION_MNIST_CLASSES)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
