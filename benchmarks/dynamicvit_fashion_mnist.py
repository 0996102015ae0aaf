"""Real experiment (issue 5): DynamicViT predictors trained on a real pretrained ViT.

Model: the real DINOv2 ViT-S/14 at 224 px (``shared/weights``), headless. Data: Fashion-MNIST
(Debian ``dataset-fashion-mnist`` IDX files), fixed seeded subsets of the training split
(probe + predictor training) and of the test split (held out). Grey 28x28 images are resized
to 224 (bicubic), copied to 3 channels, ImageNet-normalised.

1. Linear probe on the UNPRUNED features: class token concatenated with the mean of the
   patch tokens (``[B, 2C]``, the probe interface of issue 3). Uses ``leanvit.probe.fit_probe``
   when that module exists; otherwise a private fallback (multinomial logistic regression,
   L-BFGS, on standardised features) fitted on the same features.
2. DynamicViT keep 0.7, predictors before blocks 3, 6, 9, randomly initialised, trained with
   the DynamicViT loss (CE on the probe's logits + 2.0 ratio + 0.5 KL to the unpruned model
   + 0.5 token MSE over kept tokens); backbone and probe frozen. Because the backbone is
   frozen, what does not change is cached once: the hidden states entering block 3 (the first
   predictor) and the teacher's logits and final tokens. Each step then runs blocks 3..11
   (training mode: masks, tokens in place) and back-propagates into the predictors.
3. Held-out top-1 (from the cached block-3 inputs; every variant prunes at block >= 3) and
   GMACs (``leanvit.count_macs`` on the whole model, probe head included) of: unpruned,
   DynamicViT, random keep 0.7 (the same counts as DynamicViT, survivors drawn at random),
   and ``topk`` / ``evit`` at keep 0.7 when those methods are registered (issue 4a).

    flock /tmp/leanvit-cpu.lock python benchmarks/dynamicvit_fashion_mnist.py
    # -> benchmarks/results/dynamicvit_fashion_mnist.json
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import leanvit
from leanvit.adapters.vit import block_forward
from leanvit.losses import LossWeights, Output, total_loss
from leanvit.methods.dynamicvit import DECISION, keep_counts
from leanvit.models import create_model
from leanvit.registry import Method, Reducer, check_locations, register
from leanvit.state import TokenState

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights" / "dinov2_vits14_224.safetensors"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).parent / "results"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FIRST = 3  # first reducing block of every variant: blocks 0..2 are cached


# -- data -----------------------------------------------------------------------------------

def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_subset(split: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
    prefix = "train" if split == "train" else "t10k"
    images = _idx(FMNIST / f"{prefix}-images-idx3-ubyte.gz")
    labels = _idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz")
    idx = np.random.default_rng(seed).permutation(len(labels))[:n]
    return torch.from_numpy(images[idx].copy()), torch.from_numpy(labels[idx].astype(np.int64))


def to_input(images: Tensor, size: int = 224) -> Tensor:
    """uint8 ``[B, 28, 28]`` -> normalised float ``[B, 3, size, size]``."""
    x = images.float().div(255.0)[:, None]
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


# -- features and probe ---------------------------------------------------------------------

def pooled(tokens: Tensor, state: TokenState) -> Tensor:
    """``[B, 2C]``: class token and the mean of the patch tokens (size-weighted, padding and
    masked-out tokens left out)."""
    P = state.prefix
    w = state.sizes_like(tokens)[:, P:]
    if state.valid is not None:
        w = w * state.valid[:, P:].to(w.dtype)
    if state.mask is not None:
        w = w * state.mask[:, P:].to(w.dtype)
    mean = (tokens[:, P:] * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)
    return torch.cat([tokens[:, 0], mean], dim=-1)


def fit_head(feats: Tensor, labels: Tensor, classes: int) -> nn.Linear:
    try:
        from leanvit.probe import fit_probe  # issue 3

        return fit_probe(feats, labels)
    except ImportError:
        pass
    # fallback: standardise, multinomial logistic regression (L-BFGS, small L2), fold back
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mu) / sd
    lin = nn.Linear(z.shape[1], classes)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(z), labels) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    head = nn.Linear(z.shape[1], classes)
    with torch.no_grad():
        head.weight.copy_(lin.weight / sd)
        head.bias.copy_(lin.bias - (lin.weight / sd) @ mu)
    return head


# -- running the model from the cached block-3 input ----------------------------------------

def embed_and_first_blocks(model, x: Tensor) -> Tensor:
    """Unpatched blocks 0..FIRST-1 (timm modules): the input of block FIRST."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for blk in model.blocks[:FIRST]:
        x = blk(x)
    return x


def run_from(model, x: Tensor, n0: int) -> tuple[Tensor, TokenState]:
    """Blocks FIRST.. of a patched model with its method's hooks, then the final norm."""
    reducer = model.leanvit
    state = reducer.init_state(TokenState(prefix=model.num_prefix_tokens, n0=n0), x)
    for i in range(FIRST, len(model.blocks)):
        x, state = block_forward(model.blocks[i], i, x, state, reducer)
    return model.norm(x), state


# -- random keep: the control for "the predictors learned something" ------------------------

@dataclasses.dataclass(frozen=True)
class RandomKeepOptions:
    keep_rate: float = 0.7
    locations: tuple = (3, 6, 9)
    seed: int = 0


class RandomKeep(Reducer):
    """DynamicViT's counts ``int(N0 * rho ** (s + 1))`` before the same blocks, survivors drawn
    uniformly at random (seeded)."""

    def __init__(self, options, info):
        super().__init__(options, info)
        self.stage = {loc: s for s, loc in enumerate(options.locations)}
        self.gen = torch.Generator().manual_seed(options.seed)

    def acts_before(self, i):
        return i in self.stage

    def before_block(self, i, x, state):
        s, P = self.stage[i], state.prefix
        B, N = x.shape[:2]
        k = keep_counts(state.n0 - P, self.options.keep_rate, s + 1)[s]
        idx = torch.rand(B, N - P, generator=self.gen).topk(k, dim=1).indices.sort(1).values
        index = torch.cat([torch.arange(P).expand(B, -1), idx + P], dim=1)
        return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1])), state.gather(index)


def _build_random(options: RandomKeepOptions, info) -> RandomKeep:
    check_locations("locations", options.locations, info.depth)
    return RandomKeep(options, info)


def _register_random() -> None:
    if "random_keep" not in leanvit.available_methods():
        register(Method("random_keep", RandomKeepOptions, _build_random,
                        summary="control: DynamicViT's token counts, random survivors"))


# -- main -----------------------------------------------------------------------------------

def batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train", type=int, default=1000, help="training images (probe + predictors)")
    p.add_argument("--val", type=int, default=1000, help="held-out test-split images")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--keep-rate", type=float, default=0.7)
    p.add_argument("--ratio-weight", type=float, default=2.0,
                   help="ratio-loss weight (paper 2.0 for 30 ImageNet epochs; a short "
                        "schedule needs more to bring stages 2-3 to their targets)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT / "dynamicvit_fashion_mnist.json"))
    args = p.parse_args()
    if not WEIGHTS.is_file():
        raise SystemExit(f"DINOv2 weights not found at {WEIGHTS}")
    if not FMNIST.is_dir():
        raise SystemExit(f"Fashion-MNIST not found at {FMNIST} (apt install dataset-fashion-mnist)")
    torch.manual_seed(args.seed)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    model = create_model("vit_small_patch14_dinov2", img_size=224,
                                        checkpoint=str(WEIGHTS), num_classes=0).eval()
    model.requires_grad_(False)
    xtr_u8, ytr = load_subset("train", args.train, args.seed)
    xva_u8, yva = load_subset("test", args.val, args.seed + 1)

    # 1. cache block-3 inputs and the unpruned model's outputs
    t0 = time.perf_counter()
    leanvit.patch(model, "none")
    n0 = model.patch_embed.num_patches + model.num_prefix_tokens
    cache = {}
    with torch.inference_mode():
        for name, imgs in (("train", xtr_u8), ("val", xva_u8)):
            x3s, feats, toks = [], [], []
            for sl in batches(len(imgs), 50):
                x3 = embed_and_first_blocks(model, to_input(imgs[sl]))
                tok, st = run_from(model, x3, n0)
                x3s.append(x3.half())
                feats.append(pooled(tok, st))
                if name == "train":
                    toks.append(tok.half())
            cache[name] = {"x3": torch.cat(x3s), "feat": torch.cat(feats),
                           "tokens": torch.cat(toks) if toks else None}
    leanvit.unpatch(model)
    times["cache_s"] = time.perf_counter() - t0

    # 2. probe on unpruned features
    t0 = time.perf_counter()
    head = fit_head(cache["train"]["feat"], ytr, 10).eval().requires_grad_(False)
    times["probe_s"] = time.perf_counter() - t0
    with torch.no_grad():
        t_logits = head(cache["train"]["feat"])
    probe_src = "leanvit.probe" if _has_probe() else "fallback (logistic regression, L-BFGS)"

    with torch.no_grad():
        acc = (head(cache["val"]["feat"]).argmax(-1) == yva).float().mean().item()
    results = {"unpruned": {"top1": 100 * acc, "gmacs": _gmacs(model, head, xva_u8[:4])}}

    # 3. DynamicViT predictors
    t0 = time.perf_counter()
    leanvit.patch(model, "dynamicvit", keep_rate=args.keep_rate, locations=(3, 6, 9))
    preds = model.leanvit.predictor
    preds.requires_grad_(True)
    opt = torch.optim.AdamW(preds.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(args.train / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    weights = LossWeights(ratio=args.ratio_weight)
    targets = model.leanvit.keep_targets()
    log = []
    step = 0
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for epoch in range(args.epochs):
        perm = torch.randperm(args.train, generator=gen)
        for sl in batches(args.train, args.batch_size):
            idx = perm[sl]
            lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            for g in opt.param_groups:
                g["lr"] = lr
            tok, st = run_from(model, cache["train"]["x3"][idx].float(), n0)
            logits = head(pooled(tok, st))
            student = Output(logits, tok, st.mask, tuple(st.aux_values(DECISION)))
            teacher = Output(t_logits[idx], cache["train"]["tokens"][idx].float())
            loss, parts = total_loss(student, ytr[idx], teacher, weights, targets,
                                     prefix=model.num_prefix_tokens)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            kept = [float(d.mean()) for d in student.decisions]
            log.append({"step": step, "epoch": epoch, "lr": lr, "loss": float(loss.detach()),
                        **parts, "kept": kept})
            print(json.dumps(log[-1]), flush=True)
    model.eval()
    times["train_s"] = time.perf_counter() - t0
    results["dynamicvit"] = _eval_patched(model, head, cache["val"]["x3"], yva, n0, xva_u8[:4])
    leanvit.save(model, Path(args.out).with_suffix(".predictors.safetensors"))
    leanvit.unpatch(model)

    # 4. controls and off-the-shelf methods at the same keep rate
    _register_random()
    t0 = time.perf_counter()
    for name, method, opts in (
            ("random_keep", "random_keep", {"keep_rate": args.keep_rate, "seed": args.seed}),
            ("topk", "topk", {"keep_rate": args.keep_rate, "locations": (3, 6, 9)}),
            ("evit", "evit", {"keep_rate": args.keep_rate, "locations": (3, 6, 9)})):
        if method not in leanvit.available_methods():
            results[name] = {"top1": None, "gmacs": None,
                             "note": f"method {method!r} not registered on this branch"}
            continue
        leanvit.patch(model, method, **opts)
        results[name] = _eval_patched(model, head, cache["val"]["x3"], yva, n0, xva_u8[:4])
        leanvit.unpatch(model)
    times["controls_s"] = time.perf_counter() - t0
    times["total_s"] = time.perf_counter() - t_all

    report = {
        "model": "vit_small_patch14_dinov2 (real DINOv2 weights), 224 px, 257 tokens",
        "data": f"Fashion-MNIST: {args.train} train-split images (probe + predictors), "
                f"{args.val} test-split images held out; seed {args.seed}",
        "probe": probe_src, "keep_rate": args.keep_rate,
        "training": {"steps": step, "epochs": args.epochs, "batch_size": args.batch_size,
                     "lr": args.lr, "loss_weights": dataclasses.asdict(weights),
                     "first_loss": log[0], "last_loss": log[-1]},
        "results": results, "times_s": times,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def _has_probe() -> bool:
    try:
        import leanvit.probe  # noqa: F401

        return True
    except ImportError:
        return False


def _gmacs(model, head, images_u8) -> float:
    """Whole-model GMACs per image (leanvit.count_macs) plus the probe head's MACs."""
    rep = leanvit.count_macs(model, to_input(images_u8))
    return (rep.total + head.in_features * head.out_features) / 1e9


@torch.inference_mode()
def _eval_patched(model, head, x3: Tensor, labels: Tensor, n0: int, mac_images) -> dict:
    model.eval()
    correct = 0
    for sl in batches(len(x3), 100):
        tok, st = run_from(model, x3[sl].float(), n0)
        correct += int((head(pooled(tok, st)).argmax(-1) == labels[sl]).sum())
    return {"top1": 100.0 * correct / len(x3), "gmacs": _gmacs(model, head, mac_images)}


if __name__ == "__main__":
    main()
