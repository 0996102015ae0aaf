"""Compiled ToMe under two code versions in ONE process: batch-1 latency of the unmodified
model and of ToMe with each version's matching and merge, interleaved (issue 16).

Why one process: two ``benchmarks/batch1.py`` runs (one per checkout) differ by 1-3% from
machine drift alone, as much as a kernel-level change to ToMe is worth. Here each version's
``leanvit/ops/merge.py`` and ``leanvit/methods/tome.py`` are loaded from its checkout as
private modules, and that version's ``ToMe.after_attention`` is bound to its own patched
model, so ``torch.compile`` traces each model with its own code (no shared global, hence no
dynamo guard that one version's trace could invalidate for the other). Everything else
(adapters, attention, state) comes from the ``leanvit`` that is imported, i.e. the checkout
this script runs in; the comparison is therefore only valid for changes confined to those two
files. Rounds alternate the order (dense, versions..., then reversed); the figure of merit is
the per-round ratio of times ``first version / other version`` (above 1 = the other is faster).

DeiT-S, random weights (seed 0), fp32, CPU, batch 1 (``--batch-size``), inductor
(``--inductor KEY=VALUE`` applies to every model, e.g. ``cpp_wrapper=True``)::

    git worktree add --detach /tmp/lv-before <commit before the change>
    flock /tmp/leanvit-cpu.lock python benchmarks/tome_compiled_versions.py \\
        before=/tmp/lv-before after=. --rounds 15

Writes ``benchmarks/results/tome_compiled_versions.{json,md}`` (``--out``).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch1 import apply_inductor_settings  # noqa: E402

MODEL = "deit_small_patch16_224"


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _version_tome(label: str, root: Path) -> type:
    """The ``ToMe`` class of ``root``'s ``tome.py``, its globals bound to ``root``'s merge."""
    import leanvit.registry as registry

    merge = _load(f"_lv_merge_{label}", root / "leanvit" / "ops" / "merge.py")
    register = registry.register
    registry.register = lambda method: method  # the copy must not register "tome" again
    try:
        tome = _load(f"_lv_tome_{label}", root / "leanvit" / "methods" / "tome.py")
    finally:
        registry.register = register
    for name in ("bipartite_soft_matching", "merge_wavg", "merge_source", "merge_where"):
        setattr(tome, name, getattr(merge, name))
    return tome.ToMe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("versions", nargs="+", metavar="LABEL=CHECKOUT",
                   help="two or more code versions, e.g. before=/tmp/lv-before after=.")
    p.add_argument("--r", type=int, default=13, help="ToMe r (default 13, issue 16)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds (default 2)")
    p.add_argument("--iters", type=int, default=10, help="forwards per model per round")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="a torch._inductor.config setting for every model (repeatable)")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" /
                                        "tome_compiled_versions"))
    args = p.parse_args(argv)
    versions = []
    for item in args.versions:
        label, sep, root = item.partition("=")
        if not sep or not (Path(root) / "leanvit" / "ops" / "merge.py").is_file():
            p.error(f"expected LABEL=CHECKOUT with leanvit/ops/merge.py in it, got {item!r}")
        versions.append((label, Path(root).resolve()))
    if len(versions) < 2 or len({v[0] for v in versions}) != len(versions):
        p.error("give at least two versions with distinct labels")

    import torch

    import leanvit
    from leanvit._files import atomic_write_text
    from leanvit.bench import environment
    from leanvit.macs import count_macs
    from leanvit.models import create_model, input_size
    from leanvit.patching import ATTR

    apply_inductor_settings(p, args.inductor)

    t_start = time.time()
    torch.manual_seed(0)
    dense = create_model(args.model).eval()
    h, w = input_size(dense)
    x = torch.randn(args.batch_size, 3, h, w)
    models = {"dense": dense}
    for label, root in versions:
        model = leanvit.patch(copy.deepcopy(dense), "tome", r=args.r).eval()
        reducer = getattr(model, ATTR)
        reducer.after_attention = types.MethodType(
            _version_tome(label, root).after_attention, reducer)
        models[label] = model
    mac_ratio = count_macs(dense, x[:1]).gmacs / count_macs(models[versions[0][0]], x[:1]).gmacs
    runners = {k: torch.compile(m) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in runners}
    with torch.inference_mode():
        outs = {k: f(x) for k, f in runners.items()}
        first = versions[0][0]
        max_diff = {k: float((outs[k] - outs[first]).abs().max()) for k, _ in versions[1:]}
        for rnd in range(args.warmup + args.rounds):
            order = list(runners) if rnd % 2 == 0 else list(runners)[::-1]
            for k in order:
                t = time.perf_counter()
                for _ in range(args.iters):
                    runners[k](x)
                if rnd >= args.warmup:
                    times[k].append((time.perf_counter() - t) / args.iters)
    dense_ms = 1e3 * statistics.median(times["dense"])
    rows = []
    for label, root in versions:
        per_round = [a / b for a, b in zip(times[first], times[label])]
        speedups = [a / b for a, b in zip(times["dense"], times[label])]
        speedup = statistics.median(times["dense"]) / statistics.median(times[label])
        rows.append({"version": label, "checkout": str(root),
                     "ms": 1e3 * statistics.median(times[label]), "dense_ms": dense_ms,
                     "speedup": speedup, "speedup_min": min(speedups),
                     "speedup_max": max(speedups), "speedup_over_mac_ratio": speedup / mac_ratio,
                     "vs_first": statistics.median(per_round), "vs_first_min": min(per_round),
                     "vs_first_max": max(per_round),
                     "max_abs_logit_diff_vs_first": max_diff.get(label, 0.0)})
    summary = {"model": args.model, "r": args.r, "batch_size": args.batch_size,
               "inductor": args.inductor, "mac_ratio": mac_ratio, "rounds": args.rounds,
               "iters": args.iters, "minutes": (time.time() - t_start) / 60,
               "command": "python benchmarks/tome_compiled_versions.py " + " ".join(
                   sys.argv[1:] if argv is None else argv),
               "load_after": Path("/proc/loadavg").read_text().split()[:3]
               if Path("/proc/loadavg").exists() else None,
               "environment": environment(torch.device("cpu")), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), _markdown(summary))
    print(_markdown(summary))
    return 0


def _markdown(s: dict) -> str:
    env = s["environment"]
    first = s["rows"][0]["version"]
    lines = [f"# Compiled ToMe r={s['r']}, two code versions in one process ({s['model']}, "
             f"batch {s['batch_size']}, fp32 CPU)", "",
             f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}. Inductor "
             f"settings: {', '.join(s['inductor']) or 'default'}. Command: `{s['command']}` "
             f"({s['minutes']:.0f} min; load average after {s['load_after']}). Medians over "
             f"{s['rounds']} interleaved rounds of {s['iters']} forwards; MAC ratio "
             f"{s['mac_ratio']:.3f}x.", "",
             f"| version | ms (dense) | speedup [per-round range] | speedup / MAC ratio | "
             f"{first} time / this time [range] | max abs logit diff vs {first} |",
             "|---|---|---|---|---|---|"]
    for r in s["rows"]:
        lines.append(
            f"| {r['version']} | {r['ms']:.2f} ({r['dense_ms']:.2f}) | {r['speedup']:.3f}x "
            f"[{r['speedup_min']:.3f}, {r['speedup_max']:.3f}] | {r['speedup_over_mac_ratio']:.3f} "
            f"| {r['vs_first']:.3f} [{r['vs_first_min']:.3f}, {r['vs_first_max']:.3f}] | "
            f"{r['max_abs_logit_diff_vs_first']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
