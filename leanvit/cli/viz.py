"""``leanvit viz``: where the tokens of one image go, per reduction stage, as a PNG."""
from __future__ import annotations

import argparse
from pathlib import Path

from leanvit.cli.common import POSITIVE_INT


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "viz", help="draw which patches each reduction stage keeps, drops or merges",
        description="Run one image through the patched model with source tracking and write a "
                    "figure: the input, then one panel per block that changed the tokens, with "
                    "dropped patches blanked and merged groups painted in their mean colour "
                    "and outlined. Random weights unless --checkpoint is given.")
    p.add_argument("positional", nargs="+", metavar="IMAGE [MODEL]",
                   help="the image file (anything PIL reads) and the timm model name, in either "
                        "order (or the model with --model)")
    p.add_argument("--model", default=None, metavar="M",
                   help="timm model name, e.g. vit_small_patch14_dinov2 (or give it as a "
                        "positional argument, as in the other commands)")
    p.add_argument("--method", default="none", metavar="M",
                   help="method name (see 'leanvit methods'); default: none")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="method option as a Python literal, e.g. --set max_tokens=100; "
                        "repeatable")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="timm state dict (.safetensors/.pth) to load; random weights otherwise")
    p.add_argument("--img-size", type=POSITIVE_INT, default=None, metavar="S",
                   help="input size in pixels, passed to timm.create_model(img_size=S)")
    p.add_argument("--out", required=True, metavar="OUT.png", help="figure to write (PNG)")
    p.add_argument("--pca", action="store_true",
                   help="instead of the token stages, draw the dense-feature PCA (first three "
                        "components as RGB, fitted on the unpatched model) of the unpatched and "
                        "the patched model side by side (leanvit.dense_features)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import leanvit
    from leanvit.cli.common import Out, check_paths, parse_set
    from leanvit.models import create_model
    from leanvit.viz import check_drawable, visualize

    resolve_image_and_model(args)
    check_paths(args, Out("--out", args.out))
    options = parse_set(args.options)
    model = create_model(args.model, img_size=args.img_size, checkpoint=args.checkpoint).eval()
    check_drawable(model)  # before patching: ConvNeXt/Swin have nothing to draw
    leanvit.patch(model, args.method, **options)
    from leanvit.patching import warn_if_untrained

    warn_if_untrained(model)
    shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
    weights = f"weights {Path(args.checkpoint).name}" if args.checkpoint else "random weights"
    title = (f"{args.model} ({weights}) / {args.method}" + (f" ({shown})" if shown else ""))
    if args.pca:
        from leanvit.viz import visualize_pca

        r = visualize_pca(model, args.image, args.out, title=title)
        print(f"wrote {args.out} (input, unpatched and {args.method} dense-feature PCA; mean "
              f"cosine of the patch features to the unpatched ones {r['cosine']:.3f})")
        return 0
    stages = visualize(model, args.image, args.out, title=title)
    counts = ", ".join(f"block {s.block}: {s.num_tokens}" for s in stages) or "no reduction"
    print(f"wrote {args.out} ({len(stages) + 1} panels; tokens after {counts})")
    return 0


def resolve_image_and_model(args: argparse.Namespace) -> None:
    """Sets ``args.image`` and ``args.model`` from ``IMAGE MODEL``, ``MODEL IMAGE`` or
    ``IMAGE --model MODEL``: of two positionals, the model is the timm model name."""
    import timm

    pos = list(args.positional)
    if len(pos) > 2:
        raise ValueError(f"viz takes IMAGE and MODEL, got {len(pos)} arguments: {' '.join(pos)}")
    if len(pos) == 2:
        if args.model is not None:
            raise ValueError("give the model once: as a positional argument or with --model")
        names = [p for p in pos if timm.is_model(p) and not Path(p).is_file()]
        if not names and sum(Path(p).exists() for p in pos) == 1:  # a misspelled model
            from leanvit.cli.common import check_model_name

            check_model_name(next(p for p in pos if not Path(p).exists()))
        if len(names) != 1:
            raise ValueError(f"of {pos[0]!r} and {pos[1]!r} exactly one must be a timm model "
                             "name (the other the image file)")
        pos.remove(names[0])
        args.model = names[0]
    elif args.model is None:
        raise ValueError("viz needs a model: leanvit viz IMAGE MODEL (or --model MODEL)")
    args.image = pos[0]
