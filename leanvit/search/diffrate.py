"""DiffRate's rate search: train the per-block kept-count logits of the ``diffrate-search``
mode (:mod:`leanvit.methods.diffrate_search`) on a frozen model to a MAC target, and return a
deployable :class:`leanvit.schedule.Schedule` for the ``diffrate`` method
(:mod:`leanvit.methods.diffrate`). Used by ``leanvit search``.
"""
from __future__ import annotations

import copy
import math
import os
import time
import warnings
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
from leanvit.schedule import HANDSET_KINDS, Schedule, fit_handset, schedule_macs
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

#: Default relative distance of the deployed MACs from the target beyond which a search
#: result carries a warning (and :func:`search` with ``select_every`` prefers snapshots
#: within it).
TOLERANCE = 0.02

#: With ``max_seconds``, the share of it that caching the frozen prefix and the teacher's
#: outputs may take; beyond it the search uses fewer images (with a warning).
CACHE_SHARE = 0.25


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
    lr: Optional[float] = None,
    min_lr: Optional[float] = None,
    mac_weight: float = 5.0,
    granularity: Optional[int] = None,
    first_block: int = 1,
    ops: str = "both",
    init: str = "warm",
    init_spread: float = 2.0,
    steps: Optional[int] = None,
    max_seconds: Optional[float] = None,
    tolerance: float = TOLERANCE,
    select_every: Optional[int] = None,
    holdout: int = 200,
    seed: int = 0,
    progress: bool = True,
    log: Optional[Callable[[dict], None]] = None,
) -> SearchResult:
    """Search DiffRate's per-block kept counts for ``model`` to ``target_gmacs``.

    The backbone is frozen (restored afterwards) and only the rate logits are trained: AdamW
    (weight decay 0) with a per-step cosine from ``lr`` to ``min_lr``, loss = task +
    ``mac_weight`` (5, the authors') x (GMACs - target)^2. ``lr`` defaults to the authors' 0.01
    for their zero start and to 0.05 for the warm start (a short search must move counts by
    several candidates: ``docs/diffrate.md``), ``min_lr`` to ``lr / 10`` (the authors' ratio).
    What the frozen blocks before ``first_block`` compute, and the unpatched model's outputs
    (the distillation targets), are computed once and cached.

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
        granularity / first_block / ops: see :class:`DiffRateSearchOptions` (``ops``:
            ``"both"``, the authors' space; ``"merge"`` or ``"prune"`` for one operation).
        init: the logits' start. ``"warm"`` (default): the hand-set schedule that merges the
            same number of tokens in every block and meets the target (``"merge-uniform"``
            of :func:`handset_schedule`; any of :data:`leanvit.schedule.HANDSET_KINDS` may
            be named instead), so the search starts on its budget and every block gets task
            gradient from the first step; ``"zero"``: the authors' zero logits (every block
            at the same, middle count).
        init_spread: width of the warm start's distributions, in candidates
            (:meth:`DiffRateSearchReducer.warm_start`).
        steps: optimiser steps in all (overrides ``epochs``; the images are cycled).
        max_seconds: stop after about this many seconds of search (caching included): caching
            may take :data:`CACHE_SHARE` of it (fewer images otherwise, with a warning); the
            step count is cut to what fits, measured after the first steps and re-planned
            every 10, and the lr schedule follows the cut so it still ends near ``min_lr``.
        tolerance: relative distance of the deployed MACs from the target above which the
            result carries a warning (``schedule.obtained["warning"]``, and a Python
            ``UserWarning``); default 2%.
        select_every: keep snapshots: at step 0 and every ``select_every`` steps (and at the
            end), the current hard counts are deployed (method ``diffrate``, tokens removed)
            and scored by the task loss on ``holdout`` of the search images, which are then
            not trained on; the search returns the best snapshot whose estimated MACs are
            within ``tolerance`` of the target (the one closest to it when none is). The
            straight-through gradient is a noisy guide: on DINOv2 a 400-step search from the
            best hand-set schedule ended with a worse deployed loss than it started from
            (``docs/diffrate.md``); this keeps the search from returning a schedule worse than
            one it saw. ``None`` (default): the last step's counts, as the authors.
        holdout: images held out for ``select_every`` (default 200; at most half the images).
        log: called with each step's record.

    Returns:
        :class:`SearchResult` with the deployable schedule; ``schedule.gmacs`` is measured by
        :func:`leanvit.count_macs` on the model with the schedule deployed, and
        ``schedule.obtained["off_target"]`` is its relative distance from the target.
    """
    check_number("target_gmacs", target_gmacs, lo=0, lo_open=True)
    check_number("epochs", epochs, lo=1, integer=True)
    check_number("batch_size", batch_size, lo=1, integer=True)
    check_number("mac_weight", mac_weight, lo=0)
    if lr is None:  # the authors' 0.01 from their zero start; 5x from the warm start
        lr = 0.01 if init == "zero" else 0.05
    if min_lr is None:
        min_lr = lr / 10
    check_number("lr", lr, lo=0, lo_open=True)
    check_number("min_lr", min_lr, lo=0)
    check_number("init_spread", init_spread, lo=0, lo_open=True)
    check_number("tolerance", tolerance, lo=0)
    if steps is not None:
        check_number("steps", steps, lo=1, integer=True)
    if max_seconds is not None:
        check_number("max_seconds", max_seconds, lo=0, lo_open=True)
    if select_every is not None:
        check_number("select_every", select_every, lo=1, integer=True)
        check_number("holdout", holdout, lo=1, integer=True)
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if ops != "both" and init.startswith(("merge-", "prune-")) and not init.startswith(ops):
        raise ValueError(f"init {init!r} starts from an operation that ops={ops!r} does not "
                         "search; start from a schedule of that operation (e.g. "
                         f"'{ops}-uniform')")
    for name, v in (("target_gmacs", target_gmacs), ("lr", lr), ("min_lr", min_lr),
                    ("mac_weight", mac_weight)):
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v!r}")
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
                if max_seconds is not None and s == batch_size:
                    # caching may take at most CACHE_SHARE of the time: fewer images if not
                    per_image = (time.perf_counter() - t0) / s
                    fit = max(batch_size, int(CACHE_SHARE * max_seconds / per_image))
                    if fit < len(images):
                        warnings.warn(f"diffrate search: caching {len(images)} images would take "
                                      f"~{per_image * len(images):.0f} s of max_seconds="
                                      f"{max_seconds:g}; searching on the first {fit}",
                                      stacklevel=2)
                        images = images[:fit]
                        labels = None if labels is None else labels[:fit]
                if s >= len(images):
                    break
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
        held = None
        if select_every is not None:
            if len(cache_t) < 2:
                raise ValueError("select_every needs at least 2 search images (some are held "
                                 "out to score the snapshots)")
            k = min(holdout, len(cache_t) // 2)
            held = (cache_t[-k:], target_t[-k:])
            cache_t, target_t = cache_t[:-k], target_t[:-k]
            deploy_copy = copy.deepcopy(model)  # unpatched: the snapshots are deployed on it

        patch(model, "diffrate-search", granularity=granularity, first_block=first_block,
              mac_model=coeffs, ops=ops)
        reducer: DiffRateSearchReducer = model.leanvit
        start = None
        if init != "zero":
            kind = ("prune-uniform" if ops == "prune" else "merge-uniform") if init == "warm" \
                else init
            start = handset_schedule(model, kind, target_gmacs, first_block=first_block,
                                     coeffs=coeffs, measure=False)
            reducer.warm_start(start.prune_kept, start.merge_kept, spread=init_spread)
        opt = torch.optim.AdamW(reducer.parameters(), lr=lr, weight_decay=0.0)
        steps_per_epoch = math.ceil(len(cache_t) / batch_size)
        total = steps if steps is not None else epochs * steps_per_epoch
        gen = torch.Generator().manual_seed(seed)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="diffrate search", unit="step")
        def task_loss(y: Tensor, state: TokenState, target: Tensor,
                      net: nn.Module = model) -> Tensor:
            if objective == "distill-features":
                f = _features(y, state, info.num_prefix_tokens)
                return (f - target).square().mean() / target.square().mean()
            out = adapter.forward_head(net, y, state)
            if objective == "ce":
                return F.cross_entropy(out, target)
            return F.kl_div(out.log_softmax(-1), target.log_softmax(-1), reduction="batchmean",
                            log_target=True)

        snapshots: list[dict] = []

        def snapshot(at: int) -> None:
            """Deploy the current hard counts on the held-out images and record the loss."""
            s = reducer.to_schedule(info.name, info.img_size)
            key = (tuple(s.prune_kept), tuple(s.merge_kept))
            if any(r["key"] == key for r in snapshots):
                return
            patch(deploy_copy, "diffrate", schedule=s)
            total_loss, n = 0.0, 0
            with torch.no_grad():
                for a in range(0, len(held[0]), batch_size):
                    x0, tgt = held[0][a:a + batch_size], held[1][a:a + batch_size]
                    st = deploy_copy.leanvit.init_state(
                        TokenState(prefix=info.num_prefix_tokens, n0=x0.shape[1]), x0)
                    y, st = adapter.run_blocks(deploy_copy, x0, st, first_block)
                    total_loss += float(task_loss(y, st, tgt, deploy_copy)) * len(x0)
                    n += len(x0)
            unpatch(deploy_copy)
            est = schedule_macs(s.prune_kept, s.merge_kept, s.num_tokens, coeffs)
            snapshots.append({"key": key, "step": at, "holdout_loss": total_loss / n,
                              "estimated_gmacs": est, "schedule": s})

        step, epoch = 0, -1
        if held is not None:
            snapshot(0)
        requested, t_loop = total, time.perf_counter()  # the step time excludes snapshot 0
        while step < total:
            epoch += 1
            perm = torch.randperm(len(cache_t), generator=gen)
            for s in range(0, len(cache_t), batch_size):
                if step >= total:
                    break
                if max_seconds is not None and (step == 2 or (step > 2 and step % 10 == 0)):
                    # what fits in the time left, at the speed of the steps so far (re-planned
                    # every 10 steps, so a machine that slows down cannot overrun the limit,
                    # and one that speeds up gets back up to the steps asked for)
                    per_step = (time.perf_counter() - t_loop) / step
                    left = max_seconds - (time.perf_counter() - t0)
                    total = max(step + 1, min(requested, step + int(left / per_step)))
                    if bar is not None:
                        bar.total = total
                        bar.refresh()
                idx = perm[s:s + batch_size].to(device)
                cur_lr = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / total))
                for group in opt.param_groups:
                    group["lr"] = cur_lr
                x0 = cache_t[idx]
                state = reducer.init_state(TokenState(prefix=info.num_prefix_tokens,
                                                      n0=x0.shape[1]), x0)
                y, state = adapter.run_blocks(model, x0, state, first_block)
                task = task_loss(y, state, target_t[idx])
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
                if held is not None and step % select_every == 0:
                    snapshot(step)
        if held is not None:
            snapshot(step)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            expected = float(reducer.expected_gmacs())
        obtained = {
            "how": "search", "method": "diffrate", "target_gmacs": float(target_gmacs),
            "objective": objective, "images": int(len(cache_t)), "epochs": epochs,
            "steps": step, "batch_size": batch_size, "lr": lr, "min_lr": min_lr,
            "init": init, "init_spread": init_spread,
            "init_gmacs": None if start is None else start.obtained["estimated_gmacs"],
            "mac_weight": mac_weight, "granularity": int(reducer.candidates[0] -
                                                         reducer.candidates[1])
            if len(reducer.candidates) > 1 else 1,
            "first_block": first_block, "ops": ops, "expected_gmacs": expected,
            "seconds": round(seconds, 1), "seed": seed,
            "leanvit": _version(),
        }
        schedule = reducer.to_schedule(info.name, info.img_size, obtained)
        if held is not None:
            ok = [r for r in snapshots
                  if abs(r["estimated_gmacs"] - target_gmacs) <= tolerance * target_gmacs]
            best = (min(ok, key=lambda r: r["holdout_loss"]) if ok else
                    min(snapshots, key=lambda r: abs(r["estimated_gmacs"] - target_gmacs)))
            obtained.update({
                "select_every": select_every, "holdout": len(held[0]),
                "images": int(len(cache_t)) + len(held[0]), "selected_step": best["step"],
                "snapshots": [{k: v for k, v in r.items() if k not in ("key", "schedule")}
                              for r in snapshots]})
            schedule = Schedule(**{**_fields(best["schedule"]), "obtained": obtained})
        unpatch(model)
        patch(model, "diffrate", schedule=schedule)
        deployed = count_macs(model, images[:1].to(device)).gmacs
        unpatch(model)
        off = (deployed - target_gmacs) / target_gmacs
        obtained = {**schedule.obtained, "off_target": round(off, 6)}
        if abs(off) > tolerance:
            msg = (f"the searched schedule gives {deployed:.4f} GMACs, {100 * off:+.1f}% off the "
                   f"target {target_gmacs:g} (more than {100 * tolerance:g}%): search longer "
                   "(--epochs/steps), raise mac_weight, or use a schedule that meets it")
            obtained["warning"] = msg
            warnings.warn(msg, stacklevel=2)
        schedule = Schedule(**{**_fields(schedule), "gmacs": round(deployed, 6),
                               "obtained": obtained})
        return SearchResult(schedule=schedule, history=history, seconds=seconds, steps=step)
    finally:
        if is_patched(model):
            unpatch(model)
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
        model.train(was_training)


#: Starts of the search's logits: ``"warm"`` (= ``"merge-uniform"``), a hand-set kind, or
#: the authors' ``"zero"``.
INITS = ("warm", "zero") + HANDSET_KINDS


def handset_schedule(model: nn.Module, kind: str, target_gmacs: float, *, first_block: int = 1,
                     coeffs: Optional[dict] = None, measure: bool = True) -> Schedule:
    """The hand-set schedule of DiffRate's space of ``kind`` (:data:`leanvit.schedule.
    HANDSET_KINDS`: the same number of tokens merged or pruned in every block from
    ``first_block`` on, or three EViT-like stages) whose MACs come closest to ``target_gmacs``
    (:func:`leanvit.schedule.fit_handset` with ``model``'s coefficients, :func:`mac_model`).

    ``schedule.gmacs`` is measured by :func:`leanvit.count_macs` with the schedule deployed
    (``measure=False``: left ``None``; the estimate is in ``obtained["estimated_gmacs"]``).
    ``model`` must be unpatched unless ``coeffs`` is given and ``measure`` is False.
    """
    info = find_adapter(model).describe(model)
    coeffs = coeffs if coeffs is not None else mac_model(model)
    n = info.num_patches + info.num_prefix_tokens
    p, m, strength, est = fit_handset(kind, target_gmacs, n, info.num_prefix_tokens,
                                      info.depth, coeffs, first_block)
    s = Schedule(model=info.name, img_size=info.img_size, num_tokens=n,
                 prefix_tokens=info.num_prefix_tokens, prune_kept=p, merge_kept=m,
                 obtained={"how": "handset", "kind": kind, "strength": strength,
                           "target_gmacs": float(target_gmacs), "estimated_gmacs": est})
    if not measure:
        return s
    import copy

    h, w = info.img_size
    prm = next(model.parameters())
    deployed = patch(copy.deepcopy(model), "diffrate", schedule=s)
    g = count_macs(deployed, torch.zeros(1, 3, h, w, device=prm.device, dtype=prm.dtype)).gmacs
    return Schedule(**{**_fields(s), "gmacs": round(g, 6)})


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
