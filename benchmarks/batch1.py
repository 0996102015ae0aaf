"""Small-batch latency of the fixed-rate token methods on CPU, eager and compiled, against the
unmodified model in the same run (issue 16's acceptance).

DeiT-S (random weights: fixed-rate methods do the same work whatever the weights), fp32, CPU.
For every batch size and mode (``eager``; ``compiled`` = ``torch.compile``, inductor) the dense
model and each method are timed in interleaved rounds (:func:`leanvit.bench.time_models`: the
order alternates every round); the speedup is the median dense time over the median method
time, the spread the lowest and highest per-round ratio. Target (issue 16): compiled batch-1
speedup >= 0.9 x the MAC ratio for ToMe r=13 and EViT 0.7.

Run it under the shared CPU lock (compiling DeiT-S with inductor takes about a minute per
model on 2 cores)::

    flock /tmp/leanvit-cpu.lock python benchmarks/batch1.py

Writes ``benchmarks/results/batch1_cpu.json`` and ``.md`` (``--out`` to change). The load
average before and after is recorded in both.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time

from _common import RESULTS, command, loadavg, md_table, write_results

MODEL = "deit_small_patch16_224"
#: (label, method, options): the issue's two acceptance methods; one line each to add more
METHODS = [("tome r=13", "tome", {"r": 13}), ("evit 0.7", "evit", {"keep_rate": 0.7})]
#: compiled batch-1 speedup must reach this fraction of the MAC ratio (issue 16)
TARGET = 0.9


def apply_inductor_settings(parser: argparse.ArgumentParser, items: list[str]) -> None:
    """Set ``--inductor KEY=VALUE`` items on ``torch._inductor.config`` (values as Python
    literals), or exit through ``parser`` naming the bad item."""
    import ast

    import torch._inductor.config as inductor_config

    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not hasattr(inductor_config, key):
            parser.error(f"--inductor takes KEY=VALUE with a torch._inductor.config key, got "
                         f"{item!r}")
        setattr(inductor_config, key, ast.literal_eval(value))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="1,64", help="comma-separated (default 1,64)")
    p.add_argument("--modes", default="eager,compiled",
                   help="comma-separated subset of eager,compiled (default both)")
    p.add_argument("--compiled-batch-sizes", default="1",
                   help="batch sizes also run compiled (default 1: batch 64 compiled adds "
                        "minutes on a 2-core machine)")
    p.add_argument("--methods", nargs="*", default=None, metavar="LABEL",
                   help="subset of: " + ", ".join(m[0] for m in METHODS))
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per pair (default 15)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10,
                   help="forwards per timed round at batch 1 (1 at larger batches)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="a torch._inductor.config setting for the compiled mode, applied to "
                        "the dense model and the methods alike, e.g. cpp_wrapper=True or "
                        "freezing=True (repeatable)")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--out", default=str(RESULTS / "batch1_cpu"),
                   help="output path without suffix (.json and .md are written)")
    args = p.parse_args(argv)

    import torch

    import leanvit
    from leanvit.bench import environment, time_models
    from leanvit.models import create_model, input_size

    if args.threads:
        torch.set_num_threads(args.threads)
    apply_inductor_settings(p, args.inductor)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= {"eager", "compiled"}:
        p.error(f"--modes takes eager and/or compiled, got {args.modes!r}")
    if "compiled" in modes and shutil.which("gcc") is None and shutil.which("cc") is None:
        p.error("compiled mode needs a C compiler (inductor on CPU); none found")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    compiled_batches = {int(b) for b in args.compiled_batch_sizes.split(",") if b}
    chosen = [m for m in METHODS if args.methods is None or m[0] in args.methods]
    if not chosen:
        p.error(f"no method matches {args.methods}; labels: {[m[0] for m in METHODS]}")

    load_before = " ".join(loadavg())
    t_start = time.time()
    torch.manual_seed(0)
    dense = create_model(args.model).eval()
    h, w = input_size(dense)
    models = {"dense": dense}
    for label, method, options in chosen:
        m = create_model(args.model).eval()
        m.load_state_dict(dense.state_dict())
        models[label] = leanvit.patch(m, method, **options)
    probe = torch.randn(4, 3, h, w)
    gmacs = {k: leanvit.count_macs(m, probe).gmacs for k, m in models.items()}

    rows = []
    for mode in modes:
        runners = dict(models)
        if mode == "compiled":
            torch._dynamo.reset()
            runners = {k: torch.compile(m) for k, m in models.items()}
        for b in batches:
            if mode == "compiled" and b not in compiled_batches:
                continue
            torch.manual_seed(1)
            x = torch.randn(b, 3, h, w)
            iters = args.iters if b == 1 else 1
            for label, method, options in chosen:
                print(f"[{mode} batch {b}] dense vs {label} ...", file=sys.stderr, flush=True)
                t = time_models(runners["dense"], runners[label], x, warmup=args.warmup,
                                repeats=args.repeats, iters=iters)
                base, cand = t["baseline"], t["candidate"]
                ratios = [bt / ct for bt, ct in zip(base, cand)]
                speedup = statistics.median(base) / statistics.median(cand)
                mac_ratio = gmacs["dense"] / gmacs[label]
                rows.append({
                    "mode": mode, "batch_size": b, "method": label, "name": method,
                    "options": options, "gmacs": gmacs[label], "base_gmacs": gmacs["dense"],
                    "mac_ratio": mac_ratio, "speedup": speedup,
                    "speedup_over_mac_ratio": speedup / mac_ratio,
                    "round_ratio_min": min(ratios), "round_ratio_max": max(ratios),
                    "ms": 1e3 * statistics.median(cand), "base_ms": 1e3 * statistics.median(base),
                    "round_ms": [1e3 * v for v in cand], "base_round_ms": [1e3 * v for v in base],
                })
                print(_line(rows[-1]), file=sys.stderr, flush=True)
    load_after = " ".join(loadavg())

    summary = {"model": args.model, "dtype": "fp32", "device": "cpu",
               "command": command("batch1.py", argv),
               "environment": environment(torch.device("cpu")), "leanvit_path": leanvit.__file__,
               "repeats": args.repeats, "iters_batch1": args.iters,
               "load_before": load_before, "load_after": load_after,
               "minutes": (time.time() - t_start) / 60, "target": TARGET, "rows": rows}
    write_results(args.out, summary, _markdown(summary))
    print(_markdown(summary))
    return 0


def _line(r: dict) -> str:
    return (f"{r['mode']} batch {r['batch_size']} {r['method']}: {r['ms']:.1f} ms vs "
            f"{r['base_ms']:.1f} ms, speedup {r['speedup']:.3f}x (rounds {r['round_ratio_min']:.3f}"
            f"-{r['round_ratio_max']:.3f}), MAC ratio {r['mac_ratio']:.3f}x -> "
            f"{r['speedup_over_mac_ratio']:.2f} of it")


def _markdown(s: dict) -> str:
    env = s["environment"]
    lines = [f"# Batch-1 latency on {s['model']}, fp32, CPU, eager and compiled", "",
             f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}, timm "
             f"{env['timm']}. Command: `{s['command']}` ({s['minutes']:.0f} min). Load average "
             f"before {s['load_before']}, after {s['load_after']}.", "",
             f"Speedup = median dense time / median method time over {s['repeats']} interleaved "
             f"rounds ({s['iters_batch1']} forwards per round at batch 1); spread = lowest and "
             "highest per-round ratio. Target: compiled batch-1 speedup >= "
             f"{s['target']} x MAC ratio.", ""]
    cells = [[r["mode"], r["batch_size"], r["method"], f"{r['ms']:.1f} ({r['base_ms']:.1f})",
              f"{r['speedup']:.3f}x", f"{r['round_ratio_min']:.3f}-{r['round_ratio_max']:.3f}",
              f"{r['mac_ratio']:.3f}x", f"{r['speedup_over_mac_ratio']:.2f}"] for r in s["rows"]]
    lines.append(md_table(["mode", "batch", "method", "ms (dense)", "speedup", "spread",
                           "MAC ratio", "speedup / MAC ratio"], cells))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
