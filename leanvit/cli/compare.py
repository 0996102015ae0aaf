"""``leanvit compare``: accuracy against GMACs and throughput for several method settings."""
from __future__ import annotations

import argparse

from leanvit.cli.common import NON_NEGATIVE_INT, POSITIVE_INT, Out, check_paths

#: the files compare writes into --out (leanvit.compare.write_outputs)
OUTPUT_FILES = ("results.md", "results.png", "results.json")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="evaluate several method settings: Markdown table + accuracy/cost plot",
        description="Evaluate each method setting on the same images of DATA/SPLIT (fresh copy "
                    "of the same model each time) and write OUT/results.md (method, settings, "
                    "top-1, top-5, GMACs, images/s, speedup over 'none' in the same run), "
                    "OUT/results.png (top-1 against GMACs and against images/s, Pareto front "
                    "marked) and OUT/results.json.")
    p.add_argument("model", metavar="MODEL", help="timm model name")
    p.add_argument("--methods", required=True, metavar="SPECS",
                   help="settings separated by ';', each a method and key=value options, e.g. "
                        "\"none; evit keep_rate=0.7; tome r=13\"; load=FILE applies saved "
                        "method state (leanvit.save)")
    p.add_argument("--data", required=True, metavar="DIR", help="ImageFolder root (DIR/SPLIT)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the results files")
    p.add_argument("--split", default="val", help="sub-folder to evaluate (default val)")
    p.add_argument("--checkpoint", default=None, metavar="FILE", help="timm state dict to load")
    p.add_argument("--head", default=None, metavar="FILE", help="linear-probe head to attach")
    p.add_argument("--img-size", type=POSITIVE_INT, default=None, metavar="S",
                   help="input size (pixels)")
    p.add_argument("--num-classes", type=NON_NEGATIVE_INT, default=None, metavar="N",
                   help="classifier size")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, metavar="N",
                   help="a fixed seeded subset of N images (default: all)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64,
                   help="images per batch (default 64)")
    p.add_argument("--workers", type=NON_NEGATIVE_INT, default=0,
                   help="data-loading processes (default 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--repeats", type=POSITIVE_INT, default=3,
                   help="timed passes per setting (default 3)")
    p.add_argument("--title", default=None, help="plot title (default: model and data)")
    p.add_argument("--dense", action="store_true",
                   help="per-patch (segmentation) evaluation with a dense probe head from "
                        "'leanvit probe --dense' (--head): per-patch accuracy, mIoU and the mean "
                        "cosine of each setting's dense features to the unmodified model's, "
                        "beside GMACs and throughput; the plot shows mIoU")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import leanvit
    from leanvit.compare import markdown_table, parse_methods, run_compare, write_outputs
    from leanvit.data import classes_of, loader
    from leanvit.evaluate import check_classes, load_split
    from leanvit.models import create_model, input_size

    settings = parse_methods(args.methods)
    check_paths(args, Out("--out", args.out, "folder", OUTPUT_FILES))
    evaluation = None
    if args.dense:
        from leanvit.dense import DenseEvaluation, load_dense_head

        if args.head is None:
            raise ValueError("--dense needs --head: a dense probe head from "
                             "'leanvit probe --dense'")
        head, threshold = load_dense_head(args.head)
        model = create_model(args.model, img_size=args.img_size, checkpoint=args.checkpoint,
                             num_classes=0).eval().to(args.device)
        if head.in_features != model.embed_dim:
            raise ValueError(f"dense head {args.head} takes {head.in_features} features, the "
                             f"model's patch features are {model.embed_dim} wide")
        from leanvit.heads import check_head_backbone

        check_head_backbone(model, head, f"dense head {args.head}", override="")
        evaluation = DenseEvaluation(head, threshold)
        data = load_split(model, args.data, args.split, args.limit)
    else:
        model = create_model(args.model, img_size=args.img_size, checkpoint=args.checkpoint,
                             num_classes=args.num_classes, head=args.head).eval().to(args.device)
        data = load_split(model, args.data, args.split, args.limit)
        check_classes(model, classes_of(data), args.head)
    rows = run_compare(model, settings, loader(data, args.batch_size, args.workers),
                       progress=not args.no_progress, repeats=args.repeats,
                       evaluate_fn=evaluation)
    from leanvit.bench import environment
    import torch

    meta = {"model": args.model, "checkpoint": args.checkpoint, "head": args.head,
            "img_size": list(input_size(model)), "data": args.data,
            "split": args.split, "limit": args.limit, "images": len(data),
            "batch_size": args.batch_size, "methods": args.methods, "dense": args.dense,
            "environment": environment(torch.device(args.device)),
            "leanvit": leanvit.__version__}
    title = args.title or (f"{args.model} on {args.data}/{args.split} ({len(data)} images, "
                           f"batch {args.batch_size}, {args.device})")
    paths = write_outputs(rows, args.out, meta, title=title)
    print(markdown_table(rows))
    print(f"wrote {paths['md']}, {paths['png']}, {paths['json']}")
    return 0
