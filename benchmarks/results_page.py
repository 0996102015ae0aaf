"""Regenerate ``docs/results.md`` and its plot: every registered method at two or three budgets
on the real DINOv2 ViT-S/14 (``shared/weights``) with a linear probe, on Fashion-MNIST.

One command (from the repository root; heavy, so under the shared CPU lock)::

    flock /tmp/leanvit-cpu.lock python benchmarks/results_page.py

Steps (each re-used when its output exists, so re-runs after adding a method are fast):
1. ``results/tmp/fmnist``: ``leanvit data fashion-mnist`` (3000 train / 1000 val, seed 0);
2. the probe: features of train and val (cached in ``results/tmp/cache``), L-BFGS fit,
   head ``results/tmp/dinov2_vits14_fmnist_head.safetensors``;
3. ``leanvit compare`` of the settings below that are available on a fixed, seeded subset of
   ``--limit`` val images: table + ``docs/img/results_dinov2_fmnist.png``.
Methods not registered in this checkout, and learned/searched settings whose saved state
(``load=``, written by ``leanvit.save`` after training/search) is absent, are listed as skipped.
4. the section made by ``leanvit tune`` (:func:`tune_section`): the command below with
   ``--budget-gmacs 4.0`` on the same model, head, data and 500 images, its output in
   ``results/tmp/tune_4.0`` (run when absent). ``--section tune`` rewrites just that section
   of an existing page without re-running steps 1-3.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path

from _common import DINOV2_MODEL as MODEL, DINOV2_WEIGHTS as WEIGHTS, REPO as ROOT, RESULTS, \
    dinov2, loadavg, require

ARTIFACTS = "results/tmp/artifacts"  # trained / searched method state (leanvit.save files)

#: Two or three budgets per method, mildest first. ViT-S/14 at 224 px: 12 blocks, 256 patches.
#: evit/topk: keep rates of the EViT paper (0.7, 0.5); tome: r per block (ToMe's ViT-S
#: settings scaled to 256 patches); ats: default (K = N0 in blocks 3..11) and token caps;
#: diffrate: the schedules the retired `diffrate_dinov2.py` searched (4.0 G target, two lrs);
#: dynamicvit: predictors trained by the retired `dynamicvit_fashion_mnist.py` (378 steps,
#: ratio weight 10); commands and commits of both in benchmarks/README.md.
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
ats max_tokens=64
diffrate schedule=benchmarks/results/diffrate_dinov2_4.0_lr0.05_schedule.json
diffrate schedule=benchmarks/results/diffrate_dinov2_4.0_schedule.json
dynamicvit load=benchmarks/results/dynamicvit_fashion_mnist_continued.predictors.safetensors
random keep_rate=0.7
random keep_rate=0.5
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="results/tmp/fmnist")
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--limit", type=int, default=500, help="val images evaluated per setting")
    p.add_argument("--train-limit", type=int, default=None,
                   help="probe on a fixed subset of the train images (default: all)")
    p.add_argument("--val-limit", type=int, default=None,
                   help="probe accuracy on a fixed subset of val (default: all)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--cache", default="results/tmp/cache")
    p.add_argument("--head", default="results/tmp/dinov2_vits14_fmnist_head.safetensors")
    p.add_argument("--artifacts", default=ARTIFACTS)
    p.add_argument("--page", default="docs/results.md")
    p.add_argument("--img", default="docs/img/results_dinov2_fmnist.png")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tune-dir", default=f"results/tmp/tune_{TUNE_BUDGET}",
                   help="output folder of the page's 'leanvit tune' run (run when absent)")
    p.add_argument("--section", choices=("all", "dense", "tune"), default="all",
                   help="'dense': only (re)write the dense-segmentation section of --page from "
                        "benchmarks/results/dense_segmentation.json (benchmarks/"
                        "dense_segmentation.py); 'tune': only the leanvit tune section (from "
                        "--tune-dir, running leanvit tune when it has no tune.json); the rest "
                        "of the page stays as it is")
    args = p.parse_args()
    if args.section in ("dense", "tune"):
        page = Path(args.page)
        lines = dense_section(page) if args.section == "dense" else tune_section(args)
        write_section(page, args.section, lines)
        print(f"wrote the {args.section} section of {page}")
        return 0

    import torch

    import leanvit
    from leanvit.bench import environment
    from leanvit.compare import apply_setting, parse_methods, run_compare, write_outputs
    from leanvit.data import export_fashion_mnist, loader
    from leanvit.evaluate import load_split
    from leanvit.probe import probe_folder

    require(WEIGHTS)
    data = Path(args.data)
    if not (data / "val").is_dir():
        export_fashion_mnist(data, train=args.train, val=args.val, seed=0)

    t0 = time.perf_counter()
    probe = probe_folder(MODEL, data, args.head, checkpoint=WEIGHTS, img_size=224,
                         batch_size=args.batch_size, cache_dir=args.cache,
                         limit=args.train_limit, val_limit=args.val_limit)
    probe_wall = time.perf_counter() - t0
    print(f"probe: val accuracy {probe['val_accuracy']:.2f}% ({probe['seconds']})")

    model = dinov2(head=args.head)
    available = set(leanvit.available_methods())
    settings, skipped = [], []
    for s in parse_methods(SETTINGS.format(a=args.artifacts)):
        if s.method not in available:
            skipped.append((s.label, "method not registered in this checkout"))
            continue
        if s.load is not None and not Path(s.load).is_file():
            skipped.append((s.label, "saved method state not found (train/search it first)"))
            continue
        try:
            apply_setting(copy.deepcopy(model), s)
        except (ValueError, TypeError) as e:
            skipped.append((s.label, f"error: {e}"))
            continue
        settings.append(s)
    ds = load_split(model, data, "val", args.limit)
    rows = run_compare(model, settings, loader(ds, args.batch_size), repeats=args.repeats)
    env = environment(torch.device("cpu"))
    meta = {"model": MODEL, "weights": WEIGHTS.name, "img_size": [224, 224], "data": str(data),
            "limit": args.limit, "images": len(ds), "batch_size": args.batch_size,
            "probe": probe, "environment": env}
    out = Path("results/tmp/compare")
    title = (f"DINOv2 ViT-S/14 + linear probe, Fashion-MNIST val ({len(ds)} images), "
             f"CPU batch {args.batch_size}")
    paths = write_outputs(rows, out, meta, title=title)
    Path(args.img).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(paths["png"], args.img)
    _write_page(Path(args.page), Path(args.img), rows, skipped, probe, probe_wall, meta, args)
    print(f"wrote {args.page} and {args.img}")
    return 0


def _write_page(page: Path, img: Path, rows, skipped, probe, probe_wall, meta, args) -> None:
    from leanvit.compare import markdown_table

    env = meta["environment"]
    sec = probe["seconds"]
    cached = sec.get("train_from_cache") and sec.get("val_from_cache")
    lines = [
        "# Results: accuracy against cost on a real model and real images",
        "",
        "Generated by `flock /tmp/leanvit-cpu.lock python benchmarks/results_page.py"
        f"{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` "
        "(see its docstring); do not edit by hand. Every method registered in the checkout "
        "appears at two or three budgets; methods that are missing are listed at the end.",
        "",
        "## Setup",
        "",
        f"- Model: `{MODEL}` (DINOv2 ViT-S/14, `shared/weights/{meta['weights']}`, 224 px, "
        "257 tokens), headless: classified by a linear probe on the class token concatenated "
        "with the mean patch token (DINOv2's linear evaluation; `leanvit probe`).",
        f"- Data: Fashion-MNIST from Debian's `dataset-fashion-mnist`, exported by "
        f"`leanvit data fashion-mnist` (seed 0): {probe['train_images']} train images (official "
        f"training set), {probe['val_images']} val images (official test set), balanced over "
        "the 10 classes; 28x28 grayscale as RGB, resized to 224 (bicubic, ImageNet mean/std: "
        "the model's timm data config).",
        f"- Probe: logistic regression, full-batch L-BFGS on standardised features, weight "
        f"decay {probe['weight_decay']:g} chosen on a held-out 20% of train. **Val accuracy of "
        f"the unpruned model: {probe['val_accuracy']:.2f}%** ({probe['val_images']} images; "
        f"train {probe['train_accuracy']:.2f}%).",
        f"- Probe time on CPU ({env['device_name']}, {env['threads']} threads): features "
        f"{sec['train_features']:.0f} s train + {sec['val_features']:.0f} s val, fit "
        f"{sec['fit']:.1f} s" + (" (features read from the cache of an earlier run)"
                                  if cached else "") + ".",
        f"- Comparison: fixed seeded subset of {meta['images']} val images (`--limit "
        f"{args.limit}`), batch {meta['batch_size']}, fp32, CPU; GMACs per image averaged over "
        "those images; images/s = the model alone on one batch (median of "
        f"{args.repeats} passes after a warm-up); speedup over `none` measured in the same run. "
        "CPU timings on a shared 2-core machine are noisy: compare GMACs for cost, images/s "
        "as an indication.",
        f"- torch {env['torch']}, timm {env['timm']}, leanvit {env['leanvit']}.",
        "",
        "## Table",
        "",
        markdown_table(rows).rstrip(),
        "",
        f"![top-1 against GMACs and throughput]({img.relative_to(page.parent) if img.is_relative_to(page.parent) else img})",
        "",
    ]
    if skipped:
        lines += ["## Skipped settings", ""]
        lines += [f"- `{label}`: {why}" for label, why in skipped]
        lines.append("")
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines))
    write_section(page, "dense", dense_section(page))
    write_section(page, "tune", tune_section(args))
    (page.parent / "img").mkdir(exist_ok=True)
    Path("results/tmp/results_page.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "skipped": skipped,
                    "probe_wall_s": probe_wall}, indent=2, default=str))


# --------------------------------------------------------------------------------------------
# Page sections kept between markers, each (re)written on its own


def write_section(page: Path, name: str, lines: list) -> None:
    """Put ``lines`` between ``<!-- section:NAME -->`` and ``<!-- /section:NAME -->`` in
    ``page``, replacing what was there, or at the end of the page."""
    start, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    text = page.read_text() if page.is_file() else ""
    block = "\n".join([start, *lines, end])
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)


def dense_section(page: Path) -> list:
    """Issue 15: foreground segmentation from the dense features of each reduced model
    (``benchmarks/dense_segmentation.py``'s results)."""
    from leanvit.compare import markdown_table

    res = RESULTS / "dense_segmentation.json"
    lines = ["## Dense features: foreground segmentation (issue 15)", ""]
    if not res.is_file():
        return lines + ["Not run yet: `flock /tmp/leanvit-cpu.lock python "
                        "benchmarks/dense_segmentation.py`, then `python benchmarks/"
                        "results_page.py --section dense`.", ""]
    r = json.loads(res.read_text())
    meta, rows = r["meta"], r["rows"]
    probe = meta["probe"]
    img = ROOT / "docs" / "img" / "dense_segmentation_fmnist.png"
    rel = img.relative_to(page.parent.resolve()) if img.is_relative_to(
        page.parent.resolve()) else img
    lines += [
        f"Generated by `{meta['command']}` and `python benchmarks/results_page.py --section "
        "dense`; details and the CLI commands in [dense.md](dense.md).",
        "",
        f"- `leanvit.dense_features` of `{meta['model']}` (`shared/weights/{meta['weights']}`, "
        "224 px, 16x16 patches): every patch gets the final features of the token holding it, "
        "or, when its token was pruned, the features it had when it left (final norm applied).",
        f"- Target per patch: foreground when more than half its pixels have intensity "
        f"> {meta['threshold']:g} (mean of R, G, B in [0, 1]); Fashion-MNIST exported by "
        "`leanvit data fashion-mnist` (seed 0).",
        f"- Probe: per-patch logistic regression (`leanvit probe --dense`) fitted on the "
        f"UNPATCHED model's features of {probe['train_images']} train images "
        f"({probe['train_rows']} patches), weight decay {probe['weight_decay']:g}; never "
        "refitted for a method.",
        f"- Evaluation (`leanvit compare --dense`): the same {meta['images']} val images for "
        "every setting; cosine = mean over patches of the cosine similarity of the setting's "
        "dense features to the unpatched model's; GMACs per image = backbone (as `count_macs`) "
        "+ the per-patch head; images/s on one batch of "
        f"{meta['batch_size']} (median of {meta['repeats']}) on a shared 2-core CPU (load "
        f"average {meta['loadavg_before'][0]} before, {meta['loadavg_after'][0]} after): "
        "indicative only.",
        "",
        markdown_table(rows).rstrip(),
        "",
        f"![mIoU against GMACs and throughput]({rel})",
        "",
    ]
    return lines


# --------------------------------------------------------------------------------------------
# Section: leanvit tune (issue 14)

TUNE_BUDGET = 4.0
TUNE_IMG = "docs/img/results_tune_dinov2_fmnist.png"


def tune_command(args) -> list[str]:
    """The ``leanvit tune`` command of the page's section (same model, head, data, images)."""
    return ["leanvit", "tune", MODEL, "--img-size", "224", "--checkpoint",
            os.path.relpath(WEIGHTS, ROOT), "--head", args.head,
            "--data", args.data, "--limit", str(args.limit), "--batch-size",
            str(args.batch_size), "--budget-gmacs", str(TUNE_BUDGET), "--out", args.tune_dir,
            "--no-progress"]


def tune_section(args) -> list[str]:
    """Lines of the page's section made by ``leanvit tune`` (run first when its output folder
    has no ``tune.json``): what it evaluated, its Pareto front, its choice for 4.0 GMACs."""
    import subprocess

    from leanvit.compare import markdown_table

    out = Path(args.tune_dir)
    cmd = tune_command(args)
    if not (out / "tune.json").is_file():
        load0 = loadavg()
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "leanvit", *cmd[1:]], check=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        info = json.loads((out / "tune.json").read_text())
        info["wall_s"] = time.perf_counter() - t0
        info["loadavg"] = [load0, loadavg()]
        (out / "tune.json").write_text(json.dumps(info, indent=2) + "\n")
    info = json.loads((out / "tune.json").read_text())
    rows = info["rows"]
    front = sorted((r for r in rows if r["label"] in info["front"]), key=lambda r: r["gmacs"])
    choice = next((r for r in rows if r["label"] == info["choice"]), None)
    within = [r for r in rows if r["gmacs"] <= TUNE_BUDGET]
    Path(TUNE_IMG).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "results.png", TUNE_IMG)
    wall = info.get("wall_s", info["seconds"])
    load = info.get("loadavg")
    lines = [f"## Choosing for a budget: `leanvit tune` at {TUNE_BUDGET} GMACs", "",
             "Made by (under the CPU lock):", "", "    " + " ".join(cmd), "",
             f"It evaluated {len(rows)} settings on the same {info['meta']['images']} val images "
             f"(grids of every training-free method around the budget, a DiffRate schedule it "
             f"searched to the budget, the unmodified model) in {wall / 60:.1f} min"
             + (f" (load average {' '.join(load[0])} before, {' '.join(load[1])} after)"
                if load else "") + f"; {len(within)} are within {TUNE_BUDGET} GMACs.", "",
             "Pareto front (top-1 against GMACs):", "", markdown_table(front).rstrip(), ""]
    if choice is not None:
        best = max(r["top1"] for r in within)
        lines += [f"**Chosen: `{choice['label']}`**, top-1 {choice['top1']:.2f}% at "
                  f"{choice['gmacs']:.3f} GMACs ({choice['speedup']:.2f}x the unmodified "
                  f"model's images/s in the same run); the best top-1 of the settings within "
                  f"the budget is {best:.2f}%. Written as `choice.safetensors` "
                  "(`leanvit.load`, `--set load=FILE`).", ""]
    lines += ["All settings it evaluated:", "", markdown_table(rows).rstrip(), ""]
    for r in rows:  # a searched schedule that missed its target says so in its file
        sched = r.get("options", {}).get("schedule") if r.get("method") == "diffrate" else None
        if sched and (ROOT / sched).is_file():
            warning = json.loads((ROOT / sched).read_text()).get("obtained", {}).get("warning")
            if warning:
                lines += [f"DiffRate's search (inside tune, its default settings): {warning}. "
                          "Over the budget, it cannot be chosen.", ""]
    lines += [f"![leanvit tune: top-1 against GMACs and throughput]"
              f"({Path(TUNE_IMG).relative_to('docs')})", ""]
    return lines


if __name__ == "__main__":
    sys.exit(main())
