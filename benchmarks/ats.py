"""ATS (adaptive token sampling) on DeiT-S and on real DINOv2 ViT-S/14 weights.

Measures, each against the unmodified model in the same run:

1. MACs per image from ``leanvit.count_macs``, averaged over real photos (scikit-image's
   bundled photos, preprocessed with timm's eval transform for the model): DeiT-S with random
   weights (no ImageNet weights here: its attention is meaningless, so its kept counts are not
   representative) and DINOv2 ViT-S/14 with its real weights (``<shared>/weights``).
2. Throughput, DeiT-S, batch 64, fp32, CPU, ``leanvit.bench.run_benchmark`` (random weights,
   random input): speedup and MAC ratio; and batch-1 latency.
3. The same timing protocol on DINOv2 with real weights on the real photos (a batch of 64
   made of the photos, repeated, every second copy flipped), where ATS's counts are real.
4. Mean cosine similarity of the final class features (DINOv2, real weights, real photos)
   between the ATS-patched and the unpatched model.
5. ``packed``: DINOv2 (real weights, real photos), batch ``--packed-batch`` (32): the
   unmodified model, ATS padded (``packed=False``) and ATS packed (``packed="auto"``, the
   default), interleaved rounds (every round runs all three, the order rotated): medians,
   spread, speedups over the unmodified model against the MAC ratio, and how far the packed
   outputs are from the padded ones.

ATS here is off-the-shelf (no fine-tuning); the published DeiT-S number, 2.9 GMACs, is after
fine-tuning with ATS in place.

Run under the shared CPU lock::

    flock /tmp/leanvit-cpu.lock python benchmarks/ats.py --json benchmarks/results/ats.json

    flock /tmp/leanvit-cpu.lock python benchmarks/ats.py --parts packed \
        --json benchmarks/results/ats_packed.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from _common import DINOV2_WEIGHTS, command, dinov2, loadavg, photos, write_results

import leanvit
from leanvit.bench import round_spread, run_benchmark, time_models
from leanvit.models import create_model

#: the scikit-image photos of the recorded runs (results/ats_run*.json)
PHOTOS = ("astronaut", "brick", "camera", "cat", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket",
          "stereo_motorcycle")


def batch_of(images: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` images cycling through ``images``, every second pass flipped left-right."""
    reps = []
    k = 0
    while sum(r.shape[0] for r in reps) < size:
        reps.append(images.flip(-1) if k % 2 else images)
        k += 1
    return torch.cat(reps)[:size]


def macs(model, images, **options) -> dict:
    """MACs per image (mean over ``images``) and the tokens each block leaves: mean over the
    images, and the largest (what a padded batch of these images computes on; one image at a
    time through ``count_macs``)."""
    base = leanvit.count_macs(model, images)
    patched = leanvit.patch(copy.deepcopy(model), "ats", **options)
    rep = leanvit.count_macs(patched, images)
    alone = [leanvit.count_macs(patched, images[i:i + 1]).per_block for i in range(len(images))]
    return {"baseline_gmacs": base.gmacs, "ats_gmacs": rep.gmacs,
            "mac_ratio": base.total / rep.total, "images": rep.images,
            "tokens_out_per_block": [round(b.tokens_out, 2) for b in rep.per_block],
            "tokens_out_max_per_block": [round(max(blocks)) for blocks in zip(
                *[[b.tokens_out for b in per_block] for per_block in alone])]}


def time_pair(base, patched, x, warmup: int, repeats: int) -> dict:
    """run_benchmark's protocol on given input (``leanvit.bench.time_models``: warm-up,
    interleaved rounds in alternating order), medians and the rounds' spread."""
    rounds = time_models(base, patched, x, warmup=warmup, repeats=repeats)
    med = {k: statistics.median(v) for k, v in rounds.items()}
    return {"baseline_ms": med["baseline"] * 1e3, "patched_ms": med["candidate"] * 1e3,
            "speedup": med["baseline"] / med["candidate"],
            "baseline_images_per_s": x.shape[0] / med["baseline"],
            "patched_images_per_s": x.shape[0] / med["candidate"],
            "spread": {"baseline": round_spread(rounds["baseline"]),
                       "patched": round_spread(rounds["candidate"])}}


def rounds(models: dict, x: torch.Tensor, warmup: int, repeats: int) -> dict:
    """Seconds per batch of each model on ``x`` under ``torch.inference_mode``: ``warmup``
    untimed rounds, then ``repeats`` rounds, each running every model once, the order rotated
    by one model every round."""
    names, times = list(models), {k: [] for k in models}
    with torch.inference_mode():
        for r in range(-warmup, repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t = time.perf_counter()
                models[name](x)
                if r >= 0:
                    times[name].append(time.perf_counter() - t)
    return times


def packed_part(dino, imgs, batch: int, warmup: int, repeats: int) -> dict:
    """Part 5: the unmodified model, ATS padded and ATS packed in the same run."""
    x = batch_of(imgs, batch)
    models = {"dense": dino, "padded": leanvit.patch(copy.deepcopy(dino), "ats", packed=False),
              "packed": leanvit.patch(copy.deepcopy(dino), "ats")}
    with torch.inference_mode():
        out = {k: m(x) for k, m in models.items()}
    macs = {k: leanvit.count_macs(m, x).total for k, m in models.items()}
    times = rounds(models, x, warmup, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"batch": batch, "rounds": repeats, "warmup": warmup,
           "ms": {k: round(v * 1e3, 1) for k, v in med.items()},
           "round_ms": {k: [round(t * 1e3, 1) for t in v] for k, v in times.items()},
           "spread": {k: round(round_spread(v), 3) for k, v in times.items()},
           "mac_ratio": macs["dense"] / macs["packed"],
           "padded_macs_equal_packed": macs["padded"] == macs["packed"],
           "packed_vs_padded_max_abs_diff": float((out["packed"] - out["padded"]).abs().max()),
           "output_max_abs": float(out["padded"].abs().max())}
    for k in ("padded", "packed"):
        res[f"speedup_{k}"] = med["dense"] / med[k]
        res[f"speedup_{k}_over_mac_ratio"] = res[f"speedup_{k}"] / res["mac_ratio"]
        # the same ratio in every round (each round's own dense time): its spread
        per = [d / t for d, t in zip(times["dense"], times[k])]
        res[f"speedup_{k}_rounds"] = [round(v, 3) for v in per]
    res["packed_over_padded"] = med["padded"] / med["packed"]
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--latency-repeats", type=int, default=20)
    p.add_argument("--parts", default="macs,deit-bench,deit-latency,dino",
                   help="comma-separated subset of macs,deit-bench,deit-latency,dino,packed")
    p.add_argument("--packed-batch", type=int, default=32)
    p.add_argument("--packed-repeats", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    result: dict = {"threads": torch.get_num_threads(), "command": command("ats.py"),
                    "torch": torch.__version__, "leanvit": leanvit.__file__,
                    "loadavg_start": loadavg()}

    parts = set(args.parts.split(","))
    if "macs" in parts:
        torch.manual_seed(0)  # random weights: fix them so the MACs repeat run to run
        deit = create_model("deit_small_patch16_224").eval()
        deit_photos = photos(deit, PHOTOS)
        result["deit_s_random_weights_photos"] = macs(deit, deit_photos)
        print("DeiT-S (random weights), ATS MACs on", deit_photos.shape[0], "photos:",
              json.dumps(result["deit_s_random_weights_photos"]), flush=True)

    if "deit-bench" in parts:
        r = run_benchmark("deit_small_patch16_224", "ats", {}, batch_size=args.batch_size,
                          repeats=args.repeats, progress=False)
        result["deit_s_bench"] = {
            "batch": args.batch_size, "speedup": r["speedup"], "mac_ratio": r["mac_ratio"],
            "baseline_images_per_s": r["baseline"]["images_per_s"],
            "patched_images_per_s": r["patched"]["images_per_s"],
            "baseline_gmacs": r["baseline"]["gmacs"], "patched_gmacs": r["patched"]["gmacs"],
            "peak_mem_mb": [r["baseline"]["peak_mem_mb"], r["patched"]["peak_mem_mb"]],
            "round_ms": [r["baseline"]["round_ms"], r["patched"]["round_ms"]],
            "environment": r["environment"],
        }
        print("DeiT-S bench:", json.dumps({k: v for k, v in result["deit_s_bench"].items()
                                           if k != "environment"}), flush=True)
    if "deit-latency" in parts:
        r1 = run_benchmark("deit_small_patch16_224", "ats", {}, batch_size=1, warmup=3,
                           repeats=args.latency_repeats, memory=False, progress=False)
        result["deit_s_batch1"] = {
            "baseline_ms": r1["baseline"]["ms_per_batch"],
            "patched_ms": r1["patched"]["ms_per_batch"],
            "latency_change": r1["patched"]["ms_per_batch"] / r1["baseline"]["ms_per_batch"] - 1,
        }
        print("DeiT-S batch 1:", json.dumps(result["deit_s_batch1"]), flush=True)

    if "dino" not in parts:
        pass
    elif DINOV2_WEIGHTS.is_file():
        dino = dinov2()
        imgs = photos(dino, PHOTOS)
        result["dinov2_real_weights_photos"] = macs(dino, imgs)
        print("DINOv2 ViT-S/14 (real weights), ATS MACs on", imgs.shape[0], "photos:",
              json.dumps(result["dinov2_real_weights_photos"]), flush=True)
        patched = leanvit.patch(copy.deepcopy(dino), "ats")
        with torch.no_grad():
            f0, f1 = dino(imgs), patched(imgs)
        cos = torch.nn.functional.cosine_similarity(f0, f1, dim=-1)
        result["dinov2_cosine"] = {"mean": float(cos.mean()), "min": float(cos.min()),
                                   "images": imgs.shape[0]}
        print("DINOv2 class-feature cosine (ATS vs unpatched):",
              json.dumps(result["dinov2_cosine"]), flush=True)
        x = batch_of(imgs, args.batch_size)
        t = time_pair(dino, patched, x, warmup=2, repeats=args.repeats)
        t["mac_ratio"] = leanvit.count_macs(dino, x).total / leanvit.count_macs(patched, x).total
        t1 = time_pair(dino, patched, imgs[:1], warmup=3, repeats=args.latency_repeats)
        t["batch1_baseline_ms"], t["batch1_patched_ms"] = t1["baseline_ms"], t1["patched_ms"]
        t["batch1_latency_change"] = t1["patched_ms"] / t1["baseline_ms"] - 1.0
        result["dinov2_bench_photos"] = t
        print("DINOv2 bench on photos:", json.dumps(t), flush=True)
    else:
        print(f"skipping DINOv2: {DINOV2_WEIGHTS} not found", flush=True)
    if "packed" in parts and DINOV2_WEIGHTS.is_file():
        dino = dinov2()
        r = packed_part(dino, photos(dino, PHOTOS), args.packed_batch, 1, args.packed_repeats)
        result["dinov2_packed"] = r
        print("DINOv2 dense / padded / packed:", json.dumps(r), flush=True)

    result["loadavg_end"] = loadavg()
    if args.json:
        write_results(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
