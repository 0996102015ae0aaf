"""DiffRate's rate search on the real DINOv2 ViT-S/14 with real Fashion-MNIST images.

1. Search: ~1000 Fashion-MNIST training images (28x28 grey, upsampled to 224 RGB, ImageNet
   normalisation), distillation to the unpatched model's features (class token + mean patch
   token: no labels needed), the authors' optimiser settings, to ``--target-gmacs``; reports
   wall time, steps, the schedule and how close its deployed MACs (``count_macs``) are.
2. Probe comparison (only when ``leanvit.probe`` (issue 3) and the ``tome``/``evit`` methods
   (issue 4) are available): a linear probe per method on held-out images, DiffRate against
   ToMe and EViT tuned to the same GMACs, and the dense model.

Heavy: run under the shared CPU lock, e.g.

    flock /tmp/leanvit-cpu.lock python benchmarks/diffrate_dinov2.py --target-gmacs 4.0 \\
        --epochs 3 --out /tmp/diffrate_dinov2.json
"""
from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import leanvit
from leanvit.search.diffrate import search
from leanvit.models import create_model
from leanvit.schedule import load_schedule, save_schedule

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / "shared" / "weights" / "dinov2_vits14_224.safetensors"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str, n: int, seed: int, size: int = 224
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of a split (fixed random subset) as normalised ``[n, 3, size, size]``."""
    prefix = "train" if split == "train" else "t10k"
    images = _idx(FMNIST / f"{prefix}-images-idx3-ubyte.gz")
    labels = _idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    x = torch.from_numpy(images[order.numpy()].copy()).float().div(255)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    x = x.expand(-1, 3, -1, -1)
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    return x.contiguous(), torch.from_numpy(labels[order.numpy()].astype(np.int64))


def dinov2():
    return create_model("vit_small_patch14_dinov2", img_size=224, checkpoint=WEIGHTS).eval()


def run_search(args) -> dict:
    model = dinov2()
    images, _ = fashion_mnist("train", args.images, seed=0)
    dense = leanvit.count_macs(model, images[:1]).gmacs
    print(f"dense {dense:.4f} GMACs; target {args.target_gmacs}", flush=True)
    t0 = time.perf_counter()

    def log(rec):
        if rec["step"] % 5 == 0:
            print(f"step {rec['step']:4d} epoch {rec['epoch']} task {rec['task']:.4f} "
                  f"gmacs {rec['gmacs']:.3f} lr {rec['lr']:.4f} "
                  f"t {time.perf_counter() - t0:.0f}s", flush=True)

    result = search(model, args.target_gmacs, images, epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                    objective="distill-features", progress=False, log=log)
    s = result.schedule
    save_schedule(s, args.out)
    err = (s.gmacs - args.target_gmacs) / args.target_gmacs
    summary = {"dense_gmacs": dense, "target_gmacs": args.target_gmacs, "gmacs": s.gmacs,
               "relative_error": err, "seconds": result.seconds, "steps": result.steps,
               "images": args.images, "prune_kept": list(s.prune_kept),
               "merge_kept": list(s.merge_kept), "schedule_file": str(args.out)}
    print(json.dumps(summary, indent=1), flush=True)
    return summary


def _tune(model, method: str, key: str, lo: float, hi: float, target: float, images,
          integer: bool, extra: dict) -> tuple[float, float]:
    """Bisect one option so the method's GMACs come closest to ``target``."""
    best = None
    for _ in range(20):
        mid = round((lo + hi) / 2) if integer else (lo + hi) / 2
        leanvit.patch(model, method, **{key: mid}, **extra)
        g = leanvit.count_macs(model, images[:2]).gmacs
        leanvit.unpatch(model)
        if best is None or abs(g - target) < abs(best[1] - target):
            best = (mid, g)
        # more reduction (bigger r, smaller keep rate) -> fewer MACs
        more = (g > target)
        if method == "tome":
            lo, hi = (mid, hi) if more else (lo, mid)
        else:
            lo, hi = (lo, mid) if more else (mid, hi)
        if integer and hi - lo <= 1:
            break
    return best


def run_probe(args, schedule_path: str) -> None:
    try:
        from leanvit import probe
    except ImportError:
        print("leanvit.probe (issue 3) is not available: probe comparison skipped")
        return
    missing = [m for m in ("tome", "evit") if m not in leanvit.available_methods()]
    if missing:
        print(f"methods {missing} (issue 4) not available: probe comparison skipped")
        return
    model = dinov2()
    train_x, train_y = fashion_mnist("train", args.probe_train, seed=1)
    val_x, val_y = fashion_mnist("val", args.probe_val, seed=2)
    target = load_schedule(schedule_path).gmacs
    configs = {"dense": ("none", {}), "diffrate": ("diffrate", {"schedule": schedule_path})}
    r, g = _tune(model, "tome", "r", 1, 64, target, val_x, True, {})
    configs["tome"] = ("tome", {"r": r})
    k, g = _tune(model, "evit", "keep_rate", 0.05, 1.0, target, val_x, False, {})
    configs["evit"] = ("evit", {"keep_rate": k})
    rows = {}
    for name, (method, opts) in configs.items():
        if method != "none":
            leanvit.patch(model, method, **opts)
        gm = leanvit.count_macs(model, val_x[:2]).gmacs
        with torch.no_grad():
            ftr = torch.cat([probe.features(model, train_x[i:i + 64])
                             for i in range(0, len(train_x), 64)])
            fva = torch.cat([probe.features(model, val_x[i:i + 64])
                             for i in range(0, len(val_x), 64)])
        head = probe.fit_probe(ftr, train_y)
        acc = (head(fva).argmax(-1) == val_y).float().mean().item()
        rows[name] = {"options": {k: str(v) for k, v in opts.items()}, "gmacs": gm,
                      "accuracy": acc}
        print(f"{name:9s} {gm:.3f} GMACs  top-1 {acc * 100:.2f}%  {opts}", flush=True)
        if method != "none":
            leanvit.unpatch(model)
    Path(args.out).with_suffix(".probe.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target-gmacs", type=float, default=4.0)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--min-lr", type=float, default=0.001)
    ap.add_argument("--out", default="/tmp/diffrate_dinov2.json")
    ap.add_argument("--skip-search", action="store_true", help="reuse --out's schedule")
    ap.add_argument("--probe", action="store_true", help="run the probe comparison")
    ap.add_argument("--probe-train", type=int, default=2000)
    ap.add_argument("--probe-val", type=int, default=1000)
    args = ap.parse_args()
    torch.manual_seed(0)
    if not WEIGHTS.is_file() or not FMNIST.is_dir():
        raise SystemExit(f"needs {WEIGHTS} and {FMNIST}")
    if not args.skip_search:
        run_search(args)
    if args.probe:
        run_probe(args, args.out)


if __name__ == "__main__":
    main()
