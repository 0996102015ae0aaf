"""Peak CPU memory of one forward pass, every token method against the unmodified model, on
the three timm token families (ViT, Eva, BEiT).

Each number is ``leanvit.bench.cpu_peak_memory_mb``: a fresh process builds the model (random
weights), runs one forward pass, then measures how far the resident size rises during a
second one (glibc's mmap threshold fixed, so the peak follows the live tensors and repeats to
the megabyte). The unmodified model runs timm's own forward. The target: no method above it.

    python benchmarks/memory.py                        # all families and methods, batch 32
    python benchmarks/memory.py --families eva --methods tome evit

Writes ``benchmarks/results/memory.json`` and ``.md`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import sys

from _common import RESULTS, command, md_table, write_results

FAMILIES = {"vit": "deit_small_patch16_224", "eva": "eva02_small_patch14_224",
            "beit": "beit_base_patch16_224"}

#: one setting per method, about 1.5x fewer MACs where the method has a rate (its default
#: otherwise); dynamicvit with untrained predictors keeps the same token counts as trained ones
METHODS = {
    "none": {}, "evit": {"keep_rate": 0.7}, "topk": {"keep_rate": 0.7}, "tome": {"r": 13},
    "ats": {}, "random": {"keep_rate": 0.7}, "dynamicvit": {"keep_rate": 0.7},
    "pitome": {"r": 13}, "mctf": {"r": 16}, "tofu": {"r": 13}, "zerotprune": {"r": 11},
    "divprune": {"keep_rate": 0.7},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=str(RESULTS / "memory"),
                   help="output path without suffix (.json and .md are written)")
    args = p.parse_args(argv)

    from leanvit.bench import cpu_peak_memory_mb

    rows = []
    for family in args.families:
        model = FAMILIES[family]
        base = cpu_peak_memory_mb(model, batch_size=args.batch_size)
        for method in args.methods:
            mb = cpu_peak_memory_mb(model, method, METHODS[method], batch_size=args.batch_size)
            rows.append(dict(family=family, model=model, method=method,
                             options=METHODS[method], base_mb=base, patched_mb=mb,
                             ratio=mb / base, within=mb <= base))
            print(f"{model} {method}: {mb:.0f} MB (unmodified {base:.0f} MB)", file=sys.stderr,
                  flush=True)
    summary = {"batch_size": args.batch_size, "dtype": "fp32", "device": "cpu",
               "command": command("memory.py", argv), "rows": rows,
               "all_within": all(r["within"] for r in rows)}
    md = "\n".join([
        f"# Peak CPU memory of one forward pass, batch {args.batch_size}, fp32", "",
        f"Command: `{summary['command']}`. Unmodified: timm's own forward.", "",
        md_table(["model", "method", "options", "peak MB", "unmodified MB", "ratio"],
                 [[r["model"], r["method"], r["options"] or "-", f"{r['patched_mb']:.0f}",
                   f"{r['base_mb']:.0f}", f"{r['ratio']:.2f}"] for r in rows]), ""])
    write_results(args.out, summary, md)
    print(md)
    return 0 if summary["all_within"] else 1


if __name__ == "__main__":
    sys.exit(main())
