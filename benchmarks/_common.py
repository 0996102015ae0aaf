"""What the benchmark scripts share: where the shared data is, real photos, the real DINOv2
model, and the results writers. A script imports it before ``leanvit`` (``import _common``
puts this checkout first on ``sys.path``, so a script measures the code beside it, not an
installed copy).

The shared folder is ``../shared`` beside the checkout, or wherever the environment variable
``LEANVIT_SHARED`` points (as in ``tests/conftest.py``).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
SHARED = Path(os.environ.get("LEANVIT_SHARED") or REPO.parent / "shared")
#: the real DINOv2 ViT-S/14 backbone at 224 px (timm state dict, no head)
DINOV2_MODEL = "vit_small_patch14_dinov2"
DINOV2_WEIGHTS = SHARED / "weights" / "dinov2_vits14_224.safetensors"
#: DiffRate's published schedules (the authors' ``compression_rate.json``)
AUTHORS_DIFFRATE = SHARED / "reference" / "diffrate_compression_rate.json"

#: scikit-image's bundled photographs (no download); grey ones are repeated to RGB
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "retina", "immunohistochemistry",
          "hubble_deep_field", "camera", "moon", "coins", "clock", "grass", "gravel", "brick",
          "cell")


def photos(model, names: Sequence[str] = PHOTOS, mirror: bool = False):
    """The photos ``names`` as ``model``'s input ``[P, 3, H, W]`` (its timm eval transform at
    the size it was built for, ``leanvit.data.eval_transform``); with ``mirror`` each photo is
    followed by its left-right mirror image (``2 P`` images)."""
    import numpy as np
    import skimage.data
    import torch
    from PIL import Image

    from leanvit.data import eval_transform

    transform = eval_transform(model)
    out = []
    for name in names:
        arr = getattr(skimage.data, name)()
        if isinstance(arr, tuple):  # stereo_motorcycle: (left, right, disparity)
            arr = arr[0]
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        img = Image.fromarray(arr[..., :3].astype(np.uint8))
        out.append(transform(img))
        if mirror:
            out.append(transform(img.transpose(Image.FLIP_LEFT_RIGHT)))
    return torch.stack(out)


def require(*paths: Path) -> None:
    """Exit with a one-line message naming the first of ``paths`` that does not exist."""
    for p in paths:
        if not Path(p).exists():
            raise SystemExit(f"{p} not found (the shared folder is ../shared beside the "
                             "checkout, or the folder the environment variable LEANVIT_SHARED "
                             "names)")


def dinov2(**kw):
    """The real DINOv2 ViT-S/14 at 224 px in eval mode (``leanvit.models.create_model`` from
    the local weights; ``kw`` e.g. ``head=`` a probe head file, ``num_classes=0``)."""
    from leanvit.models import create_model

    require(DINOV2_WEIGHTS)
    return create_model(DINOV2_MODEL, img_size=224, checkpoint=DINOV2_WEIGHTS, **kw).eval()


def resolve(options: dict) -> dict:
    """``options`` with a DiffRate ``schedule`` named ``"authors:MODEL_KEY:TARGET"`` (e.g.
    ``"authors:ViT-S-DeiT:2.9"``) replaced by that published schedule; others as given."""
    sched = options.get("schedule")
    if not (isinstance(sched, str) and sched.startswith("authors:")):
        return options
    from leanvit.methods.diffrate import read_authors_schedule

    require(AUTHORS_DIFFRATE)
    _, model_key, target = sched.split(":")
    return {**options, "schedule": read_authors_schedule(AUTHORS_DIFFRATE, model_key, target)}


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table: ``header`` cells, then one line per row (cells as given, ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(out: str | Path, summary: dict, md: str | None = None) -> Path:
    """``summary`` as ``out`` with suffix ``.json`` (and ``md`` as ``.md``), each written to a
    temporary name first and then renamed, so an interrupted run leaves no half file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    items = [(out.with_suffix(".json"), json.dumps(summary, indent=2, default=str) + "\n")]
    if md is not None:
        items.append((out.with_suffix(".md"), md))
    for path, text in items:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return out.with_suffix(".json")


def loadavg() -> list[str]:
    """The 1, 5 and 15 minute load averages (``/proc/loadavg``; ``["n/a"]`` elsewhere)."""
    try:
        return Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return ["n/a"]


def command(script: str, argv: Sequence[str] | None = None) -> str:
    """The command line that ran ``benchmarks/<script>`` (``argv``, default ``sys.argv[1:]``),
    quoted for a shell."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"benchmarks/{script}", *args])
