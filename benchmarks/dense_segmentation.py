"""Foreground segmentation from a reduced model's dense features (issue 15's real experiment).

Model: the real DINOv2 ViT-S/14 backbone in ``<shared>/weights`` (224 px, 16x16 = 256 patches).
Data: Fashion-MNIST (Debian's ``dataset-fashion-mnist``, exported by ``leanvit data
fashion-mnist``, seed 0), 28x28 grayscale resized to 224 with the model's data config.
Per-patch target: a pixel is foreground when its intensity (mean of R, G, B of the model's
input with the normalisation undone, in [0, 1]) is above ``--threshold`` (default 0.1); a
14x14 patch is foreground when more than half of its pixels are
(:func:`leanvit.dense.foreground_targets`).

Steps (library calls, the same as the two CLI commands in docs/dense.md):
1. ``leanvit probe --dense``: a per-patch linear probe (logistic regression, L-BFGS, weight
   decay chosen on a held-out 20%) on the UNPATCHED model's dense features of ``--train``
   train images (:func:`leanvit.probe.probe_folder` with ``dense=True``);
2. ``leanvit compare --dense``: every setting below on the same ``--limit`` val images:
   per-patch accuracy, mIoU, the mean cosine of its dense features to the unpatched
   model's, GMACs per image (backbone + head), throughput of backbone + dense scatter + head
   on one batch (:class:`leanvit.dense.DenseEvaluation`). The head is never refitted.

Run it under the shared CPU lock::

    flock /tmp/leanvit-cpu.lock python benchmarks/dense_segmentation.py

Writes ``benchmarks/results/dense_segmentation.{json,md}`` and
``docs/img/dense_segmentation_fmnist.png``; ``benchmarks/results_page.py --section dense``
puts them on the results page.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from _common import DINOV2_MODEL as MODEL, DINOV2_WEIGHTS as WEIGHTS, REPO, RESULTS, command, \
    dinov2, loadavg, require, write_results

#: two or three budgets per method (the results page's classification settings); dynamicvit
#: with the predictors trained on these features (the retired dynamicvit_fashion_mnist.py,
#: keep 0.7: one budget; benchmarks/README.md), diffrate with the two schedules searched for
#: 4.0 GMACs.
SETTINGS = """
none
evit keep_rate=0.7
evit keep_rate=0.5
topk keep_rate=0.7
topk keep_rate=0.5
tome r=8
tome r=13
tome r=16
ats
ats max_tokens=128
diffrate schedule=benchmarks/results/diffrate_dinov2_4.0_lr0.05_schedule.json
diffrate schedule=benchmarks/results/diffrate_dinov2_4.0_schedule.json
dynamicvit load=benchmarks/results/dynamicvit_fashion_mnist_continued.predictors.safetensors
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/tmp/leanvit-dense/fmnist",
                   help="Fashion-MNIST ImageFolder (exported here when missing)")
    p.add_argument("--train", type=int, default=400, help="train images of the probe")
    p.add_argument("--limit", type=int, default=300, help="val images evaluated per setting")
    p.add_argument("--threshold", type=float, default=None,
                   help="foreground pixel intensity (default leanvit.dense's 0.1)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2, help="timed passes per setting")
    p.add_argument("--cache", default="/tmp/leanvit-dense/cache")
    p.add_argument("--head", default="/tmp/leanvit-dense/dense_head.safetensors")
    p.add_argument("--out", default=str(RESULTS / "dense_segmentation"))
    p.add_argument("--img", default=str(REPO / "docs" / "img" / "dense_segmentation_fmnist.png"))
    args = p.parse_args(argv)

    import torch

    from leanvit.bench import environment
    from leanvit.compare import markdown_table, parse_methods, run_compare, write_outputs
    from leanvit.data import export_fashion_mnist, loader
    from leanvit.dense import DenseEvaluation, load_dense_head
    from leanvit.evaluate import load_split
    from leanvit.probe import probe_folder

    require(WEIGHTS)
    load_before = loadavg()
    data = Path(args.data)
    if not (data / "val").is_dir():
        export_fashion_mnist(data, train=args.train, val=max(args.limit, 300), seed=0)
    t0 = time.perf_counter()
    probe = probe_folder(MODEL, data, args.head, checkpoint=WEIGHTS, img_size=224,
                         batch_size=args.batch_size, cache_dir=args.cache, limit=args.train,
                         val_limit=args.limit, dense=True, threshold=args.threshold)
    probe_wall = time.perf_counter() - t0
    print(f"dense probe: val per-patch accuracy {probe['val_accuracy']:.2f}%, mIoU "
          f"{probe['val_miou']:.2f}% ({probe['seconds']})", flush=True)

    head, threshold = load_dense_head(args.head)
    model = dinov2(num_classes=0)
    settings = parse_methods(SETTINGS)
    ds = load_split(model, data, "val", args.limit)
    t0 = time.perf_counter()
    rows = run_compare(model, settings, loader(ds, args.batch_size), repeats=args.repeats,
                       evaluate_fn=DenseEvaluation(head, threshold))
    compare_wall = time.perf_counter() - t0
    load_after = loadavg()
    meta = {"model": MODEL, "weights": WEIGHTS.name, "img_size": [224, 224], "data": str(data),
            "train_images": probe["train_images"], "limit": args.limit, "images": len(ds),
            "threshold": threshold, "batch_size": args.batch_size, "repeats": args.repeats,
            "probe": probe, "probe_wall_s": probe_wall, "compare_wall_s": compare_wall,
            "loadavg_before": load_before, "loadavg_after": load_after,
            "command": "flock /tmp/leanvit-cpu.lock " + command("dense_segmentation.py", argv),
            "environment": environment(torch.device("cpu"))}
    title = (f"DINOv2 ViT-S/14 dense features + per-patch linear probe (fitted unpatched): "
             f"Fashion-MNIST foreground, {len(ds)} val images")
    tmp = Path(args.cache) / "compare"
    paths = write_outputs(rows, tmp, meta, title=title)
    for r in rows:
        r.pop("round_ms", None)
    out = write_results(args.out, {"meta": meta, "rows": rows}, markdown_table(rows))
    Path(args.img).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(paths["png"], args.img)
    print(markdown_table(rows))
    print(f"wrote {out}, {out.with_suffix('.md')}, {args.img}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
