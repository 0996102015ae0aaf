"""``leanvit eval``: top-1/top-5, GMACs and throughput of a (patched) model on an ImageFolder."""
from __future__ import annotations

import argparse

from leanvit.cli.common import (NON_NEGATIVE_INT, POSITIVE_INT, Out, add_model_args, check_paths,
                                parse_set, write_json)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="accuracy, GMACs and throughput on an ImageFolder split",
        description="Evaluate a model (optionally patched with --method) on DATA/SPLIT, read "
                    "with the model's own timm data config at its input size: top-1 and top-5 "
                    "(%), GMACs per image averaged over the evaluated images, and images/s of "
                    "the model alone (median of timed passes on one batch).")
    add_model_args(p)
    p.add_argument("--data", required=True, metavar="DIR", help="ImageFolder root (DIR/SPLIT)")
    p.add_argument("--split", default="val", help="sub-folder to evaluate (default val)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64,
                   help="images per batch (default 64)")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, metavar="N",
                   help="evaluate a fixed seeded subset of N images (default: all)")
    p.add_argument("--workers", type=NON_NEGATIVE_INT, default=0,
                   help="data-loading processes (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--repeats", type=POSITIVE_INT, default=3,
                   help="timed passes for the throughput (default 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import leanvit
    from leanvit.compare import apply_setting, setting_from
    from leanvit.data import classes_of, loader
    from leanvit.evaluate import check_classes, evaluate, load_split
    from leanvit.models import create_model, input_size

    check_paths(args, Out("--json", args.json))
    model = create_model(args.model, img_size=args.img_size, checkpoint=args.checkpoint,
                         num_classes=args.num_classes, head=args.head).eval()
    data = load_split(model, args.data, args.split, args.limit)
    check_classes(model, classes_of(data), args.head)
    options = parse_set(args.options)
    model = apply_setting(model, setting_from(args.method, options)).to(args.device)
    result = evaluate(model, loader(data, args.batch_size, args.workers),
                      progress=not args.no_progress, repeats=args.repeats)
    print(f"{args.model} / {args.method} {options or ''}: top-1 {result['top1']:.2f}%  "
          f"top-5 {result['top5']:.2f}%  on {result['images']} images of "
          f"{args.data}/{args.split}; {result['gmacs']:.3f} GMACs/image; "
          f"{result['images_per_s']:.1f} images/s (batch {result['batch_size']}, {args.device})")
    write_json(args.json, {"model": args.model, "method": args.method,
                           "options": {k: (list(v) if isinstance(v, tuple) else v)
                                       for k, v in options.items()},
                           "checkpoint": args.checkpoint, "head": args.head,
                           "img_size": list(input_size(model)), "data": args.data,
                           "split": args.split, "limit": args.limit,
                           "leanvit": leanvit.__version__, **result})
    return 0
