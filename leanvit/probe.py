"""Linear probes: a classifier on a headless backbone's features, DINOv2's linear evaluation.

The feature of an image is the final-norm class token concatenated with the mean of the
patch tokens, ``[B, 2C]`` (Oquab et al. 2023, DINOv2, linear evaluation: "class token
concatenated with the average-pooled patch tokens"). When a method merged tokens, the mean
is weighted by how many patches each token stands for, and padding is left out, so a
patched model pools the same image content as the unpatched one.

Typical use::

    feats = features(model, images)                    # [B, 2C]
    head = fit_probe(feats, labels)                    # nn.Linear(2C, K)
    save_head(head, "head.safetensors", model="vit_small_patch14_dinov2", classes=[...])
    attach_head(model, load_head("head.safetensors"))  # model(images) -> logits [B, K]

Fitting (:func:`fit_probe`): multinomial logistic regression on standardised features,
full-batch L-BFGS (strong-Wolfe line search), L2 weight decay chosen from a grid by accuracy
on a class-stratified held-out part of the training features (20 %), then refit on all of
them. The standardisation is folded into the returned layer, so it takes raw features.
Deterministic for a given input (no mini-batch noise), seconds on a few thousand features.

Heads (the pooling module, saving, loading, attaching) are :mod:`leanvit.heads`; their names
stay importable from here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanvit import adapters
from leanvit._files import atomic_path
from leanvit.heads import (POOL_TYPE, ClassMeanPool, attach_head, check_probe_model,  # noqa: F401
                           class_mean, head_metadata, load_head, save_head)

#: weight-decay grid of :func:`fit_probe` (coefficient of ``0.5 * ||W||^2`` added to the mean
#: cross-entropy on standardised features); a decade grid as in DINOv2's and CLIP's linear
#: evaluations, which sweep their regularisation over powers of ten.
WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def min_per_class(held_out: float) -> int:
    """Fewest features of a class for choosing the weight decay: the stratified split must
    hold out at least one of them (``round(held_out * n) >= 1``) and fit on at least one:
    3 at the default 20 %."""
    n = 2
    while round(held_out * n) < 1 or n - round(held_out * n) < 1:
        n += 1
    return n


@torch.no_grad()
def features(model: nn.Module, images: Tensor) -> Tensor:
    """Probe features of ``images`` ``[B, 3, H, W]``: ``[B, 2C]`` (see module docstring).

    Works on unpatched and leanvit-patched timm ViTs (merged tokens weighted by size), with
    or without a head attached. Runs without gradients in the model's current mode.
    """
    adapter = check_probe_model(model)
    p = next(model.parameters(), None)
    if p is not None:
        images = images.to(device=p.device, dtype=p.dtype)
    if adapters.is_patched(model):
        x, state = adapter.forward_features(model, images)
        return class_mean(x, model.num_prefix_tokens, adapter.token_weights(state, x))
    return class_mean(model.forward_features(images), model.num_prefix_tokens)


def extract_features(model: nn.Module, loader: Iterable, progress: bool = True,
                     desc: str = "features", fn=None) -> tuple[Tensor, Tensor]:
    """:func:`features` of every batch of ``loader`` (``(images, labels)`` pairs), in eval
    mode: ``([M, 2C] float32 on CPU, [M] long)``.

    ``fn(model, images, labels) -> (features [R, D], labels [R])`` replaces the per-batch
    step (rows need not be images: :func:`leanvit.dense.dense_batch_fn` gives one row per
    patch with its foreground label)."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for images, y in tqdm(loader, desc=desc, disable=not progress, unit="batch"):
            if fn is not None:
                f, y = fn(model, images, y)
            else:
                f = features(model, images)
            feats.append(f.float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


# --------------------------------------------------------------------------------------------
# Fitting


def _stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (fit, held out): ``fraction`` of each class held out, seeded."""
    g = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = int(round(fraction * len(idx)))
        held.append(idx[:n_held])
        fit.append(idx[n_held:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def _lbfgs(x: Tensor, y: Tensor, num_classes: int, weight_decay: float, max_iter: int
           ) -> tuple[Tensor, Tensor]:
    """Minimise mean CE + ``weight_decay/2 * ||W||^2`` over ``x`` ``[M, D]`` (float64)."""
    w = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _accuracy(w: Tensor, b: Tensor, x: Tensor, y: Tensor) -> float:
    return float(((x @ w.T + b).argmax(1) == y).double().mean()) if len(y) else float("nan")


def fit_probe(
    features: Tensor,
    labels: Tensor,
    num_classes: Optional[int] = None,
    *,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    held_out: float = 0.2,
    max_iter: int = 150,
    seed: int = 0,
    info: Optional[dict] = None,
) -> nn.Linear:
    """Fit a linear classifier ``[M, D]`` features -> ``num_classes`` logits.

    Multinomial logistic regression on standardised features (mean/std of the training
    features) by full-batch L-BFGS; the weight decay is the value of ``weight_decays`` with
    the best accuracy on a stratified ``held_out`` fraction of the features (fitted on the
    rest), ties to the larger decay; then the model is refit on all features with it.

    Args:
        features: ``[M, D]`` (e.g. :func:`features`, D = 2C).
        labels: ``[M]`` int class indices in ``[0, num_classes)``.
        num_classes: default ``labels.max() + 1``.
        weight_decays: grid (see :data:`WEIGHT_DECAYS`); one value skips the selection.
        held_out: fraction of each class held out for the selection (default 0.2).
        max_iter: L-BFGS iterations per fit (default 150).
        seed: seed of the held-out split.
        info: if given, filled with ``weight_decay`` (chosen), ``held_out_accuracy`` (per
            decay), ``train_accuracy``.

    Returns:
        ``nn.Linear(D, num_classes)`` in float32 taking raw (unstandardised) features.
    """
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise ValueError(f"features must be a [M, D] tensor, got "
                         f"{tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__}")
    labels = torch.as_tensor(labels).long().flatten()
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {labels.shape[0]} labels")
    if labels.numel() == 0:
        raise ValueError("no features to fit")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got "
                         f"{int(labels.min())}..{int(labels.max())}")
    if not weight_decays or any(float(wd) < 0 for wd in weight_decays):
        raise ValueError(f"weight_decays must be non-negative numbers, got {weight_decays!r}")
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    if num_classes < 2:
        raise ValueError(f"a probe needs at least 2 classes, got {num_classes}: with one class "
                         "every prediction is right and the accuracy says nothing")
    # every class in the fit, and (when a decay is chosen) in both parts of the split:
    # otherwise the held-out accuracy is NaN or blind to a class
    need = min_per_class(held_out) if len(weight_decays) > 1 else 1
    counts = torch.bincount(labels, minlength=num_classes)
    if int(counts.min()) < need:
        few = [f"class {c}: {int(n)}" for c, n in enumerate(counts.tolist()) if n < need]
        raise ValueError(f"fit_probe needs at least {need} feature(s) of every class"
                         + (f" (the weight decay is chosen on a held-out {held_out:.0%} of "
                            "each class)" if need > 1 else "")
                         + f"; too few: {', '.join(few[:5])}")

    x = features.detach().double().cpu()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    scores: dict[float, float] = {}
    if len(weight_decays) > 1:
        fit_idx, held_idx = _stratified_split(labels, held_out, seed)
        for wd in weight_decays:
            w, b = _lbfgs(z[fit_idx], labels[fit_idx], num_classes, float(wd), max_iter)
            scores[float(wd)] = _accuracy(w, b, z[held_idx], labels[held_idx])
        best = max(scores.items(), key=lambda kv: (kv[1], kv[0]))[0]
    else:
        best = float(weight_decays[0])
    w, b = _lbfgs(z, labels, num_classes, best, max_iter)
    # fold the standardisation in: W (x - m) / s + b = (W / s) x + (b - (W / s) m)
    w_raw = w / std
    b_raw = b - w_raw @ mean
    head = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(w_raw.float())
        head.bias.copy_(b_raw.float())
    if info is not None:
        info.update(weight_decay=best, held_out_accuracy=scores,
                    train_accuracy=_accuracy(w, b, z, labels))
    return head


# --------------------------------------------------------------------------------------------
# Feature cache (probe fits and results pages re-use extracted features)


def cached_features(model: nn.Module, dataset, cache: Optional[str | Path], key: dict[str, Any],
                    batch_size: int = 64, workers: int = 0, progress: bool = True,
                    desc: str = "features", fn=None) -> tuple[Tensor, Tensor]:
    """:func:`extract_features` of ``dataset`` (with the per-batch ``fn``, if given), stored
    in / read from the file ``cache``.

    The file holds the features, the labels and ``key`` (JSON: what they were computed from,
    e.g. model name, checkpoint, image size, image files); a cache whose key differs is
    recomputed and overwritten. ``cache=None`` always computes.
    """
    from safetensors.torch import load_file, save_file

    from leanvit.data import loader

    key_text = json.dumps(key, sort_keys=True, default=str)
    if cache is not None and Path(cache).is_file():
        try:
            if head_metadata(cache).get("key") == key_text:
                t = load_file(str(cache))
                return t["features"], t["labels"]
        except ValueError:
            pass  # unreadable cache: recompute
    feats, labels = extract_features(model, loader(dataset, batch_size, workers),
                                     progress=progress, desc=desc, fn=fn)
    if cache is not None:
        path = Path(cache)
        with atomic_path(path) as tmp:
            save_file({"features": feats.contiguous(), "labels": labels.contiguous()}, str(tmp),
                      metadata={"key": json.dumps(key_text)})
    return feats, labels


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex): what a cache key needs to see a replaced file, even one
    of the same size and modification time (``cp -p``, ``rsync -t``)."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def dataset_key(dataset) -> list:
    """Image files (relative names, SHA-256 of their bytes) and labels of an ImageFolder or
    Subset, for cache keys: ``[count, sha256]``."""
    from torch.utils.data import Subset

    idx = None
    while isinstance(dataset, Subset):
        idx = list(dataset.indices) if idx is None else [dataset.indices[i] for i in idx]
        dataset = dataset.dataset
    samples = dataset.samples if idx is None else [dataset.samples[i] for i in idx]
    root = Path(dataset.root)
    import hashlib

    h = hashlib.sha256()
    for path, label in samples:
        # the content, not size and modification time: an image replaced under the same name
        # by one of the same size, its time kept (cp -p), must not give the old features
        h.update(f"{Path(path).relative_to(root)}\t{label}\t{file_digest(path)}\n".encode())
    return [len(samples), h.hexdigest()]


def check_head_destination(out: str | Path) -> None:
    """``ValueError`` when writing a probe head to ``out`` would replace something that is not
    a probe head (an image, model weights, any other file) or ``out`` is a folder; a new path
    or an existing head (which a new fit replaces) is fine."""
    p = Path(out)
    if p.is_dir():
        raise ValueError(f"head destination {p} is a folder; give a file name, e.g. "
                         f"{p / 'head.safetensors'}")
    if not p.exists():
        return
    why = None
    if p.suffix != ".safetensors":
        why = "not a .safetensors file"
    else:
        try:
            meta = head_metadata(p)
            if not {"in_features", "num_classes"} <= set(meta):
                why = "a safetensors file without a head's metadata, e.g. model weights"
        except ValueError:
            why = "not a readable safetensors file"
    if why:
        raise ValueError(f"{p} exists and is not a probe head ({why}); refusing to replace it: "
                         "choose another file name for the head")


def _check_enough_images(dataset, classes: Sequence[str], where: str) -> None:
    """``ValueError`` unless ``dataset`` (train images) has 2+ classes and enough images of
    each for :func:`fit_probe` to choose its weight decay (:func:`min_per_class`)."""
    from leanvit.data import class_counts

    if len(classes) < 2:
        raise ValueError(f"{where} has {len(classes)} class folder(s) ({', '.join(classes)}); a "
                         "probe needs at least 2 classes (with one, every prediction is right)")
    need = min_per_class(0.2)
    counts = class_counts(dataset)
    few = [f"{c}: {n}" for c, n in zip(classes, counts) if n < need]
    if few:
        raise ValueError(f"{where} has too few images for a probe ({', '.join(few[:5])}); it "
                         f"needs at least {need} of every class (the weight decay is chosen on a "
                         "held-out 20% of each class): use more images (a larger --limit)")


def _dense_probe_setup(threshold: Optional[float], model: nn.Module
                       ) -> tuple[Callable, str, dict[str, Any]]:
    """A dense probe's batch function (patch features and foreground targets), its feature
    name for the cache key and the head's extra metadata; ``threshold`` ``None``:
    :data:`leanvit.dense.FOREGROUND_THRESHOLD`."""
    from leanvit.dense import FOREGROUND_THRESHOLD, dense_batch_fn

    threshold = FOREGROUND_THRESHOLD if threshold is None else float(threshold)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be a pixel intensity in [0, 1), got {threshold}")
    extra = dict(dense=True, threshold=threshold, width=model.embed_dim,
                 feature="final-norm patch token (leanvit.dense_features)")
    return dense_batch_fn(threshold), f"dense foreground>{threshold!r} v1", extra


def _score_probe(head: nn.Module, features: Tensor, labels: Tensor,
                 dense_extra: Optional[dict] = None) -> float:
    """Accuracy (%) of ``head`` on ``features`` ``[M, C]`` against ``labels`` ``[M]``; for a
    dense probe also the foreground/background mIoU, written to ``dense_extra["val_miou"]``."""
    with torch.no_grad():
        pred = head(features).argmax(1)
        acc = 100.0 * float((pred == labels).double().mean())
    if dense_extra is not None:
        from leanvit.dense import confusion_matrix, segmentation_scores

        dense_extra["val_miou"] = segmentation_scores(confusion_matrix(pred, labels, 2))["miou"]
    return acc


def probe_folder(
    model_name: str,
    data: str | Path,
    out: str | Path,
    *,
    checkpoint: Optional[str | Path] = None,
    img_size: Optional[int] = None,
    batch_size: int = 64,
    limit: Optional[int] = None,
    val_limit: Optional[int] = None,
    workers: int = 0,
    cache_dir: Optional[str | Path] = None,
    progress: bool = True,
    dense: bool = False,
    threshold: Optional[float] = None,
) -> dict[str, Any]:
    """``leanvit probe``: features of ``data/train`` -> :func:`fit_probe` -> head saved to
    ``out``; accuracy on ``data/val``. ``limit`` / ``val_limit``: fixed seeded subsets of
    train / val (:func:`leanvit.data.fixed_subset`). Returns the numbers (accuracy in percent, seconds).

    ``dense``: a per-patch (segmentation) probe instead: one row per patch, its final features
    from :func:`leanvit.dense_features` (``[C]``), its label the foreground target
    (:func:`leanvit.dense.foreground_targets`, pixel ``threshold`` default
    :data:`leanvit.dense.FOREGROUND_THRESHOLD`; classes ``background``, ``foreground``; the
    folders' class labels are not used). Adds ``val_miou``; ``val_accuracy`` is per patch.

    The unpatched backbone (no head) gives the features; with ``cache_dir`` they are kept
    in ``cache_dir/<model>-<split>-<hash>.safetensors``, keyed by model, checkpoint (path and
    content hash), image size and image files (names, labels, content hashes).

    Refused before any work: ``threshold`` without ``dense``, an ``out`` that exists and is
    not a probe head (:func:`check_head_destination`), fewer than 2 classes or too few train
    images of a class to choose the weight decay (:func:`min_per_class`).
    """
    import hashlib
    import time

    from leanvit.data import classes_of, fixed_subset, image_folder, split_dir
    from leanvit.models import create_model

    if threshold is not None and not dense:
        raise ValueError("threshold is the foreground threshold of a dense probe: it needs "
                         "dense=True (--dense)")
    check_head_destination(out)
    model = create_model(model_name, img_size=img_size, checkpoint=checkpoint,
                         num_classes=0).eval()
    check_probe_model(model)
    train = fixed_subset(image_folder(split_dir(data, "train"), model), limit)
    val = fixed_subset(image_folder(split_dir(data, "val"), model), val_limit)
    classes = classes_of(train)
    if classes_of(val) != classes:
        raise ValueError(f"{data}/train and {data}/val have different classes: {classes} vs "
                         f"{classes_of(val)}")
    if not dense:  # a dense probe's classes are background/foreground patches, counted later
        _check_enough_images(train, classes, f"{data}/train"
                             + (f" (limit={limit})" if limit is not None else ""))
    ck = None
    if checkpoint is not None:  # by content, as the images
        ck = [str(Path(checkpoint).resolve()), file_digest(checkpoint)]
    seconds: dict[str, float] = {}
    fn, feature, extra = None, "cls+mean v1", {}
    if dense:
        fn, feature, extra = _dense_probe_setup(threshold, model)
        classes = ["background", "foreground"]
    feats = {}
    for split, ds in (("train", train), ("val", val)):
        key = {"model": model_name, "checkpoint": ck, "img_size": list(model.patch_embed.img_size),
               "images": dataset_key(ds), "feature": feature}
        cache = None
        if cache_dir is not None:
            h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
            kind = "-dense" if dense else ""
            cache = Path(cache_dir) / f"{model_name}{kind}-{split}-{h}.safetensors"
        seconds[f"{split}_from_cache"] = float(cache is not None and cache.is_file())
        t0 = time.perf_counter()
        feats[split] = cached_features(model, ds, cache, key, batch_size, workers, progress,
                                       desc=f"{split} features", fn=fn)
        seconds[f"{split}_features"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    head = fit_probe(*feats["train"], num_classes=len(classes), info=info)
    seconds["fit"] = time.perf_counter() - t0
    val_acc = _score_probe(head, *feats["val"], extra if dense else None)
    save_head(head, out, backbone=model, model=model_name,
              img_size=list(model.patch_embed.img_size),
              classes=classes, checkpoint=None if checkpoint is None else Path(checkpoint).name,
              val_accuracy=val_acc, weight_decay=info["weight_decay"],
              train_images=len(train), **extra)
    return {"model": model_name, "checkpoint": None if checkpoint is None else str(checkpoint),
            "img_size": list(model.patch_embed.img_size), "data": str(data),
            "classes": classes, "train_images": len(train), "val_images": len(val),
            "val_accuracy": val_acc, "train_accuracy": 100 * info["train_accuracy"],
            "weight_decay": info["weight_decay"],
            "held_out_accuracy": info["held_out_accuracy"], "seconds": seconds,
            "threads": torch.get_num_threads(), "head": str(out),
            "train_rows": int(feats["train"][1].numel()), **extra}
