"""DynamicConvNeXt / DynamicSwin inference speed: ``dynamicvit`` keep 0.7 on ConvNeXt-T and
Swin-T, batch 64, fp32, CPU, against the unmodified model in the same run
(``leanvit.bench.run_benchmark``: interleaved rounds after warm-up, median), with the MAC
ratio beside the measured speedup.

Why the speedup stays below the MAC ratio (the script measures the pieces): only the MLPs of
stage 3 get cheaper. The spatial parts (depthwise 7x7 convolutions, window attention), the
LayerNorms, GELUs, residual adds and layout permutes of every block keep their full cost, and
they are memory-bound work whose time share on a CPU is larger than their MAC share. The
routed blocks add a gather of the slow and fast tokens, a scatter back, the fast paths'
LayerNorm, and the predictors (whose MACs are counted). ``stage3_ms`` times stage 3 alone
(its input cached) in both models, so the saving where the method acts is seen directly.

Random weights: speed does not depend on them (the predictors decide which positions take
which path, never how many).

    flock /tmp/leanvit-cpu.lock python benchmarks/dynamicvit_hierarchical.py
    # -> results/dynamicvit_hierarchical.{json,md}
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from leanvit._files import atomic_write_text
from leanvit.bench import format_table, run_benchmark

OUT = Path(__file__).parent / "results" / "dynamicvit_hierarchical"
MODELS = ("convnext_tiny", "swin_tiny_patch4_window7_224")
#: published GMACs at keep 0.7 and dense (Rao et al., TPAMI extension, arXiv 2207.01580)
AUTHORS = {"convnext_tiny": (3.6, 4.5), "swin_tiny_patch4_window7_224": (4.0, 4.5)}


def _stage3_ms(model_name: str, keep_rate: float, batch: int, repeats: int) -> dict:
    """Median ms of stage 3 alone (its input cached), dense vs patched, interleaved."""
    from leanvit import adapters
    from leanvit.adapters.stages import run_stage
    from leanvit.models import create_model, input_size
    from leanvit.patching import patch
    from leanvit.registry import Reducer
    from leanvit.state import TokenState

    torch.manual_seed(0)
    base = create_model(model_name).eval()
    patched = patch(copy.deepcopy(base), "dynamicvit", keep_rate=keep_rate).eval()
    adapter = adapters.find_adapter(base)
    stages = base.stages if hasattr(base, "stages") else base.layers
    x = torch.randn(batch, 3, *input_size(base))
    with torch.inference_mode():
        h = base.stem(x) if hasattr(base, "stem") else base.patch_embed(x)
        for s in (0, 1):
            h = stages[s](h)
        h = stages[2].downsample(h)
        runs = {"dense": (adapter.block_parts(base)[2], Reducer(None, None)),  # timm's blocks
                "patched": (adapter.block_parts(patched)[2], patched.leanvit)}
        times = {"dense": [], "patched": []}
        for r in range(repeats + 1):
            order = ("dense", "patched") if r % 2 == 0 else ("patched", "dense")
            for key in order:
                parts, reducer = runs[key]
                t0 = time.perf_counter()
                run_stage(reducer, 2, parts, h, TokenState(prefix=0, n0=0))
                if r > 0:  # the first round warms up
                    times[key].append(time.perf_counter() - t0)
    dense, pat = statistics.median(times["dense"]), statistics.median(times["patched"])
    return {"dense_ms": dense * 1e3, "patched_ms": pat * 1e3, "speedup": dense / pat}


def _stage3_macs(report: dict, depths_before: int, depth: int) -> float:
    blocks = report["per_block"][depths_before:depths_before + depth]
    return sum(b["macs"] for b in blocks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--keep-rate", type=float, default=0.7)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    t0 = time.time()
    rows = {}
    for name in args.models:
        r = run_benchmark(name, "dynamicvit", {"keep_rate": args.keep_rate},
                          batch_size=args.batch_size, repeats=args.repeats, warmup=1,
                          memory=False)
        print(format_table(r))
        s3 = _stage3_ms(name, args.keep_rate, args.batch_size, args.repeats)
        print(f"stage 3 alone: dense {s3['dense_ms']:.1f} ms, patched {s3['patched_ms']:.1f} ms "
              f"({s3['speedup']:.3f}x)")
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
            "stage3": s3, "raw": r,
        }
    summary = {"keep_rate": args.keep_rate, "batch": args.batch_size, "dtype": "fp32",
               "device": "cpu", "repeats": args.repeats, "warmup": 1, "models": rows,
               "wall_s": time.time() - t0}
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), _markdown(summary))
    print(_markdown(summary))


def _markdown(s: dict) -> str:
    lines = [f"dynamicvit keep {s['keep_rate']} on hierarchical models, batch {s['batch']}, "
             f"{s['dtype']}, {s['device']}, median of {s['repeats']} interleaved rounds", "",
             "| model | GMACs dense | GMACs patched | authors (patched / dense) | MAC ratio | "
             "speedup | stage 3 alone: speedup |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in s["models"].items():
        lines.append(f"| {name} | {r['gmacs_dense']:.3f} | {r['gmacs_patched']:.3f} | "
                     f"{r['authors_gmacs_patched']} / {r['authors_gmacs_dense']} | "
                     f"{r['mac_ratio']:.3f}x | {r['speedup']:.3f}x | "
                     f"{r['stage3']['speedup']:.3f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
