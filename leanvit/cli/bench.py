"""``leanvit bench``: throughput of the unmodified and the patched model in one run."""
from __future__ import annotations

import argparse

from leanvit.cli.common import (NON_NEGATIVE_INT, POSITIVE_INT, Out, add_model_args, check_paths,
                                parse_set, write_json)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="time the unmodified and the patched model in the same run",
        description="Time the unmodified model and the patched one, interleaved, after warm-up "
                    "(median of the rounds); report images/s, ms per batch, GMACs, speedup, MAC "
                    "ratio and peak memory. Random weights unless --checkpoint is given.")
    add_model_args(p)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64,
                   help="images per batch (default 64)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="weights and inputs dtype (default fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--warmup", type=NON_NEGATIVE_INT, default=2,
                   help="warm-up rounds per model (default 2)")
    p.add_argument("--repeats", type=POSITIVE_INT, default=5,
                   help="timed rounds per model (default 5)")
    p.add_argument("--iters", type=POSITIVE_INT, default=1,
                   help="batches per timed round (default 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", default=None, metavar="PATH", help="write the full result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from leanvit.bench import format_table, run_benchmark

    check_paths(args, Out("--json", args.json))

    result = run_benchmark(
        args.model, args.method, parse_set(args.options), img_size=args.img_size,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, compile=args.compile,
        checkpoint=args.checkpoint, num_classes=args.num_classes, head=args.head, warmup=args.warmup,
        repeats=args.repeats, iters=args.iters, memory=not args.no_memory)
    print(format_table(result))
    write_json(args.json, result)
    return 0
