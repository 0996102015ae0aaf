"""``leanvit train``: fine-tune a patched model (DynamicViT's recipe; any method)."""
from __future__ import annotations

import argparse

from typing import Any

from leanvit.cli.common import (NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, Out, add_model_args,
                                bounded, check_paths, describe_range, in_range, parse_set)

#: TrainConfig fields a resumed run may change (leanvit.train.RESUME_MAY_CHANGE; repeated
#: here so that --help does not import torch)
RESUME_MAY_CHANGE = ("workers", "device", "checkpoint_interval_s", "eval_every")
#: the files a run writes in --output (leanvit.train.RUN_FILES, repeated for the same reason)
RUN_FILES = ("last.pt", "final.safetensors", "final_ema.safetensors", "log.jsonl")
#: seeds: what torch.manual_seed takes without overflow
SEED = bounded(int, 0, 2**63 - 1)
NON_NEGATIVE_FLOAT = bounded(float, 0, None)
PROBABILITY = bounded(float, 0, 1)

#: valid ranges of the numeric TrainConfig fields given with --cfg: (low, high, low open,
#: high open); None: unbounded on that side. Probabilities and decays in [0, 1], counts of
#: epochs and steps at least 1, mixup/cutmix Beta-distribution alphas >= 0 (0: off).
CFG_RANGES: dict[str, tuple] = {
    "img_size": (1, None, False, False), "num_classes": (1, None, False, False),
    "compact_images": (0, None, False, False), "epochs": (1, None, False, False),
    "batch_size": (1, None, False, False), "lr": (0, None, True, False),
    "min_lr": (0, None, False, False), "weight_decay": (0, None, False, False),
    "warmup_epochs": (0, None, False, False), "backbone_lr_scale": (0, None, False, False),
    "freeze_backbone_epochs": (0, None, False, False),
    "keep_rate_warmup_epochs": (0, None, False, False), "mixup": (0, None, False, False),
    "cutmix": (0, None, False, False), "smoothing": (0, 1, False, True),
    "reprob": (0, 1, False, False), "ema_decay": (0, 1, False, False),
    "clip_grad": (0, None, True, False), "workers": (0, None, False, False),
    "seed": (0, 2**63 - 1, False, False), "log_every": (1, None, False, False),
    "checkpoint_interval_s": (0, None, True, False), "max_steps": (1, None, False, False),
    "eval_every": (0, None, False, False), "consistency_weight": (0, None, False, False),
    "consistency_threshold": (0, 1, False, False),
}
#: TrainConfig fields with their own option (a --cfg value would be replaced by it)
OWN_OPTIONS = {"model": "MODEL", "method": "--method", "options": "--set", "data": "--data",
               "output": "--output", "checkpoint": "--checkpoint", "img_size": "--img-size",
               "num_classes": "--num-classes", "resume": "--resume", "overwrite": "--overwrite"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a patched model on an ImageFolder (one process or torchrun)",
        description="Train a method (default dynamicvit: the authors' recipe) on DIR/train, "
                    "evaluating on DIR/val. Multi-process: torchrun --nproc_per_node=N -m "
                    "leanvit train ... (DDP; gloo on CPU). Checkpoints: OUTPUT/last.pt every "
                    "epoch and every --checkpoint-interval seconds; --resume auto continues "
                    "exactly where a run stopped. Any TrainConfig field: --cfg key=value.")
    add_model_args(p, default_method="dynamicvit")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="ImageFolder root with train/<class>/* and val/<class>/*")
    p.add_argument("--output", default="runs/leanvit", metavar="DIR",
                   help="checkpoints, log.jsonl and final weights (default runs/leanvit)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a used --output: remove the previous run's files (" +
                        ", ".join(RUN_FILES) + ") first; without it (or --resume) a folder "
                        "with files in it is refused")
    p.add_argument("--epochs", type=POSITIVE_INT, default=None, help="default 30 (authors)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=None,
                   help="images per process (default 96; lr scales with the global batch)")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=None,
                   help="base lr (default 1e-3 x global batch / 1024)")
    p.add_argument("--amp", default=None, choices=("auto", "none", "bf16", "fp16"),
                   help="autocast dtype (default auto: bf16 on CUDA, none on CPU)")
    p.add_argument("--ema", action="store_true", help="keep an EMA of the weights")
    p.add_argument("--workers", type=NON_NEGATIVE_INT, default=None,
                   help="data-loader workers (default: 4, at most this machine's CPU cores)")
    p.add_argument("--seed", type=SEED, default=None, help="default 0")
    p.add_argument("--resume", default=None, metavar="CKPT|auto",
                   help="checkpoint to continue from; 'auto': OUTPUT/last.pt if present")
    p.add_argument("--allow-change", action="append", default=[], metavar="FIELD",
                   choices=RESUME_MAY_CHANGE,
                   help="with --resume: let this harmless TrainConfig field differ from the "
                        "run's saved config (choices: %(choices)s); any other difference is "
                        "refused; repeatable")
    p.add_argument("--max-steps", type=POSITIVE_INT, default=None,
                   help="stop after this many steps in this run (a checkpoint is written)")
    p.add_argument("--checkpoint-interval", type=POSITIVE_FLOAT, default=None, metavar="SECONDS",
                   help="also checkpoint inside an epoch this often (default 1800)")
    p.add_argument("--no-distill", action="store_true",
                   help="no teacher (the KL and token terms are dropped)")
    p.add_argument("--loss", action="append", default=[], metavar="TERM=WEIGHT",
                   help="loss weights: cls, ratio, distill, token, feature (default 1, 2, "
                        "0.5, 0.5, 0)")
    p.add_argument("--consistency-weight", type=NON_NEGATIVE_FLOAT, default=None, metavar="W",
                   help="MCTF's token-reduction-consistency fine-tuning (--method mctf; authors: "
                        "3.0 with --no-distill): each batch also runs with less reduction "
                        "(r' < --set consistency_r, default 8), trained with the same "
                        "classification loss, and the reduced run's class token is pulled "
                        "towards it with weight W (default 0: off)")
    p.add_argument("--consistency-threshold", type=PROBABILITY, default=None, metavar="P",
                   help="the consistency term counts images whose label probability exceeds P "
                        "(default 0.4, the authors')")
    p.add_argument("--compact", nargs="*", default=None, metavar="KEY=VALUE",
                   help="compact the model first (hMHSA + cFFN, leanvit.compact; options e.g. "
                        "hallucination=mix ffn_ratio=0.6667), calibrated on 16 training "
                        "images; use with --method none to fine-tune the compacted model")
    p.add_argument("--cfg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other TrainConfig field, e.g. --cfg mixup=0 --cfg "
                        "freeze_backbone_epochs=0 --cfg keep_rate_warmup_epochs=10")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from leanvit.train import TrainConfig

    values = parse_set(args.cfg)
    unknown = sorted(set(values) - set(TrainConfig.fields()))
    if unknown:
        raise ValueError(f"unknown --cfg key(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(TrainConfig.fields())}")
    check_cfg(values, TrainConfig.fields())
    values.update(model=args.model, method=args.method, options=parse_set(args.options),
                  data=args.data, output=args.output, checkpoint=args.checkpoint,
                  img_size=args.img_size, num_classes=args.num_classes)
    for key, attr in (("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr"),
                      ("amp", "amp"), ("workers", "workers"), ("seed", "seed"),
                      ("resume", "resume"), ("max_steps", "max_steps"),
                      ("checkpoint_interval_s", "checkpoint_interval")):
        v = getattr(args, attr)
        if v is not None:
            values[key] = v
    if args.allow_change:
        values["allow_changes"] = tuple(args.allow_change)
    if args.ema:
        values["ema"] = True
    if args.no_distill:
        values["distill"] = False
    if args.no_progress:
        values["progress"] = False
    if args.overwrite:
        values["overwrite"] = True
    if args.loss:
        values["loss"] = parse_set(args.loss)
    if args.consistency_weight is not None:
        values["consistency_weight"] = args.consistency_weight
    if args.consistency_threshold is not None:
        values["consistency_threshold"] = args.consistency_threshold
    if args.compact is not None:
        values["compact"] = parse_set(args.compact)
    return TrainConfig(**values)


def _fits(value: Any, annotation: str) -> bool:
    """Whether a --cfg value fits a TrainConfig field's annotation (``int``, ``float``,
    ``bool``, ``str``, ``dict``, ``tuple``, ``Optional[...]`` of them)."""
    if annotation.startswith("Optional[") and annotation.endswith("]"):
        if value is None:
            return True
        annotation = annotation[len("Optional["):-1]
    if isinstance(value, bool):
        return annotation == "bool"
    kinds = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict,
             "tuple": (tuple, list)}
    return annotation not in kinds or isinstance(value, kinds[annotation])


def check_cfg(values: dict[str, Any], fields: dict) -> None:
    """``ValueError`` naming the --cfg key for a value of another type than the TrainConfig
    field's, or outside its range (:data:`CFG_RANGES`), or a key that has its own option."""
    for key, value in values.items():
        if key in OWN_OPTIONS:
            raise ValueError(f"--cfg {key}: give it as {OWN_OPTIONS[key]}")
        annotation = str(fields[key].type)
        if not _fits(value, annotation):
            raise ValueError(f"--cfg {key}={value!r}: must be of type {annotation}")
        if key in CFG_RANGES and isinstance(value, (int, float)):
            low, high, low_open, high_open = CFG_RANGES[key]
            if not in_range(value, low, high, low_open=low_open, high_open=high_open):
                kind = float if "float" in annotation else int
                what = describe_range(kind, low, high, low_open=low_open, high_open=high_open)
                raise ValueError(f"--cfg {key} must be {what}, got {value!r}")


def run(args: argparse.Namespace) -> int:
    from leanvit.train import train

    import os

    check_paths(args, Out("--output", args.output, "folder", RUN_FILES), ignore=("--resume",))
    summary = train(config_from_args(args))
    if os.environ.get("RANK", "0") == "0":  # once per run, not per torchrun process
        print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    """The end of a run for a person: what was done, the accuracy, where the files are."""
    def pct(v):
        return "-" if v is None else f"{v:.2f}%"

    lines = [f"{'stopped after' if summary.get('stopped_early') else 'finished'} "
             f"{summary.get('epochs_done')} epoch(s), {summary.get('global_step')} steps"]
    last = {k[len("last_"):]: v for k, v in summary.items() if k.startswith("last_")}
    if "top1" in last or summary.get("best_top1") is not None:
        lines.append(f"val top-1: last {pct(last.get('top1'))}, best "
                     f"{pct(summary.get('best_top1'))}"
                     + (f", EMA {pct(last['ema_top1'])}" if "ema_top1" in last else ""))
    for key, label in (("weights", "weights"), ("ema_weights", "EMA weights"),
                       ("checkpoint", "checkpoint (--resume)")):
        if summary.get(key):
            lines.append(f"{label}: {summary[key]}")
    return "\n".join(lines)
