"""Pool the per-round-pair ratios (speedup after / speedup before) of several
``speed_versions.py`` runs of the same change: per method, the number of round pairs, their
median, geometric mean and range. One run of two rounds cannot resolve a few percent on a
2-core machine (a method's speedup moves by up to ~7% from one fresh process to the next);
pooling the runs can.

    python benchmarks/speed_versions_pool.py benchmarks/results/speed_versions_*quiet*.json
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys


def pool(paths: list[str]) -> dict[str, list[float]]:
    """Method label -> every round pair's ratio over the runs in ``paths``."""
    out: dict[str, list[float]] = {}
    for path in paths:
        with open(path) as f:
            for row in json.load(f)["rows"]:
                ratios = row["ratio"] if isinstance(row["ratio"], list) else [row["ratio"]]
                out.setdefault(row["method"], []).extend(ratios)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="speed_versions.py JSON results")
    args = p.parse_args(argv)
    print("| method | round pairs | median | geometric mean | min | max |")
    print("|---|---|---|---|---|---|")
    for method, r in pool(args.runs).items():
        g = math.exp(sum(math.log(v) for v in r) / len(r))
        print(f"| {method} | {len(r)} | {statistics.median(r):.3f} | {g:.3f} | {min(r):.3f} | "
              f"{max(r):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
