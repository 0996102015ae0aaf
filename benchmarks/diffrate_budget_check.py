"""Does the DiffRate search do its job, and is its accuracy gap to the hand-set schedules real?

For each schedule at one MAC target (the hand-set schedules of DiffRate's space, refitted, and
searched schedule files of ``benchmarks/diffrate_budget.py``), on the real DINOv2 ViT-S/14 +
the results page's linear probe:

- the search's own objective on its 1000 train images (``distill-logits``: mean KL divergence
  of the probe's softmax on the patched model from the unpatched model's, what the searches
  of ``diffrate_budget.py --objective distill-logits`` minimise);
- top-1 on the page's 500 seeded val images (the acceptance set) and on ``--limit`` val images
  (default 1000, all of the page's val split: half the binomial noise of 500), with the
  binomial standard error.

Run it under the shared CPU lock, from the repository root (needs what
``diffrate_budget.py`` needs)::

    flock /tmp/leanvit-cpu.lock python benchmarks/diffrate_budget_check.py --target-gmacs 3.7 \\
        --schedules benchmarks/results/diffrate_budget_3.7_m3merge_schedule.json \\
        --out benchmarks/results/diffrate_budget_3.7_check.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from diffrate_budget import DATA, HEAD, MODEL, WEIGHTS, _accuracy, _tensors  # noqa: E402


def _kl(model, x, teacher_logp, batch: int = 50) -> float:
    """Mean KL(teacher || model) of the probe's softmax over ``x`` (batchmean, as the search)."""
    total = 0.0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            logp = model(x[i:i + batch]).log_softmax(-1)
            t = teacher_logp[i:i + batch]
            total += float((t.exp() * (t - logp)).sum())
    return total / len(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target-gmacs", type=float, default=3.7)
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--head", default=HEAD)
    ap.add_argument("--limit", type=int, default=1000, help="val images of the larger check")
    ap.add_argument("--images", type=int, default=1000, help="train images (the searches')")
    ap.add_argument("--schedules", nargs="*", default=[], help="searched schedule files")
    ap.add_argument("--tome-r", type=int, default=16, help="ToMe r at the same MACs, for scale")
    ap.add_argument("--only-schedules", action="store_true",
                    help="evaluate only --schedules (no hand-set, ToMe or unpatched rows)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import leanvit
    from leanvit.models import create_model
    from leanvit.schedule import HANDSET_KINDS, load_schedule
    from leanvit.search.diffrate import handset_schedule

    t0 = time.perf_counter()
    model = create_model(MODEL, img_size=224, checkpoint=WEIGHTS, head=args.head).eval()
    data = Path(args.data)
    vx, vy = _tensors(model, data, "val", args.limit, Path(f"results/tmp/val{args.limit}.pt"))
    px, py = _tensors(model, data, "val", 500, Path("results/tmp/val500.pt"))
    tx, _ = _tensors(model, data, "train", args.images, Path(f"results/tmp/train{args.images}.pt"))
    with torch.inference_mode():
        teacher = torch.cat([model(tx[i:i + 50]).log_softmax(-1) for i in range(0, len(tx), 50)])

    settings = [] if args.only_schedules else [
        (f"hand-set {k}", "diffrate", {"schedule": handset_schedule(model, k, args.target_gmacs)})
        for k in HANDSET_KINDS if k.startswith("merge")]
    settings += [(f"searched {Path(f).stem}", "diffrate", {"schedule": load_schedule(f)})
                 for f in args.schedules]
    if not args.only_schedules:
        settings += [(f"tome r={args.tome_r}", "tome", {"r": args.tome_r}),
                     ("unpatched", "none", {})]
    rows = []
    for label, method, options in settings:
        m = leanvit.patch(copy.deepcopy(model), method, **options).eval()
        page = _accuracy(m, px, py)
        big = _accuracy(m, vx, vy)
        kl = _kl(m, tx, teacher) if method != "none" else 0.0
        row = {"setting": label, "gmacs": page["gmacs"], "train_kl": kl,
               "top1_500": page["top1"], "top1_big": big["top1"], "big_images": len(vx),
               "se_500": 100 * math.sqrt(page["top1"] / 100 * (1 - page["top1"] / 100) / 500),
               "se_big": 100 * math.sqrt(big["top1"] / 100 * (1 - big["top1"] / 100) / len(vx))}
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = Path(args.out)
    summary = {"model": MODEL, "target_gmacs": args.target_gmacs, "rows": rows,
               "seconds": round(time.perf_counter() - t0, 1),
               "command": "python benchmarks/diffrate_budget_check.py " + " ".join(sys.argv[1:])}
    out.write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"| setting | GMACs | train KL (search objective) | top-1 500 val (%) | "
             f"top-1 {len(vx)} val (%) |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['gmacs']:.3f} | {r['train_kl']:.4f} | "
                     f"{r['top1_500']:.1f} ± {r['se_500']:.1f} | {r['top1_big']:.1f} ± "
                     f"{r['se_big']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
