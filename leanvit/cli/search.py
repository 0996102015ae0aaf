"""``leanvit search``: search a per-block token schedule to a MAC budget (DiffRate)."""
from __future__ import annotations

import argparse

METHODS = ("diffrate",)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search", help="search per-block kept-token counts to a MAC budget (DiffRate)",
        description="Learn DiffRate's per-block prune/merge rates for a frozen model against a "
                    "target GMACs on a few images, and write the schedule as JSON (deploy it "
                    "with --method diffrate --set schedule=FILE). Headless models (DINOv2) "
                    "distil the unpatched model's features, so no labels are needed.")
    p.add_argument("model", metavar="MODEL", help="timm model name, e.g. deit_small_patch16_224")
    p.add_argument("--method", default="diffrate", choices=METHODS,
                   help="search method (default diffrate)")
    p.add_argument("--target-gmacs", type=float, required=True, metavar="G",
                   help="MACs per image to reach, in 1e9")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="ImageFolder directory (DIR/<class>/*.png); DIR/train is used if present")
    p.add_argument("--images", type=int, default=1000, help="images to use (default 1000)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the images (default 3)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--objective", default="auto",
                   choices=("auto", "ce", "distill-logits", "distill-features"),
                   help="task loss: auto = distill-features for headless models, "
                        "distill-logits otherwise")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW lr (default 0.05 from the warm start, the authors' 0.01 from "
                        "--init zero)")
    p.add_argument("--min-lr", type=float, default=None,
                   help="cosine floor (default lr / 10)")
    p.add_argument("--mac-weight", type=float, default=5.0,
                   help="weight of (GMACs - target)^2 (default 5, authors)")
    p.add_argument("--granularity", type=int, default=None,
                   help="candidate spacing in tokens (default: 4 per 196 patches)")
    p.add_argument("--init", default="best-handset",
                   help="start of the rate logits: best-handset (default: every hand-set "
                        "schedule of the searched --ops fitted to the target, scored deployed "
                        "on --holdout held-out images; the search starts at the best and "
                        "returns nothing worse on those images), warm (the schedule merging "
                        "the same number of tokens in every block that meets the target), "
                        "zero (the authors'), or a hand-set kind: merge-uniform, "
                        "prune-uniform, merge-3stage, prune-3stage")
    p.add_argument("--ops", default="both", choices=["both", "merge", "prune"],
                   help="operations searched: both (default, the authors' space), merge "
                        "(merging only, nothing pruned) or prune")
    p.add_argument("--init-spread", type=float, default=2.0,
                   help="width of the warm start's count distributions, in candidates "
                        "(default 2)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimiser steps in all (overrides --epochs)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop after about this many seconds (the lr schedule is fitted to it)")
    p.add_argument("--select-every", type=int, default=None, metavar="K",
                   help="deploy the counts at step 0, every K steps and at the end, score each "
                        "on held-out search images, and keep the best within the MAC "
                        "tolerance (default: the last step's counts, as the authors)")
    p.add_argument("--holdout", type=int, default=200, metavar="M",
                   help="search images held out for --select-every and --init best-handset "
                        "(default 200)")
    p.add_argument("--img-size", type=int, default=None, metavar="S",
                   help="input size in pixels, passed to timm.create_model(img_size=S)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="timm state dict to load (random weights otherwise)")
    p.add_argument("--num-classes", type=int, default=None, metavar="N",
                   help="classifier size (0: headless); default: the model's or the checkpoint's")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the image subset and the batch order (default 0)")
    p.add_argument("--out", required=True, metavar="FILE", help="schedule JSON to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    import warnings
    from pathlib import Path

    from leanvit.cli.common import Out, check_paths
    from leanvit.search.diffrate import search
    from leanvit.models import create_model
    from leanvit.methods.diffrate.schedule import save_schedule

    check_paths(args, Out("--out", args.out))  # before the search, not after it

    model = create_model(args.model, img_size=args.img_size, checkpoint=args.checkpoint,
                         num_classes=args.num_classes).eval()
    data = Path(args.data)
    if (data / "train").is_dir():
        data = data / "train"
    with warnings.catch_warnings():
        # the off-target warning is printed below; others (e.g. fewer images cached to fit
        # --max-seconds) go to stderr as usual
        warnings.filterwarnings("ignore", message=".*off the target", category=UserWarning)
        result = search(model, args.target_gmacs, data, objective=args.objective,
                        epochs=args.epochs, batch_size=args.batch_size,
                        num_images=args.images, lr=args.lr, min_lr=args.min_lr,
                        mac_weight=args.mac_weight, granularity=args.granularity,
                        ops=args.ops, init=args.init, init_spread=args.init_spread,
                        steps=args.steps,
                        max_seconds=args.max_seconds, select_every=args.select_every,
                        holdout=args.holdout, seed=args.seed)
    s = result.schedule
    save_schedule(s, args.out)
    print(f"prune_kept {list(s.prune_kept)}")
    print(f"merge_kept {list(s.merge_kept)}")
    if "start" in s.obtained:  # init best-handset: which hand-set schedule it started from
        tried = ", ".join(f"{h['kind']} {h['holdout_loss']:.4g}" for h in s.obtained["handset"])
        print(f"started from hand-set {s.obtained['start']} (held-out loss: {tried}); "
              f"returned the snapshot of step {s.obtained['selected_step']}"
              + (" (the start)" if s.obtained["selected_start"] else ""))
    print(f"{s.gmacs:.4f} GMACs (target {args.target_gmacs}, "
          f"{100 * s.obtained['off_target']:+.1f}%), {result.steps} steps, "
          f"{result.seconds:.0f} s; wrote {args.out}")
    if "warning" in s.obtained:  # still a result: exit 0, the warning is in the file too
        print(f"leanvit search: warning: {s.obtained['warning']}", file=sys.stderr)
    return 0
