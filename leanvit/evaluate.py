"""Accuracy, MACs and throughput of a (patched) classifier on an ImageFolder split.

Protocol:
- images: ``DIR/<split>`` read with the model's own timm data config (:mod:`leanvit.data`),
  optionally a fixed seeded subset (``limit``), in order, eval mode, no gradients;
- top-1 / top-5: percent of images whose label is the arg-max / among the 5 largest logits
  (top-``min(5, K)`` when there are fewer than 5 classes);
- GMACs: per image, from the token counts each block saw on these very images, averaged over
  them (:func:`leanvit.macs.forward_with_macs`: the same forward pass gives the logits);
- throughput: images/s of the model alone (no data loading), on one batch of the evaluated
  images, after ``warmup`` passes, median of ``repeats`` timed passes under
  ``torch.inference_mode`` (``leanvit.bench``'s conventions; ratios between settings are
  only meaningful within one run on one machine).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn



def model_logits(out: Any) -> Tensor:
    """Logits ``[B, K]`` of a model's output: the tensor itself (timm), or the ``logits`` of
    an output object (Hugging Face ``ImageClassifierOutput``)."""
    return out if isinstance(out, Tensor) else out.logits

def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of rows of ``logits`` ``[B, K]`` whose label is among the top ``min(k, K)``."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # [B, maxk], best first
    hit = top == labels[:, None]
    return {k: int(hit[:, :min(k, logits.shape[1])].any(1).sum()) for k in ks}


def measure_throughput(model: nn.Module, images: Tensor, warmup: int = 1, repeats: int = 3
                       ) -> dict[str, Any]:
    """Images/s of ``model`` on the batch ``images`` (on the model's device): median of
    ``repeats`` timed forward passes after ``warmup`` untimed ones."""
    p = next(model.parameters(), None)
    if p is not None:
        images = images.to(device=p.device, dtype=p.dtype)
    cuda = images.device.type == "cuda"
    times = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for r in range(warmup + repeats):
                if cuda:
                    torch.cuda.synchronize(images.device)
                t0 = time.perf_counter()
                model(images)
                if cuda:
                    torch.cuda.synchronize(images.device)
                if r >= warmup:
                    times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    med = statistics.median(times)
    return {"images_per_s": images.shape[0] / med, "ms_per_batch": med * 1e3,
            "batch_size": images.shape[0], "round_ms": [t * 1e3 for t in times]}


def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    progress: bool = True,
    throughput: bool = True,
    warmup: int = 1,
    repeats: int = 3,
    desc: str = "eval",
    macs: bool = True,
    amp_dtype: Optional[torch.dtype] = None,
) -> dict[str, Any]:
    """Evaluate a classifier on ``loader`` (``(images [B, 3, H, W], labels [B])`` batches), in
    eval mode without gradients (the model's mode is restored).

    Returns a dict: ``top1``, ``top5`` (percent), ``images``, ``correct1``, ``correct5``,
    ``gmacs`` (mean per image; absent with ``macs=False``), ``images_per_s`` and
    ``ms_per_batch`` (throughput on the first batch, see the module docstring; absent when
    ``throughput=False``). Under ``torch.distributed`` the counts (and MACs) are summed over
    the ranks, each of which evaluates its own shard.

    Args:
        macs: count MACs from the same forward pass (:func:`leanvit.macs.forward_with_macs`;
            needs a model of a registered family). ``False``: the model's own ``forward``
            (any classifier, e.g. a layer-compacted PVTv2; the trainer's validation).
        amp_dtype: run the forward passes under ``torch.autocast`` with this dtype
            (``torch.bfloat16``/``torch.float16``); ``None``: the model's own precision.
    """
    from tqdm import tqdm

    from leanvit.macs import forward_with_macs

    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # images, top-1, top-5, MACs
    first: Optional[Tensor] = None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype,
                                             enabled=amp_dtype is not None):
            for images, labels in tqdm(loader, desc=desc, disable=not progress, unit="batch"):
                if first is None:
                    first = images
                if macs:
                    logits, report = forward_with_macs(model, images)
                    counts[3] += report.total * images.shape[0]
                else:
                    dtype = p.dtype if p is not None and p.is_floating_point() else None
                    logits = model_logits(model(images.to(device=device, dtype=dtype)))
                hits = topk_correct(logits, labels.to(logits.device))
                counts[0] += images.shape[0]
                counts[1] += hits[1]
                counts[2] += hits[5]
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    total, c1, c5 = (int(v) for v in counts[:3].tolist())
    if total == 0:
        raise ValueError("no images to evaluate")
    out: dict[str, Any] = {"top1": 100.0 * c1 / total, "top5": 100.0 * c5 / total,
                           "images": total, "correct1": c1, "correct5": c5}
    if macs:
        out["gmacs"] = float(counts[3]) / total / 1e9
    if throughput:
        out.update(measure_throughput(model, first, warmup=warmup, repeats=repeats))
    return out


def check_classes(model: nn.Module, classes: list[str], head: Optional[str | Path] = None) -> None:
    """The model must output one logit per class of the data (and a probe head must have
    been fitted on the same class names); ``ValueError`` otherwise."""
    k = getattr(model, "num_classes", None)
    if k == 0:
        raise ValueError("the model has no classifier (a headless backbone); fit a linear probe "
                         "with 'leanvit probe' and pass it with --head")
    if k is not None and k != len(classes):
        raise ValueError(f"the model outputs {k} classes but the data has {len(classes)} "
                         f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    if head is not None:
        from leanvit.heads import head_metadata

        names = head_metadata(head).get("classes")
        if names is not None and list(names) != list(classes):
            raise ValueError(f"head {head} was fitted on the classes {names}, the data has "
                             f"{classes}")


def load_split(model: nn.Module, data: str | Path, split: str = "val",
               limit: Optional[int] = None, seed: int = 0):
    """The ImageFolder ``data/split`` with ``model``'s transform, optionally a fixed subset of
    ``limit`` images (:func:`leanvit.data.fixed_subset`)."""
    from leanvit.data import fixed_subset, image_folder, split_dir

    return fixed_subset(image_folder(split_dir(data, split), model), limit, seed)
