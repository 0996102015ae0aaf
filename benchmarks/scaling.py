"""High resolution and large models: every training-free method at about the same MAC ratio
on DINOv2 ViT-S/14 at 224, 448, 518 px, ViT-B/16 at 384 and ViT-L/16 at 224 and 384, batch 8,
fp32, CPU, eager and compiled: speedup beside the MAC ratio, peak memory, and how both grow
with the token count.

One invocation measures one part of one configuration and merges it into the results JSON, so
a long table is built in chunks that each hold the shared CPU lock for minutes, e.g.::

    for part in settings eager memory compiled; do
        flock /tmp/leanvit-cpu.lock python benchmarks/scaling.py dinov2_518 $part
    done
    python benchmarks/scaling.py --table     # writes results/scaling.md from the JSON

Parts: ``settings`` sets each method's strength knob by bisection on MACs to the dense GMACs
divided by ``--ratio`` (``leanvit.tune.knob_setting``, as ``leanvit tune`` does; MACs counted
on ``--mac-images`` images, ATS's again on the whole batch); ``eager`` / ``compiled``
(``torch.compile`` default) time the dense model and every method in interleaved rounds (one
warm-up, then ``--repeats`` rounds, each model once per round, the order reversed every other
round): speedup = median dense / median method time, spread = lowest and highest per-round
ratio; ``memory``: ``leanvit.bench.cpu_peak_memory_mb`` (a fresh process per model, random
weights). ``--methods``: some methods only. DINOv2: the real ViT-S/14 weights (positions
resampled), 8 scikit-image photos; others random weights and images. Not DiffRate (searched,
not one knob) nor DynamicViT (trained predictors).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import (DINOV2_MODEL, DINOV2_WEIGHTS, RESULTS, command, loadavg, md_table, photos,
                     require)

#: name -> (timm model, image size, real DINOv2 weights)
CONFIGS = {
    "dinov2_224": (DINOV2_MODEL, 224, True),
    "dinov2_448": (DINOV2_MODEL, 448, True),
    "dinov2_518": (DINOV2_MODEL, 518, True),
    "vitb_384": ("vit_base_patch16_384", 384, False),
    "vitl_224": ("vit_large_patch16_224", 224, False),
    "vitl_384": ("vit_large_patch16_384", 384, False),
}
#: methods whose MACs depend on the images (counted again on the timed batch)
IMAGE_DEPENDENT = ("ats",)
OUT = RESULTS / "scaling.json"


def build(cfg: str, batch: int):
    """The dense model (eval) and its input batch ``[batch, 3, S, S]``."""
    import torch

    from leanvit.models import create_model

    name, size, real = CONFIGS[cfg]
    if real:
        require(DINOV2_WEIGHTS)
        model = create_model(name, img_size=size, checkpoint=DINOV2_WEIGHTS).eval()
        x = photos(model)[:batch]
    else:
        model = create_model(name, img_size=size).eval()
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    return model, x


def part_settings(cfg, model, x, args, res) -> None:
    import copy

    import leanvit
    from leanvit.tune import knob_setting

    imgs = x[:args.mac_images]
    dense = leanvit.count_macs(model, imgs).gmacs
    res.update(tokens=model.patch_embed.num_patches + model.num_prefix_tokens, dense_gmacs=dense)
    out = res.setdefault("settings", {})
    for m in args.methods:
        s, g = knob_setting(model, m, dense / args.ratio, imgs)
        if m in IMAGE_DEPENDENT:
            g = leanvit.count_macs(leanvit.patch(copy.deepcopy(model), m, **s.options), x).gmacs
        out[m] = {"options": s.options, "gmacs": g, "mac_ratio": dense / g}
        print(f"  {m} {s.options}: {g:.2f} GMACs, MAC ratio {dense / g:.3f}", file=sys.stderr)


def part_time(cfg, model, x, args, res, compiled: bool) -> None:
    import copy

    import torch

    import leanvit

    runners = {"dense": model}
    for m in args.methods:
        runners[m] = leanvit.patch(copy.deepcopy(model), m, **res["settings"][m]["options"])
    if compiled:
        torch._dynamo.reset()
        runners = {k: torch.compile(v) for k, v in runners.items()}
    times: dict[str, list[float]] = {k: [] for k in runners}
    first: dict[str, float] = {}
    with torch.inference_mode():
        for r in range(args.repeats + 1):  # round 0 warms up (and compiles)
            order = list(runners) if r % 2 == 0 else list(runners)[::-1]
            for k in order:
                t0 = time.perf_counter()
                runners[k](x)
                if r:
                    times[k].append(time.perf_counter() - t0)
                else:
                    first[k] = time.perf_counter() - t0
    out = res.setdefault("compiled" if compiled else "eager", {})
    base = times["dense"]
    out["dense"] = {"ms": 1e3 * statistics.median(base), "round_ms": [1e3 * t for t in base],
                    "first_s": first["dense"]}
    for m in args.methods:
        ratios = [b / t for b, t in zip(base, times[m])]
        out[m] = {"speedup": statistics.median(base) / statistics.median(times[m]),
                  "spread": [min(ratios), max(ratios)], "ms": 1e3 * statistics.median(times[m]),
                  "round_ms": [1e3 * t for t in times[m]], "first_s": first[m],
                  "dense_ms": out["dense"]["ms"]}  # the same run's dense model
        print(f"  {m}: {out[m]['speedup']:.3f}x (MAC ratio "
              f"{res['settings'][m]['mac_ratio']:.3f})", file=sys.stderr)


def part_memory(cfg, model, x, args, res) -> None:
    from leanvit.bench import cpu_peak_memory_mb

    name, size, _ = CONFIGS[cfg]
    out = res.setdefault("memory", {})
    if "dense" not in out or args.force:
        out["dense"] = cpu_peak_memory_mb(name, None, batch_size=len(x), img_size=size)
    for m in args.methods:
        out[m] = cpu_peak_memory_mb(name, m, res["settings"][m]["options"], batch_size=len(x),
                                    img_size=size)
        print(f"  {m}: {out[m]:.0f} MB (dense {out['dense']:.0f})", file=sys.stderr)


def table(data: dict) -> str:
    """The markdown page: one table per mode (methods x configurations), memory, and the
    acceptance check at 518 px."""
    cfgs = [c for c in CONFIGS if c in data.get("configs", {})]
    res = data["configs"]
    head = ["method"] + [f"{c} ({res[c].get('tokens', '?')} tok)" for c in cfgs]
    lines = ["# Scaling: token count and model size, batch 8, fp32, CPU", "",
             "`python benchmarks/scaling.py CONFIG PART` per part (see the script's docstring), "
             "under `flock /tmp/leanvit-cpu.lock`; commands as run, with the load average "
             "before each, in `scaling.json` (`runs`). Cells: speedup / MAC ratio (their "
             "quotient), spread of the per-round speedups in brackets, 'best': fastest dense round over the "
             "method's fastest; '-' = not measured.", ""]
    names = sorted({m for c in cfgs for m in res[c].get("settings", {})})
    for mode in ("eager", "compiled"):
        rows = []
        for m in names:
            cells = [m]
            for c in cfgs:
                s, t = res[c].get("settings", {}).get(m), res[c].get(mode, {}).get(m)
                cells.append("-" if not (s and t) else
                             f"{t['speedup']:.2f}x / {s['mac_ratio']:.2f}x = "
                             f"{t['speedup'] / s['mac_ratio']:.2f} "
                             f"[{t['spread'][0]:.2f}-{t['spread'][1]:.2f}], best "
                             f"{min(res[c][mode]['dense']['round_ms']) / min(t['round_ms']):.2f}x")
            rows.append(cells)
        rows.append(["dense ms/batch"] + [f"{res[c][mode]['dense']['ms']:.0f}"
                                           if mode in res[c] else "-" for c in cfgs])
        lines += [f"## {mode}", "", md_table(head, rows)]
    rows = [[m] + [f"{res[c]['memory'][m]:.0f}" if m in res[c].get("memory", {}) else "-"
                   for c in cfgs] for m in ["dense"] + names]
    lines += ["## Peak memory of one forward, MB (fresh process, random weights)", "",
              md_table(head, rows)]
    rows = [[m] + [str(res[c].get("settings", {}).get(m, {}).get("options", "-"))
                   for c in cfgs] for m in names]
    lines += ["## Settings (knob bisected on MACs)", "", md_table(head, rows)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", choices=list(CONFIGS))
    p.add_argument("part", nargs="?", choices=["settings", "eager", "compiled", "memory"])
    p.add_argument("--table", action="store_true", help="write the .md from the JSON")
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ratio", type=float, default=2.0, help="MAC ratio aimed at (default 2)")
    p.add_argument("--mac-images", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--force", action="store_true", help="remeasure the dense memory too")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"configs": {}, "runs": []}
    if not args.table:
        if args.config is None or args.part is None:
            p.error("give CONFIG and PART, or --table")
        import torch

        import leanvit

        print(f"leanvit from {leanvit.__file__}", file=sys.stderr)
        from leanvit.tune import KNOBS  # every training-free method with a strength knob

        args.methods = args.methods or sorted(set(KNOBS) & set(leanvit.available_methods()))
        res = data["configs"].setdefault(args.config, {})
        if args.part != "settings" and "settings" not in res:
            p.error(f"run '{args.config} settings' first")
        model, x = build(args.config, args.batch_size)
        t0, load = time.time(), loadavg()
        if args.part in ("eager", "compiled"):
            part_time(args.config, model, x, args, res, args.part == "compiled")
        else:
            {"settings": part_settings, "memory": part_memory}[args.part](
                args.config, model, x, args, res)
        data["runs"].append({"command": command("scaling.py", argv), "loadavg_before": load,
                             "loadavg_after": loadavg(), "seconds": time.time() - t0,
                             "threads": torch.get_num_threads(), "torch": torch.__version__})
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
        tmp.replace(out)
    out.with_suffix(".md").write_text(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
