"""``leanvit data``: prepare data sets leanvit reads (ImageFolder splits)."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data", help="prepare data sets as ImageFolder splits (DIR/train, DIR/val)",
        description="Prepare a data set as the ImageFolder splits leanvit reads: "
                    "DIR/train/<class>/*.png and DIR/val/<class>/*.png.")
    kinds = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    f = kinds.add_parser(
        "fashion-mnist", help="a fixed, class-balanced Fashion-MNIST subset",
        description="Export a fixed, class-balanced subset of Fashion-MNIST (Debian package "
                    "dataset-fashion-mnist, IDX files) as 28x28 RGB PNGs: --train images from "
                    "the official training set, --val from the official test set, chosen per "
                    "class with numpy's default_rng(--seed).")
    f.add_argument("--out", required=True, metavar="DIR", help="new output folder")
    f.add_argument("--train", type=int, default=3000, metavar="N",
                   help="training images, balanced over the 10 classes (default 3000)")
    f.add_argument("--val", type=int, default=1000, metavar="M",
                   help="validation images from the test set (default 1000)")
    f.add_argument("--seed", type=int, default=0, help="subset seed (default 0)")
    f.add_argument("--source", default=None, metavar="DIR",
                   help="folder with the IDX files (default /usr/share/datasets/fashion-mnist)")
    f.set_defaults(func=run_fashion_mnist)


def run_fashion_mnist(args: argparse.Namespace) -> int:
    from leanvit.cli.common import Out, check_paths
    from leanvit.data import FASHION_MNIST_DIR, export_fashion_mnist

    check_paths(args, Out("--out", args.out, "folder"))

    out = export_fashion_mnist(args.out, train=args.train, val=args.val, seed=args.seed,
                               source=args.source or FASHION_MNIST_DIR)
    print(f"wrote {args.train} train and {args.val} val images to {out}/{{train,val}}")
    return 0
