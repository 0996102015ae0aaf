"""Same-run speed of the token methods on DeiT-S under two code versions (before / after a
change): the acceptance tool for refactors (the speed of ToMe, EViT, DiffRate, DynamicViT and
ATS must not drop).

Protocol: deit_small_patch16_224 (random weights, seed 0: fixed-rate methods do the same work
whatever the weights; ATS and DynamicViT get the same weights, predictors and images in both
versions, so they do the same work too), batch 64, fp32, CPU. Each version runs in its own
worker process that imports ``leanvit`` from its own checkout (``PYTHONPATH``), builds the
unmodified model and every patched one once, and then waits for orders. Both workers stay
alive for the whole run and take turns pass by pass: in repeat ``r`` of a method the four
timed forward passes are before-unmodified, before-patched, after-patched, after-unmodified
(reversed every other repeat), one at a time, so both versions see the same machine within
seconds of each other. Repeat ``r`` gives each version a speedup (its unmodified pass over
its patched pass) and their ratio, ``speedup_after / speedup_before`` (1.0 = unchanged,
below 1 = slower after the change); the figure of merit is the median of these ratios over
the repeats, with its quartiles.

(The earlier protocol ran each version's rounds in fresh processes minutes apart; on this
shared 2-core machine its ratios moved by +-8 % between round pairs of the same two commits.)

Run it under the shared CPU lock, e.g. for this change (base = main before it)::

    git worktree add --detach /tmp/lv-before 6c6e0ad
    flock /tmp/leanvit-cpu.lock python benchmarks/speed_versions.py \\
        --before /tmp/lv-before --after . --repeats 12

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
    ("pitome r=13", "pitome", {"r": 13}),
    ("mctf r=16", "mctf", {"r": 16}),
    ("tofu r=13", "tofu", {"r": 13}),
    ("zerotprune r=11", "zerotprune", {"r": 11}),
    ("divprune 0.7", "divprune", {"keep_rate": 0.7}),
]


def worker(args: argparse.Namespace) -> int:
    """One version: build every model, then time one forward pass per line read from stdin
    (a method label, or ``"-"`` for the unmodified model), answering with the seconds."""
    import copy

    import torch

    import leanvit
    from leanvit.models import create_model

    torch.manual_seed(0)
    base = create_model(MODEL).eval()
    x = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    models, gmacs = {"-": base}, {}
    for label, method, options in METHODS:
        if args.methods and label not in args.methods:
            continue
        torch.manual_seed(1)  # the same predictor weights (DynamicViT) in both versions
        models[label] = leanvit.patch(copy.deepcopy(base), method, **options).eval()
        gmacs[label] = leanvit.count_macs(models[label], x[:8]).gmacs
    with torch.inference_mode():
        for m in models.values():  # warm-up
            m(x)
    print(json.dumps({"leanvit_file": leanvit.__file__, "threads": torch.get_num_threads(),
                      "gmacs": gmacs}), flush=True)
    for line in sys.stdin:
        model = models[line.strip()]
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(x)
            dt = time.perf_counter() - t0
        print(json.dumps(dt), flush=True)
    return 0


class Version:
    """A live worker process of one checkout."""

    def __init__(self, path: Path, args: argparse.Namespace):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker",
               "--batch-size", str(args.batch_size)] + (
                   ["--methods", *args.methods] if args.methods else [])
        env = dict(os.environ, PYTHONPATH=str(path))
        self.proc = subprocess.Popen(cmd, cwd=str(path), env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker for {path} failed ({self.proc.wait()})")
        self.info = json.loads(line)
        if not Path(self.info["leanvit_file"]).resolve().is_relative_to(path.resolve()):
            raise SystemExit(f"worker for {path} imported {self.info['leanvit_file']}")

    def time(self, label: str) -> float:
        self.proc.stdin.write(label + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def quartiles(v: list[float]) -> tuple[float, float, float]:
    """Lower quartile, median, upper quartile (``statistics.quantiles``, inclusive)."""
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else v * 3
    return q[0], statistics.median(v), q[2]


def measure(versions: dict[str, Version], label: str, repeats: int) -> dict:
    """``repeats`` interleaved repeats of one method (see the module docstring)."""
    raw = {k: {"baseline_s": [], "patched_s": []} for k in versions}
    for r in range(repeats):
        order = [("before", "-"), ("before", label), ("after", label), ("after", "-")]
        for key, which in (order if r % 2 == 0 else order[::-1]):
            raw[key]["baseline_s" if which == "-" else "patched_s"].append(
                versions[key].time(which))
    speed = {k: [b / p for b, p in zip(v["baseline_s"], v["patched_s"])]
             for k, v in raw.items()}
    ratio = [a / b for a, b in zip(speed["after"], speed["before"])]
    lo, med, hi = quartiles(ratio)
    return {"method": label, "speedup_before": speed["before"], "speedup_after": speed["after"],
            "ratio": ratio, "ratio_median": med, "ratio_q1": lo, "ratio_q3": hi,
            "speedup_before_median": statistics.median(speed["before"]),
            "speedup_after_median": statistics.median(speed["after"]), "raw": raw}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, help="checkout of the code before the change")
    p.add_argument("--after", type=Path, help="checkout of the code after the change")
    p.add_argument("--repeats", type=int, default=12,
                   help="interleaved repeats per method (four timed passes each; default 12)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--methods", nargs="*", default=None, metavar="LABEL")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None,
                   help="output path without suffix (default benchmarks/results/speed_versions)")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.before is None or args.after is None:
        p.error("--before and --after are required")
    paths = {"before": args.before.resolve(), "after": args.after.resolve()}
    commits = {k: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=v,
                                 capture_output=True, text=True).stdout.strip()
               for k, v in paths.items()}
    # imported here, not at the top: the workers must import leanvit from PYTHONPATH, and
    # _common puts this checkout first on sys.path
    from _common import RESULTS, command, loadavg, write_results

    load_before, t0 = loadavg(), time.time()
    versions = {k: Version(v, args) for k, v in paths.items()}
    rows = []
    try:
        for label, _, _ in METHODS:
            if args.methods and label not in args.methods:
                continue
            row = measure(versions, label, args.repeats)
            row["gmacs_before"] = versions["before"].info["gmacs"][label]
            row["gmacs_after"] = versions["after"].info["gmacs"][label]
            rows.append(row)
            print(f"  {label}: ratio {row['ratio_median']:.3f} [{row['ratio_q1']:.3f}, "
                  f"{row['ratio_q3']:.3f}]", file=sys.stderr, flush=True)
    finally:
        for v in versions.values():
            v.close()
    summary = {"model": MODEL, "batch_size": args.batch_size, "dtype": "fp32", "device": "cpu",
               "versions": {k: str(v) for k, v in paths.items()}, "commits": commits,
               "repeats": args.repeats, "loadavg_before": load_before,
               "loadavg_after": loadavg(), "seconds": round(time.time() - t0),
               "threads": versions["after"].info["threads"],
               "command": command("speed_versions.py", argv), "rows": rows}
    write_results(args.out or RESULTS / "speed_versions", summary, markdown(summary))
    print(markdown(summary))
    return 0


def markdown(s: dict) -> str:
    """The summary as markdown."""
    from _common import md_table

    head = (f"# Token methods on {s['model']} before / after ({s['commits']['before']} -> "
            f"{s['commits']['after']}), batch {s['batch_size']}, fp32, CPU\n\n"
            f"Command: `{s['command']}` (two live workers, {s['repeats']} interleaved repeats "
            f"per method, {s['threads']} threads; load average "
            f"{' '.join(s['loadavg_before'])} before, {' '.join(s['loadavg_after'])} after; "
            f"{s['seconds']} s).\n\n"
            "Speedup = a version's unmodified pass time / its patched pass time, per repeat. "
            "Ratio = speedup after / speedup before of the same repeat (1.0 = unchanged): "
            "median [lower quartile, upper quartile] over the repeats.\n\n")
    cells = [[r["method"], f"{r['gmacs_before']:.3f} / {r['gmacs_after']:.3f}",
              f"{r['speedup_before_median']:.3f}", f"{r['speedup_after_median']:.3f}",
              f"{r['ratio_median']:.3f} [{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}]"]
             for r in s["rows"]]
    return head + md_table(["method", "GMACs before / after", "speedup before (median)",
                            "speedup after (median)", "ratio median [quartiles]"], cells)


if __name__ == "__main__":
    sys.exit(main())
