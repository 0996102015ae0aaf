"""GPU benchmark: the unmodified model against every method at batch 1, 64 and 256, bf16,
eager and compiled, in the same run, with the MAC ratio and peak memory (issue 16).

On a CUDA machine::

    python benchmarks/gpu.py                      # DeiT-S, about 15 minutes on one GPU

writes ``benchmarks/results/gpu_<device>.md`` (and ``.json``), ``<device>`` the CUDA device
name in lower case (``gpu_nvidia_h200.md``). Without CUDA it says so and exits 0.

Protocol, per (mode, batch size, method): the dense model and the patched one (same weights,
``model.to(device, bfloat16)``, eval, ``torch.inference_mode``) are timed in interleaved rounds
by :func:`leanvit.bench.time_models` (warm-up, then ``--repeats`` rounds with the order
alternating, CUDA synchronised around each); the speedup is the median dense time over the
median method time, the spread the lowest and highest per-round ratio. ``compiled`` =
``torch.compile(model, mode=--compile-mode)``; the default ``reduce-overhead`` captures the
forward in CUDA graphs, which the fixed-rate methods allow (one graph, no host sync; ATS and
its per-image counts recompile or fall back). Peak memory: ``torch.cuda.max_memory_allocated``
of one forward after ``reset_peak_memory_stats``, weights included. MACs are counted once per
method on fp32 copies (they do not depend on the dtype); ATS's depend on the images (random
here). DynamicViT runs with untrained predictors (its speed does not depend on them: the
kept counts are fixed in eval mode). An entry that fails (out of memory at batch 256, a
compile error) is recorded with its error and the run goes on.

``--device cpu --dry-run`` runs the same code on a tiny model on the CPU (batch 1 and 2, one
round, the compile backend ``eager``): it checks the script's logic where no GPU is; its
timings mean nothing.
"""
from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also when loaded by path
from _common import RESULTS, command, md_table, resolve, write_results  # noqa: E402

MODEL = "deit_small_patch16_224"

#: (label, method, options) on DeiT-S: every registered method at the settings of the CPU
#: results (token_reduction.md, token_reduction_new_methods.md, ats.md, dynamicvit.md,
#: diffrate.md); diffrate's schedule is the authors' 2.9 GMACs one
METHODS = [
    ("evit 0.7", "evit", {"keep_rate": 0.7}),
    ("topk 0.7", "topk", {"keep_rate": 0.7}),
    ("tome r=13", "tome", {"r": 13}),
    ("ats", "ats", {}),
    ("diffrate 2.9G", "diffrate", {"schedule": "authors:ViT-S-DeiT:2.9"}),
    ("dynamicvit 0.7", "dynamicvit", {"keep_rate": 0.7}),
    ("pitome r=13", "pitome", {"r": 13}),
    ("mctf r=16", "mctf", {"r": 16}),
    ("tofu r=13", "tofu", {"r": 13}),
    ("zerotprune r=11", "zerotprune", {"r": 11}),
    ("divprune 0.7", "divprune", {"keep_rate": 0.7}),
]
#: the dry run's tiny model (4 blocks, 16 patches) and its methods' settings
DRY_MODEL = ("deit_tiny_patch16_224", dict(depth=4, img_size=64))
DRY_METHODS = [
    ("evit 0.7", "evit", {"keep_rate": 0.7}),
    ("topk 0.7", "topk", {"keep_rate": 0.7}),
    ("tome r=2", "tome", {"r": 2}),
    ("ats", "ats", {}),
    ("diffrate", "diffrate", {"schedule": ([17, 15, 13, 11], [15, 13, 11, 9])}),
    ("dynamicvit 0.7", "dynamicvit", {"keep_rate": 0.7, "locations": (1, 2, 3)}),
    ("pitome r=2", "pitome", {"r": 2}),
    ("mctf r=2", "mctf", {"r": 2}),
    ("tofu r=2", "tofu", {"r": 2}),
    ("zerotprune r=2", "zerotprune", {"r": 2}),
    ("divprune 0.7", "divprune", {"keep_rate": 0.7}),
]


def device_slug(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia_h200"`` (the results file's ``<device>``)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unknown"


def _peak_mb(model, x, device) -> Optional[float]:
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        model(x)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All measurements; returns the summary written to the results files."""
    import torch

    import leanvit
    from leanvit.bench import DTYPES, environment, time_models
    from leanvit.models import input_size

    import timm

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.dry_run:
        name, kw = DRY_MODEL
        methods = DRY_METHODS
    else:
        name, kw = args.model, {}
        methods = METHODS
    if args.methods:
        methods = [m for m in methods if m[0] in args.methods or m[1] in args.methods]
    torch.manual_seed(0)
    dense = timm.create_model(name, **kw).eval()
    h, w = input_size(dense)
    probe = torch.randn(4, 3, h, w)

    # MACs and the patched models, built once (fp32, CPU), then cast and moved
    built: dict[str, Any] = {}
    gmacs = {"dense": leanvit.count_macs(dense, probe).gmacs}
    errors: dict[str, str] = {}
    for label, method, options in methods:
        try:
            m = leanvit.patch(copy.deepcopy(dense), method, **resolve(options)).eval()
            gmacs[label] = leanvit.count_macs(m, probe).gmacs
            built[label] = m
        except Exception as e:  # recorded, the run goes on
            errors[label] = f"{type(e).__name__}: {e}".splitlines()[0]
    dense = dense.to(device, dtype)
    built = {k: m.to(device, dtype) for k, m in built.items()}

    rows: list[dict[str, Any]] = []
    for mode in args.modes:
        for b in args.batch_sizes:
            torch.manual_seed(1)
            x = torch.randn(b, 3, h, w, device=device, dtype=dtype)
            iters = args.iters if b == 1 else 1
            base = dense
            if mode == "compiled":
                torch._dynamo.reset()
                base = _compile(dense, args)
            try:
                base_mem = _peak_mb(base, x, device)
            except Exception as e:
                base_mem = None
                errors[f"dense {mode} {b}"] = f"{type(e).__name__}: {e}".splitlines()[0]
            for label, method, _ in methods:
                row: dict[str, Any] = {"mode": mode, "batch_size": b, "method": label,
                                       "name": method, "gmacs": gmacs.get(label),
                                       "base_gmacs": gmacs["dense"]}
                if label not in built:
                    row["error"] = errors[label]
                    rows.append(row)
                    continue
                row["mac_ratio"] = gmacs["dense"] / gmacs[label]
                print(f"[{mode} batch {b}] dense vs {label}", file=sys.stderr, flush=True)
                try:
                    cand = _compile(built[label], args) if mode == "compiled" else built[label]
                    t = time_models(base, cand, x, warmup=args.warmup, repeats=args.repeats,
                                    iters=iters)
                    bt, ct = t["baseline"], t["candidate"]
                    ratios = [p / q for p, q in zip(bt, ct)]
                    row.update(
                        speedup=statistics.median(bt) / statistics.median(ct),
                        round_ratio_min=min(ratios), round_ratio_max=max(ratios),
                        ms=1e3 * statistics.median(ct), base_ms=1e3 * statistics.median(bt),
                        peak_mb=_peak_mb(cand, x, device), base_peak_mb=base_mem)
                    row["speedup_over_mac_ratio"] = row["speedup"] / row["mac_ratio"]
                except Exception as e:  # e.g. out of memory at batch 256: recorded
                    row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                    if args.verbose:
                        traceback.print_exc()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
    env = environment(device)
    return {"model": name, "model_kwargs": kw, "dtype": args.dtype, "device": str(device),
            "device_name": env["device_name"], "dry_run": args.dry_run,
            "compile_mode": args.compile_mode, "compile_backend": args.compile_backend,
            "repeats": args.repeats, "iters_batch1": args.iters, "environment": env,
            "errors": errors, "rows": rows}


def _compile(model, args):
    import torch

    kw: dict[str, Any] = {"backend": args.compile_backend}
    if args.compile_backend == "inductor" and args.compile_mode != "default":
        kw["mode"] = args.compile_mode
    return torch.compile(model, **kw)


def markdown(s: dict[str, Any], command: str) -> str:
    env = s["environment"]
    title = "DRY RUN (CPU, tiny model; timings mean nothing)" if s["dry_run"] else \
        f"{s['model']}, {s['dtype']}"
    lines = [f"# GPU benchmark: {title} on {s['device_name']}", "",
             f"torch {env['torch']}, timm {env['timm']}, leanvit {env['leanvit']}. Command: "
             f"`{command}` ({s['minutes']:.0f} min). Compiled = `torch.compile` backend "
             f"{s['compile_backend']}, mode {s['compile_mode']}.", "",
             f"Speedup = median dense time / median method time over {s['repeats']} "
             f"interleaved rounds ({s['iters_batch1']} forwards per round at batch 1); spread "
             "= lowest and highest per-round ratio. Peak memory = "
             "`torch.cuda.max_memory_allocated` of one forward (weights included).", ""]

    def mb(v):
        return "n/a" if v is None else f"{v:.0f}"

    cells = []
    for r in s["rows"]:
        row = [r["mode"], r["batch_size"], r["method"], f"{r.get('mac_ratio', float('nan')):.3f}x"]
        if "error" in r:
            cells.append(row + [f"failed: {r['error']}", "", "", "", ""])
            continue
        cells.append(row + [f"{r['speedup']:.3f}x",
                            f"{r['round_ratio_min']:.2f}-{r['round_ratio_max']:.2f}",
                            f"{r['speedup_over_mac_ratio']:.2f}",
                            f"{r['ms']:.2f} ({r['base_ms']:.2f})",
                            f"{mb(r['peak_mb'])} ({mb(r['base_peak_mb'])})"])
    lines.append(md_table(["mode", "batch", "method", "MAC ratio", "speedup", "spread",
                           "speedup / MAC ratio", "ms (dense)", "peak MB (dense)"], cells))
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with "
                   "--dry-run")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny model, batch 1 and 2, one round, eager compile backend: checks "
                        "the script's logic (on CPU too); timings mean nothing")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--methods", nargs="*", default=None, metavar="LABEL",
                   help="subset (labels or method names): " + ", ".join(m[0] for m in METHODS))
    p.add_argument("--batch-sizes", default="1,64,256")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode (default reduce-overhead: CUDA graphs)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20, help="forwards per round at batch 1")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed entries")
    args = p.parse_args(argv)
    if args.dry_run:
        if "--batch-sizes" not in (argv if argv is not None else sys.argv):
            args.batch_sizes = "1,2"
        args.repeats, args.warmup, args.iters = 1, 1, 1
        args.compile_backend = "eager"
    try:
        args.batch_sizes = [int(v) for v in str(args.batch_sizes).split(",") if v]
    except ValueError:
        p.error(f"--batch-sizes takes comma-separated ints, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch-sizes must be positive ints")
    args.modes = [m for m in args.modes.split(",") if m]
    if not set(args.modes) <= {"eager", "compiled"} or not args.modes:
        p.error(f"--modes takes eager and/or compiled, got {args.modes!r}")
    for k in ("repeats", "warmup", "iters"):
        if getattr(args, k) < (0 if k == "warmup" else 1):
            p.error(f"--{k} must be positive")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/gpu.py: CUDA is not available on this machine; nothing to measure "
              "(run it on a machine with an NVIDIA GPU, or `--device cpu --dry-run` to check "
              "the script).")
        return 0
    if args.device == "cpu" and not args.dry_run:
        print("benchmarks/gpu.py: --device cpu only with --dry-run (CPU timings: "
              "benchmarks/batch1.py and benchmarks/token_reduction.py)", file=sys.stderr)
        return 2
    t0 = time.time()
    summary = run(args)
    summary["minutes"] = (time.time() - t0) / 60
    summary["command"] = cmd = command("gpu.py", argv)
    slug = device_slug(summary["device_name"] if args.device != "cpu" else "cpu")
    out = Path(args.out_dir) / f"gpu_{slug}"
    text = markdown(summary, cmd)
    write_results(out, summary, text)
    print(text)
    print(f"wrote {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
