"""``count_macs`` against PyTorch's FLOP counter on the full-size timm ``Eva`` models
(EVA02-S, DINOv3-S, PE-Core-S), dense and with each token method on (issue 12).

Random weights (counts do not depend on them), batch 1, eval mode. The counter
(``torch.utils.flop_counter.FlopCounterMode``; MACs = FLOPs / 2) sees fused SDPA on CPU not at
all, so every attention module (blocks and PE-Core's attention pool) runs materialised
(``fused_attn = False``) while it counts; ``count_macs`` does not depend on that switch.
Acceptance: within 1%.

    flock /tmp/leanvit-cpu.lock python benchmarks/eva_macs.py \\
        --out benchmarks/results/eva_macs.json --md benchmarks/results/eva_macs.md
"""
from __future__ import annotations

import argparse
import json
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import leanvit

MODELS = ("eva02_small_patch14_224", "vit_small_patch16_dinov3", "vit_pe_core_small_patch16_384")
METHODS = {
    "dense": None,
    "tome r=13": ("tome", dict(r=13)),
    "evit 0.7": ("evit", dict(keep_rate=0.7)),
    "topk 0.7": ("topk", dict(keep_rate=0.7)),
    "ats": ("ats", dict()),
    "dynamicvit 0.7": ("dynamicvit", dict(keep_rate=0.7)),
    "diffrate": ("diffrate", None),  # a fixed prune/merge schedule, see _schedule
}


def _schedule(n0: int, depth: int) -> tuple[list[int], list[int]]:
    """A DiffRate schedule that removes ~6% of the tokens per block from block 1 on, a third of
    them by merging (not a searched one: MAC counting only)."""
    prune, merge, n = [n0], [n0], n0
    for _ in range(1, depth):
        p = n - max(1, n // 24)
        m = p - max(1, n // 48)
        prune.append(p)
        merge.append(m)
        n = m
    return prune, merge


def traced(model: torch.nn.Module, x: torch.Tensor) -> float:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    for p in model.parameters():
        p.requires_grad_(False)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]


def measure(name: str) -> list[dict]:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(0))
    n0 = model.patch_embed.num_patches + model.num_prefix_tokens
    rows = []
    for label, spec in METHODS.items():
        t0 = time.perf_counter()
        if spec is not None:
            method, opts = spec
            if method == "diffrate":
                opts = dict(schedule=_schedule(n0, len(model.blocks)))
            leanvit.patch(model, method, **opts)
        count = leanvit.count_macs(model, x).total
        counter = traced(model, x)
        if spec is not None:
            leanvit.unpatch(model)
        rows.append(dict(model=name, method=label, count_macs=count, flop_counter=counter,
                         rel_diff=count / counter - 1, seconds=round(time.perf_counter() - t0, 1)))
        print(f"{name:32s} {label:16s} count_macs {count / 1e9:8.4f} G  counter/2 "
              f"{counter / 1e9:8.4f} G  diff {100 * (count / counter - 1):+.4f}%", flush=True)
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["| model | method | count_macs (G) | FlopCounterMode / 2 (G) | difference |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['count_macs'] / 1e9:.4f} | "
                     f"{r['flop_counter'] / 1e9:.4f} | {100 * r['rel_diff']:+.4f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    ap.add_argument("--md", default=None, help="Markdown table file")
    args = ap.parse_args()
    rows = [r for name in args.models for r in measure(name)]
    worst = max(abs(r["rel_diff"]) for r in rows)
    print(f"largest difference {100 * worst:.4f}% (acceptance: 1%)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "timm": timm.__version__, "rows": rows}, f,
                      indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write("# count_macs vs FlopCounterMode / 2 on timm Eva models (batch 1, random "
                    "weights)\n\n`flock /tmp/leanvit-cpu.lock python benchmarks/eva_macs.py "
                    "--out benchmarks/results/eva_macs.json --md "
                    "benchmarks/results/eva_macs.md`\n\n")
            f.write(to_markdown(rows))
            f.write(f"\nLargest difference: {100 * worst:.4f}% (acceptance: within 1%).\n")


if __name__ == "__main__":
    main()
