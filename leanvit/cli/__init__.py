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
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):  # one line each
        print(f"leanvit {args.command}: warning: {message}", file=sys.stderr)

    shown_before = warnings.showwarning
    warnings.showwarning = show
    try:
        if isinstance(getattr(args, "model", None), str):
            from leanvit.cli.common import check_model_name
            from leanvit.models import is_hf_folder

            if not is_hf_folder(args.model):
                check_model_name(args.model)  # before any work, with suggestions
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError) as e:
        print(f"leanvit {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown_before


def one_line(e: BaseException) -> str:
    """An error's message on one line. An error raised in a DataLoader worker arrives with the
    worker's whole traceback in its message: its last line is the original message."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        name = type(e).__name__
        for prefix in (f"{type(e).__module__}.{name}: ", f"{name}: "):
            if last.startswith(prefix):
                last = last[len(prefix):]
        text = last.split(": ", 1)[1] if last.startswith("leanvit.") and ": " in last else last
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{text}: {e.filename}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) \
        or type(e).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
