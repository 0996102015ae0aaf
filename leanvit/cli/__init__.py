"""The ``leanvit`` command line: a thin layer over the library.

Each subcommand is a module here with ``add_parser(subparsers)`` (which sets ``func``) and is
listed in ``COMMANDS``. Library errors (``ValueError``/``TypeError``) become one-line messages
and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMANDS = ('bench', 'macs', 'methods', 'viz', 'search', 'train', 'compare', 'data', 'eval', 'probe',
            'tune')


def build_parser() -> argparse.ArgumentParser:
    import leanvit

    parser = argparse.ArgumentParser(
        prog="leanvit",
        description="Make timm Vision Transformers faster (token pruning/merging/sampling, "
                    "layer compaction) and measure the cost: MACs, throughput, accuracy.",
        epilog="Run 'leanvit COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"leanvit {leanvit.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"leanvit.cli.{name}").add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError) as e:
        print(f"leanvit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
