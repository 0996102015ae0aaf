"""DiffRate's rate search: train the per-block kept-count logits of the ``diffrate-search``
mode (:mod:`leanvit.methods.diffrate.search_mode`) on a frozen model to a MAC target, and return a
deployable :class:`leanvit.methods.diffrate.schedule.Schedule` for the ``diffrate`` method
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
from leanvit.methods.diffrate.budget import HANDSET_KINDS, fit_handset, schedule_macs
from leanvit.methods.diffrate.schedule import Schedule
from leanvit.methods.diffrate.search_mode import DiffRateSearchReducer
from leanvit.patching import is_patched, patch, unpatch
from leanvit.registry import check_number
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


@dataclass
class SearchConfig:
    """Every knob of one DiffRate rate search (what :func:`search` takes besides the model, the
    images and their labels; the meaning and defaults of each are in :func:`search`'s
    docstring). Checked when built: a bad value is a one-line ``ValueError`` naming it. ``lr``
    and ``min_lr`` left ``None`` become their defaults (the authors' 0.01 from the zero start,
    0.05 from a warm start; ``lr / 10``)."""

    target_gmacs: float
    objective: str = "auto"
    epochs: int = 3
    batch_size: int = 32
    num_images: Optional[int] = None
    lr: Optional[float] = None
    min_lr: Optional[float] = None
    mac_weight: float = 5.0
    granularity: Optional[int] = None
    first_block: int = 1
    ops: str = "both"
    init: str = "warm"
    init_spread: float = 2.0
    steps: Optional[int] = None
    max_seconds: Optional[float] = None
    tolerance: float = TOLERANCE
    select_every: Optional[int] = None
    holdout: int = 200
    seed: int = 0
    progress: bool = True
    log: Optional[Callable[[dict], None]] = None

    def __post_init__(self) -> None:
        check_number("target_gmacs", self.target_gmacs, lo=0, lo_open=True)
        check_number("epochs", self.epochs, lo=1, integer=True)
        check_number("batch_size", self.batch_size, lo=1, integer=True)
        check_number("mac_weight", self.mac_weight, lo=0)
        if self.lr is None:  # the authors' 0.01 from their zero start; 5x from the warm start
            self.lr = 0.01 if self.init == "zero" else 0.05
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        check_number("lr", self.lr, lo=0, lo_open=True)
        check_number("min_lr", self.min_lr, lo=0)
        check_number("init_spread", self.init_spread, lo=0, lo_open=True)
        check_number("tolerance", self.tolerance, lo=0)
        if self.steps is not None:  # 0: no step, the start is returned (scored when selecting)
            check_number("steps", self.steps, lo=0, integer=True)
        if self.max_seconds is not None:
            check_number("max_seconds", self.max_seconds, lo=0, lo_open=True)
        if self.select_every is not None:
            check_number("select_every", self.select_every, lo=1, integer=True)
        if self.selects:
            check_number("holdout", self.holdout, lo=1, integer=True)
        init, ops = self.init, self.ops
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        if ops != "both" and init.startswith(("merge-", "prune-")) and not init.startswith(ops):
            raise ValueError(f"init {init!r} starts from an operation that ops={ops!r} does not "
                             "search; start from a schedule of that operation (e.g. "
                             f"'{ops}-uniform')")
        for name in ("target_gmacs", "lr", "min_lr", "mac_weight"):
            v = getattr(self, name)
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v!r}")
        if self.num_images is not None:
            check_number("num_images", self.num_images, lo=1, integer=True)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, "
                             f"got {self.objective!r}")

    @property
    def selects(self) -> bool:
        """Whether images are held out to score deployed schedules: for snapshots
        (``select_every``) or to pick the start (``init="best-handset"``)."""
        return self.select_every is not None or self.init == BEST_HANDSET


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
    (the distillation targets), are computed once and cached. The keyword arguments form a
    :class:`SearchConfig`; :func:`run_search` takes one directly.

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
            of :func:`handset_schedule`; any of
            :data:`leanvit.methods.diffrate.budget.HANDSET_KINDS` may be named instead), so
            the search starts on its budget and every block gets task gradient from the first
            step; ``"best-handset"`` (``leanvit search``'s and ``leanvit tune``'s default):
            every hand-set kind of the searched ``ops`` fitted to the target, deployed and
            scored on ``holdout`` held-out images, the best one the start and a snapshot
            (so with selection the search returns nothing worse than its start on those
            images, even with ``select_every=None``: the start and the last step are then
            compared); ``"zero"``: the authors' zero logits (every block at the same,
            middle count).
        init_spread: width of the warm start's distributions, in candidates
            (:meth:`DiffRateSearchReducer.warm_start`).
        steps: optimiser steps in all (overrides ``epochs``; the images are cycled); 0
            returns the start.
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
            straight-through gradient is a noisy guide (``docs/diffrate.md``): this keeps the
            search from returning a schedule worse than one it saw. ``None`` (default): the
            last step's counts, as the authors.
        holdout: images held out for ``select_every`` and ``init="best-handset"`` (default
            200; at most half the images).
        log: called with each step's record.

    Returns:
        :class:`SearchResult` with the deployable schedule; ``schedule.gmacs`` is measured by
        :func:`leanvit.count_macs` on the model with the schedule deployed, and
        ``schedule.obtained["off_target"]`` is its relative distance from the target.
    """
    config = SearchConfig(
        target_gmacs=target_gmacs, objective=objective, epochs=epochs, batch_size=batch_size,
        num_images=num_images, lr=lr, min_lr=min_lr, mac_weight=mac_weight,
        granularity=granularity, first_block=first_block, ops=ops, init=init,
        init_spread=init_spread, steps=steps, max_seconds=max_seconds, tolerance=tolerance,
        select_every=select_every, holdout=holdout, seed=seed, progress=progress, log=log)
    return run_search(model, images, config, labels=labels)


def run_search(model: nn.Module, images: Any, config: SearchConfig, *,
               labels: Optional[Tensor] = None) -> SearchResult:
    """:func:`search` with its knobs in a :class:`SearchConfig`: the phases in order (check
    the inputs, cache the frozen prefix and the targets, train the rate logits step by step
    with snapshots, select the schedule, export it with its deployed MACs). The model's
    ``requires_grad`` flags and train/eval mode are restored whatever happens."""
    run = _SearchRun(model, images, labels, config)
    grad_flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        run.cache()
        run.start()
        run.train()
        return run.export(run.select())
    finally:
        if is_patched(model):
            unpatch(model)
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
        model.train(was_training)


class _SearchRun:
    """One search in progress: the inputs checked (:meth:`__init__`), then the phases
    :meth:`cache`, :meth:`start`, :meth:`train` (of :meth:`step` s and :meth:`snapshot` s),
    :meth:`select` and :meth:`export`, each reading and filling the attributes below."""

    def __init__(self, model: nn.Module, images: Any, labels: Optional[Tensor],
                 config: SearchConfig) -> None:
        cfg = self.cfg = config
        if is_patched(model):
            raise ValueError("search needs an unpatched model; call leanvit.unpatch(model) first")
        adapter = find_adapter(model)
        if adapter.KIND != "tokens":
            raise ValueError(f"diffrate search runs on flat-token families, not "
                             f"{adapter.FAMILY!r}")
        self.model, self.adapter, self.info = model, adapter, adapter.describe(model)
        if isinstance(images, (str, os.PathLike)):
            images, folder_labels = _image_folder(images, model, cfg.num_images, cfg.seed)
            labels = folder_labels if labels is None else labels
        elif cfg.num_images is not None:
            images = images[:cfg.num_images]
            labels = None if labels is None else labels[:cfg.num_images]
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise TypeError("images must be a [M, 3, H, W] tensor or an ImageFolder directory")
        if images.shape[0] == 0:
            raise ValueError("no images to search on (an empty batch)")
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images hold NaN or infinite values; the search needs real images")
        has_head = getattr(model, "num_classes", 0) > 0
        objective = cfg.objective
        if objective == "auto":
            objective = "distill-logits" if has_head else "distill-features"
        if objective in ("ce", "distill-logits") and not has_head:
            raise ValueError(f"objective {objective!r} needs a classifier head; this model has "
                             "none (use distill-features)")
        if objective == "ce" and labels is None:
            raise ValueError("objective 'ce' needs labels")
        dense_gmacs = count_macs(model, images[:1]).gmacs
        if cfg.target_gmacs >= dense_gmacs:
            raise ValueError(f"target_gmacs {cfg.target_gmacs} is not below the dense model's "
                             f"{dense_gmacs:.4f} GMACs")
        self.images, self.labels, self.objective = images, labels, objective
        self.device = next(model.parameters()).device
        self.t0 = time.perf_counter()
        self.history: list[dict] = []
        self.snapshots: list[dict] = []
        self.held: Optional[tuple[Tensor, Tensor]] = None
        self.start_schedule: Optional[Schedule] = None
        self.step_count = 0

    # -- phase 1: cache the frozen prefix and the teacher's outputs ---------------------------

    def cache(self) -> None:
        """Run the frozen blocks before ``first_block`` once over the images (and the whole
        unpatched model for the distillation targets); hold out ``holdout`` of them when
        deployed schedules are scored (:attr:`SearchConfig.selects`). Fills ``cache_t``
        ``[M, N, C]``, ``target_t`` and ``held``."""
        cfg, model, adapter = self.cfg, self.model, self.adapter
        bs = cfg.batch_size
        self.coeffs = mac_model(model)
        patch(model, "none")
        cache, teacher = [], []
        with torch.no_grad():
            for s in range(0, len(self.images), bs):
                if cfg.max_seconds is not None and s == bs:
                    self._fit_cache_time(s)
                if s >= len(self.images):
                    break
                xb = self.images[s:s + bs].to(self.device)
                x, state = adapter.embed(model, xb)
                x, state = adapter.run_blocks(model, x, state, 0, cfg.first_block)
                cache.append(x)
                if self.objective != "ce":
                    y, st = adapter.run_blocks(model, x, state, cfg.first_block)
                    teacher.append(adapter.forward_head(model, y, st)
                                   if self.objective == "distill-logits"
                                   else _features(y, st, self.info.num_prefix_tokens))
        self.cache_t = torch.cat(cache)
        self.target_t = torch.cat(teacher) if teacher else self.labels.to(self.device)
        unpatch(model)
        if cfg.selects:
            if len(self.cache_t) < 2:
                why = "select_every" if cfg.select_every is not None else f"init={cfg.init!r}"
                raise ValueError(f"{why} needs at least 2 search images (some are held out to "
                                 "score the deployed schedules)")
            k = min(cfg.holdout, len(self.cache_t) // 2)
            self.held = (self.cache_t[-k:], self.target_t[-k:])
            self.cache_t, self.target_t = self.cache_t[:-k], self.target_t[:-k]
            self.deploy_copy = copy.deepcopy(model)  # unpatched: snapshots are deployed on it

    def _fit_cache_time(self, done: int) -> None:
        """Caching may take at most :data:`CACHE_SHARE` of ``max_seconds``: after the first
        batch (``done`` images), keep only the images that fit (with a warning)."""
        per_image = (time.perf_counter() - self.t0) / done
        fit = max(self.cfg.batch_size, int(CACHE_SHARE * self.cfg.max_seconds / per_image))
        if fit < len(self.images):
            warnings.warn(f"diffrate search: caching {len(self.images)} images would take "
                          f"~{per_image * len(self.images):.0f} s of max_seconds="
                          f"{self.cfg.max_seconds:g}; searching on the first {fit}",
                          stacklevel=5)
            self.images = self.images[:fit]
            self.labels = None if self.labels is None else self.labels[:fit]

    # -- phase 2: the search mode, its start and its optimiser ---------------------------------

    def start(self) -> None:
        """Patch the ``diffrate-search`` mode, warm-start its logits from a hand-set schedule
        (unless ``init="zero"``; with ``"best-handset"`` the best on the held-out images) and
        build the optimiser and the step plan."""
        cfg, model = self.cfg, self.model
        patch(model, "diffrate-search", granularity=cfg.granularity,
              first_block=cfg.first_block, mac_model=self.coeffs, ops=cfg.ops)
        self.reducer: DiffRateSearchReducer = model.leanvit
        if cfg.init == BEST_HANDSET:
            self.start_schedule = self._best_handset()
        elif cfg.init != "zero":
            kind = cfg.init
            if kind == "warm":
                kind = "prune-uniform" if cfg.ops == "prune" else "merge-uniform"
            self.start_schedule = handset_schedule(model, kind, cfg.target_gmacs,
                                                   first_block=cfg.first_block,
                                                   coeffs=self.coeffs, measure=False)
        if self.start_schedule is not None:
            self.reducer.warm_start(self.start_schedule.prune_kept,
                                    self.start_schedule.merge_kept, spread=cfg.init_spread)
        self.opt = torch.optim.AdamW(self.reducer.parameters(), lr=cfg.lr, weight_decay=0.0)
        steps_per_epoch = math.ceil(len(self.cache_t) / cfg.batch_size)
        self.total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc="diffrate search", unit="step")

    def _best_handset(self) -> Schedule:
        """Every hand-set kind the searched ``ops`` can express
        (:func:`handset_kinds`), fitted to the target and scored on the held-out images; the
        best within the MAC tolerance (the closest to the target when none is) is returned
        and recorded as the step-0 snapshot, so selection compares every later schedule
        with it. The scores go to ``handset_scores``."""
        cfg = self.cfg
        tried = []
        for kind in handset_kinds(cfg.ops):
            s = handset_schedule(self.model, kind, cfg.target_gmacs, first_block=cfg.first_block,
                                 coeffs=self.coeffs, measure=False)
            tried.append({"kind": kind, "holdout_loss": self.holdout_loss(s),
                          "estimated_gmacs": s.obtained["estimated_gmacs"], "schedule": s})
        best = _best_of(tried, cfg.target_gmacs, cfg.tolerance)
        self.handset_scores = [{k: v for k, v in r.items() if k != "schedule"} for r in tried]
        s = best["schedule"]
        self.snapshots.append({"key": (tuple(s.prune_kept), tuple(s.merge_kept)), "step": 0,
                               "holdout_loss": best["holdout_loss"],
                               "estimated_gmacs": best["estimated_gmacs"], "schedule": s,
                               "start": best["kind"]})
        return s

    def task_loss(self, y: Tensor, state: TokenState, target: Tensor,
                  net: Optional[nn.Module] = None) -> Tensor:
        """The objective's loss of final tokens ``y`` ``[B, N, C]`` against ``target``."""
        if self.objective == "distill-features":
            f = _features(y, state, self.info.num_prefix_tokens)
            return (f - target).square().mean() / target.square().mean()
        out = self.adapter.forward_head(self.model if net is None else net, y, state)
        if self.objective == "ce":
            return F.cross_entropy(out, target)
        return F.kl_div(out.log_softmax(-1), target.log_softmax(-1), reduction="batchmean",
                        log_target=True)

    # -- phase 3: the steps -----------------------------------------------------------------

    def train(self) -> None:
        """Step through shuffled batches of the cache until ``total`` steps (re-planned
        under ``max_seconds``), snapshotting at step 0, every ``select_every`` steps and at
        the end when deployed schedules are scored."""
        cfg = self.cfg
        epoch = -1
        if self.held is not None:
            self.snapshot(0)
        self.requested, self.t_loop = self.total, time.perf_counter()  # excludes snapshot 0
        while self.step_count < self.total:
            epoch += 1
            perm = torch.randperm(len(self.cache_t), generator=self.gen)
            for s in range(0, len(self.cache_t), cfg.batch_size):
                if self.step_count >= self.total:
                    break
                self._replan()
                self.step(perm[s:s + cfg.batch_size].to(self.device), epoch)
                if cfg.select_every is not None and self.step_count % cfg.select_every == 0:
                    self.snapshot(self.step_count)
        if self.held is not None:
            self.snapshot(self.step_count)
        if self.bar is not None:
            self.bar.close()

    def _replan(self) -> None:
        """Under ``max_seconds``: what fits in the time left, at the speed of the steps so far
        (re-planned every 10 steps, so a machine that slows down cannot overrun the limit, and
        one that speeds up gets back up to the steps asked for)."""
        step = self.step_count
        if self.cfg.max_seconds is None or not (step == 2 or (step > 2 and step % 10 == 0)):
            return
        per_step = (time.perf_counter() - self.t_loop) / step
        left = self.cfg.max_seconds - (time.perf_counter() - self.t0)
        self.total = max(step + 1, min(self.requested, step + int(left / per_step)))
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def step(self, idx: Tensor, epoch: int) -> None:
        """One optimiser step on the cached images ``idx`` ``[B]``: task + MAC loss."""
        cfg, reducer, step = self.cfg, self.reducer, self.step_count
        cur_lr = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (
            1 + math.cos(math.pi * step / self.total))
        for group in self.opt.param_groups:
            group["lr"] = cur_lr
        x0 = self.cache_t[idx]
        state = reducer.init_state(TokenState(prefix=self.info.num_prefix_tokens,
                                              n0=x0.shape[1]), x0)
        y, state = self.adapter.run_blocks(self.model, x0, state, cfg.first_block)
        task = self.task_loss(y, state, self.target_t[idx])
        gmacs = reducer.expected_gmacs()
        loss = task + cfg.mac_weight * (gmacs - cfg.target_gmacs) ** 2
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        rec = {"step": step, "epoch": epoch, "loss": loss.item(), "task": task.item(),
               "gmacs": gmacs.item(), "lr": cur_lr}
        self.history.append(rec)
        if cfg.log is not None:
            cfg.log(rec)
        if self.bar is not None:
            self.bar.set_postfix(task=f"{rec['task']:.4f}", gmacs=f"{rec['gmacs']:.3f}")
            self.bar.update(1)
        self.step_count = step + 1

    def snapshot(self, at: int) -> None:
        """Deploy the current hard counts on the held-out images and record the loss (once
        per distinct schedule)."""
        s = self.reducer.to_schedule(self.info.name, self.info.img_size)
        key = (tuple(s.prune_kept), tuple(s.merge_kept))
        if any(r["key"] == key for r in self.snapshots):
            return
        est = schedule_macs(s.prune_kept, s.merge_kept, s.num_tokens, self.coeffs)
        self.snapshots.append({"key": key, "step": at, "holdout_loss": self.holdout_loss(s),
                               "estimated_gmacs": est, "schedule": s})

    def holdout_loss(self, s: Schedule) -> float:
        """The task loss of schedule ``s`` deployed (method ``diffrate``, tokens removed) on
        the held-out images, averaged over them."""
        info, held, net = self.info, self.held, self.deploy_copy
        patch(net, "diffrate", schedule=s)
        total_loss, n = 0.0, 0
        try:
            with torch.no_grad():
                for a in range(0, len(held[0]), self.cfg.batch_size):
                    x0 = held[0][a:a + self.cfg.batch_size]
                    tgt = held[1][a:a + self.cfg.batch_size]
                    st = net.leanvit.init_state(
                        TokenState(prefix=info.num_prefix_tokens, n0=x0.shape[1]), x0)
                    y, st = self.adapter.run_blocks(net, x0, st, self.cfg.first_block)
                    total_loss += float(self.task_loss(y, st, tgt, net)) * len(x0)
                    n += len(x0)
        finally:
            unpatch(net)
        return total_loss / n

    # -- phase 4: select the schedule --------------------------------------------------------

    def select(self) -> Schedule:
        """The last step's counts, or with snapshots the best one within the tolerance (the
        closest to the target when none is), with what the search did in ``obtained``."""
        cfg, reducer = self.cfg, self.reducer
        self.seconds = time.perf_counter() - self.t0
        with torch.no_grad():
            expected = float(reducer.expected_gmacs())
        start = self.start_schedule
        obtained = {
            "how": "search", "method": "diffrate", "target_gmacs": float(cfg.target_gmacs),
            "objective": self.objective, "images": int(len(self.cache_t)),
            "epochs": cfg.epochs, "steps": self.step_count, "batch_size": cfg.batch_size,
            "lr": cfg.lr, "min_lr": cfg.min_lr, "init": cfg.init, "init_spread": cfg.init_spread,
            "init_gmacs": None if start is None else start.obtained["estimated_gmacs"],
            "mac_weight": cfg.mac_weight, "granularity": int(reducer.candidates[0] -
                                                             reducer.candidates[1])
            if len(reducer.candidates) > 1 else 1,
            "first_block": cfg.first_block, "ops": cfg.ops, "expected_gmacs": expected,
            "seconds": round(self.seconds, 1), "seed": cfg.seed,
            "leanvit": _version(),
        }
        schedule = reducer.to_schedule(self.info.name, self.info.img_size, obtained)
        if self.held is None:
            return schedule
        best = _best_of(self.snapshots, cfg.target_gmacs, cfg.tolerance)
        obtained.update({
            "select_every": cfg.select_every, "holdout": len(self.held[0]),
            "images": int(len(self.cache_t)) + len(self.held[0]), "selected_step": best["step"],
            "snapshots": [{k: v for k, v in r.items() if k not in ("key", "schedule")}
                          for r in self.snapshots]})
        if cfg.init == BEST_HANDSET:
            obtained.update({"start": self.snapshots[0]["start"], "handset": self.handset_scores,
                             "selected_start": best is self.snapshots[0]})
        return Schedule(**{**_fields(best["schedule"]), "obtained": obtained})

    # -- phase 5: export with the deployed MACs ----------------------------------------------

    def export(self, schedule: Schedule) -> SearchResult:
        """Deploy ``schedule`` on the model, count its MACs, warn when they are off the
        target by more than the tolerance, and return the result."""
        cfg, model = self.cfg, self.model
        unpatch(model)
        patch(model, "diffrate", schedule=schedule)
        deployed = count_macs(model, self.images[:1].to(self.device)).gmacs
        unpatch(model)
        target = cfg.target_gmacs
        off = (deployed - target) / target
        obtained = {**schedule.obtained, "off_target": round(off, 6)}
        if abs(off) > cfg.tolerance:
            msg = (f"the searched schedule gives {deployed:.4f} GMACs, {100 * off:+.1f}% off the "
                   f"target {target:g} (more than {100 * cfg.tolerance:g}%): search longer "
                   "(--epochs/steps), raise mac_weight, or use a schedule that meets it")
            obtained["warning"] = msg
            warnings.warn(msg, stacklevel=4)
        schedule = Schedule(**{**_fields(schedule), "gmacs": round(deployed, 6),
                               "obtained": obtained})
        return SearchResult(schedule=schedule, history=self.history, seconds=self.seconds,
                            steps=self.step_count)


#: The start that scores every hand-set kind on held-out images and begins at the best.
BEST_HANDSET = "best-handset"
#: Starts of the search's logits: ``"warm"`` (= ``"merge-uniform"``), the best hand-set
#: schedule on held-out images, a hand-set kind, or the authors' ``"zero"``.
INITS = ("warm", BEST_HANDSET, "zero") + HANDSET_KINDS


def handset_kinds(ops: str) -> tuple[str, ...]:
    """The hand-set kinds (:data:`leanvit.methods.diffrate.budget.HANDSET_KINDS`) a search of
    ``ops`` (``"both"``, ``"merge"``, ``"prune"``) can express: all of them for both
    operations, else the ones of that operation."""
    return tuple(k for k in HANDSET_KINDS if ops == "both" or k.startswith(ops + "-"))


def _best_of(rows: list, target: float, tolerance: float) -> dict:
    """The row (a scored schedule: ``holdout_loss``, ``estimated_gmacs``) with the lowest
    held-out loss among those within ``tolerance`` (relative) of ``target`` GMACs, or the
    one closest to the target when none is; ties go to the earlier row."""
    ok = [r for r in rows if abs(r["estimated_gmacs"] - target) <= tolerance * target]
    if ok:
        return min(ok, key=lambda r: r["holdout_loss"])
    return min(rows, key=lambda r: abs(r["estimated_gmacs"] - target))


def handset_schedule(model: nn.Module, kind: str, target_gmacs: float, *, first_block: int = 1,
                     coeffs: Optional[dict] = None, measure: bool = True) -> Schedule:
    """The hand-set schedule of DiffRate's space of ``kind``
    (:data:`leanvit.methods.diffrate.budget.HANDSET_KINDS`: the same number of tokens merged
    or pruned in every block from ``first_block`` on, or three EViT-like stages) whose MACs
    come closest to ``target_gmacs`` (:func:`leanvit.methods.diffrate.budget.fit_handset`
    with ``model``'s coefficients, :func:`mac_model`).

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
