"""``leanvit train``: fine-tune a patched model (DynamicViT's recipe; any method)."""
from __future__ import annotations

import argparse

from leanvit.cli.common import add_model_args, parse_set

#: TrainConfig fields a resumed run may change (leanvit.train.RESUME_MAY_CHANGE; repeated
#: here so that --help does not import torch)
RESUME_MAY_CHANGE = ("workers", "device", "checkpoint_interval_s", "eval_every")


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
    p.add_argument("--epochs", type=int, default=None, help="default 30 (authors)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per process (default 96; lr scales with the global batch)")
    p.add_argument("--lr", type=float, default=None,
                   help="base lr (default 1e-3 x global batch / 1024)")
    p.add_argument("--amp", default=None, choices=("auto", "none", "bf16", "fp16"),
                   help="autocast dtype (default auto: bf16 on CUDA, none on CPU)")
    p.add_argument("--ema", action="store_true", help="keep an EMA of the weights")
    p.add_argument("--workers", type=int, default=None,
                   help="data-loader workers (default: 4, at most this machine's CPU cores)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", default=None, metavar="CKPT|auto",
                   help="checkpoint to continue from; 'auto': OUTPUT/last.pt if present")
    p.add_argument("--allow-change", action="append", default=[], metavar="FIELD",
                   choices=RESUME_MAY_CHANGE,
                   help="with --resume: let this harmless TrainConfig field differ from the "
                        "run's saved config (choices: %(choices)s); any other difference is "
                        "refused; repeatable")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps in this run (a checkpoint is written)")
    p.add_argument("--checkpoint-interval", type=float, default=None, metavar="SECONDS",
                   help="also checkpoint inside an epoch this often (default 1800)")
    p.add_argument("--no-distill", action="store_true",
                   help="no teacher (the KL and token terms are dropped)")
    p.add_argument("--loss", action="append", default=[], metavar="TERM=WEIGHT",
                   help="loss weights: cls, ratio, distill, token, feature (default 1, 2, "
                        "0.5, 0.5, 0)")
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
    if args.loss:
        values["loss"] = parse_set(args.loss)
    if args.compact is not None:
        values["compact"] = parse_set(args.compact)
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    from leanvit.train import train

    import os

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
