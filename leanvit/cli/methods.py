"""``leanvit methods``: the registered methods and their options."""
from __future__ import annotations

import argparse
import dataclasses


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the methods and their options with defaults",
                       description="List every registered method with its options and defaults.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from leanvit.adapters import KINDS, family_names
    from leanvit.registry import _METHODS

    def served(fams) -> str:  # a kind lists its registered families
        return ", ".join(f"{f} ({', '.join(family_names(f))})" if f in KINDS else f for f in fams)

    for name, m in sorted(_METHODS.items()):
        if m.internal:
            continue
        print(f"{name}: {m.summary}  [families: {served(m.families)}]")
        groups = [(None, m.options)] + [(fam, cls) for fam, cls in m.family_options.items()
                                        if cls is not m.options]
        for fam, cls in groups:
            if len(groups) > 1:
                fams = [fam] if fam else [f for f in m.families if f not in m.family_options]
                print(f"  on {served(fams)}:")
            for f in dataclasses.fields(cls):
                print(f"    {f.name} = {f.default!r}")
    return 0
