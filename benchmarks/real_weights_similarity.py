"""How close the patched model's features stay to the unpatched model's, with real weights on
real photos.

Model: the real DINOv2 ViT-S/14 backbone in ``<shared>/weights`` (``_common.dinov2``). Images:
the natural photos bundled with scikit-image (no download, ``_common.photos``), each also
mirrored, preprocessed with timm's data config for the model (bicubic, ImageNet mean/std,
224 x 224). For each method at its default setting: the cosine similarity
between the patched and the unpatched final class feature (after the final norm), per image,
and its mean; and the MACs per image (``leanvit.count_macs``, averaged over the images).

Run it under the shared CPU lock::

    flock /tmp/leanvit-cpu.lock python benchmarks/real_weights_similarity.py

Writes ``benchmarks/results/real_weights_similarity.json`` and ``.md``. To add a method, add
one line to ``METHODS``.
"""
from __future__ import annotations

import argparse
import sys

import torch
from _common import DINOV2_MODEL, DINOV2_WEIGHTS, PHOTOS, RESULTS, command, dinov2, md_table, \
    photos, write_results

import leanvit

#: (label, method, options): each method at its default setting. One line each.
METHODS = [
    ("evit", "evit", {}),
    ("topk", "topk", {}),
    ("tome", "tome", {}),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-mirror", action="store_true", help="only the photos, not mirrored")
    p.add_argument("--out", default=str(RESULTS / "real_weights_similarity"),
                   help="output path without suffix (.json and .md are written)")
    args = p.parse_args(argv)
    model = dinov2()
    images = photos(model, mirror=not args.no_mirror)
    names = [n + m for n in PHOTOS for m in (("", " (mirrored)") if not args.no_mirror else ("",))]
    with torch.inference_mode():
        ref = model(images)  # [B, 384]: the final class token (global_pool "token")
    base_gmacs = leanvit.count_macs(model, images).gmacs
    rows = []
    for label, method, options in METHODS:
        leanvit.patch(model, method, **options)
        try:
            with torch.inference_mode():
                feats = model(images)
            gmacs = leanvit.count_macs(model, images).gmacs
        finally:
            leanvit.unpatch(model)
        cos = torch.nn.functional.cosine_similarity(feats, ref, dim=-1)
        rows.append({"method": label, "name": method, "options": options,
                     "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                     "gmacs": gmacs, "base_gmacs": base_gmacs,
                     "per_image": dict(zip(names, map(float, cos)))})
        print(f"{label}: mean cosine {rows[-1]['mean_cosine']:.4f} (min "
              f"{rows[-1]['min_cosine']:.4f}), {gmacs:.3f} GMACs (base {base_gmacs:.3f})",
              file=sys.stderr, flush=True)

    summary = {"model": DINOV2_MODEL, "weights": DINOV2_WEIGHTS.name, "images": len(names),
               "command": command("real_weights_similarity.py", argv), "rows": rows}
    write_results(args.out, summary, _markdown(summary))
    print(_markdown(summary))
    return 0


def _markdown(s: dict) -> str:
    lines = [f"# Patched vs unpatched final class feature: real DINOv2 ViT-S/14, "
             f"{s['images']} real photos", "",
             f"Command: `{s['command']}`", ""]
    cells = [[r["method"], ", ".join(f"{k}={v!r}" for k, v in r["options"].items()) or
              "defaults", f"{r['mean_cosine']:.4f}", f"{r['min_cosine']:.4f}",
              f"{r['gmacs']:.3f} ({r['base_gmacs']:.3f})"] for r in s["rows"]]
    lines.append(md_table(["method", "options", "mean cosine", "min cosine",
                           "GMACs (unpatched)"], cells))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
