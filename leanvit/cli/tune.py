"""``leanvit tune``: the most accurate method and setting within a budget, on the user's data."""
from __future__ import annotations

import argparse

from leanvit.cli.common import NON_NEGATIVE_INT, POSITIVE_INT, Out, check_paths

#: what tune writes into --out (leanvit.tune.write_tune_outputs, and the searched schedules)
OUTPUT_FILES = ("results.md", "results.png", "results.json", "front.md", "choice.safetensors",
                "choice.json", "choice_schedule.json", "tune.json", "diffrate_*_schedule.json")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune", help="pick the most accurate method setting within a MAC or speedup budget",
        description="Evaluate a grid of settings of every registered method that needs no "
                    "training (each method's strength option set so its GMACs fall at and "
                    "below the budget), a DiffRate schedule searched to the budget, and the "
                    "settings given with --methods, on DATA/val: top-1, GMACs per image and "
                    "images/s at --batch-size (same run as the unmodified model). Writes "
                    "OUT/results.{md,png,json} (all settings, Pareto front ringed), "
                    "OUT/front.md (the front, the choice marked), OUT/choice.safetensors (the "
                    "chosen setting: leanvit.load, --set load=FILE, leanvit bench) and "
                    "OUT/choice.json.")
    p.add_argument("model", metavar="MODEL", help="timm model name, e.g. vit_small_patch14_dinov2")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="ImageFolder root: DIR/val is evaluated, DIR/train (if present) feeds "
                        "the DiffRate search")
    p.add_argument("--head", default=None, metavar="FILE",
                   help="linear-probe head (leanvit probe) for a headless backbone")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-gmacs", type=float, default=None, metavar="G",
                        help="mean GMACs per image at most G")
    budget.add_argument("--budget-speedup", type=float, default=None, metavar="S",
                        help="measured images/s at least S times the unmodified model's")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64, metavar="B",
                   help="images per batch, evaluated and timed (default 64)")
    p.add_argument("--methods", default=None, metavar="SPECS",
                   help="';'-separated: a method name asks for its grid ('diffrate': a search), "
                        "a method with key=value options or load=FILE is evaluated as given "
                        "(e.g. \"tome; evit; dynamicvit load=p.safetensors\"); default: every "
                        "training-free method, the DiffRate search and the unmodified model")
    p.add_argument("--limit", type=POSITIVE_INT, default=None, metavar="N",
                   help="evaluate a fixed seeded subset of N val images (default: all)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the results")
    p.add_argument("--search-images", type=POSITIVE_INT, default=None, metavar="M",
                   help="train images of the DiffRate search (default: the search's default)")
    p.add_argument("--search", dest="search_options", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="option of the DiffRate search (leanvit.search.diffrate.search), e.g. "
                        "--search epochs=2; repeatable")
    p.add_argument("--img-size", type=POSITIVE_INT, default=None, metavar="S",
                   help="input size (pixels)")
    p.add_argument("--checkpoint", default=None, metavar="FILE", help="timm state dict to load")
    p.add_argument("--num-classes", type=NON_NEGATIVE_INT, default=None, metavar="N",
                   help="classifier size")
    p.add_argument("--repeats", type=POSITIVE_INT, default=3,
                   help="timed passes per setting (default 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ValueError as e:  # the library names its argument; the user gave --search
        text = str(e)
        if text.startswith("search_options"):
            raise ValueError("--search" + text[len("search_options"):]) from None
        raise


def _run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    import torch

    import leanvit
    from leanvit.bench import environment
    from leanvit.cli.common import parse_set
    from leanvit.compare import Setting
    from leanvit.data import classes_of, loader
    from leanvit.evaluate import check_classes, load_split
    from leanvit.models import create_model
    from leanvit.tune import (check_search_options, parse_methods_arg, searched_methods, tune,
                              write_tune_outputs)

    check_paths(args, Out("--out", args.out, "folder", OUTPUT_FILES))
    budget = ({"gmacs": args.budget_gmacs} if args.budget_gmacs is not None
              else {"speedup": args.budget_speedup})
    names, explicit = parse_methods_arg(args.methods)
    methods = None if names is None else [*names, *explicit]
    search_options = check_search_options(parse_set(args.search_options), "--search")
    searched = sorted(searched_methods())  # methods tune searches (DiffRate)
    wants_search = names is None or any(n in searched for n in names)
    if (search_options or args.search_images) and not wants_search:
        raise ValueError(f"--search and --search-images set the search of "
                         f"{' / '.join(searched) or 'no method'}, which --methods does not ask "
                         f"for (add {' or '.join(map(repr, searched))} to --methods, or leave "
                         "them out)")
    model = create_model(args.model, img_size=args.img_size, checkpoint=args.checkpoint,
                         num_classes=args.num_classes, head=args.head).eval()
    data = load_split(model, args.data, "val", args.limit)
    check_classes(model, classes_of(data), args.head)
    search_images = None
    if wants_search:
        train = Path(args.data) / "train"
        if train.is_dir():
            search_images = train
    if search_images is not None:
        search_options.setdefault("num_images", args.search_images)
        if search_options["num_images"] is None:
            del search_options["num_images"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = tune(model, loader(data, args.batch_size), budget, methods=methods,
                  search_images=search_images, search_options=search_options,
                  repeats=args.repeats, out=out, progress=not args.no_progress)
    meta = {"model": args.model, "checkpoint": args.checkpoint, "head": args.head,
            "img_size": list(model.patch_embed.img_size), "data": args.data, "split": "val",
            "limit": args.limit, "images": len(data), "batch_size": args.batch_size,
            "methods": args.methods, "budget": budget,
            "environment": environment(torch.device("cpu")), "leanvit": leanvit.__version__}
    paths = write_tune_outputs(result, model, out, meta,
                               command=f"leanvit {' '.join(sys.argv[1:])}" if sys.argv[1:] else "")
    print(paths["front"].read_text())
    if result.choice is None:
        print(f"leanvit tune: no evaluated setting is within the budget "
              f"({result.budget.describe()}); see {paths['md']}", file=sys.stderr)
        return 1
    c = result.choice
    use = json.loads(paths["json_choice"].read_text())["choice"]["use"]
    print(f"chosen: {c['label']}  top-1 {c['top1']:.2f}%  {c['gmacs']:.3f} GMACs  "
          f"{c['speedup']:.2f}x; wrote {paths['choice']}")
    print(f"use it: {use['bench']}  |  {use['set']}  |  {use['python']}")
    return 0
