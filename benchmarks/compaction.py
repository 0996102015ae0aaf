"""Throughput of DeiT-S compacted (hMHSA + cFFN, reparameterized) vs the plain model.

Same run, same input, back to back (``leanvit.bench.time_models``): batch 64, fp32, CPU,
``torch.inference_mode``; speedup = candidate images/s over baseline images/s; MAC ratio =
baseline MACs over candidate MACs (``leanvit.count_macs``). Variants: hMHSA only (mix and
dwconv), cFFN only, both. The paper never measured speed ("throughput depends on hardware"):
this does, on the machine it runs on.

    flock /tmp/leanvit-cpu.lock python benchmarks/compaction.py --out results.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics

import timm
import torch

import leanvit
from leanvit.bench import environment, time_models

VARIANTS = {
    "hMHSA mix": dict(ffn=None, hallucination="mix"),
    "hMHSA dwconv": dict(ffn=None, hallucination="dwconv"),
    "cFFN": dict(attention=None),
    "hMHSA mix + cFFN": dict(hallucination="mix"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = timm.create_model(args.model).eval()
    x = torch.randn(args.batch_size, 3, 224, 224)
    macs_base = leanvit.count_macs(base, x[:2]).total
    results = {"config": vars(args), "environment": environment(torch.device("cpu")),
               "baseline_gmacs": macs_base / 1e9, "variants": {}}
    print(f"{args.model} batch {args.batch_size} fp32 CPU, {torch.get_num_threads()} threads; "
          f"baseline {macs_base / 1e9:.3f} GMACs")
    print(f"{'variant':18} {'GMACs':>7} {'MAC ratio':>9} {'base ms':>8} {'cand ms':>8} "
          f"{'speedup':>8}")
    for name in args.variants:
        cand = leanvit.compact(copy.deepcopy(base), **VARIANTS[name])
        if VARIANTS[name].get("ffn", "compact") is not None:
            leanvit.reparameterize(cand)
        cand.eval()
        macs = leanvit.count_macs(cand, x[:2]).total
        t = time_models(base, cand, x, warmup=args.warmup, repeats=args.repeats)
        mb, mc = statistics.median(t["baseline"]), statistics.median(t["candidate"])
        r = {"gmacs": macs / 1e9, "mac_ratio": macs_base / macs, "baseline_ms": mb * 1e3,
             "candidate_ms": mc * 1e3, "speedup": mb / mc,
             "baseline_round_ms": [v * 1e3 for v in t["baseline"]],
             "candidate_round_ms": [v * 1e3 for v in t["candidate"]]}
        results["variants"][name] = r
        print(f"{name:18} {r['gmacs']:7.3f} {r['mac_ratio']:9.3f} {r['baseline_ms']:8.0f} "
              f"{r['candidate_ms']:8.0f} {r['speedup']:8.3f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
