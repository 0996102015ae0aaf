"""DynamicConvNeXt / DynamicSwin inference speed: ``dynamicvit`` keep 0.7 on ConvNeXt-T and
Swin-T, batch 64, fp32, CPU, against the unmodified model in the same run
(``leanvit.bench.run_benchmark``: interleaved rounds after warm-up, median), with the MAC
ratio beside the measured speedup.

Why the speedup stays below the MAC ratio: only the MLPs of
stage 3 get cheaper. The spatial parts (depthwise 7x7 convolutions, window attention), the
LayerNorms, GELUs, residual adds and layout permutes of every block keep their full cost, and
they are memory-bound work whose time share on a CPU is larger than their MAC share. The
routed blocks add a gather of the slow and fast tokens, a scatter back, the fast paths'
LayerNorm, and the predictors (whose MACs are counted). The recorded run
(``results/dynamicvit_hierarchical.{json,md}``, commit bb05f17, this script as of 20da934)
also timed stage 3 alone, through the adapters' internal stage runner; that part is gone.

Random weights: speed does not depend on them (the predictors decide which positions take
which path, never how many).

    flock /tmp/leanvit-cpu.lock python benchmarks/dynamicvit_hierarchical.py
    # -> results/dynamicvit_hierarchical.{json,md}
"""
from __future__ import annotations

import argparse
import statistics
import time

from _common import RESULTS, md_table, write_results

from leanvit.bench import format_table, run_benchmark

MODELS = ("convnext_tiny", "swin_tiny_patch4_window7_224")
#: published GMACs at keep 0.7 and dense (Rao et al., TPAMI extension, arXiv 2207.01580)
AUTHORS = {"convnext_tiny": (3.6, 4.5), "swin_tiny_patch4_window7_224": (4.0, 4.5)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--keep-rate", type=float, default=0.7)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--out", default=str(RESULTS / "dynamicvit_hierarchical"))
    args = p.parse_args()
    t0 = time.time()
    rows = {}
    for name in args.models:
        r = run_benchmark(name, "dynamicvit", {"keep_rate": args.keep_rate},
                          batch_size=args.batch_size, repeats=args.repeats, warmup=1,
                          memory=False)
        print(format_table(r))
        pub, pub_dense = AUTHORS.get(name, (None, None))
        rows[name] = {
            "speedup": r["speedup"], "mac_ratio": r["mac_ratio"],
            "speedup_over_mac_ratio": r["speedup"] / r["mac_ratio"],
            "speedup_median_pairwise": statistics.median(
                b / q for b, q in zip(r["baseline"]["round_ms"], r["patched"]["round_ms"])),
            "gmacs_dense": r["baseline"]["gmacs"], "gmacs_patched": r["patched"]["gmacs"],
            "authors_gmacs_patched": pub, "authors_gmacs_dense": pub_dense,
            "ms_per_batch_dense": r["baseline"]["ms_per_batch"],
            "ms_per_batch_patched": r["patched"]["ms_per_batch"],
            "raw": r,
        }
    summary = {"keep_rate": args.keep_rate, "batch": args.batch_size, "dtype": "fp32",
               "device": "cpu", "repeats": args.repeats, "warmup": 1, "models": rows,
               "wall_s": time.time() - t0}
    write_results(args.out, summary, _markdown(summary))
    print(_markdown(summary))


def _markdown(s: dict) -> str:
    head = (f"dynamicvit keep {s['keep_rate']} on hierarchical models, batch {s['batch']}, "
            f"{s['dtype']}, {s['device']}, median of {s['repeats']} interleaved rounds\n\n")
    cells = [[name, f"{r['gmacs_dense']:.3f}", f"{r['gmacs_patched']:.3f}",
              f"{r['authors_gmacs_patched']} / {r['authors_gmacs_dense']}",
              f"{r['mac_ratio']:.3f}x", f"{r['speedup']:.3f}x"] for name, r in s["models"].items()]
    return head + md_table(["model", "GMACs dense", "GMACs patched", "authors (patched / dense)",
                            "MAC ratio", "speedup"], cells)


if __name__ == "__main__":
    main()
