"""``leanvit.count_macs`` against PyTorch's FLOP counter on full-size models (issue 12).

For each model, dense and with a token method on where one applies: ``count_macs`` (leanvit's
formulas from the token counts each block saw) and ``FlopCounterMode`` total / 2 (every
matrix product and convolution that ran, at the ``aten`` level), per image, batch 1, random
weights (counts do not depend on them). Attention is materialised for the counter
(``fused_attn = False`` on every module that has it): on CPU the counter does not see fused
SDPA, while ``count_macs`` counts the attention products either way. The models:

- ``beit_base_patch16_224`` (relative position bias): dense, ToMe r=13, EViT 0.7;
- ``vit_base_patch16_siglip_224`` (attention-pool head, ``global_pool='map'``): dense, ToMe
  r=13 (the pool then sees fewer tokens);
- ``pvt_v2_b1`` and ``nextvit_small`` compacted (``leanvit.compact`` + ``reparameterize``,
  hMHSA + cFFN, the deploy form) and dense; no token method runs on them.

    flock /tmp/leanvit-cpu.lock python benchmarks/macs_flop_counter.py \
        --out benchmarks/results/macs_flop_counter.md
"""
from __future__ import annotations

import argparse
import json
import os
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import leanvit

#: model -> [(setting, method, options)]; "compact" = leanvit.compact + reparameterize, after
#: the dense row (one model each, patched / compacted in turn: weights are created once)
CASES = {
    "beit_base_patch16_224": [("dense", "none", {}), ("tome r=13", "tome", {"r": 13}),
                              ("evit 0.7", "evit", {"keep_rate": 0.7})],
    "vit_base_patch16_siglip_224": [("dense", "none", {}), ("tome r=13", "tome", {"r": 13})],
    "pvt_v2_b1": [("dense", None, {}), ("compacted", "compact", {})],
    "nextvit_small": [("dense", None, {}), ("compacted", "compact", {})],
}


def flop_counter_macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    """FlopCounterMode total / 2 per image (the model as it is: patched or not)."""
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]


def materialise(model: torch.nn.Module) -> None:
    """Explicit attention everywhere (the counter does not see CPU fused SDPA) and no
    gradients (AttentionPoolLatent trips the counter's module tracker under no_grad)."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    model.requires_grad_(False)


def measure(name: str, x: torch.Tensor) -> list[dict]:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    materialise(model)
    rows = []
    for setting, method, options in CASES[name]:
        t = time.perf_counter()
        if method == "compact":
            leanvit.compact(model)
            leanvit.reparameterize(model)
            materialise(model)
        elif method is not None:
            leanvit.patch(model, method, **options)
        ours = leanvit.count_macs(model, x).total
        ref = flop_counter_macs(model, x)
        if method not in (None, "compact"):
            leanvit.unpatch(model)
        rows.append({"model": name, "setting": setting, "count_macs": ours,
                     "flop_counter": ref, "rel_diff": ours / ref - 1,
                     "seconds": time.perf_counter() - t})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write a markdown table here (and .json)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    x = torch.randn(1, 3, 224, 224)
    load_before, start = os.getloadavg(), time.perf_counter()
    rows = []
    print(f"{'model':28} {'setting':11} {'count_macs G':>12} {'counter/2 G':>12} {'diff':>8}")
    for name in CASES:
        for r in measure(name, x):
            rows.append(r)
            print(f"{name:28} {r['setting']:11} {r['count_macs'] / 1e9:12.4f} "
                  f"{r['flop_counter'] / 1e9:12.4f} {100 * r['rel_diff']:7.3f}%", flush=True)
    load_after, seconds = os.getloadavg(), time.perf_counter() - start
    print(f"load average {load_before} -> {load_after}; {seconds:.0f} s")
    if args.out:
        lines = ["# count_macs vs torch.utils.flop_counter (issue 12)", "",
                 "Per image, 224x224, batch 1, random weights, attention materialised for the "
                 "counter. Reproduce:", "",
                 "    flock /tmp/leanvit-cpu.lock python benchmarks/macs_flop_counter.py "
                 f"--out {args.out}", "",
                 f"Load average (1, 5, 15 min) before {load_before}, after {load_after} "
                 f"(counts do not depend on load); {seconds:.0f} s.", "",
                 "| model | setting | count_macs GMACs | FlopCounterMode / 2 GMACs | difference |",
                 "| --- | --- | ---: | ---: | ---: |"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['setting']} | {r['count_macs'] / 1e9:.4f} | "
                         f"{r['flop_counter'] / 1e9:.4f} | {100 * r['rel_diff']:+.3f}% |")
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
