"""Linear-probe accuracy of the real DINOv2 ViT-S/14 before and right after conversion.

Fashion-MNIST (Debian ``dataset-fashion-mnist``; 28x28 grayscale, resized to 224, RGB,
ImageNet-normalised): a logistic-regression probe (``torch`` L-BFGS, L2 1e-3, on
standardised class-token features) is fitted on ``--train`` training images and evaluated on
``--val`` test-set images, for the plain model and for converted ones
(``leanvit.compact(..., images=16 other training images)``, no fine-tune: the distillation
fine-tune needs issue 5's trainer). Each model gets its own probe (as a user would refit).

    flock /tmp/leanvit-cpu.lock python benchmarks/compaction_probe.py --out benchmarks/results/compaction_probe.json
"""
from __future__ import annotations

import argparse
import copy
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import leanvit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compaction_head_similarity import load_dinov2  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def balanced(labels: np.ndarray, n: int, skip: int = 0) -> np.ndarray:
    """Indices of ``n`` images, the same number per class, after the first ``skip`` per class."""
    per = n // 10
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[skip: skip + per]
                                   for c in range(10)]))


def to_input(imgs: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(imgs.copy()).float()[:, None] / 255.0
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (x - MEAN[:, None, None]) / STD[:, None, None]


@torch.no_grad()
def features(model, imgs: np.ndarray, batch: int = 50) -> torch.Tensor:
    return torch.cat([model(to_input(imgs[i:i + batch])) for i in range(0, len(imgs), batch)])


def probe_accuracy(ftr, ytr, fva, yva, l2: float = 1e-3) -> float:
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fva = (ftr - mu) / sd, (fva - mu) / sd
    lin = torch.nn.Linear(ftr.shape[1], 10)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(ftr), ytr) + l2 * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((lin(fva).argmax(1) == yva).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=500)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"Fashion-MNIST not found in {FMNIST}")
    xtr, ytr = read_idx(FMNIST / "train-images-idx3-ubyte.gz"), read_idx(
        FMNIST / "train-labels-idx1-ubyte.gz")
    xte, yte = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz"), read_idx(
        FMNIST / "t10k-labels-idx1-ubyte.gz")
    itr, iva = balanced(ytr, args.train), balanced(yte, args.val)
    icalib = balanced(ytr, 20, skip=args.train // 10)[:16]
    calib = to_input(xtr[icalib])
    ytr_t, yva_t = torch.from_numpy(ytr[itr].astype(np.int64)), torch.from_numpy(
        yte[iva].astype(np.int64))
    plain = load_dinov2()
    variants = {
        "plain": None,
        "hMHSA mix": dict(ffn=None, hallucination="mix"),
        "hMHSA dwconv": dict(ffn=None, hallucination="dwconv"),
        "cFFN t=2/3": dict(attention=None),
        "hMHSA mix + cFFN t=2/3": dict(hallucination="mix"),
    }
    results = {}
    for name, opts in variants.items():
        t0 = time.time()
        model = plain if opts is None else leanvit.compact(copy.deepcopy(plain), images=calib,
                                                           **opts).eval()
        if opts is not None and opts.get("ffn", "compact") is not None:
            leanvit.reparameterize(model)  # deploy form (same outputs, deploy MACs)
        acc = probe_accuracy(features(model, xtr[itr]), ytr_t, features(model, xte[iva]), yva_t)
        results[name] = {"accuracy": acc, "gmacs": leanvit.count_macs(model, calib[:1]).gmacs,
                         "params": sum(p.numel() for p in model.parameters())}
        print(f"{name:26} probe acc {100 * acc:5.1f}%  {results[name]['gmacs']:.3f} GMACs  "
              f"({time.time() - t0:.0f} s)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"train": args.train, "val": args.val, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
