"""MACs and parameters of DeiT-T, DeiT-S, PVTv2-b1, NextViT-S: baseline vs hMHSA + cFFN.

Compacted = ``leanvit.compact(model)`` with the defaults (``ffn_ratio=2/3``, mix
hallucination) then ``leanvit.reparameterize`` (deploy form), also attention-only and
FFN-only. MACs per 224x224 image counted by ``leanvit.macs.traced_macs``
(``torch.utils.flop_counter``, MACs = FLOPs / 2, for all four) and by ``leanvit.count_macs``
(the ViT adapter's own accounting, DeiT only); weights are random (counts do not depend on
them). Paper (arXiv 2306.10875): 10-20% fewer FLOPs and parameters; PVTv2-b1 -13.2% params,
-15.2% FLOPs; NextViT-S -13.9% params, -11.5% FLOPs.

    flock /tmp/leanvit-cpu.lock python benchmarks/compaction_macs.py --out benchmarks/results/compaction_macs.json
"""
from __future__ import annotations

import argparse

import timm
import torch
from _common import write_results

import leanvit
from leanvit.macs import traced_macs

MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "pvt_v2_b1", "nextvit_small")
VARIANTS = {"baseline": None, "hMHSA": dict(ffn=None), "cFFN": dict(attention=None),
            "hMHSA+cFFN": dict()}


def measure(name: str, x: torch.Tensor, hallucination: str, ffn_ratio: float) -> dict:
    rows = {}
    for variant, opts in VARIANTS.items():
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        if opts is not None:
            leanvit.compact(model, hallucination=hallucination, ffn_ratio=ffn_ratio, **opts)
            if opts.get("ffn", "compact") is not None:
                leanvit.reparameterize(model)
        row = {"params": sum(p.numel() for p in model.parameters()),
               "macs_traced": traced_macs(model, x)}
        if name.startswith("deit"):
            row["macs_count"] = leanvit.count_macs(model, x).total
        rows[variant] = row
    base = rows["baseline"]
    for row in rows.values():
        row["params_change"] = row["params"] / base["params"] - 1
        row["macs_change"] = row["macs_traced"] / base["macs_traced"] - 1
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--hallucination", default="mix", choices=("mix", "dwconv"))
    ap.add_argument("--ffn-ratio", type=float, default=2 / 3,
                    help="cFFN rank as a fraction of the width (paper's t = 2/3)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    x = torch.randn(1, 3, 224, 224)
    results = {}
    print(f"{'model':24} {'variant':11} {'params M':>9} {'dParams':>8} {'GMACs':>7} {'dMACs':>7}"
          f" {'count_macs G':>12}")
    for name in args.models:
        results[name] = measure(name, x, args.hallucination, args.ffn_ratio)
        for variant, r in results[name].items():
            cm = f"{r['macs_count'] / 1e9:12.4f}" if "macs_count" in r else f"{'':12}"
            print(f"{name:24} {variant:11} {r['params'] / 1e6:9.3f} {100 * r['params_change']:7.1f}%"
                  f" {r['macs_traced'] / 1e9:7.4f} {100 * r['macs_change']:6.1f}% {cm}", flush=True)
    if args.out:
        write_results(args.out, {"hallucination": args.hallucination,
                                 "ffn_ratio": args.ffn_ratio, "results": results})


if __name__ == "__main__":
    main()
