"""Fine-tuning a patched timm ViT: DynamicViT's recipe, and any other method.

One script for one process and for many (``torchrun``, PyTorch DDP; NCCL on GPUs, gloo on
CPU). Everything a run does is in one :class:`TrainConfig`; ``leanvit train`` fills it from
the command line. What it does:

- Data: an ImageFolder (``DIR/train/<class>/*``, ``DIR/val/<class>/*``) with timm's data
  config of the model (mean/std, interpolation, crop) and timm's training transforms
  (RandAugment, random erasing) and ``timm.data.Mixup`` (mixup/cutmix/label smoothing).
- Model: ``leanvit.models.create_model`` (local checkpoint or random weights), or one the
  caller built (``train(cfg, model=...)``), optionally compacted (``compact``: hMHSA/cFFN by
  :func:`leanvit.compact`, calibrated on ``compact_images`` training images), patched with the
  method (``none`` to fine-tune a compacted model as it is). Teacher (distillation): a frozen
  copy of the model made before compaction and patching, or the caller's ``teacher``.
- Loss: :func:`leanvit.losses.total_loss` (DynamicViT: CE + ratio + KL + token terms), the
  ratio targets, decisions and default weights being what the method's reducer declares
  (:class:`leanvit.registry.Reducer`'s training hooks). With ``consistency_weight > 0``, the
  token-reduction-consistency loss of MCTF (Lee et al., CVPR 2024) for a method that offers
  its milder view (:meth:`leanvit.registry.Reducer.consistency_view`): each batch also runs
  through that view (same weights, less reduction, drawn anew per step), which gets the same
  classification terms, and the reduced view's final class token is pulled towards the milder
  view's (detached) on the images it classifies with confidence above
  ``consistency_threshold`` (:func:`leanvit.losses.consistency_loss`).
- Parameter groups (the DynamicViT authors' ``get_param_groups``/``adjust_learning_rate``):
  the method's own parameters (predictors) at the base lr; the backbone at
  ``min(backbone_lr_scale * lr, scheduled lr)`` and at lr 0 for the first
  ``freeze_backbone_epochs`` (frozen the authors' way: in the optimizer at lr 0, which also
  keeps DDP's set of trained parameters fixed); class token, position embedding (and
  distillation/register tokens) never updated; biases and 1-D parameters without weight
  decay. For methods without learned parameters (EViT, ToMe, ATS, top-k) the backbone is
  trained at the full lr from the start, as in their fine-tuning recipes.
- Schedule: linear warm-up over ``warmup_epochs`` then cosine to ``min_lr``, per step.
- AMP: ``amp="bf16"`` autocast (CUDA, or CPU: works, but is only fast on CPUs with bf16
  units), ``"fp16"`` (CUDA, with a gradient scaler), ``"none"``; ``"auto"`` = bf16 on CUDA,
  none on CPU. Optional EMA of the weights (``timm.utils.ModelEmaV3``).
- Logs: tqdm progress (rank 0) and JSON lines in ``OUTPUT/log.jsonl``.
- Output folder: a new run needs an empty (or new) ``OUTPUT``; a folder with files in it is
  refused unless ``resume`` continues its run or ``overwrite`` removes the previous run's own
  files (:data:`RUN_FILES`) first, so a second run never replaces the first one's weights nor
  mixes both in one log.
- Checkpoints: ``OUTPUT/last.pt`` written atomically at the end of every epoch and every
  ``checkpoint_interval_s`` seconds inside an epoch: model, optimizer, scaler, EMA, epoch, step
  inside the epoch, RNG states, config. ``resume`` continues exactly where it stopped.
  Exactness does not depend on the RNG states: every random draw of step ``t`` (data order,
  augmentation of each image, mixup, Gumbel noise, drop-path) is seeded from
  ``(seed, epoch, t, rank)`` or ``(seed, epoch, image index)``, so a resumed run replays the
  same numbers and a run does not depend on the number of data-loader workers.
- Result: ``OUTPUT/final.safetensors`` (:func:`leanvit.save` with the backbone) and
  ``OUTPUT/final_ema.safetensors`` when EMA is on.

Data handling is a private helper here (torchvision ``ImageFolder`` + timm transforms) until
the shared ``leanvit.data`` module exists.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from leanvit._files import atomic_path
from leanvit.data import data_config, fix_randaugment_posterize
from leanvit.evaluate import evaluate
from leanvit.losses import LossWeights, Output, total_loss
from leanvit.registry import Reducer

#: parameters never updated by the recipe (DynamicViT's get_param_groups skips these)
FROZEN_NAMES = ("cls_token", "pos_embed", "dist_token", "reg_token")


def default_workers() -> int:
    """Data-loader workers: 4 (DeiT's 10 per GPU scaled down), at most the CPU cores this
    process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(4, cores))


#: TrainConfig fields never compared on resume (how this invocation runs, not what it trains;
#: ``output``: a run folder may be moved)
RESUME_IGNORES = ("resume", "progress", "log_every", "max_steps", "allow_changes", "output",
                  "overwrite")
#: fields a resumed run may change when ``allow_changes`` names them: they change speed or
#: bookkeeping, not the result (``workers``: images are seeded per index, not per worker)
RESUME_MAY_CHANGE = ("workers", "device", "checkpoint_interval_s", "eval_every")


@dataclass
class TrainConfig:
    """A training run. Defaults: the DynamicViT DeiT-S recipe (Rao et al. 2021, authors'
    ``main_dynamic_vit.py``; DeiT's augmentation defaults) unless said otherwise."""

    model: str = "deit_small_patch16_224"
    data: str = ""  #: ImageFolder root with train/ and val/
    method: str = "dynamicvit"
    options: dict = field(default_factory=dict)  #: the method's options
    output: str = "runs/leanvit"
    checkpoint: Optional[str] = None  #: timm weights to start from (random otherwise)
    img_size: Optional[int] = None
    num_classes: Optional[int] = None  #: default: the number of class folders
    model_kwargs: dict = field(default_factory=dict)  #: more timm.create_model arguments
    probe_head: Optional[str] = None  #: a probe head file (leanvit.probe.save_head) to attach
    compact: Optional[dict] = None  #: leanvit.compact options (None: no compaction)
    compact_images: int = 16  #: calibration images for compact (leanvit's conversion: 16)
    epochs: int = 30
    batch_size: int = 96  #: per process (authors: 96 x 8 GPUs)
    lr: Optional[float] = None  #: default 1e-3 * global batch / 1024 (authors: 5e-4 per 512)
    min_lr: float = 1e-5  #: DeiT
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0  #: linear warm-up of every group (authors: none)
    backbone_lr_scale: Optional[float] = None  #: 0.01 with learned method parameters, else 1
    freeze_backbone_epochs: Optional[int] = None  #: 5 with learned method parameters, else 0
    keep_rate_warmup_epochs: float = 0.0  #: EViT-style: keep_rate cosine from 1 to target
    #: LossWeights fields: cls, ratio, distill, token (default: the method's
    #: ``default_loss_weights`` if it has them, e.g. ratio 10 on ConvNeXt/Swin, else DeiT's)
    loss: dict = field(default_factory=dict)
    #: weight of MCTF's token-reduction-consistency term (authors' 3.0; 0: off); needs a method
    #: that offers a milder view (``mctf``; its ``consistency_r`` sets the view's reduction)
    consistency_weight: float = 0.0
    #: the term counts the images whose label probability (plus the mixed-in label's under
    #: mixup/cutmix) exceeds this (authors' ``task_type[2]`` = 0.4)
    consistency_threshold: float = 0.4
    distill: bool = True  #: teacher = frozen unpatched model (KL + token terms)
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    crop_scale: Optional[tuple] = None  #: RandomResizedCrop area range; None: timm's (0.08, 1)
    amp: str = "auto"
    ema: bool = False
    ema_decay: float = 0.99996  #: DeiT
    clip_grad: Optional[float] = None
    workers: int = field(default_factory=lambda: default_workers())  #: min(4, CPU cores)
    seed: int = 0
    device: Optional[str] = None  #: default: cuda:LOCAL_RANK if available, else cpu
    log_every: int = 50
    checkpoint_interval_s: float = 1800.0
    resume: Optional[str] = None  #: a checkpoint path, or "auto" (OUTPUT/last.pt if present)
    #: start over in a used ``output`` folder: remove the previous run's files (RUN_FILES) first
    overwrite: bool = False
    #: fields a resumed run may change (only those in RESUME_MAY_CHANGE; the rest must equal
    #: the checkpoint's config, else resuming is refused listing the differences)
    allow_changes: tuple = ()
    max_steps: Optional[int] = None  #: stop after this many optimizer steps in this run
    eval_every: int = 1  #: evaluate on val every N epochs (0: never)
    progress: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, got {v!r}")
        if self.amp not in ("auto", "none", "bf16", "fp16"):
            raise ValueError(f"amp must be auto, none, bf16 or fp16, got {self.amp!r}")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.mixup > 0 or self.cutmix > 0:
            if self.batch_size % 2:
                raise ValueError("mixup/cutmix need an even batch_size per process "
                                 f"(got {self.batch_size}); or set mixup=0 cutmix=0")
        LossWeights(**self.loss)  # validates names and values
        for name, hi in (("consistency_weight", math.inf), ("consistency_threshold", 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= hi:
                raise ValueError(f"{name} must be a number in [0, {hi:g}], got {v!r}")
        if self.compact is not None and not isinstance(self.compact, dict):
            raise TypeError(f"compact must be a dict of leanvit.compact options or None, got "
                            f"{type(self.compact).__name__}")
        if self.crop_scale is not None and not (
                len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
            raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got "
                             f"{self.crop_scale!r}")
        if not isinstance(self.compact_images, int) or self.compact_images < 0:
            raise ValueError(f"compact_images must be an int >= 0, got {self.compact_images!r}")

        if isinstance(self.allow_changes, str):
            self.allow_changes = (self.allow_changes,)
        bad = sorted(set(self.allow_changes) - set(RESUME_MAY_CHANGE))
        if bad:
            raise ValueError(f"allow_changes: {', '.join(bad)} cannot change in a resumed run "
                             f"(they change what is trained); only {', '.join(RESUME_MAY_CHANGE)}")

    @classmethod
    def fields(cls) -> dict[str, Any]:
        return {f.name: f for f in dataclasses.fields(cls)}


# ------------------------------------------------------------------------------------------
# Seeding: every random draw is a function of (seed, epoch, step/index, rank)


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (SplitMix64-style mixing)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_states(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ------------------------------------------------------------------------------------------
# Data (private until leanvit.data exists)


class _SeededImages(torch.utils.data.Dataset):
    """An ImageFolder whose random transform of image ``i`` in epoch ``e`` is seeded from
    ``(seed, e, i)``: the same pixels whatever the worker count, the rank, or a resume."""

    def __init__(self, folder, seed: int):
        self.folder, self.seed, self.epoch = folder, seed, 0

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        _seed_all(_mix(self.seed, self.epoch, i, 1))
        return self.folder[i]


def _count_classes(root: str) -> int:
    """Class folders in ``root/train`` (what ImageFolder will find); checks the layout."""
    r = Path(root)
    for split in ("train", "val"):
        if not (r / split).is_dir():
            raise ValueError(f"--data {r}: no {split}/ folder (expected an ImageFolder "
                             f"layout: {r}/train/<class>/*.png and {r}/val/<class>/*)")
    classes = [d for d in (r / "train").iterdir() if d.is_dir()]
    if not classes:
        raise ValueError(f"--data {r}: train/ has no class folders")
    return len(classes)


def _datasets(cfg: TrainConfig, model: nn.Module):
    from timm.data import create_transform
    from leanvit.data import ImageFolder

    root = Path(cfg.data)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ValueError(f"--data {root}: no {split}/ folder (expected an ImageFolder "
                             f"layout: {root}/train/<class>/*.png and {root}/val/<class>/*)")
    dc = data_config(model)
    fix_randaugment_posterize()  # DeiT's "-inc1" policy crashed on Pillow 12+ otherwise
    extra = {} if cfg.crop_scale is None else {"scale": tuple(cfg.crop_scale)}
    train_tf = create_transform(
        dc["input_size"], is_training=True, auto_augment=cfg.auto_augment or None,
        re_prob=cfg.reprob, interpolation=dc["interpolation"], mean=dc["mean"], std=dc["std"],
        **extra)
    val_tf = create_transform(
        dc["input_size"], is_training=False, interpolation=dc["interpolation"], mean=dc["mean"],
        std=dc["std"], crop_pct=dc["crop_pct"], crop_mode=dc.get("crop_mode", "center"))
    train = ImageFolder(str(root / "train"), transform=train_tf)
    val = ImageFolder(str(root / "val"), transform=val_tf)
    if train.classes != val.classes:
        raise ValueError(f"train and val class folders differ: {train.classes} vs {val.classes}")
    return _SeededImages(train, cfg.seed), val, dc


def _epoch_batches(n: int, epoch: int, seed: int, global_batch: int, world: int, rank: int
                   ) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded permutation cut into global batches (the
    tail that does not fill one is dropped), each split into ``world`` equal contiguous
    parts, so the union over ranks of step ``t`` is the same global batch for any ``world``."""
    g = torch.Generator().manual_seed(_mix(seed, epoch, 2))
    perm = torch.randperm(n, generator=g).tolist()
    per = global_batch // world
    steps = n // global_batch
    return [perm[t * global_batch + rank * per: t * global_batch + (rank + 1) * per]
            for t in range(steps)]


# ------------------------------------------------------------------------------------------
# Model pieces


class _TrainStep(nn.Module):
    """The student's forward returning what the loss needs (wrapped by DDP as a whole)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, view: Optional[Reducer] = None):
        """``(logits, tokens, keep, decisions)`` of the patched model; with ``view`` (a reducer
        sharing the method's learned modules: :meth:`Reducer.consistency_view`) also the
        logits and final tokens of the same images through it, in the same forward (DDP
        sees one forward per backward)."""
        out = self._one(x)
        if view is None:
            return out
        main = self.model.leanvit
        self.model.leanvit = view  # the adapters read the reducer at every forward
        try:
            logits, tokens, _, _ = self._one(x)
        finally:
            self.model.leanvit = main
        return (*out, logits, tokens)

    def _one(self, x: Tensor):
        from leanvit import adapters

        adapter = adapters.find_adapter(self.model)
        tokens, state = adapter.forward_features(self.model, x)
        logits = adapter.forward_head(self.model, tokens, state)
        tokens, keep = adapter.loss_tokens(self.model, tokens, state)
        key = self.model.leanvit.decision_key  # the method's keep decisions (ratio loss)
        return logits, tokens, keep, tuple(state.aux_values(key)) if key is not None else ()


def _teacher_forward(teacher: nn.Module, x: Tensor) -> Output:
    from leanvit import adapters

    features = teacher.forward_features(x)
    logits = teacher.forward_head(features)
    adapter = adapters.find_adapter(teacher)
    tokens = adapter.loss_tokens(teacher, features, None)[0]
    return Output(logits, tokens)


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """(method, backbone decay, backbone no-decay) groups; frozen names left out."""
    method, decay, no_decay = [], [], []
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    for name, p in model.named_parameters():
        if name.startswith("leanvit."):
            method.append(p)
        elif name in FROZEN_NAMES or name.split(".")[0] in FROZEN_NAMES:
            p.requires_grad_(False)
        elif not p.requires_grad:
            continue
        elif p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": method, "weight_decay": cfg.weight_decay, "name": "method"},
              {"params": decay, "weight_decay": cfg.weight_decay, "name": "backbone"},
              {"params": no_decay, "weight_decay": 0.0, "name": "backbone_no_decay"}]
    return [g for g in groups if g["params"]]


def _resolve(cfg: TrainConfig, has_method_params: bool, world: int) -> dict:
    r = {"global_batch": cfg.batch_size * world}
    r["lr"] = cfg.lr if cfg.lr is not None else 1e-3 * r["global_batch"] / 1024
    r["backbone_lr_scale"] = (cfg.backbone_lr_scale if cfg.backbone_lr_scale is not None
                              else (0.01 if has_method_params else 1.0))
    r["freeze_backbone_epochs"] = (cfg.freeze_backbone_epochs
                                   if cfg.freeze_backbone_epochs is not None
                                   else (5 if has_method_params else 0))
    return r


def lr_at(progress_epochs: float, cfg: TrainConfig, base_lr: float) -> float:
    """Learning rate after ``progress_epochs`` (fractional): linear warm-up, then cosine from
    ``base_lr`` to ``min_lr`` over the remaining epochs."""
    if cfg.warmup_epochs > 0 and progress_epochs < cfg.warmup_epochs:
        return base_lr * progress_epochs / cfg.warmup_epochs
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-12)
    t = min(max((progress_epochs - cfg.warmup_epochs) / span, 0.0), 1.0)
    low = min(cfg.min_lr, base_lr)  # small batches scale base_lr below DeiT's min_lr
    return low + 0.5 * (1 + math.cos(math.pi * t)) * (base_lr - low)


def _set_lrs(optimizer, progress: float, epoch: int, cfg: TrainConfig, res: dict) -> float:
    lr = lr_at(progress, cfg, res["lr"])
    if epoch < res["freeze_backbone_epochs"]:
        backbone = 0.0
    elif res["backbone_lr_scale"] < 1.0:  # the authors' min(0.01 * init_lr, cosine lr)
        backbone = min(res["backbone_lr_scale"] * res["lr"], lr)
    else:
        backbone = lr
    for g in optimizer.param_groups:
        g["lr"] = lr if g["name"] == "method" else backbone
    return lr


def _set_keep_rate(model: nn.Module, value: float) -> None:
    """Keep-rate warm-up hook: give the method a new keep rate between steps, through its
    :meth:`leanvit.registry.Reducer.with_keep_rate` (a reducer without learned parameters is
    rebuilt, one with them gets new options)."""
    reducer = model.leanvit
    if reducer.trained_keep_rate() == value:
        return
    new = reducer.with_keep_rate(value)
    if new is not reducer:
        model.leanvit = new


def _check_consistency(model: nn.Module, cfg: TrainConfig) -> None:
    """``ValueError`` when the consistency loss cannot run: the method offers no milder view,
    or the model has no class token to compare."""
    reducer = model.leanvit
    if reducer.consistency_view(torch.Generator().manual_seed(0)) is None:
        raise ValueError(f"consistency_weight needs a method with a token-reduction-consistency "
                         f"view (Reducer.consistency_view); {cfg.method!r} offers none")
    if not reducer.info.has_class_token:
        raise ValueError("consistency_weight compares the final class tokens of two views; "
                         f"{cfg.model} has no class token")


def _consistency_terms(cfg: TrainConfig, weights: LossWeights, student_logits: Tensor,
                       tokens: Tensor, view_logits: Tensor, view_tokens: Tensor,
                       y: Tensor, labels: Tensor, mixed: bool, teacher: Optional[Output]
                       ) -> tuple[Tensor, dict[str, float]]:
    """The milder view's classification terms (CE, and KL to the teacher when there is one:
    the authors train both views with the same criterion) and the consistency term
    (``consistency_weight`` x :func:`leanvit.losses.consistency_loss` of the class tokens at
    index 0); their weighted sum and each part's value.

    Args:
        y: the (mixed, smoothed) targets of the CE; ``labels``: ``[B]`` class indices before
            mixing (the confidence of the reduced view, ``mixed``: under mixup/cutmix).
    """
    from leanvit.losses import (consistency_loss, kl_to_teacher, label_confidence,
                                soft_target_cross_entropy)

    parts = {"view_cls": soft_target_cross_entropy(view_logits, y)}
    loss = weights.cls * parts["view_cls"]
    if teacher is not None and weights.distill > 0:
        parts["view_distill"] = kl_to_teacher(view_logits, teacher.logits.detach())
        loss = loss + weights.distill * parts["view_distill"]
    confidence = label_confidence(student_logits, labels, mixed)
    parts["consistency"] = consistency_loss(tokens[:, 0], view_tokens[:, 0], confidence,
                                            cfg.consistency_threshold)
    loss = loss + cfg.consistency_weight * parts["consistency"]
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def _keep_rate_at(progress: float, cfg: TrainConfig, target: float) -> float:
    if cfg.keep_rate_warmup_epochs <= 0 or progress >= cfg.keep_rate_warmup_epochs:
        return target
    t = progress / cfg.keep_rate_warmup_epochs
    return target + (1.0 - target) * 0.5 * (1 + math.cos(math.pi * t))


# ------------------------------------------------------------------------------------------
# Checkpoints


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file; a failed write (disk full: torch reports
    ``unexpected pos``; read-only or vanished folder) is a ``ValueError`` naming the file."""
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as e:
        import shutil

        reason = e.strerror if isinstance(e, OSError) and e.strerror else \
            (str(e).strip().splitlines() or [type(e).__name__])[-1]
        try:
            free = shutil.disk_usage(path.parent).free
            reason += f"; {free / 2**20:.0f} MiB free on that disk"
        except OSError:
            pass
        raise ValueError(f"could not write checkpoint {path}: {reason}") from None


#: what atomic_path leaves behind when a process is killed mid-write
_STALE_TEMP_GLOBS = (".last.pt.*.tmp", ".final.safetensors.*.tmp", ".final_ema.safetensors.*.tmp")
#: the files a run writes in its output folder (what ``overwrite`` removes)
RUN_FILES = ("last.pt", "final.safetensors", "final_ema.safetensors", "log.jsonl")


def _is_stale_temp(path: Path) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(path.name, g) for g in _STALE_TEMP_GLOBS)


def _check_output(cfg: TrainConfig, out: Path) -> None:
    """``ValueError`` when ``out`` cannot take this run: a file; a folder with files in it for
    a new run (neither ``resume`` nor ``overwrite``); ``overwrite`` with ``resume``, or
    ``overwrite`` that would remove the ``checkpoint`` or ``probe_head`` this run reads.
    Every rank checks before rank 0 writes; the only write is :func:`_check_writable`'s
    empty test file."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} is a file; a folder is needed (the run writes "
                         f"{', '.join(RUN_FILES)} into it)")
    if cfg.overwrite and cfg.resume:
        raise ValueError("overwrite and resume exclude each other: resume continues the run in "
                         f"{out}, overwrite removes its files and starts a new one")
    if not out.is_dir():
        return
    _check_writable(out)  # the first thing to fix in a read-only folder
    if cfg.resume:
        return
    present = sorted(p.name for p in out.iterdir() if not _is_stale_temp(p))
    if present and not cfg.overwrite:
        shown = ", ".join(present[:4]) + (f" and {len(present) - 4} more" if len(present) > 4
                                          else "")
        raise ValueError(f"output folder {out} is not empty ({shown}): continue its run with "
                         "--resume auto, start over with --overwrite (removes the previous "
                         "run's files), or choose another --output")
    if cfg.overwrite:
        for name, value in (("checkpoint", cfg.checkpoint), ("probe_head", cfg.probe_head)):
            for f in RUN_FILES:
                if value and (out / f).exists() and Path(value).exists() and \
                        os.path.samefile(out / f, value):
                    raise ValueError(f"overwrite would remove {out / f}, which this run reads "
                                     f"as its {name}: copy it out of {out} first")


def _check_writable(out: Path) -> None:
    """Create ``out`` if needed and write and remove an empty file there; ``ValueError`` if
    that fails."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".leanvit-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output folder {out} is not writable: "
                         f"{e.strerror or type(e).__name__}") from None


def _prepare_output(out: Path, overwrite: bool = False) -> None:
    """Create ``out``, check that files can be written there, remove temporary files of
    checkpoint writes a killed run left behind, and with ``overwrite`` the previous run's
    :data:`RUN_FILES` (nothing else)."""
    _check_writable(out)
    for pattern in _STALE_TEMP_GLOBS:
        for stale in out.glob(pattern):
            stale.unlink(missing_ok=True)
    if overwrite:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)


def _read_training_checkpoint(path: Path) -> dict:
    """A ``last.pt`` written by :func:`train`; ``ValueError`` for anything else (e.g. the
    run's ``final.safetensors``, which holds weights only)."""
    hint = (f"{path} is not a training checkpoint: --resume continues a run from its "
            "OUTPUT/last.pt (optimizer, step, RNG states); to start a new run from trained "
            "weights use --checkpoint")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        raise ValueError(hint)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # unpickling errors of corrupt files come in many types
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    need = ("model", "optimizer", "epoch", "step", "global_step", "rng")
    if not isinstance(ck, dict) or any(k not in ck for k in need):
        raise ValueError(hint)
    return ck


def _comparable(v: Any) -> Any:
    return json.loads(json.dumps(v, sort_keys=True, default=str))


def _check_resumed_config(cfg: TrainConfig, saved: Optional[dict], path) -> None:
    """``ValueError`` listing every field whose value differs from the checkpoint's config
    (except :data:`RESUME_IGNORES` and the allowed :data:`RESUME_MAY_CHANGE`)."""
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint {path} holds no training config; cannot check that the "
                         "resumed run is the same")
    now = dataclasses.asdict(cfg)
    skip = set(RESUME_IGNORES) | set(cfg.allow_changes)
    # a field newer than the checkpoint: its run had the field's default behaviour
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)
                if f.default is not dataclasses.MISSING}
    diffs = []
    for k in now:
        if k in skip:
            continue
        a, b = _comparable(saved[k] if k in saved else defaults.get(k)), _comparable(now[k])
        if a != b:
            diffs.append(f"{k} {saved.get(k)!r} -> {now[k]!r}")
    if diffs:
        may = [d.split(" ", 1)[0] for d in diffs if d.split(" ", 1)[0] in RESUME_MAY_CHANGE]
        hint = (f"; harmless ones can be allowed: "
                f"{' '.join(f'--allow-change {m}' for m in may)}" if may else "")
        raise ValueError(f"cannot resume from {path}: the config differs from the run's: "
                         f"{'; '.join(diffs)} (use the run's values or a new --output{hint})")


class _Logger:
    def __init__(self, path: Optional[Path]):
        self.path = path

    def __call__(self, **record) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------


def _setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device is not None:
        device = torch.device(cfg.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return world, rank, device


def _autocast(cfg: TrainConfig, device: torch.device):
    amp = cfg.amp
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp=fp16 needs CUDA; use bf16 or none on CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return amp, dtype


def _validate(model: nn.Module, loader, amp_dtype=None) -> dict:
    """Top-1 accuracy (%) and image count on the validation loader: the library's
    :func:`leanvit.evaluate.evaluate` (summed over ranks), without MACs or timing."""
    r = evaluate(model, loader, progress=False, throughput=False, macs=False,
                 amp_dtype=amp_dtype, desc="val")
    return {"top1": r["top1"], "images": r["images"]}


def _calibration_images(cfg: TrainConfig, data_cfg: dict, n: int) -> Tensor:
    """``n`` training images with the evaluation transform (no augmentation), the first ones
    of a permutation seeded by ``cfg.seed``: ``[n, 3, H, W]`` (for :func:`leanvit.compact`)."""
    from timm.data import create_transform
    from leanvit.data import ImageFolder

    tf = create_transform(
        data_cfg["input_size"], is_training=False, interpolation=data_cfg["interpolation"],
        mean=data_cfg["mean"], std=data_cfg["std"], crop_pct=data_cfg["crop_pct"],
        crop_mode=data_cfg.get("crop_mode", "center"))
    folder = ImageFolder(str(Path(cfg.data) / "train"), transform=tf)
    g = torch.Generator().manual_seed(_mix(cfg.seed, 4))
    idx = torch.randperm(len(folder), generator=g)[:n].tolist()
    return torch.stack([folder[i][0] for i in idx])


def train(config: TrainConfig | dict, model: Optional[nn.Module] = None,
          teacher: Optional[nn.Module] = None) -> dict:
    """Run (or resume) a training run; returns a summary dict (final top-1, paths, steps).

    Args:
        config: a :class:`TrainConfig` or a dict of its fields.
        model: an already built (unpatched) model to train instead of creating
            ``config.model`` (e.g. one compacted and checked by the caller); ``config.model``
            then only names the run. Trained in place. ``config.checkpoint``, ``img_size``,
            ``model_kwargs`` do not apply; ``probe_head`` and ``compact`` still do. Its
            parameters with ``requires_grad=False`` stay frozen (e.g. a fixed probe head).
            Resuming needs the same model again.
        teacher: the distillation teacher (frozen, eval mode); default: a copy of the model
            before compaction and patching. Ignored when ``config.distill`` is False.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is created here unless the
    caller made one, and then destroyed here when the run ends: a gloo group left to the
    interpreter's exit can abort the process while its threads are still running.
    """
    owned = not (dist.is_available() and dist.is_initialized())
    try:
        return Trainer(config, model, teacher).run()
    finally:
        if owned and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    """One training run over a :class:`TrainConfig`, in phases: :meth:`setup` (output folder,
    data, model, teacher, method, optimizer), :meth:`resume`, :meth:`epoch` (of
    :meth:`train_step` s), :meth:`evaluate`, :meth:`checkpoint` and :meth:`finish`;
    :meth:`run` calls them in order. :func:`train` is ``Trainer(config, model, teacher).run()``.
    """

    def __init__(self, config: TrainConfig | dict, model: Optional[nn.Module] = None,
                 teacher: Optional[nn.Module] = None) -> None:
        self.cfg = config if isinstance(config, TrainConfig) else TrainConfig(**config)
        self.setup(model, teacher)

    # -- setup --------------------------------------------------------------------------------

    def setup(self, model: Optional[nn.Module], teacher: Optional[nn.Module]) -> None:
        """Check the output folder and the data, build the model, teacher and method, then
        the optimizer and the loaders (:meth:`_setup_optimization`)."""
        from leanvit.models import create_model
        from leanvit.patching import patch

        cfg = self.cfg
        if not cfg.data:
            raise ValueError("config.data must name an ImageFolder root (with train/ and val/)")
        self.world, self.rank, self.device = _setup_distributed(cfg)
        world, rank, device = self.world, self.rank, self.device
        self.amp, self.amp_dtype = _autocast(cfg, device)
        # the data first: a wrong --data must not leave an empty output folder behind
        self.num_classes = (cfg.num_classes if cfg.num_classes is not None
                            else _count_classes(cfg.data))
        out = self.out = Path(cfg.output)
        _check_output(cfg, out)  # on every rank, before rank 0 writes there
        if world > 1:
            dist.barrier()
        if rank == 0:
            _prepare_output(out, overwrite=cfg.overwrite)
        self.log = _Logger(out / "log.jsonl" if rank == 0 else None)

        # -- model, teacher, method (the same seed on every rank and on resume)
        _seed_all(cfg.seed)
        if model is None:
            model = create_model(cfg.model, img_size=cfg.img_size, checkpoint=cfg.checkpoint,
                                 num_classes=0 if cfg.probe_head else self.num_classes,
                                 **cfg.model_kwargs)
        elif not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        else:
            from leanvit.adapters import is_patched

            if is_patched(model):
                raise ValueError("model is patched; pass an unpatched model (the trainer "
                                 f"patches it with config.method={cfg.method!r})")
        self.train_set, self.val_set, self.data_cfg = _datasets(cfg, model)
        if cfg.probe_head is not None:  # a headless backbone made a classifier by a probe
            from leanvit.heads import attach_head, load_head

            attach_head(model, load_head(cfg.probe_head))
        if not cfg.distill:
            teacher = None
        elif teacher is None:
            teacher = copy.deepcopy(model)
        if teacher is not None:
            teacher = teacher.eval().requires_grad_(False).to(device)
        self.teacher = teacher
        if cfg.compact is not None:
            from leanvit.compaction import compact

            images = (_calibration_images(cfg, self.data_cfg, cfg.compact_images)
                      if cfg.compact_images else None)
            compact(model, **{**cfg.compact, "images": images})
        patch(model, cfg.method, **cfg.options)
        model.to(device).train()
        self.model = model
        self._setup_optimization()

    def _setup_optimization(self) -> None:
        """Loss weights, optimizer, scaler, EMA, the (DDP) step module, mixup, val loader."""
        from timm.data import Mixup

        cfg, model, world, rank, device = self.cfg, self.model, self.world, self.rank, self.device
        self.target_keep = model.leanvit.trained_keep_rate()
        if cfg.keep_rate_warmup_epochs > 0 and self.target_keep is None:
            raise ValueError(f"keep_rate_warmup_epochs needs a method with a keep_rate option; "
                             f"{cfg.method!r} has none")
        has_method_params = any(True for _ in model.leanvit.parameters())
        res = self.res = _resolve(cfg, has_method_params, world)
        if res["global_batch"] > len(self.train_set):
            raise ValueError(f"global batch {res['global_batch']} is larger than the training "
                             f"set ({len(self.train_set)} images)")
        # the method's own default weights (e.g. dynamicvit on ConvNeXt/Swin: ratio 10), then
        # the user's
        self.weights = LossWeights(**{**model.leanvit.default_loss_weights, **cfg.loss})
        self.keep_targets = model.leanvit.keep_targets()
        if cfg.consistency_weight > 0:
            _check_consistency(model, cfg)
        self.optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=res["lr"],
                                           weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.ema_decay)
        step_module = _TrainStep(model)
        self.runner: nn.Module = step_module
        if world > 1:
            self.runner = nn.parallel.DistributedDataParallel(
                step_module, device_ids=[device.index] if device.type == "cuda" else None)
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                               label_smoothing=cfg.smoothing, num_classes=self.num_classes)
        self.val_loader = torch.utils.data.DataLoader(
            self.val_set, batch_size=cfg.batch_size, num_workers=cfg.workers,
            sampler=(torch.utils.data.distributed.DistributedSampler(self.val_set, world, rank,
                                                                     shuffle=False)
                     if world > 1 else None))
        self.start_epoch, self.start_step, self.global_step, self.best = 0, 0, 0, None
        self.steps_per_epoch = len(self.train_set) // res["global_batch"]
        self.steps_this_run, self.stopped, self.metrics = 0, False, {}

    # -- resume and checkpoint ----------------------------------------------------------------

    def resume(self) -> None:
        """Continue from ``config.resume`` (``"auto"``: ``OUTPUT/last.pt`` when there is one):
        model, optimizer, scaler, EMA, position and RNG states."""
        cfg, out, model = self.cfg, self.out, self.model
        resume = cfg.resume
        if resume == "auto":
            resume = str(out / "last.pt") if (out / "last.pt").is_file() else None
        if not resume:
            return
        ck = _read_training_checkpoint(Path(resume))
        _check_resumed_config(cfg, ck.get("config"), resume)
        try:
            model.load_state_dict(ck["model"])
        except RuntimeError as e:
            from leanvit.models import load_error_summary

            raise ValueError(f"cannot resume from {resume}: the model differs from the one "
                             f"trained there ({load_error_summary(e)})") from None
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.scaler is not None and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        if self.ema is not None and ck.get("ema") is not None:
            self.ema.load_state_dict(ck["ema"])
        self.start_epoch, self.start_step = ck["epoch"], ck["step"]
        self.global_step = ck["global_step"]
        self.best = ck.get("best")
        rank = self.rank
        _set_rng_states(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        self.log(event="resume", checkpoint=str(resume), epoch=self.start_epoch,
                 step=self.start_step)

    def checkpoint(self, epoch: int, step: int) -> None:
        """Write ``OUTPUT/last.pt`` atomically (rank 0; every rank's RNG states gathered):
        the run resumes at step ``step`` of epoch ``epoch``."""
        world = self.world
        states = [None] * world
        if world > 1:
            dist.all_gather_object(states, _rng_states())
        else:
            states = [_rng_states()]
        if self.rank == 0:
            _atomic_torch_save({
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "epoch": epoch, "step": step, "global_step": self.global_step,
                "best": self.best, "rng": states, "config": dataclasses.asdict(self.cfg),
                "world_size": world,
            }, self.out / "last.pt")

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> dict:
        """Resume if asked, train the remaining epochs, save the result; the summary dict."""
        cfg = self.cfg
        self.resume()
        self.log(event="start", rank_count=self.world, device=str(self.device), amp=self.amp,
                 config=dataclasses.asdict(cfg), resolved=self.res,
                 steps_per_epoch=self.steps_per_epoch,
                 data_config={k: list(v) if isinstance(v, tuple) else v
                              for k, v in self.data_cfg.items()},
                 num_classes=self.num_classes)
        self.bar = None
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.epochs * self.steps_per_epoch, initial=self.global_step,
                            unit="step", desc=f"train {cfg.model} / {cfg.method}")
        self.last_ckpt = time.monotonic()
        self.epochs_done = self.start_epoch
        for epoch in range(self.start_epoch, cfg.epochs):
            if not self.epoch(epoch):
                break
        if self.bar is not None:
            self.bar.close()
        return self.finish()

    def epoch(self, epoch: int) -> bool:
        """Train one epoch (from ``start_step`` on a resumed one), then evaluate and
        checkpoint; False when the run stops here (``max_steps``)."""
        cfg, world = self.cfg, self.world
        self.train_set.epoch = epoch
        batches = _epoch_batches(len(self.train_set), epoch, cfg.seed, self.res["global_batch"],
                                 world, self.rank)
        loader = torch.utils.data.DataLoader(self.train_set,
                                             batch_sampler=batches[self.start_step:],
                                             num_workers=cfg.workers)
        t0, seen = time.perf_counter(), 0
        for step, (x, y) in enumerate(loader, start=self.start_step):
            loss, parts, lr = self.train_step(x, y, epoch, step)
            seen += x.shape[0] * world
            if step % cfg.log_every == 0 or step == self.steps_per_epoch - 1:
                self.log(event="step", epoch=epoch, step=step, global_step=self.global_step,
                         lr=lr, loss=float(loss.detach()),
                         **{f"loss_{k}": v for k, v in parts.items()},
                         images_per_s=seen / max(time.perf_counter() - t0, 1e-9))
            stop = cfg.max_steps is not None and self.steps_this_run >= cfg.max_steps
            last_in_epoch = step == self.steps_per_epoch - 1
            due = time.monotonic() - self.last_ckpt >= cfg.checkpoint_interval_s
            if world > 1:  # every rank must agree (the checkpoint gathers RNG states)
                flag = torch.tensor([float(due)])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                due = bool(flag.item())
            if (due or stop) and not last_in_epoch:
                self.checkpoint(epoch, step + 1)
                self.last_ckpt = time.monotonic()
            if stop and not last_in_epoch:
                self.stopped = True
                return False
        self.start_step = 0
        if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            self.evaluate(epoch)
        self.checkpoint(epoch + 1, 0)
        self.last_ckpt = time.monotonic()
        self.epochs_done = epoch + 1
        if cfg.max_steps is not None and self.steps_this_run >= cfg.max_steps:
            self.stopped = epoch + 1 < cfg.epochs
            return False
        return True

    def train_step(self, x: Tensor, y: Tensor, epoch: int, step: int
                   ) -> tuple[Tensor, dict, float]:
        """One optimizer step on the batch ``x`` ``[B, 3, H, W]``, ``y`` ``[B]``; returns the
        loss, its parts and the lr used."""
        cfg, model, device = self.cfg, self.model, self.device
        optimizer, scaler, amp_dtype = self.optimizer, self.scaler, self.amp_dtype
        progress = epoch + step / self.steps_per_epoch
        lr = _set_lrs(optimizer, progress, epoch, cfg, self.res)
        if self.target_keep is not None and cfg.keep_rate_warmup_epochs > 0:
            _set_keep_rate(model, _keep_rate_at(progress, cfg, self.target_keep))
        _seed_all(_mix(cfg.seed, epoch, step, self.rank, 3))  # mixup, Gumbel noise, drop-path
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        labels, view = y, None
        if cfg.consistency_weight > 0:  # the milder view of this step (same on every rank)
            view = model.leanvit.consistency_view(
                torch.Generator().manual_seed(_mix(cfg.seed, epoch, step, 7)))
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        elif cfg.smoothing > 0:  # timm's label smoothing without mixup
            off = cfg.smoothing / self.num_classes
            y = torch.full((y.shape[0], self.num_classes), off, device=device).scatter_(
                1, y[:, None], 1.0 - cfg.smoothing + off)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, tokens, keep, decisions, *viewed = self.runner(x, view)
            t_out = None
            if self.teacher is not None:
                with torch.no_grad():
                    t_out = _teacher_forward(self.teacher, x)
        loss, parts = total_loss(Output(logits, tokens, keep, decisions), y, t_out,
                                 self.weights, self.keep_targets,
                                 prefix=model.leanvit.info.num_prefix_tokens)
        if viewed:
            extra, extra_parts = _consistency_terms(cfg, self.weights, logits, tokens, *viewed,
                                                    y, labels, self.mixup is not None, t_out)
            loss, parts = loss + extra, {**parts, **extra_parts}
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"loss is {float(loss.detach())} at epoch {epoch} "
                                     f"step {step}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if self.ema is not None:
            self.ema.update(model, step=self.global_step)
        self.global_step += 1
        self.steps_this_run += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{lr:.2e}")
        return loss, parts, lr

    def evaluate(self, epoch: int) -> dict:
        """Top-1 on the validation set (and of the EMA weights), logged; keeps the best."""
        metrics = _validate(self.model, self.val_loader, self.amp_dtype)
        if self.ema is not None:
            metrics["ema_top1"] = _validate(self.ema.module, self.val_loader,
                                            self.amp_dtype)["top1"]
        self.best = max(self.best or 0.0, metrics["top1"])
        self.log(event="eval", epoch=epoch, **metrics)
        self.metrics = metrics
        return metrics

    def finish(self) -> dict:
        """Save the final weights (rank 0, unless stopped early) and log the summary."""
        from leanvit.io import save

        out = self.out
        summary = {"epochs_done": self.epochs_done, "global_step": self.global_step,
                   "stopped_early": self.stopped, "best_top1": self.best,
                   **{f"last_{k}": v for k, v in self.metrics.items()},
                   "checkpoint": str(out / "last.pt")}
        if not self.stopped and self.rank == 0:
            summary["weights"] = str(save(self.model, out / "final.safetensors", backbone=True))
            if self.ema is not None:
                summary["ema_weights"] = str(save(self.ema.module,
                                                  out / "final_ema.safetensors", backbone=True))
        self.log(event="end", **summary)
        if self.world > 1:
            dist.barrier()
        return summary
