"""``leanvit probe``: fit a linear classifier on a headless backbone's features."""
from __future__ import annotations

import argparse

from leanvit.cli.common import NON_NEGATIVE_INT, POSITIVE_INT, Out, bounded, check_paths


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe", help="fit a linear probe head on a backbone's features (DINOv2 protocol)",
        description="Fit a linear classifier on the class token concatenated with the mean "
                    "patch token (2C features, DINOv2's linear evaluation) of DATA/train: "
                    "logistic regression by full-batch L-BFGS, weight decay chosen on a "
                    "held-out 20% of train; report accuracy on DATA/val; save the head "
                    "(safetensors) for --head.")
    p.add_argument("model", metavar="MODEL", help="timm model name, e.g. vit_small_patch14_dinov2")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="backbone weights (timm state dict); random weights otherwise")
    p.add_argument("--img-size", type=POSITIVE_INT, default=None, metavar="S",
                   help="input size in pixels, passed to timm.create_model(img_size=S)")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="ImageFolder root with train/, val/")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="head file to write (.safetensors); an existing file is only replaced "
                        "when it is a probe head")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64,
                   help="images per batch (default 64)")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, metavar="N",
                   help="use a fixed seeded subset of N training images (default: all)")
    p.add_argument("--workers", type=NON_NEGATIVE_INT, default=0,
                   help="data-loading processes (default 0)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="keep extracted features here; re-runs on the same model and images "
                        "skip the extraction")
    p.add_argument("--dense", action="store_true",
                   help="a per-patch (segmentation) probe on leanvit.dense_features instead: "
                        "each patch labelled foreground when more than half its pixels are "
                        "brighter than --threshold (the folders' classes are not used); "
                        "reports per-patch accuracy and mIoU")
    p.add_argument("--threshold", type=bounded(float, 0, 1, high_open=True), default=None,
                   metavar="T",
                   help="with --dense only: pixel intensity in [0, 1) (mean of R, G, B) above "
                        "which a pixel is foreground (default 0.1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from leanvit.cli.common import write_json
    from leanvit.probe import probe_folder

    if args.threshold is not None and not args.dense:
        raise ValueError("--threshold is the foreground threshold of a dense probe: add "
                         "--dense, or leave --threshold out")
    check_paths(args, Out("--out", args.out), Out("--json", args.json),
                Out("--cache", args.cache, "folder"))
    r = probe_folder(args.model, args.data, args.out, checkpoint=args.checkpoint,
                     img_size=args.img_size, batch_size=args.batch_size, limit=args.limit,
                     workers=args.workers, cache_dir=args.cache, progress=not args.no_progress,
                     dense=args.dense, threshold=args.threshold)
    if args.dense:
        print(f"dense probe on {r['train_rows']} patches of {r['train_images']} train images "
              f"(foreground: pixel intensity > {r['threshold']:g} on more than half the patch): "
              f"weight decay {r['weight_decay']:g}; val per-patch accuracy "
              f"{r['val_accuracy']:.2f}%, mIoU {r['val_miou']:.2f}% on {r['val_images']} images")
        print(f"time: features {r['seconds']['train_features'] + r['seconds']['val_features']:.1f}"
              f" s, fit {r['seconds']['fit']:.1f} s; head written to {args.out}")
        write_json(args.json, r)
        return 0
    print(f"probe on {r['train_images']} train images: weight decay {r['weight_decay']:g} "
          f"(held-out part of train: {100 * r['held_out_accuracy'][r['weight_decay']]:.2f}%); "
          f"val accuracy {r['val_accuracy']:.2f}% on {r['val_images']} images")
    print(f"time: features {r['seconds']['train_features'] + r['seconds']['val_features']:.1f} s,"
          f" fit {r['seconds']['fit']:.1f} s; head written to {args.out}")
    write_json(args.json, r)
    return 0
