"""DiffRate's rate search: train the per-block kept-count logits of the ``diffrate-search``
mode (:mod:`leanvit.methods.diffrate_search`) on a frozen model to a MAC target, and return a
deployable :class:`leanvit.schedule.Schedule` for the ``diffrate`` method
(:mod:`leanvit.methods.diffrate`). Used by ``leanvit search``.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanvit.adapters import find_adapter
from leanvit.macs import count_macs
from leanvit.methods.diffrate_search import DiffRateSearchReducer
from leanvit.patching import is_patched, patch, unpatch
from leanvit.registry import check_number
from leanvit.schedule import Schedule
from leanvit.state import TokenState

# --------------------------------------------------------------------------------------------
# The search loop


def mac_model(model: nn.Module) -> dict:
    """Per-image MAC coefficients of a ViT for the differentiable estimate, read off
    :func:`leanvit.count_macs` of the dense model: ``constant`` (patch embedding, head),
    ``attn_token`` (q/k/v and output projections per token), ``attn_pair`` (scores and
    weighted values per query-key pair), ``mlp_token`` (MLP per token)."""
    info = find_adapter(model).describe(model)
    h, w = info.img_size
    p = next(model.parameters())
    report = count_macs(model, torch.zeros(1, 3, h, w, device=p.device, dtype=p.dtype))
    n = info.num_patches + info.num_prefix_tokens
    b = report.per_block[0]
    attn_pair = 2.0 * info.embed_dim  # q k^T and attn @ v: 2 N^2 C
    return {"constant": report.stem + report.head, "attn_token": (b.attention - attn_pair * n * n)
            / n, "attn_pair": attn_pair, "mlp_token": b.mlp / n}


@dataclass
class SearchResult:
    """What :func:`search` returns: the schedule (its ``gmacs`` from :func:`count_macs` of the
    deployed model) and the per-step history (loss, task loss, expected GMACs, lr)."""

    schedule: Schedule
    history: list = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


OBJECTIVES = ("auto", "ce", "distill-logits", "distill-features")


def _features(x: Tensor, state: Optional[TokenState], prefix: int) -> Tensor:
    """Class token concatenated with the size- (and mask-) weighted mean of the patch tokens,
    ``[B, 2C]`` from final tokens ``x`` ``[B, N, C]`` (the probe's feature)."""
    w = x.new_ones(x.shape[:2])
    if state is not None:
        if state.size is not None:
            w = w * state.size
        if state.mask is not None:
            w = w * state.mask
    w = w[:, prefix:]
    mean = (x[:, prefix:] * w[..., None]).sum(1) / w.sum(1, keepdim=True)
    return torch.cat([x[:, 0], mean], dim=-1)


def search(
    model: nn.Module,
    target_gmacs: float,
    images: Any,
    *,
    labels: Optional[Tensor] = None,
    objective: str = "auto",
    epochs: int = 3,
    batch_size: int = 32,
    num_images: Optional[int] = None,
    lr: float = 0.01,
    min_lr: float = 0.001,
    mac_weight: float = 5.0,
    granularity: Optional[int] = None,
    first_block: int = 1,
    seed: int = 0,
    progress: bool = True,
    log: Optional[Callable[[dict], None]] = None,
) -> SearchResult:
    """Search DiffRate's per-block kept counts for ``model`` to ``target_gmacs``.

    The backbone is frozen (restored afterwards) and only the rate logits are trained: AdamW
    (weight decay 0) at ``lr`` 0.01 with a per-step cosine to ``min_lr`` 0.001, loss =
    task + ``mac_weight`` (5) x (GMACs - target)^2 (the authors' defaults). What the frozen
    blocks before ``first_block`` compute is cached once.

    Args:
        model: an unpatched timm ViT (with a class token), eval mode.
        target_gmacs: MACs per image, in 1e9.
        images: ``[M, 3, H, W]`` preprocessed images, or an ImageFolder directory.
        labels: ``[M]`` class indices (objective ``"ce"``; read from the folder for a path).
        objective: ``"ce"`` (cross-entropy with labels and the model's head),
            ``"distill-logits"`` (KL to the unpatched model's logits), ``"distill-features"``
            (relative MSE to the unpatched model's class token + mean patch token, for
            headless models such as DINOv2), or ``"auto"``: features when the model has no
            head, logits otherwise. Distillation needs no labels.
        epochs: passes over the images (the paper: ~1000 images suffice).
        batch_size: images per step.
        num_images: use this many images of the folder (a fixed random subset, ``seed``).
        granularity / first_block: see :class:`DiffRateSearchOptions`.
        log: called with each step's record.

    Returns:
        :class:`SearchResult` with the deployable schedule; ``schedule.gmacs`` is measured by
        :func:`leanvit.count_macs` on the model with the schedule deployed.
    """
    check_number("target_gmacs", target_gmacs, lo=0, lo_open=True)
    check_number("epochs", epochs, lo=1, integer=True)
    check_number("batch_size", batch_size, lo=1, integer=True)
    check_number("mac_weight", mac_weight, lo=0)
    check_number("lr", lr, lo=0, lo_open=True)
    check_number("min_lr", min_lr, lo=0)
    if num_images is not None:
        check_number("num_images", num_images, lo=1, integer=True)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if is_patched(model):
        raise ValueError("search needs an unpatched model; call leanvit.unpatch(model) first")
    adapter = find_adapter(model)
    if adapter.KIND != "tokens":
        raise ValueError(f"diffrate search runs on flat-token families, not {adapter.FAMILY!r}")
    info = adapter.describe(model)
    if isinstance(images, (str, os.PathLike)):
        images, folder_labels = _image_folder(images, model, num_images, seed)
        labels = folder_labels if labels is None else labels
    elif num_images is not None:
        images = images[:num_images]
        labels = None if labels is None else labels[:num_images]
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise TypeError("images must be a [M, 3, H, W] tensor or an ImageFolder directory")
    if images.shape[0] == 0:
        raise ValueError("no images to search on (an empty batch)")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images hold NaN or infinite values; the search needs real images")
    has_head = getattr(model, "num_classes", 0) > 0
    if objective == "auto":
        objective = "distill-logits" if has_head else "distill-features"
    if objective in ("ce", "distill-logits") and not has_head:
        raise ValueError(f"objective {objective!r} needs a classifier head; this model has none "
                         "(use distill-features)")
    if objective == "ce" and labels is None:
        raise ValueError("objective 'ce' needs labels")

    dense_gmacs = count_macs(model, images[:1]).gmacs
    if target_gmacs >= dense_gmacs:
        raise ValueError(f"target_gmacs {target_gmacs} is not below the dense model's "
                         f"{dense_gmacs:.4f} GMACs")
    grad_flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    history: list[dict] = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        coeffs = mac_model(model)
        # cache the frozen prefix and the teacher's outputs
        patch(model, "none")
        cache, teacher = [], []
        with torch.no_grad():
            for s in range(0, len(images), batch_size):
                xb = images[s:s + batch_size].to(device)
                x, state = adapter.embed(model, xb)
                x, state = adapter.run_blocks(model, x, state, 0, first_block)
                cache.append(x)
                if objective != "ce":
                    y, st = adapter.run_blocks(model, x, state, first_block)
                    teacher.append(adapter.forward_head(model, y, st)
                                   if objective == "distill-logits"
                                   else _features(y, st, info.num_prefix_tokens))
        cache_t = torch.cat(cache)
        target_t = torch.cat(teacher) if teacher else labels.to(device)
        unpatch(model)

        patch(model, "diffrate-search", granularity=granularity, first_block=first_block,
              mac_model=coeffs)
        reducer: DiffRateSearchReducer = model.leanvit
        opt = torch.optim.AdamW(reducer.parameters(), lr=lr, weight_decay=0.0)
        steps_per_epoch = math.ceil(len(cache_t) / batch_size)
        total = epochs * steps_per_epoch
        gen = torch.Generator().manual_seed(seed)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="diffrate search", unit="step")
        step = 0
        for epoch in range(epochs):
            perm = torch.randperm(len(cache_t), generator=gen)
            for s in range(0, len(cache_t), batch_size):
                idx = perm[s:s + batch_size].to(device)
                cur_lr = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / total))
                for group in opt.param_groups:
                    group["lr"] = cur_lr
                x0 = cache_t[idx]
                state = reducer.init_state(TokenState(prefix=info.num_prefix_tokens,
                                                      n0=x0.shape[1]), x0)
                y, state = adapter.run_blocks(model, x0, state, first_block)
                if objective == "distill-features":
                    f, t = _features(y, state, info.num_prefix_tokens), target_t[idx]
                    task = (f - t).square().mean() / t.square().mean()
                else:
                    out = adapter.forward_head(model, y, state)
                    if objective == "ce":
                        task = F.cross_entropy(out, target_t[idx])
                    else:
                        task = F.kl_div(out.log_softmax(-1), target_t[idx].log_softmax(-1),
                                        reduction="batchmean", log_target=True)
                gmacs = reducer.expected_gmacs()
                loss = task + mac_weight * (gmacs - target_gmacs) ** 2
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                rec = {"step": step, "epoch": epoch, "loss": loss.item(), "task": task.item(),
                       "gmacs": gmacs.item(), "lr": cur_lr}
                history.append(rec)
                if log is not None:
                    log(rec)
                if bar is not None:
                    bar.set_postfix(task=f"{rec['task']:.4f}", gmacs=f"{rec['gmacs']:.3f}")
                    bar.update(1)
                step += 1
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            expected = float(reducer.expected_gmacs())
        obtained = {
            "how": "search", "method": "diffrate", "target_gmacs": float(target_gmacs),
            "objective": objective, "images": int(len(cache_t)), "epochs": epochs,
            "steps": step, "batch_size": batch_size, "lr": lr, "min_lr": min_lr,
            "mac_weight": mac_weight, "granularity": int(reducer.candidates[0] -
                                                         reducer.candidates[1])
            if len(reducer.candidates) > 1 else 1,
            "first_block": first_block, "expected_gmacs": expected,
            "seconds": round(seconds, 1), "seed": seed,
            "leanvit": _version(),
        }
        schedule = reducer.to_schedule(info.name, info.img_size, obtained)
        unpatch(model)
        patch(model, "diffrate", schedule=schedule)
        deployed = count_macs(model, images[:1].to(device)).gmacs
        unpatch(model)
        schedule = Schedule(**{**_fields(schedule), "gmacs": round(deployed, 6)})
        return SearchResult(schedule=schedule, history=history, seconds=seconds, steps=step)
    finally:
        if is_patched(model):
            unpatch(model)
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
        model.train(was_training)


def _version() -> str:
    import leanvit

    return leanvit.__version__


def _fields(s: Schedule) -> dict:
    return {"model": s.model, "img_size": s.img_size, "num_tokens": s.num_tokens,
            "prefix_tokens": s.prefix_tokens, "prune_kept": s.prune_kept,
            "merge_kept": s.merge_kept, "gmacs": s.gmacs, "obtained": s.obtained}


def _image_folder(path: Any, model: nn.Module, num_images: Optional[int], seed: int
                  ) -> tuple[Tensor, Tensor]:
    """Images of an ImageFolder directory (``path/<class>/*.png``), preprocessed with the
    model's timm eval transform, as ``[M, 3, H, W]`` and labels ``[M]``; a fixed random subset
    of ``num_images``. (Private stand-in until :mod:`leanvit.data` is on main.)"""
    from pathlib import Path

    from timm.data import create_transform, resolve_data_config
    from leanvit.data import ImageFolder

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"data directory {root} does not exist")
    cfg = resolve_data_config({}, model=model)
    h, w = find_adapter(model).describe(model).img_size
    cfg["input_size"] = (3, h, w)
    try:
        ds = ImageFolder(str(root), transform=create_transform(**cfg))
    except (FileNotFoundError, RuntimeError) as e:
        raise ValueError(f"{root} is not an ImageFolder directory (class sub-folders of "
                         f"images): {e}") from None
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    if num_images is not None:
        order = order[:num_images]
    xs, ys = zip(*(ds[int(i)] for i in order))
    return torch.stack(xs), torch.tensor(ys)
