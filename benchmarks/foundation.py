"""What the patch machinery itself costs: DeiT-S, batch 64, fp32, CPU, ``none`` vs unpatched.

Acceptance (foundation issue): the ``none``-patched model's throughput is at least 0.97x the
unpatched model's, measured in the same run (interleaved rounds, median).

    python benchmarks/foundation.py                # writes benchmarks/results/foundation.json
    python benchmarks/foundation.py --repeats 9 --batch-size 64
"""
from __future__ import annotations

import argparse
import time

from _common import RESULTS, write_results

from leanvit.bench import format_table, run_benchmark


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=str(RESULTS / "foundation.json"))
    args = p.parse_args()
    t0 = time.time()
    result = run_benchmark(args.model, "none", batch_size=args.batch_size,
                           repeats=args.repeats, warmup=2)
    result["wall_s"] = time.time() - t0
    print(format_table(result))
    print(f"none / unpatched throughput: {result['speedup']:.3f} (acceptance: >= 0.97)")
    write_results(args.out, result)


if __name__ == "__main__":
    main()
