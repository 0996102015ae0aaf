"""DynamicViT inference speed: DeiT-S, keep 0.7, fp32, CPU, against the unmodified model in
the same run (``leanvit.bench.run_benchmark``: interleaved rounds after warm-up, median).

Acceptance (issue 5): at batch 64, speedup >= 0.95 x the MAC ratio (1.54x with the
predictors counted) and >= 1.49x (the authors' code over dense timm). Batch-1 latency is
reported too: the authors' users found their model slower than the dense one at batch 1
(their per-block policy bookkeeping and ``argsort`` over all tokens; on GPU, launch overhead).
leanvit's inference path adds only the three predictors (1.625 C^2 MACs per token), one
``topk`` + ``sort`` of the survivors and one ``gather`` per stage, and every block runs timm's
own fused attention on the survivors, so the saving carries over to batch 1. Token counts are
exact per image, so shapes are static and ``torch.compile(model, fullgraph=True)`` (and CUDA
graphs) work, which removes the per-op launch overhead behind the slow batch-1 GPU reports
(``--compile-latency`` times that too).

Random weights: speed does not depend on them (the predictors' choice changes which tokens
survive, never how many).

    flock /tmp/leanvit-cpu.lock python benchmarks/dynamicvit.py   # -> results/dynamicvit.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from leanvit.bench import format_table, run_benchmark

OUT = Path(__file__).parent / "results"
AUTHORS_SPEEDUP = 1.49  # the issue's figure for the authors' code over dense timm (CPU)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--keep-rate", type=float, default=0.7)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--latency-iters", type=int, default=20,
                   help="batch-1 forwards per timed round")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (slower)")
    p.add_argument("--compile-latency", action="store_true",
                   help="also time batch 1 with torch.compile on both models (static shapes: "
                        "the patched model compiles with fullgraph, no graph breaks)")
    p.add_argument("--out", default=str(OUT / "dynamicvit.json"))
    args = p.parse_args()
    options = {"keep_rate": args.keep_rate, "locations": (3, 6, 9)}
    t0 = time.time()
    big = run_benchmark(args.model, "dynamicvit", options, batch_size=args.batch_size,
                        repeats=args.repeats, warmup=2, memory=args.memory)
    one = run_benchmark(args.model, "dynamicvit", options, batch_size=1,
                        repeats=args.repeats, warmup=2, iters=args.latency_iters, memory=False)
    one_c = None
    if args.compile_latency:
        one_c = run_benchmark(args.model, "dynamicvit", options, batch_size=1, compile=True,
                              repeats=args.repeats, warmup=2, iters=args.latency_iters,
                              memory=False)
    print(format_table(big))
    print(format_table(one))
    if one_c is not None:
        print(format_table(one_c))
    need = 0.95 * big["mac_ratio"]
    summary = {
        "batch": args.batch_size,
        "speedup": big["speedup"], "mac_ratio": big["mac_ratio"],
        "speedup_over_mac_ratio": big["speedup"] / big["mac_ratio"],
        # fastest round of each, and the median of the back-to-back ratios of each round:
        # less sensitive to other jobs starting and stopping on a shared machine
        "speedup_best_rounds": min(big["baseline"]["round_ms"]) / min(big["patched"]["round_ms"]),
        "speedup_median_pairwise": statistics.median(
            b / q for b, q in zip(big["baseline"]["round_ms"], big["patched"]["round_ms"])),
        "meets_0.95_mac_ratio": big["speedup"] >= need,
        "meets_authors_1.49": big["speedup"] >= AUTHORS_SPEEDUP,
        "batch1_ms_dense": one["baseline"]["ms_per_batch"],
        "batch1_ms_dynamicvit": one["patched"]["ms_per_batch"],
        "batch1_speedup": one["speedup"],
        "batch1_compiled_ms_dense": one_c and one_c["baseline"]["ms_per_batch"],
        "batch1_compiled_ms_dynamicvit": one_c and one_c["patched"]["ms_per_batch"],
        "batch1_compiled_speedup": one_c and one_c["speedup"],
        "wall_s": time.time() - t0,
    }
    print(f"batch {args.batch_size}: speedup {big['speedup']:.3f}x, MAC ratio "
          f"{big['mac_ratio']:.3f}x (0.95 x = {need:.3f}; authors {AUTHORS_SPEEDUP}x)")
    print(f"batch {args.batch_size}, fastest rounds: {summary['speedup_best_rounds']:.3f}x, "
          f"median of per-round ratios: {summary['speedup_median_pairwise']:.3f}x")
    print(f"batch 1 latency: dense {summary['batch1_ms_dense']:.1f} ms, dynamicvit "
          f"{summary['batch1_ms_dynamicvit']:.1f} ms ({one['speedup']:.3f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "batch": big, "batch1": one,
                                          "batch1_compiled": one_c},
                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
