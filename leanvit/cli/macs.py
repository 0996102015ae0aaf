"""``leanvit macs``: multiply-accumulates per image, per block."""
from __future__ import annotations

import argparse

from leanvit.cli.common import POSITIVE_INT, Out, add_model_args, check_paths, parse_set, write_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "macs", help="count MACs per image (per block) of a model, patched or not",
        description="Count the multiply-accumulates per image the model performs, from the "
                    "token counts each block sees (averaged over --batch-size random images "
                    "for data-dependent methods).")
    add_model_args(p)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=1,
                   help="random images to average over (default 1: data-dependent methods "
                        "such as ats then count one image; give more for their average)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import leanvit
    from leanvit.models import create_model

    from leanvit.adapters import find_adapter, layer_map

    check_paths(args, Out("--json", args.json))

    model = create_model(args.model, img_size=args.img_size, checkpoint=args.checkpoint,
                         num_classes=args.num_classes, head=args.head).eval()
    if layer_map(model) is None:  # PVTv2, NextViT: counted layer by layer, no method
        if args.method != "none":  # a method the family cannot take: say so first
            from leanvit.patching import check_serves

            check_serves(model, args.method)
        find_adapter(model)  # a clear error for unsupported families before any input is made
    base = leanvit.count_macs(model, _images(model, args.batch_size))
    if args.method != "none" or args.options:
        from leanvit.bench import apply_method

        apply_method(model, args.method, parse_set(args.options))  # also --set load=FILE
    torch.manual_seed(0)
    report = leanvit.count_macs(model, _images(model, args.batch_size))
    print(report.table())
    print(f"baseline {base.gmacs:.4f} GMACs; ratio {base.total / report.total:.3f}x")
    write_json(args.json, {"model": args.model, "method": args.method,
                           "options": parse_set(args.options), "baseline_gmacs": base.gmacs,
                           **report.to_dict()})
    return 0


def _images(model, batch_size: int):
    import torch

    from leanvit.models import input_size

    torch.manual_seed(0)
    h, w = input_size(model)
    return torch.randn(batch_size, 3, h, w)
