"""DiffRate at a MAC budget on the real DINOv2 ViT-S/14 + linear probe, Fashion-MNIST (the
results page's protocol, ``benchmarks/results_page.py``): hand-set schedules of DiffRate's own
space against searched ones, top-1 on the page's 500 seeded val images.

Hand-set schedules (:func:`leanvit.search.diffrate.handset_schedule`), each fitted to the target
by bisection on its one strength parameter:
- ``merge-uniform``: every block from 1 on merges the same number of tokens (no pruning);
- ``prune-uniform``: every block from 1 on prunes the same number of tokens;
- ``prune-3stage`` / ``merge-3stage``: EViT-like, blocks 3, 6, 9 each keep the same fraction.

Searches (:func:`leanvit.search.diffrate.search`) with the options given as ``NAME:key=value,...``
(e.g. ``warm:init=warm,lr=0.05`` or ``zero:init=zero``), each on the same 1000 training images
(seed 0), timed; the objective (``--objective``) distils the unpatched backbone's features (no
labels, the default), or the probe's logits, or trains on the probe's cross-entropy.

Heavy: run under the shared CPU lock, from the repository root::

    flock /tmp/leanvit-cpu.lock python benchmarks/diffrate_budget.py --target-gmacs 3.7 \\
        --handset --search 'warm:init=warm' --out benchmarks/results/diffrate_budget_3.7.json

The ``sort check`` row of ``results/diffrate_budget_3.7.json`` came from ``--sort-check 32``
(this script as of 31bb305: the exact alive-first sort against the old float key, by patching
library internals); the decision is taken and the option is gone.

Needs ``results/tmp/fmnist`` and the probe head of ``benchmarks/results_page.py`` (its first two
steps; ``leanvit data fashion-mnist`` + ``leanvit probe``).
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

import torch
from _common import dinov2, loadavg

#: the results page's data and probe head (benchmarks/results_page.py makes them)
DATA = "results/tmp/fmnist"
HEAD = "results/tmp/dinov2_vits14_fmnist_head.safetensors"


def _tensors(model, data: Path, split: str, limit: int, cache: Path, seed: int = 0):
    """``limit`` images of ``data/split`` (the fixed seeded subset of leanvit.data), decoded once
    and kept as tensors in ``cache``."""
    from leanvit.data import loader
    from leanvit.evaluate import load_split

    if cache.is_file():
        d = torch.load(cache)
        return d["x"], d["y"]
    ds = load_split(model, data, split, limit, seed=seed)
    xs, ys = zip(*loader(ds, 100))
    x, y = torch.cat(xs), torch.cat(ys)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "y": y}, cache)
    return x, y


def _accuracy(model, x, y, batch: int = 50) -> dict:
    from leanvit.evaluate import evaluate

    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]
    r = evaluate(model, batches, progress=False, throughput=False)
    return {"top1": r["top1"], "top5": r["top5"], "gmacs": r["gmacs"]}


def _evaluate_schedule(model, schedule, x, y) -> dict:
    import copy

    import leanvit

    m = leanvit.patch(copy.deepcopy(model), "diffrate", schedule=schedule).eval()
    return _accuracy(m, x, y)


def _parse_search(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        try:
            opts[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            opts[k] = v
    return name, opts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target-gmacs", type=float, default=3.7)
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--head", default=HEAD)
    ap.add_argument("--limit", type=int, default=500, help="val images (the page's 500)")
    ap.add_argument("--images", type=int, default=1000, help="search images (train split)")
    ap.add_argument("--handset", action="store_true", help="evaluate the hand-set schedules")
    ap.add_argument("--search", action="append", default=[], metavar="NAME:k=v,...",
                    help="a search variant to run and evaluate (repeatable)")
    ap.add_argument("--objective", default="distill-features",
                    choices=["distill-features", "distill-logits", "ce"],
                    help="search objective (default distill-features: the headless backbone's "
                         "class token + mean patch token; distill-logits: KL to the probe's "
                         "logits; ce: the probe's cross-entropy with the train labels)")
    ap.add_argument("--out", required=True, help="JSON results (rows appended per run)")
    args = ap.parse_args()

    from leanvit.methods.diffrate import save_schedule
    from leanvit.search import diffrate as dr

    torch.manual_seed(0)
    model = dinov2(head=args.head)
    data = Path(args.data)
    x, y = _tensors(model, data, "val", args.limit, Path(f"results/tmp/val{args.limit}.pt"))
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    results["meta"] = {"model": "vit_small_patch14_dinov2", "target_gmacs": args.target_gmacs,
                       "val_images": len(x), "search_images": args.images,
                       "threads": torch.get_num_threads()}

    def record(row):
        row["loadavg"] = loadavg()
        print(json.dumps(row), flush=True)
        results["rows"] = [r for r in results["rows"] if r["name"] != row["name"]] + [row]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")

    if args.handset:
        from leanvit.methods.diffrate import HANDSET_KINDS

        for kind in HANDSET_KINDS:
            t0 = time.perf_counter()
            s = dr.handset_schedule(model, kind, args.target_gmacs)
            acc = _evaluate_schedule(model, s, x, y)
            record({"name": f"handset {kind}", "prune_kept": list(s.prune_kept),
                    "merge_kept": list(s.merge_kept), "strength": s.obtained.get("strength"),
                    "deployed_gmacs": s.gmacs,
                    **acc, "seconds": time.perf_counter() - t0})

    if args.search:
        tx, ty = _tensors(model, data, "train", args.images,
                         Path(f"results/tmp/train{args.images}.pt"))
        if args.objective == "distill-features":  # the headless backbone's features
            searched = dinov2()
        else:  # the probe's logits (or its cross-entropy with the train labels)
            searched = dinov2(head=args.head)
        for spec in args.search:
            name, opts = _parse_search(spec)
            opts.setdefault("objective", args.objective)
            load0 = loadavg()
            t0 = time.perf_counter()
            r = dr.search(searched, args.target_gmacs, tx, labels=ty, progress=False, **opts)
            wall = time.perf_counter() - t0
            s = r.schedule
            path = out.with_name(f"{out.stem}_{name}_schedule.json")
            save_schedule(s, path)
            acc = _evaluate_schedule(model, s, x, y)
            record({"name": f"search {name}", "options": opts, "prune_kept": list(s.prune_kept),
                    "merge_kept": list(s.merge_kept), "deployed_gmacs": s.gmacs,
                    "off_target": (s.gmacs - args.target_gmacs) / args.target_gmacs,
                    "warning": s.obtained.get("warning"), "steps": r.steps,
                    "search_seconds": r.seconds, "wall_seconds": wall, "loadavg_before": load0,
                    "final_task": r.history[-1]["task"] if r.history else None,
                    "schedule_file": str(path), **acc})
    return 0


if __name__ == "__main__":
    sys.exit(main())
