"""Regenerate ``docs/results.md`` and its plot: every registered method at three MAC budgets
on the real DINOv2 ViT-S/14 (``shared/weights``) with a linear probe, on Fashion-MNIST.

One command (from the repository root; heavy: run it niced, ``nice -n 10``)::

    nice -n 10 python benchmarks/results_page.py

Steps (each output re-used when present): 1. ``results/tmp/fmnist`` (``leanvit data
fashion-mnist``, 3000 train / 1000 val, seed 0); 2. the probe head (features cached in
``results/tmp/cache``); 3. with ``--run-tune``, ``leanvit tune`` at each of
:data:`TUNE_BUDGETS` (``results/tmp/tune_<G>``); 4. every registered training-free method at
each of :data:`BUDGETS`, its option placed by :func:`leanvit.tune.grid` (tune's own rule;
placements kept in :data:`PLAN`), plus :data:`SETTINGS`, evaluated on a fixed seeded subset of
``--limit`` val images (rows kept in ``results/tmp/page_rows.json``, so an interrupted run
resumes): table, ``docs/img/results_dinov2_fmnist.png``, ``benchmarks/results/
results_page.json``. What is missing is listed as skipped; ``--section`` rewrites one section.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from _common import DINOV2_MODEL as MODEL, DINOV2_WEIGHTS as WEIGHTS, REPO as ROOT, RESULTS, \
    dinov2, loadavg, md_table, require

#: MAC budgets of the page (GMACs per image): about 2/3 of the unpruned 6.12 G, 2x fewer and
#: 2.5x fewer MACs.
BUDGETS = (4.0, 3.06, 2.45)
#: Budgets at which the page runs ``leanvit tune`` (its section, and DiffRate's schedule there).
TUNE_BUDGETS = (3.06, 2.45)
#: Settings tune's knob rule cannot make, each at the budget it stands for ("BUDGET: setting").
#: diffrate at 4.0: the schedules the retired ``diffrate_dinov2.py`` searched (4.0 G target,
#: two lrs); at the tune budgets: the schedule ``leanvit tune`` searched (step 3).
#: dynamicvit: predictors trained by the retired ``dynamicvit_fashion_mnist.py`` (378 steps,
#: ratio weight 10; its one budget); commands and commits in benchmarks/README.md.
SETTINGS = """
4.0: diffrate schedule=benchmarks/results/diffrate_dinov2_4.0_lr0.05_schedule.json
4.0: diffrate schedule=benchmarks/results/diffrate_dinov2_4.0_schedule.json
3.06: diffrate schedule=benchmarks/results/diffrate_dinov2_tune_3.06_schedule.json
2.45: diffrate schedule=benchmarks/results/diffrate_dinov2_tune_2.45_schedule.json
4.0: dynamicvit load=benchmarks/results/dynamicvit_fashion_mnist_continued.predictors.safetensors
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("data", "results/tmp/fmnist"), ("cache", "results/tmp/cache"),
                          ("head", "results/tmp/dinov2_vits14_fmnist_head.safetensors"),
                          ("page", "docs/results.md"),
                          ("img", "docs/img/results_dinov2_fmnist.png")):
        p.add_argument(f"--{name}", default=default)
    for name, default in (("train", 3000), ("val", 1000), ("limit", 500), ("batch-size", 50),
                          ("repeats", 1)):  # limit: val images per setting; repeats: tune's
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--run-tune", action="store_true", help="run leanvit tune at each of "
                   "TUNE_BUDGETS whose output folder has no tune.json")
    p.add_argument("--reuse-only", action="store_true", help="evaluate nothing: settings "
                   "without a saved row are listed as not evaluated")
    p.add_argument("--section", choices=("all", "dense", "tune"), default="all",
                   help="only (re)write the dense section (from benchmarks/results/"
                   "dense_segmentation.json) or the tune sections; the rest stays")
    args = p.parse_args()
    if args.section in ("dense", "tune"):
        page = Path(args.page)
        if args.section == "dense":
            write_section(page, "dense", dense_section(page))
        for b in TUNE_BUDGETS if args.section == "tune" else ():
            write_section(page, f"tune-{b}", tune_section(args, b, args.run_tune))
        print(f"wrote the {args.section} section(s) of {page}")
        return 0

    import torch

    from leanvit.bench import environment
    from leanvit.data import export_fashion_mnist, loader
    from leanvit.evaluate import load_split
    from leanvit.probe import probe_folder

    require(WEIGHTS)
    data = Path(args.data)
    if not (data / "val").is_dir():
        export_fashion_mnist(data, train=args.train, val=args.val, seed=0)
    saved = Path(args.cache) / "probe.json"  # the fit is minutes on a busy machine: reused
    if saved.is_file() and Path(args.head).is_file():
        probe = json.loads(saved.read_text())
    else:
        t0 = time.perf_counter()
        probe = probe_folder(MODEL, data, args.head, checkpoint=WEIGHTS, img_size=224,
                             batch_size=args.batch_size, cache_dir=args.cache)
        probe["wall_s"] = time.perf_counter() - t0
        saved.write_text(json.dumps(probe, indent=1, default=str))
    probe_wall = probe["wall_s"]
    print(f"probe: val accuracy {probe['val_accuracy']:.2f}% ({probe['seconds']})")
    tune_lines = {b: tune_section(args, b, args.run_tune) for b in TUNE_BUDGETS}

    model = dinov2(head=args.head)
    ds = load_split(model, data, "val", args.limit)
    batches = [] if args.reuse_only else list(loader(ds, args.batch_size))
    plan, skipped = page_settings(model, batches[0][0][:2] if batches else None,
                                  args.reuse_only)
    rows, missing = evaluate_plan(model, plan, batches, args, len(ds))
    skipped += [(", ".join(missing), "placed, not evaluated in this run (time)")] * bool(missing)
    env = environment(torch.device("cpu"))
    meta = {"model": MODEL, "weights": WEIGHTS.name, "img_size": [224, 224], "data": str(data),
            "limit": args.limit, "images": len(ds), "batch_size": args.batch_size,
            "budgets": list(BUDGETS), "probe": probe, "environment": env,
            "loadavg_after": loadavg()}
    title = (f"DINOv2 ViT-S/14 + linear probe, Fashion-MNIST val ({len(ds)} images): "
             "every method at 4.0, 3.06 and 2.45 GMACs")
    plot_budgets(rows, Path(args.img), title)
    (RESULTS / "results_page.json").write_text(json.dumps(
        {"meta": meta, "rows": rows, "skipped": skipped, "probe_wall_s": probe_wall},
        indent=2, default=str) + "\n")
    _write_page(Path(args.page), Path(args.img), rows, skipped, probe, meta, args, tune_lines)
    print(f"wrote {args.page} and {args.img}")
    return 0


#: where the placed settings of each budget are kept (``leanvit.tune.grid`` is many forward
#: passes; re-runs of the page reuse them)
PLAN = Path("results/tmp/page_plan.json")


def page_settings(model, sample, reuse_only: bool = False) -> tuple[list, list]:
    """What the page evaluates: ``[(budget, Setting)]`` (every registered training-free
    method's knob placed at each of :data:`BUDGETS` by :func:`leanvit.tune.grid` on the
    ``sample`` images, as ``leanvit tune`` places it, or as an earlier run placed it
    (:data:`PLAN`); with ``reuse_only`` a budget not placed yet is left out; then
    :data:`SETTINGS` whose files exist)
    and ``[(label, why)]`` of what is left out; the unpruned model first (budget ``None``)."""
    from leanvit.compare import Setting, apply_setting, parse_methods
    from leanvit.tune import grid

    plan, skipped = [(None, Setting("none"))], []
    placed = json.loads(PLAN.read_text()) if PLAN.is_file() else {}
    for b in BUDGETS:
        if str(b) in placed:  # placed by an earlier run of this script
            plan += [(b, parse_methods(label)[0]) for label in placed[str(b)]["settings"]]
            left = placed[str(b)]["left"]
        elif reuse_only:
            skipped.append((f"the training-free methods at {b} G", "not placed or evaluated "
                            "in this run (time)"))
            continue
        else:
            settings, _, left = grid(model, [b], sample)
            plan += [(b, s) for s in settings]
            placed[str(b)] = {"settings": [s.label for s in settings], "left": left}
            PLAN.write_text(json.dumps(placed, indent=1))
        skipped += [(m, why) for m, why in map(tuple, left) if (m, why) not in skipped]
    for line in SETTINGS.strip().splitlines():
        budget, text = line.split(":", 1)
        s = parse_methods(text)[0]
        path = s.load or s.options.get("schedule")
        if path is not None and not (ROOT / path).is_file():
            skipped.append((s.label, "saved method state not found (train/search it first)"))
            continue
        try:
            apply_setting(copy.deepcopy(model), s)
        except (ValueError, TypeError) as e:
            skipped.append((s.label, f"error: {e}"))
            continue
        plan.append((float(budget), s))
    return plan, skipped


def evaluate_plan(model, plan, batches, args, images: int) -> tuple[list[dict], list[str]]:
    """Rows of ``plan`` (its first: the unpruned model), each with its ``budget``. Accuracy and
    GMACs of a setting evaluated on the same images by a tune run of this page, or by an
    earlier (interrupted) run of this script (``results/tmp/page_rows.json``), are reused.
    With ``args.reuse_only`` nothing is evaluated; the labels left out are returned too."""
    from leanvit.compare import Setting, apply_setting
    from leanvit.evaluate import evaluate

    same = (images, args.limit, args.data, args.head)
    known, cache = {}, Path("results/tmp/page_rows.json")
    for b in TUNE_BUDGETS:
        f = Path(f"results/tmp/tune_{b}") / "tune.json"
        info = json.loads(f.read_text()) if f.is_file() else {"meta": {}, "rows": []}
        m = info["meta"]
        if (m.get("images"), m.get("limit"), m.get("data"), m.get("head")) == same:
            known.update({r["label"]: {**r, "from": str(f)} for r in info["rows"]})
            copy_ = Setting("diffrate", {"schedule": str(_tune_schedule(b).relative_to(ROOT))})
            known.update({copy_.label: {**r, "label": copy_.label, "settings":
                          copy_.settings_text, "options": copy_.options, "from": str(f)}
                          for r in info["rows"] if r["method"] == "diffrate"})
    saved = json.loads(cache.read_text()) if cache.is_file() else {"key": None, "rows": {}}
    if saved["key"] == list(same):
        known.update({k: v for k, v in saved["rows"].items() if k not in known})
    todo = list({s.label: s for _, s in plan if s.label not in known}.values())
    print(f"results page: {len(plan)} settings, {len(todo)} not evaluated yet"
          + (" (left out: --reuse-only)" if args.reuse_only else ""))
    missing = [s.label for s in todo] if args.reuse_only else []
    todo = [] if args.reuse_only else todo

    saved = {"key": list(same), "rows": saved["rows"] if saved["key"] == list(same) else {}}
    fresh = {}
    for i, s in enumerate(todo):  # accuracy and MACs only (no timing: see the page's setup)
        t0 = time.perf_counter()
        m = apply_setting(copy.deepcopy(model), s).eval()
        r = evaluate(m, batches, progress=False, throughput=False, desc=s.label[:40])
        fresh[s.label] = {"method": s.method, "settings": s.settings_text, "label": s.label,
                          "options": {k: (list(v) if isinstance(v, tuple) else v)
                                      for k, v in s.options.items()}, "load": s.load, **r}
        saved["rows"][s.label] = {**fresh[s.label], "from": "results_page.py"}
        cache.write_text(json.dumps(saved, indent=1, default=str))  # an interrupted run resumes
        print(f"[{i + 1}/{len(todo)}] {s.label}: top-1 {r['top1']:.2f}% at {r['gmacs']:.3f} "
              f"GMACs ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    for b, s in plan:
        if s.label in missing:
            continue
        r = dict(fresh.get(s.label) or known[s.label])
        for k in ("images_per_s", "ms_per_batch", "round_ms", "speedup", "within_budget",
                  "listed", "mac_ratio"):  # timings of other runs, dropped
            r.pop(k, None)
        rows.append({**r, "budget": b, "mac_ratio": None})
    for r in rows:
        r["mac_ratio"] = rows[0]["gmacs"] / r["gmacs"]
    return rows, missing


def _summary(rows, budgets) -> str:
    """One line per method: top-1 (GMACs) of its best setting within each budget; '>' marks a
    setting over the budget (the method's cheapest), '-' none at that budget."""
    none = rows[0]
    by: dict = {}
    for r in rows[1:]:
        by.setdefault(r["method"], {}).setdefault(r["budget"], []).append(r)
    out = []
    for m in sorted(by, key=lambda m: -max(r["top1"] for rs in by[m].values() for r in rs)):
        cells = [m]
        for b in budgets:
            rs = by[m].get(b, [])
            if not rs:
                cells.append("-")
                continue
            r = max(rs, key=lambda r: (r["gmacs"] <= b, r["top1"]))
            over = r["gmacs"] > b
            cells.append(f"{'> ' if over else ''}{r['top1']:.1f} ({r['gmacs']:.2f} G)")
        out.append(cells)
    head = ["method"] + [f"<= {b:g} G" for b in budgets]
    return md_table(head, [["none (unpruned)"] + [f"{none['top1']:.1f} ({none['gmacs']:.2f} G)"]
                           * len(budgets)] + out)


def _table(rows, budget) -> str:
    none = rows[0]
    body = [[r["method"], r["settings"] or "(defaults)", f"{r['top1']:.2f}",
             f"{r['top1'] - none['top1']:+.2f}", f"{r['top5']:.2f}", f"{r['gmacs']:.3f}",
             f"{r['mac_ratio']:.2f}x" + (" **over**" if r["gmacs"] > budget else "")]
            for r in sorted((r for r in rows[1:] if r["budget"] == budget),
                            key=lambda r: -r["top1"])]
    return md_table(["method", "settings", "top-1 (%)", "vs unpruned", "top-5 (%)", "GMACs",
                     "fewer MACs"], body)


def _hf_line() -> list[str]:
    """The unpruned probe accuracy through Hugging Face's ``Dinov2Model``
    (``benchmarks/hf_dinov2.py --probe``), when it was run."""
    f = RESULTS / "hf_dinov2_probe.json"
    if not f.is_file():
        return []
    r = json.loads(f.read_text())
    return [f"- The same weights through Hugging Face transformers (`{r['command']}`: converted "
            f"into `Dinov2Model`, sdpa, final tokens pooled as the probe pools them, same head): "
            f"top-1 **{r['top1']['hf']:.2f}%** on the same {r['images']} val images, timm "
            f"{r['top1']['timm']:.2f}%; the same prediction on {r['same_predictions']} of "
            f"{r['images']} images, features within {r['max_relative_feature_difference']:.1e} "
            "(largest per-image relative difference)."]


def _write_page(page: Path, img: Path, rows, skipped, probe, meta, args, tune_lines) -> None:
    env = meta["environment"]
    sec = probe["seconds"]
    cached = sec.get("train_from_cache") and sec.get("val_from_cache")
    none = rows[0]
    old = page.read_text() if page.is_file() else ""
    keep = {m.group(1): m.group(0) for m in re.finditer(
        r"<!-- section:(\S+) -->.*?<!-- /section:\1 -->", old, flags=re.S)}
    lines = [
        "# Results: accuracy against cost on a real model and real images",
        "",
        "Generated by `nice -n 10 python benchmarks/results_page.py"
        f"{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` (see its docstring); do not "
        "edit by hand, except the section 'What holds and what collapses'. Every method "
        "registered in the checkout appears at three budgets; methods that are missing are "
        "listed at the end.",
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
                                  if cached else "") + ", niced on 2 cores shared with other "
        "work (load average 15-20 at the time; on a quiet machine 258 s + 85 s, fit 4.7 s).",
        f"- Budgets: {', '.join(f'{b:g}' for b in BUDGETS)} GMACs per image (the unpruned "
        f"model: {none['gmacs']:.3f}). Each training-free method's strength option is set by "
        "`leanvit tune`'s own rule (`leanvit.tune.grid`: bisection on MACs, counted on the "
        "first two evaluated images, to the closest setting at or below the budget; a method "
        "that cannot get that cheap gets its cheapest setting, marked **over**). DiffRate: "
        "the schedule `leanvit tune` searched at that budget (4.0: earlier searches); "
        "DynamicViT: only its trained predictors (one budget).",
        f"- Evaluation: fixed seeded subset of {meta['images']} val images (`--limit "
        f"{args.limit}`, as on earlier versions of this page), batch {meta['batch_size']}, fp32, "
        "CPU; GMACs per image averaged over those images (`count_macs`). One image is "
        f"{100 / meta['images']:.1f} point. No timings: the runs shared 2 cores with other "
        "work (niced); a row evaluated earlier on the same images (by an interrupted run of "
        "this script, `results/tmp/page_rows.json`, or a tune run of the page) is reused.",
        *_hf_line(),
        f"- torch {env['torch']}, timm {env['timm']}, leanvit {env['leanvit']}.",
        "",
        "## Summary: best top-1 (%) within each budget",
        "",
        _summary(rows, BUDGETS).rstrip(),
        "",
        keep.get("verdict", "<!-- section:verdict -->\n<!-- /section:verdict -->"),
        "",
    ]
    for b in BUDGETS:
        lines += [f"## At <= {b:g} GMACs", "", _table(rows, b).rstrip(), ""]
    lines += [f"![top-1 against GMACs]({os.path.relpath(img, page.parent)})", ""]
    if skipped:
        lines += ["## Skipped settings", ""]
        lines += [f"- {', '.join(f'`{x}`' for x in label.split(', '))}: {why}"
                  for label, why in skipped]
        lines.append("")
    for name, block in keep.items():  # sections made by other scripts / earlier runs
        if name not in ("verdict", "dense") and not name.startswith("tune-"):
            lines += [block, ""]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines))
    write_section(page, "dense", dense_section(page))
    for b, tl in tune_lines.items():
        write_section(page, f"tune-{b}", tl)


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
# Sections: leanvit tune at each of TUNE_BUDGETS

TUNE_IMG = "docs/img/results_tune_{b}_dinov2_fmnist.png"


def tune_command(args, budget: float) -> list[str]:
    """The ``leanvit tune`` command of the page (same model, head, data, images) at ``budget``
    GMACs, its output in ``results/tmp/tune_<budget>``."""
    return ["leanvit", "tune", MODEL, "--img-size", "224", "--checkpoint",
            os.path.relpath(WEIGHTS, ROOT), "--head", args.head,
            "--data", args.data, "--limit", str(args.limit), "--batch-size",
            str(args.batch_size), "--repeats", str(args.repeats), "--budget-gmacs", str(budget),
            "--out", f"results/tmp/tune_{budget}", "--no-progress"]


def _tune_schedule(budget: float) -> Path:
    """Where the page keeps the DiffRate schedule ``leanvit tune`` searched at ``budget``."""
    return RESULTS / f"diffrate_dinov2_tune_{budget}_schedule.json"


def tune_section(args, budget: float, run: bool = False) -> list[str]:
    """Lines of the page's section made by ``leanvit tune`` at ``budget`` (with ``run``, run
    first when its output folder has no ``tune.json``): what it evaluated, its Pareto front,
    its choice. Copies its searched DiffRate schedule to :func:`_tune_schedule`."""
    import subprocess

    from leanvit.compare import markdown_table

    cmd = tune_command(args, budget)
    out = Path(cmd[cmd.index("--out") + 1])
    title = f"## Choosing for a budget: `leanvit tune` at {budget} GMACs"
    if not (out / "tune.json").is_file() and not run:
        return [title, "", "Not run for this version of the page (time): "
                f"`python benchmarks/results_page.py --run-tune` runs `{' '.join(cmd)}`.", ""]
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
    for f in out.glob("diffrate_*_schedule.json"):
        shutil.copyfile(f, _tune_schedule(budget))
    rows = info["rows"]
    front = sorted((r for r in rows if r["label"] in info["front"]), key=lambda r: r["gmacs"])
    choice = next((r for r in rows if r["label"] == info["choice"]), None)
    within = [r for r in rows if r["gmacs"] <= budget]
    img = Path(TUNE_IMG.format(b=budget))
    img.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "results.png", img)
    (RESULTS / f"results_page_tune_{budget}.json").write_text(json.dumps(
        {k: info.get(k) for k in ("meta", "command", "seconds", "wall_s", "loadavg", "rows",
                                  "front", "choice", "skipped")}, indent=2, default=str) + "\n")
    wall = info.get("wall_s", info["seconds"])
    load = info.get("loadavg")
    asked = info["meta"].get("methods")
    what = (f"what `--methods {asked}` asks for" if asked else "grids of every training-free "
            "method at 1.0, 0.85 and 1.15 x the budget, a DiffRate schedule it searched to the "
            "budget with its default search settings")
    lines = [title, "", "Made by (niced, beside other work on 2 cores: images/s and speedups "
             "are indicative only):", "", "    " + " ".join(info.get("command", "").split()
                                                          or cmd), "",
             f"It evaluated {len(rows)} settings on the same {info['meta']['images']} val images "
             f"({what}; the unmodified model) in {wall / 60:.1f} min"
             + (f" (load average {' '.join(load[0])} before, {' '.join(load[1])} after)"
                if load else "") + f"; {len(within)} are within {budget} GMACs.", "",
             "Pareto front (top-1 against GMACs):", "", markdown_table(front).rstrip(), ""]
    if choice is not None:
        best = max(r["top1"] for r in within)
        lines += [f"**Chosen: `{choice['label']}`**, top-1 {choice['top1']:.2f}% at "
                  f"{choice['gmacs']:.3f} GMACs; the best top-1 of the settings it evaluated "
                  f"within the budget is {best:.2f}%. Written as `choice.safetensors` "
                  "(`leanvit.load`, `--set load=FILE`).", ""]
    else:
        lines += [f"**Nothing it evaluated is within {budget} GMACs.**", ""]
    if info.get("skipped"):
        lines += ["Left out: " + "; ".join(f"`{m}` ({why})" for m, why in info["skipped"]), ""]
    lines += ["All settings it evaluated:", "", markdown_table(rows).rstrip(), ""]
    for r in rows:  # a searched schedule that missed its target says so in its file
        sched = r.get("options", {}).get("schedule") if r.get("method") == "diffrate" else None
        if sched and (ROOT / sched).is_file():
            warning = json.loads((ROOT / sched).read_text()).get("obtained", {}).get("warning")
            if warning:
                lines += [f"DiffRate's search (inside tune, its default settings): {warning}.",
                          ""]
    lines += [f"![leanvit tune at {budget} G: top-1 against GMACs and throughput]"
              f"({img.relative_to('docs')})", ""]
    return lines


def plot_budgets(rows, path: Path, title: str) -> None:
    """PNG: top-1 against GMACs, one line per method through its settings (cheapest first),
    the budgets as dotted lines, the unpruned model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6.5), constrained_layout=True)
    methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
    cmap = plt.get_cmap("tab20")
    for i, m in enumerate(methods):
        sel = sorted({r["label"]: r for r in rows[1:] if r["method"] == m}.values(),
                     key=lambda r: r["gmacs"])
        ax.plot([r["gmacs"] for r in sel], [r["top1"] for r in sel], marker="osD^vP*Xph"[i % 10],
                color=cmap(i % 20), label=m)
    ax.scatter([rows[0]["gmacs"]], [rows[0]["top1"]], marker="*", s=200, color="black",
               label="none (unpruned)", zorder=4)
    for b in BUDGETS:
        ax.axvline(b, linestyle=":", color="0.5")
    ax.set_xlabel("GMACs per image (lower is cheaper)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    ax.set_title(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
