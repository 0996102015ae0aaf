"""Arguments shared by several subcommands."""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path
from typing import Any, Sequence


def parse_set(items: Sequence[str] | None) -> dict[str, Any]:
    """``["r=13", "locations=(3,6,9)", "schedule=s.json"]`` -> options dict.

    Values are Python literals (``ast.literal_eval``); a value that is not a literal (a path)
    stays a string.
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"--set takes key=value, got {item!r}")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        out[key] = value
    return out


def add_model_args(p: argparse.ArgumentParser, method: bool = True,
                   default_method: str = "none") -> None:
    p.add_argument("model", metavar="MODEL", help="timm model name, e.g. deit_small_patch16_224")
    if method:
        p.add_argument("--method", default=default_method,
                       help=f"method name (see 'leanvit methods'); default: {default_method}")
        p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                       help="method option as a Python literal, e.g. --set keep_rate=0.7 "
                            "--set 'locations=(3,6,9)'; repeatable. --set load=FILE applies a "
                            "leanvit.save file (e.g. leanvit tune's choice.safetensors)")
    p.add_argument("--img-size", type=int, default=None, metavar="S",
                   help="input size in pixels, passed to timm.create_model(img_size=S)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="timm state dict (.safetensors/.pth) to load; random weights otherwise")
    p.add_argument("--num-classes", type=int, default=None, metavar="N",
                   help="classifier size (0: headless backbone); default: the model's, or 0 "
                        "for a safetensors checkpoint without head weights")
    p.add_argument("--head", default=None, metavar="FILE",
                   help="linear-probe head (from 'leanvit probe') to attach: the backbone then "
                        "classifies from its class token + mean patch token")


def write_json(path: str | None, data: Any) -> None:
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(data, indent=2) + "\n")
