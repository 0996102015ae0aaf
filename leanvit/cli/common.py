"""Arguments shared by several subcommands: options, number ranges, model names, and the
check that a command's paths are of the right kind and that no output replaces an input."""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union


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
    p.add_argument("--img-size", type=POSITIVE_INT, default=None, metavar="S",
                   help="input size in pixels, passed to timm.create_model(img_size=S)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="timm state dict (.safetensors/.pth) to load; random weights otherwise")
    p.add_argument("--num-classes", type=NON_NEGATIVE_INT, default=None, metavar="N",
                   help="classifier size (0: headless backbone); default: the model's, or 0 "
                        "for a safetensors checkpoint without head weights")
    p.add_argument("--head", default=None, metavar="FILE",
                   help="linear-probe head (from 'leanvit probe') to attach: the backbone then "
                        "classifies from its class token + mean patch token")


def write_json(path: str | None, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` (nothing when ``None``), creating folders."""
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Numbers: argparse types that name the valid range (argparse prefixes the option's name)


def bounded(kind: type, low: float | None = None, high: float | None = None, *,
            low_open: bool = False, high_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type=`` for an ``int`` or ``float`` option restricted to a range.

    ``bounded(int, 1)`` accepts integers >= 1, ``bounded(float, 0, 1, high_open=True)``
    numbers in [0, 1). A value outside (or not a number, or not finite) is refused with
    ``argparse.ArgumentTypeError("must be an integer >= 1, got 0")``, which argparse prints as
    ``argument --batch-size: must be ...`` and exit status 2.
    """
    what = describe_range(kind, low, high, low_open=low_open, high_open=high_open)

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not in_range(value, low, high, low_open=low_open, high_open=high_open):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    convert.__name__ = f"{kind.__name__} ({what})"
    return convert


def describe_range(kind: type, low: float | None = None, high: float | None = None, *,
                   low_open: bool = False, high_open: bool = False) -> str:
    """``"an integer >= 1"``, ``"a number in [0, 1)"``: what a :func:`bounded` value must be."""
    noun = "an integer" if kind is int else "a number"

    def num(v):
        return f"{v:g}" if isinstance(v, float) else str(v)

    if low is not None and high is not None:
        return (f"{noun} in {'(' if low_open else '['}{num(low)}, {num(high)}"
                f"{')' if high_open else ']'}")
    if low is not None:
        return f"{noun} {'>' if low_open else '>='} {num(low)}"
    if high is not None:
        return f"{noun} {'<' if high_open else '<='} {num(high)}"
    return noun


def in_range(value: float, low: float | None = None, high: float | None = None, *,
             low_open: bool = False, high_open: bool = False) -> bool:
    """Whether ``value`` is finite and within the (closed or open) bounds."""
    if not math.isfinite(value):
        return False
    if low is not None and not (value > low if low_open else value >= low):
        return False
    return high is None or (value < high if high_open else value <= high)


#: the count options of the commands
POSITIVE_INT = bounded(int, 1)
NON_NEGATIVE_INT = bounded(int, 0)
POSITIVE_FLOAT = bounded(float, 0, low_open=True)


# --------------------------------------------------------------------------------------------
# Model names


def check_model_name(name: str) -> None:
    """``ValueError`` for a name timm does not know, with the closest registered names
    (``difflib`` over ``timm.list_models()``) as suggestions."""
    import difflib

    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else \
        " (see timm.list_models() for the names)"
    raise ValueError(f"unknown timm model {name!r}{hint}")


# --------------------------------------------------------------------------------------------
# Paths: inputs of the right kind, outputs that replace no input


class Out(NamedTuple):
    """An output path of a command: its option, the path (``None``: not asked for), whether it
    is a file or a folder, and for a folder the names (glob patterns) of the files written in
    it."""

    option: str
    path: Optional[Union[str, Path]]
    kind: str = "file"
    files: tuple[str, ...] = ()


#: path arguments read by the commands: attribute -> (how the user wrote it, file or folder)
INPUT_ARGS = {"image": ("IMAGE", "file"), "checkpoint": ("--checkpoint", "file"),
              "head": ("--head", "file"), "data": ("--data", "folder"),
              "resume": ("--resume", "file"), "source": ("--source", "folder")}


def input_paths(args: argparse.Namespace) -> list[tuple[str, Path, str]]:
    """``(option, path, kind)`` of every path the command reads: the options of
    :data:`INPUT_ARGS` and the values of ``--set``/``--cfg``/``--search``/``--methods`` options
    that name existing files or folders (``load=FILE``, ``schedule=FILE``, ``probe_head=``).
    ``kind`` is ``"file"``, ``"folder"`` or ``"any"``."""
    found = []
    for attr, (option, kind) in INPUT_ARGS.items():
        value = getattr(args, attr, None)
        if isinstance(value, (str, Path)) and not (attr == "resume" and value == "auto"):
            found.append((option, Path(value), kind))
    values: list[tuple[str, Any]] = []
    for attr, option in (("options", "--set"), ("cfg", "--cfg"),
                         ("search_options", "--search")):
        items = getattr(args, attr, None)
        if isinstance(items, list):
            values += [(f"{option} {k}", v) for k, v in parse_set(items).items()]
    methods = getattr(args, "methods", None)
    if isinstance(methods, str):
        from leanvit.compare import parse_methods

        for s in parse_methods(methods):
            values += [(f"--methods {s.method} {k}", v) for k, v in
                       [*s.options.items(), ("load", s.load)]]
    for option, v in values:
        if isinstance(v, str) and v and os.path.exists(v):
            found.append((option, Path(v), "any"))
    return found


def _kind_problem(option: str, path: Path, kind: str, output: bool) -> Optional[str]:
    """What is wrong with ``path`` as a ``kind`` (file/folder) argument, or ``None``."""
    if kind == "file" and path.is_dir():
        return (f"{option} {path} is a folder; a file is needed"
                + (f" (e.g. {path / 'NAME'})" if output else ""))
    if kind == "folder" and path.exists() and not path.is_dir():
        return f"{option} {path} is a file; a folder is needed"
    if output:
        for parent in path.parents:  # a file where a folder of the path must be
            if parent.exists():
                if not parent.is_dir():
                    return f"{option} {path}: {parent} is a file, not a folder"
                break
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: Path, folder: Path) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(folder).rstrip(os.sep) + os.sep)


def _targets(o: Out) -> list[Path]:
    """The files ``o`` writes (existing matches of a folder's glob patterns)."""
    p = Path(o.path)
    if o.kind == "file":
        return [p]
    out = []
    for name in o.files:
        out += sorted(p.glob(name)) if any(c in name for c in "*?[") else [p / name]
    return out


def check_paths(args: argparse.Namespace, *outputs: Out, ignore: Sequence[str] = ()) -> None:
    """Refuse, before any work, paths that cannot be right (``ValueError``, one line):

    - an input of the wrong kind (a folder given as ``--checkpoint``, a file as ``--data``);
    - an output of the wrong kind (``--out FILE`` where a folder is written, a folder where a
      file is, a file in the middle of the path);
    - an output that would replace one of the command's own inputs (the same file, also
      through links, or an existing file inside an input folder such as ``--data``), or
      another output.

    ``ignore``: input options checked for their kind only (``train --resume``, which
    continues the run in its output folder on purpose).
    """
    command = f"leanvit {getattr(args, 'command', '')}".strip()
    inputs = input_paths(args)
    for option, path, kind in inputs:
        if path.exists():
            problem = _kind_problem(option, path, kind, output=False)
            if problem:
                raise ValueError(problem)
    outputs = tuple(o for o in outputs if o.path is not None)
    for o in outputs:
        problem = _kind_problem(o.option, Path(o.path), o.kind, output=True)
        if problem:
            raise ValueError(problem)
    written: list[tuple[str, Path]] = []
    for o in outputs:
        for target in _targets(o):
            for option, path, _ in inputs:
                if option in ignore:
                    continue
                if path.is_dir():
                    clash = target.is_file() and _inside(target, path)
                    what = f"would replace {target}, a file inside {option} {path}"
                else:
                    clash = _same_file(target, path)
                    what = (f"is also {option}" if target == Path(o.path)
                            else f"would replace {target}, which is {option}")
                if clash:
                    raise ValueError(f"{o.option} {o.path} {what}; {command} does not write "
                                     "over its own input: choose another path")
            for option, other in written:
                if _same_file(target, other):
                    raise ValueError(f"{o.option} and {option} both write {target}: choose "
                                     "another path for one of them")
        written += [(o.option, t) for t in _targets(o)]
