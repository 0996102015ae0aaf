"""Where batch-1 time goes, compiled, dense against a token method (issue 16's 0.9 x MAC
ratio): per forward, the time of the matrix products (``aten::addmm``: every nn.Linear), of
the attention kernel (SDPA) and of everything else, from ``torch.profiler``, each beside the
ratio of the MACs it does.

A method cannot beat its MAC ratio by more than the kernels allow: when the linear layers
alone, which hold ~90% of the MACs, run at a fraction ``f`` of their own MAC ratio on the
smaller token counts, the whole forward stays near ``f`` however cheap the method's own work
is. Model DeiT-S, fp32, CPU, ``torch.compile`` (inductor, default mode), batch 1, random
weights (fixed-rate methods do the same work whatever the weights).

Run under the shared CPU lock::

    flock /tmp/leanvit-cpu.lock python benchmarks/batch1_profile.py

Writes ``benchmarks/results/batch1_profile_cpu.{json,md}`` (``--out``).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from leanvit._files import atomic_write_text

MODEL = "deit_small_patch16_224"
#: (label, method, options)
METHODS = [("tome r=13", "tome", {"r": 13}), ("evit 0.7", "evit", {"keep_rate": 0.7})]


def _profile(fn, x, iters: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as p:
        t = time.perf_counter()
        for _ in range(iters):
            fn(x)
        wall = (time.perf_counter() - t) / iters
    ev = {e.key: e.self_cpu_time_total / 1e3 / iters for e in p.key_averages()}
    addmm = ev.get("aten::addmm", 0.0) + ev.get("aten::mm", 0.0)
    sdpa = sum(v for k, v in ev.items() if "scaled_dot_product" in k)
    return {"wall_ms": 1e3 * wall, "addmm_ms": addmm, "sdpa_ms": sdpa,
            "other_ms": 1e3 * wall - addmm - sdpa}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" /
                                        "batch1_profile_cpu"))
    args = p.parse_args(argv)

    import leanvit
    from leanvit.models import create_model

    torch.manual_seed(0)
    dense = create_model(MODEL).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    models = {"dense": dense}
    for label, method, options in METHODS:
        models[label] = leanvit.patch(copy.deepcopy(dense), method, **options).eval()
    # per-image MACs in all, and of the linear layers alone: 4 C^2 (q, k, v, proj) per token
    # entering a block, 8 C^2 (MLP) per token leaving it
    C = dense.blocks[0].attn.qkv.in_features
    reports = {k: leanvit.count_macs(m, x) for k, m in models.items()}
    gm = {k: r.gmacs for k, r in reports.items()}
    lin = {k: sum(float(b.tokens_in) * 4 * C * C + float(b.tokens_out) * 8 * C * C
                  for b in r.per_block) for k, r in reports.items()}
    comp = {k: torch.compile(m) for k, m in models.items()}
    with torch.inference_mode():
        for f in comp.values():
            for _ in range(3):
                f(x)
    prof = {k: _profile(f, x, args.iters) for k, f in comp.items()}
    d = prof["dense"]
    rows = []
    for k in models:
        if k == "dense":
            continue
        q = prof[k]
        rows.append({"method": k, "mac_ratio": gm["dense"] / gm[k],
                     "linear_mac_ratio": lin["dense"] / lin[k],
                     "wall_ratio": d["wall_ms"] / q["wall_ms"],
                     "addmm_ratio": d["addmm_ms"] / q["addmm_ms"],
                     "sdpa_ratio": d["sdpa_ms"] / q["sdpa_ms"], **q})
    out = Path(args.out)
    summary = {"model": MODEL, "batch_size": 1, "iters": args.iters,
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "dense": d, "rows": rows,
               "loadavg": Path("/proc/loadavg").read_text().split()[:3],
               "command": "python benchmarks/batch1_profile.py " + " ".join(
                   sys.argv[1:] if argv is None else argv)}
    atomic_write_text(out.with_suffix(".json"), json.dumps(summary, indent=1) + "\n")
    lines = [f"# Where batch-1 time goes: {MODEL}, fp32, CPU, compiled, {args.iters} profiled "
             f"forwards, {summary['threads']} threads (load average {' '.join(summary['loadavg'])})",
             "", f"Command: `{summary['command']}`", "",
             f"Dense: {d['wall_ms']:.1f} ms per forward = linear (addmm) {d['addmm_ms']:.1f} + "
             f"SDPA {d['sdpa_ms']:.1f} + other {d['other_ms']:.1f}.", "",
             "| method | ms (addmm / SDPA / other) | speedup (MAC ratio) | speedup / MAC ratio | "
             "linear: time ratio / MAC ratio |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['wall_ms']:.1f} ({r['addmm_ms']:.1f} / "
                     f"{r['sdpa_ms']:.1f} / {r['other_ms']:.1f}) | {r['wall_ratio']:.3f}x "
                     f"({r['mac_ratio']:.3f}x) | {r['wall_ratio'] / r['mac_ratio']:.2f} | "
                     f"{r['addmm_ratio']:.3f} / {r['linear_mac_ratio']:.3f} = "
                     f"**{r['addmm_ratio'] / r['linear_mac_ratio']:.2f}** |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
