"""Throughput of the off-the-shelf token-reduction methods on DeiT-S, against the unmodified
model in the same run (``leanvit.bench.run_benchmark``).

Protocol (issue 4): deit_small_patch16_224 (random weights: fixed-rate methods do the same work
whatever the weights; DynamicViT's untrained predictors change which tokens survive, never how
many), batch 64, fp32, CPU, warm-up then interleaved timed rounds; plus the batch-1 latency
change. Targets: speedup >= 0.95 x MAC ratio, and at least what the authors' own code reaches
on a 2-core CPU of this kind (EViT 0.7: 1.41x, ToMe r=13: 1.56x, DiffRate's published DeiT-S
2.9 G schedule: 1.31x, DynamicViT 0.7: 1.49x). Compiled batch 1: ``batch1.py``.

The DiffRate and DynamicViT rows were separate scripts, ``diffrate.py`` and ``dynamicvit.py``
(their results and commits: benchmarks/README.md). ``results/token_reduction.{json,md}`` has the
first three rows (``--methods "evit 0.7" "topk 0.7" "tome r=13"``).

Run it under the shared CPU lock::

    flock /tmp/leanvit-cpu.lock python benchmarks/token_reduction.py

Writes ``benchmarks/results/token_reduction.json`` and ``.md``. To add a method, add one line
to ``METHODS``.
"""
from __future__ import annotations

import argparse
import sys

from _common import RESULTS, command, md_table, resolve, write_results

MODEL = "deit_small_patch16_224"

#: (label, method, options, the authors' speedup on such a machine or None). One line each.
METHODS = [
    ("evit 0.7", "evit", {"keep_rate": 0.7}, 1.41),
    ("topk 0.7", "topk", {"keep_rate": 0.7}, None),
    ("tome r=13", "tome", {"r": 13}, 1.56),
    ("diffrate 2.9G", "diffrate", {"schedule": "authors:ViT-S-DeiT:2.9"}, 1.31),
    ("dynamicvit 0.7", "dynamicvit", {"keep_rate": 0.7, "locations": (3, 6, 9)}, 1.49),
    ("pitome r=13", "pitome", {"r": 13}, None),
    ("mctf r=16", "mctf", {"r": 16}, None),
    ("tofu r=13", "tofu", {"r": 13}, None),
    ("zerotprune r=11", "zerotprune", {"r": 11}, None),
    ("divprune 0.7", "divprune", {"keep_rate": 0.7}, None),
]

#: a method's measured speedup must reach this fraction of its MAC ratio (issue 4)
MAC_RATIO_TARGET = 0.95


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="*", default=None, metavar="LABEL",
                   help="subset of the labels (default: all): " + ", ".join(m[0] for m in METHODS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per model (default 5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--latency-iters", type=int, default=10,
                   help="batch-1 forwards per timed round (default 10)")
    p.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency runs")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (slower)")
    p.add_argument("--out", default=str(RESULTS / "token_reduction"),
                   help="output path without suffix (.json and .md are written)")
    args = p.parse_args(argv)

    from leanvit.bench import run_benchmark

    chosen = [m for m in METHODS if args.methods is None or m[0] in args.methods]
    if not chosen:
        p.error(f"no method matches {args.methods}; labels: {[m[0] for m in METHODS]}")
    rows, raw = [], {}
    for label, method, options, authors in chosen:
        print(f"[{label}] batch {args.batch_size} ...", file=sys.stderr, flush=True)
        res = run_benchmark(MODEL, method, resolve(options), batch_size=args.batch_size,
                            warmup=args.warmup, repeats=args.repeats, memory=args.memory,
                            progress=False)
        lat = None
        if not args.no_latency:
            print(f"[{label}] batch 1 ...", file=sys.stderr, flush=True)
            lat = run_benchmark(MODEL, method, resolve(options), batch_size=1, warmup=args.warmup,
                                repeats=args.repeats, iters=args.latency_iters, memory=False,
                                progress=False)
        row = {
            "method": label, "name": method, "options": options,
            "gmacs": res["patched"]["gmacs"], "base_gmacs": res["baseline"]["gmacs"],
            "mac_ratio": res["mac_ratio"], "speedup": res["speedup"],
            "speedup_over_mac_ratio": res["speedup"] / res["mac_ratio"],
            # Best round of each model: less sensitive to other processes on a shared machine.
            "speedup_best_rounds": min(res["baseline"]["round_ms"]) / min(res["patched"]["round_ms"]),
            "images_per_s": res["patched"]["images_per_s"],
            "base_images_per_s": res["baseline"]["images_per_s"],
            "authors_speedup": authors,
            "meets_mac_target": res["speedup"] >= MAC_RATIO_TARGET * res["mac_ratio"],
            "meets_authors": None if authors is None else res["speedup"] >= authors,
        }
        if lat is not None:
            row["latency_ms"] = lat["patched"]["ms_per_batch"]
            row["base_latency_ms"] = lat["baseline"]["ms_per_batch"]
            row["latency_change"] = lat["patched"]["ms_per_batch"] / lat["baseline"]["ms_per_batch"] - 1
            row["latency_change_best_rounds"] = (min(lat["patched"]["round_ms"]) /
                                                 min(lat["baseline"]["round_ms"]) - 1)
        rows.append(row)
        raw[label] = {"batch": res, "latency": lat}
        print(_line(row), file=sys.stderr, flush=True)

    env = next(iter(raw.values()))["batch"]["environment"]
    summary = {"model": MODEL, "batch_size": args.batch_size, "dtype": "fp32", "device": "cpu",
               "command": command("token_reduction.py", argv), "environment": env,
               "rows": rows, "raw": raw}
    write_results(args.out, summary, _markdown(summary))
    print(_markdown(summary))
    return 0


def _line(r: dict) -> str:
    s = (f"{r['method']}: {r['gmacs']:.3f} GMACs, MAC ratio {r['mac_ratio']:.3f}x, speedup "
         f"{r['speedup']:.3f}x ({r['speedup_over_mac_ratio']:.2f} of the MAC ratio)")
    if "latency_change" in r:
        s += f", batch-1 latency {100 * r['latency_change']:+.1f}%"
    return s


def _markdown(s: dict) -> str:
    env = s["environment"]
    lines = [f"# Token reduction on {s['model']}, batch {s['batch_size']}, fp32, CPU", "",
             f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}, timm "
             f"{env['timm']}, leanvit {env['leanvit']}. Command: `{s['command']}`", "",
             "Speedup: median round of each model (`run_benchmark`); best rounds: fastest round of "
             "each, less sensitive to other processes on a shared machine.", ""]
    cells = []
    for r in s["rows"]:
        authors = "-" if r["authors_speedup"] is None else f"{r['authors_speedup']:.2f}x"
        lat = ("-", "-") if "latency_ms" not in r else (
            f"{r['latency_ms']:.1f} ({r['base_latency_ms']:.1f})",
            f"{100 * r['latency_change']:+.1f}%")
        cells.append([r["method"], f"{r['gmacs']:.3f} ({r['base_gmacs']:.3f})",
                      f"{r['mac_ratio']:.3f}x", f"{r['speedup']:.3f}x",
                      f"{r['speedup_over_mac_ratio']:.2f}", f"{r['speedup_best_rounds']:.3f}x",
                      authors, f"{r['images_per_s']:.1f} ({r['base_images_per_s']:.1f})", *lat])
    lines.append(md_table(["method", "GMACs", "MAC ratio", "speedup", "speedup / MAC ratio",
                           "speedup, best rounds", "authors' code", "img/s (base)",
                           "batch-1 ms (base)", "batch-1 change"], cells))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
