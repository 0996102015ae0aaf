"""Same-run speed of the token methods on DeiT-S under two code versions (before / after a
change), the successor of ``token_reduction.py`` for refactors (issue 12: the speed of ToMe,
EViT, DiffRate, DynamicViT and ATS must not drop).

Protocol: deit_small_patch16_224 (random weights, seed 0: fixed-rate methods do the same work
whatever the weights; ATS and DynamicViT get the same weights, predictors and images in both
versions, so they do the same work too), batch 64, fp32, CPU. Rounds alternate between the two
versions (before, after, after, before, ...), each version in a fresh subprocess importing
``leanvit`` from its own checkout (``PYTHONPATH``). In a round, each method's speedup over the
unmodified model is timed with ``leanvit.bench.time_models`` (interleaved, alternating order;
median of ``--repeats``). The figure of merit is the ratio of ratios, ``speedup_after /
speedup_before`` of the same round pair: 1.0 = unchanged, below 1 = slower after the change.

Run it under the shared CPU lock, e.g. for this change (base = main before it)::

    git worktree add --detach /tmp/lv-before 5e72144
    flock /tmp/leanvit-cpu.lock python benchmarks/speed_versions.py \\
        --before /tmp/lv-before --after . --rounds 4

Writes ``benchmarks/results/speed_versions.{json,md}`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODEL = "deit_small_patch16_224"

#: a DiffRate schedule for DeiT-S (197 tokens, class token included; ~2.9 GMACs), fixed so
#: both versions run the same one: (prune_kept, merge_kept) per block
DIFFRATE_SCHEDULE = ([197, 190, 175, 160, 145, 130, 115, 100, 85, 70, 58, 45],
                     [197, 180, 165, 150, 135, 120, 105, 90, 75, 60, 50, 40])

#: (label, method, options). One line each.
METHODS = [
    ("tome r=13", "tome", {"r": 13}),
    ("evit 0.7", "evit", {"keep_rate": 0.7}),
    ("diffrate ~2.9G", "diffrate", {"schedule": DIFFRATE_SCHEDULE}),
    ("dynamicvit 0.7", "dynamicvit", {"keep_rate": 0.7}),
    ("ats", "ats", {}),
]


def worker(args: argparse.Namespace) -> int:
    """One version, one round: every method's speedup over the unmodified model."""
    import copy

    import torch

    import leanvit
    from leanvit.bench import time_models
    from leanvit.models import create_model

    torch.manual_seed(0)
    base = create_model(MODEL).eval()
    x = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    out = {"leanvit_file": leanvit.__file__, "threads": torch.get_num_threads(), "methods": {}}
    for label, method, options in METHODS:
        if args.methods and label not in args.methods:
            continue
        torch.manual_seed(1)  # the same predictor weights (DynamicViT) in both versions
        model = leanvit.patch(copy.deepcopy(base), method, **options).eval()
        gmacs = leanvit.count_macs(model, x[:8]).gmacs
        t = time_models(base, model, x, warmup=args.warmup, repeats=args.repeats)
        speedup = statistics.median(t["baseline"]) / statistics.median(t["candidate"])
        out["methods"][label] = {"speedup": speedup, "gmacs": gmacs,
                                 "baseline_s": t["baseline"], "patched_s": t["candidate"]}
        print(f"  {label}: {speedup:.3f}x", file=sys.stderr, flush=True)
    print(json.dumps(out))
    return 0


def run_version(path: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker",
           "--batch-size", str(args.batch_size), "--repeats", str(args.repeats),
           "--warmup", str(args.warmup)] + (["--methods", *args.methods] if args.methods else [])
    env = dict(os.environ, PYTHONPATH=str(path))
    res = subprocess.run(cmd, cwd=str(path), env=env, capture_output=True, text=True)
    sys.stderr.write(res.stderr)
    if res.returncode != 0:
        raise SystemExit(f"worker for {path} failed ({res.returncode})")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if not Path(out["leanvit_file"]).resolve().is_relative_to(path.resolve()):
        raise SystemExit(f"worker for {path} imported {out['leanvit_file']}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, help="checkout of the code before the change")
    p.add_argument("--after", type=Path, help="checkout of the code after the change")
    p.add_argument("--rounds", type=int, default=4, help="rounds per version (default 4)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed pairs per method and round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--methods", nargs="*", default=None, metavar="LABEL")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None,
                   help="output path without suffix (default benchmarks/results/speed_versions)")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.before is None or args.after is None:
        p.error("--before and --after are required")
    versions = {"before": args.before.resolve(), "after": args.after.resolve()}
    commits = {k: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=v,
                                 capture_output=True, text=True).stdout.strip()
               for k, v in versions.items()}
    # imported here, not at the top: the workers must import leanvit from PYTHONPATH, and
    # _common puts this checkout first on sys.path
    from _common import RESULTS, command, loadavg, write_results

    load_before = loadavg()
    t0 = time.time()
    rounds: list[dict] = []
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        got = {}
        for key in order:
            print(f"round {r + 1}/{args.rounds}: {key} ({commits[key]})", file=sys.stderr,
                  flush=True)
            got[key] = run_version(versions[key], args)
        rounds.append(got)
    load_after = loadavg()

    rows = []
    for label, _, _ in METHODS:
        if label not in rounds[0]["before"]["methods"]:
            continue
        before = [rd["before"]["methods"][label]["speedup"] for rd in rounds]
        after = [rd["after"]["methods"][label]["speedup"] for rd in rounds]
        ratio = [a / b for a, b in zip(after, before)]
        rows.append({
            "method": label,
            "gmacs_before": rounds[0]["before"]["methods"][label]["gmacs"],
            "gmacs_after": rounds[0]["after"]["methods"][label]["gmacs"],
            "speedup_before": before, "speedup_after": after, "ratio": ratio,
            "ratio_median": statistics.median(ratio), "ratio_min": min(ratio),
            "ratio_max": max(ratio),
        })
    summary = {"model": MODEL, "batch_size": args.batch_size, "dtype": "fp32", "device": "cpu",
               "versions": {k: str(v) for k, v in versions.items()}, "commits": commits,
               "rounds": args.rounds, "repeats": args.repeats, "warmup": args.warmup,
               "loadavg_before": load_before, "loadavg_after": load_after,
               "seconds": round(time.time() - t0), "threads": rounds[0]["after"]["threads"],
               "command": command("speed_versions.py", argv), "rows": rows, "raw": rounds}
    write_results(args.out or RESULTS / "speed_versions", summary, markdown(summary))
    print(markdown(summary))
    return 0


def markdown(s: dict) -> str:
    """The summary as markdown."""
    from _common import md_table

    head = (f"# Token methods on {s['model']} before / after ({s['commits']['before']} -> "
            f"{s['commits']['after']}), batch {s['batch_size']}, fp32, CPU\n\n"
            f"Command: `{s['command']}` ({s['rounds']} rounds per version, alternating, "
            f"{s['repeats']} timed pairs per method and round, {s['threads']} threads; "
            f"load average {' '.join(s['loadavg_before'])} before, "
            f"{' '.join(s['loadavg_after'])} after; {s['seconds']} s).\n\n"
            "Speedup = unmodified model's median time / patched model's, same process. "
            "Ratio = speedup after / speedup before, per round pair (1.0 = unchanged).\n\n")
    cells = [[r["method"], f"{r['gmacs_before']:.3f} / {r['gmacs_after']:.3f}",
              ", ".join(f"{v:.3f}" for v in r["speedup_before"]),
              ", ".join(f"{v:.3f}" for v in r["speedup_after"]),
              f"{r['ratio_median']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]"]
             for r in s["rows"]]
    return head + md_table(["method", "GMACs before / after", "speedup before (per round)",
                            "speedup after (per round)", "ratio median [min, max]"], cells)


if __name__ == "__main__":
    sys.exit(main())
