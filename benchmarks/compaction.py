"""Throughput of DeiT-S compacted (hMHSA + cFFN, reparameterized) vs the plain model.

Same run, same input, back to back (``leanvit.bench.time_models``): batch 64, fp32, CPU,
``torch.inference_mode``; speedup = candidate images/s over baseline images/s; MAC ratio =
baseline MACs over candidate MACs (``leanvit.count_macs``). Variants: hMHSA only (mix; dwconv
with ``--variants``), cFFN only, both, and the plain model with timm's fused attention turned
off (``fused_attn=False``: maps materialised, as hMHSA must) to separate the cost of leaving
the fused SDPA kernel from hMHSA's own saving. ``--modules``: the same timing for one block's
attention and MLP alone (``[64, 197, 384]`` tokens), where the MAC savings are.

The paper never measured speed ("throughput depends on hardware"): this does, on the machine
it runs on. The load average before and after is recorded (a clean run has ~2 or less on the
2-core machine: nothing else running).

    flock /tmp/leanvit-cpu.lock python benchmarks/compaction.py --modules
    # -> benchmarks/results/compaction_speed.json
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics

import timm
import torch
from _common import RESULTS, loadavg, write_results

import leanvit
from leanvit.bench import environment, time_models

VARIANTS = {
    "plain, unfused attention": None,
    "hMHSA mix": dict(ffn=None, hallucination="mix"),
    "hMHSA dwconv": dict(ffn=None, hallucination="dwconv"),
    "cFFN": dict(attention=None),
    "hMHSA mix + cFFN": dict(hallucination="mix"),
}
DEFAULT = ["plain, unfused attention", "hMHSA mix", "cFFN", "hMHSA mix + cFFN"]
OUT = RESULTS / "compaction_speed.json"


def _unfused(model):
    for blk in model.blocks:
        blk.attn.fused_attn = False
    return model


def _median_ratio(t) -> tuple[float, float, float]:
    mb, mc = statistics.median(t["baseline"]), statistics.median(t["candidate"])
    return mb, mc, mb / mc


def _modules(base, batch: int, warmup: int, repeats: int) -> dict:
    """One block's attention and MLP alone: plain (fused / unfused) vs hMHSA / cFFN."""
    blk = base.blocks[0]
    x = torch.randn(batch, 197, blk.attn.qkv.in_features)
    comp = leanvit.reparameterize(leanvit.compact(copy.deepcopy(base))).eval()
    cblk = comp.blocks[0]
    unfused = copy.deepcopy(blk.attn)
    unfused.fused_attn = False
    pairs = {
        "attention: plain fused vs hMHSA": (blk.attn, cblk.attn),
        "attention: plain unfused vs hMHSA": (unfused, cblk.attn),
        "attention: plain fused vs plain unfused": (blk.attn, unfused),
        "mlp: plain vs cFFN": (blk.mlp, cblk.mlp),
        "fc2: plain vs cFFN factors": (blk.mlp.fc2, cblk.mlp.fc2),
    }
    h = blk.mlp.fc1.out_features
    inputs = {"fc2: plain vs cFFN factors": torch.randn(batch, 197, h)}
    out = {}
    for name, (a, b) in pairs.items():
        t = time_models(a, b, inputs.get(name, x), warmup=warmup, repeats=repeats)
        mb, mc, sp = _median_ratio(t)
        out[name] = {"baseline_ms": mb * 1e3, "candidate_ms": mc * 1e3, "speedup": sp}
        print(f"  {name:40} {mb * 1e3:8.1f} {mc * 1e3:8.1f} ms  speedup {sp:.3f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS))
    ap.add_argument("--modules", action="store_true", help="also time attention/MLP alone")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    base = timm.create_model(args.model).eval()
    x = torch.randn(args.batch_size, 3, 224, 224)
    macs_base = leanvit.count_macs(base, x[:2]).total
    results = {"config": vars(args), "environment": environment(torch.device("cpu")),
               "load_average_before": loadavg(),
               "baseline_gmacs": macs_base / 1e9, "variants": {}}
    print(f"{args.model} batch {args.batch_size} fp32 CPU, {torch.get_num_threads()} threads; "
          f"baseline {macs_base / 1e9:.3f} GMACs")
    print(f"{'variant':18} {'GMACs':>7} {'MAC ratio':>9} {'base ms':>8} {'cand ms':>8} "
          f"{'speedup':>8}")
    for name in args.variants:
        if VARIANTS[name] is None:
            cand = _unfused(copy.deepcopy(base))
        else:
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
    if args.modules:
        print("modules (one block, batch x 197 tokens):")
        results["modules"] = _modules(base, args.batch_size, args.warmup, args.repeats)
    results["load_average_after"] = loadavg()
    results["command"] = ("flock /tmp/leanvit-cpu.lock python benchmarks/compaction.py"
                          + (" --modules" if args.modules else ""))
    write_results(args.out, results)


if __name__ == "__main__":
    main()
