"""How close the patched model's features stay to the unpatched model's, with real weights on
real photos.

Model: the real DINOv2 ViT-S/14 backbone in ``shared/weights`` (beside the repository), loaded
the timm way (see its README). Images: the natural photos bundled with scikit-image (no
download), each also mirrored, preprocessed with timm's data config for the model (bicubic,
ImageNet mean/std, 224 x 224). For each method at its default setting: the cosine similarity
between the patched and the unpatched final class feature (after the final norm), per image,
and its mean; and the MACs per image (``leanvit.count_macs``, averaged over the images).

Run it under the shared CPU lock::

    flock /tmp/leanvit-cpu.lock python benchmarks/real_weights_similarity.py

Writes ``benchmarks/results/real_weights_similarity.json`` and ``.md``. To add a method, add
one line to ``METHODS``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from leanvit._files import atomic_write_text

import torch

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / "shared" / "weights" / "dinov2_vits14_224.safetensors"
MODEL = "vit_small_patch14_dinov2"

#: (label, method, options): each method at its default setting. One line each.
METHODS = [
    ("evit", "evit", {}),
    ("topk", "topk", {}),
    ("tome", "tome", {}),
]

#: scikit-image's bundled natural photos (synthetic images such as colorwheel left out)
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "retina", "immunohistochemistry",
          "hubble_deep_field", "camera", "moon", "coins", "clock", "grass", "gravel", "brick",
          "cell"]


def load_photos(model: torch.nn.Module, mirror: bool = True) -> tuple[torch.Tensor, list[str]]:
    """The photos as a ``[B, 3, 224, 224]`` batch preprocessed for ``model``, and their names."""
    import numpy as np
    import skimage.data
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    # The model's own data config (bicubic, ImageNet mean/std), at the size it was built for
    # (DINOv2's pretrained config says 518 px; the shared weights are for 224).
    size = tuple(model.patch_embed.img_size)
    transform = create_transform(**resolve_data_config({"input_size": (3, *size)}, model=model))
    images, names = [], []
    for name in PHOTOS:
        arr = getattr(skimage.data, name)()
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        img = Image.fromarray(arr.astype(np.uint8)).convert("RGB")
        images.append(transform(img))
        names.append(name)
        if mirror:
            images.append(transform(img.transpose(Image.FLIP_LEFT_RIGHT)))
            names.append(name + " (mirrored)")
    return torch.stack(images), names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(WEIGHTS), help="DINOv2 ViT-S/14 timm state dict")
    p.add_argument("--no-mirror", action="store_true", help="only the photos, not mirrored")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" /
                                        "real_weights_similarity"),
                   help="output path without suffix (.json and .md are written)")
    args = p.parse_args(argv)
    if not Path(args.weights).is_file():
        print(f"DINOv2 weights not found at {args.weights}", file=sys.stderr)
        return 2

    import leanvit
    from leanvit.models import create_model

    model = create_model(MODEL, img_size=224, checkpoint=args.weights).eval()
    images, names = load_photos(model, mirror=not args.no_mirror)
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

    summary = {"model": MODEL, "weights": Path(args.weights).name, "images": len(names),
               "command": "python benchmarks/real_weights_similarity.py " +
                          " ".join(argv if argv is not None else sys.argv[1:]),
               "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
    md = _markdown(summary)
    atomic_write_text(out.with_suffix(".md"), md)
    print(md)
    return 0


def _markdown(s: dict) -> str:
    lines = [f"# Patched vs unpatched final class feature: real DINOv2 ViT-S/14, "
             f"{s['images']} real photos", "",
             f"Command: `{s['command']}`", "",
             "| method | options | mean cosine | min cosine | GMACs (unpatched) |",
             "|---|---|---|---|---|"]
    for r in s["rows"]:
        opts = ", ".join(f"{k}={v!r}" for k, v in r["options"].items()) or "defaults"
        lines.append(f"| {r['method']} | {opts} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} "
                     f"| {r['gmacs']:.3f} ({r['base_gmacs']:.3f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
