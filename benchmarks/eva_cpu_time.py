"""Single-thread CPU time of EVA02-S dense vs ToMe / EViT: a contention-robust check of the
implementation's overhead (``docs/eva.md``), beside the wall-clock ``leanvit bench``.

On a shared 2-core machine the wall-clock speedup of ``leanvit bench`` swings with the other
jobs. This measures each model's forward with ONE torch thread by the process's own CPU time
(``time.process_time``), which other processes barely change, dense and patched interleaved,
minimum of ``--rounds``. It is a diagnostic of the token methods' overhead on Eva (speedup per
MAC ratio), not the batch-64 two-thread acceptance measurement.

    python benchmarks/eva_cpu_time.py --batch-size 8 --rounds 3
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import timm
import torch

import leanvit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="eva02_small_patch14_224")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    x = torch.randn(args.batch_size, 3, *model.patch_embed.img_size)
    models = {"dense": model}
    for method, opts in (("tome", dict(r=13)), ("evit", dict(keep_rate=0.7))):
        models[method] = leanvit.patch(copy.deepcopy(model), method, **opts)
    macs = {k: leanvit.count_macs(m, x[:1]).total for k, m in models.items()}
    seconds = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m(x)  # warm-up
        for _ in range(args.rounds):
            for k, m in models.items():
                t0 = time.process_time()
                m(x)
                seconds[k].append(time.process_time() - t0)
    rows = {}
    for k in models:
        speedup = min(seconds["dense"]) / min(seconds[k])
        ratio = macs["dense"] / macs[k]
        rows[k] = dict(cpu_seconds=seconds[k], gmacs=macs[k] / 1e9, speedup=speedup,
                       mac_ratio=ratio, speedup_per_mac_ratio=speedup / ratio)
        print(f"{k:6s} cpu s {[round(s, 3) for s in seconds[k]]}  speedup {speedup:.3f}  "
              f"MAC ratio {ratio:.3f}  speedup / MAC ratio {speedup / ratio:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, batch_size=args.batch_size, threads=1,
                           torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
