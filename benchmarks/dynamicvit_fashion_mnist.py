"""Real experiment (issue 5): DynamicViT predictors trained on a real pretrained ViT, in one
table with the training-free methods at the same keep rate.

Model: the real DINOv2 ViT-S/14 at 224 px (``shared/weights``), headless, 257 tokens. Data:
Fashion-MNIST (Debian ``dataset-fashion-mnist`` IDX files), fixed seeded subsets of the
training split (probe + predictor training) and of the test split (held out). Grey 28x28
images are resized to 224 (bicubic), copied to 3 channels, ImageNet-normalised.

1. Linear probe (``leanvit.probe.fit_probe``) on the UNPRUNED features of the training
   images: class token concatenated with the mean of the patch tokens (``[B, 2C]``).
2. DynamicViT keep 0.7, predictors before blocks 3, 6, 9, randomly initialised, trained with
   the DynamicViT loss (``leanvit.losses.total_loss``: CE on the probe's logits + ratio MSE
   + 0.5 KL to the unpruned model + 0.5 token MSE over kept tokens); backbone and probe
   frozen (the recipe freezes the backbone for its first epochs; this short schedule never
   unfreezes it). Because the backbone is frozen, what does not change is cached once: the
   hidden states entering block 3 (the first predictor) and the teacher's logits and final
   tokens. Each step then runs blocks 3..11 in training mode (hard Gumbel decisions, tokens
   kept in place and masked; the masked softmax in fp32 as the authors do) and
   back-propagates into the predictors. ``--bf16`` runs the training steps and the
   training-set cache under CPU bfloat16 autocast (1.8x faster on this CPU); held-out
   evaluation is always fp32.
3. Held-out top-1 of every variant from the cached fp32 block-3 inputs (every variant
   reduces at blocks >= 3), and GMACs per image (``leanvit.count_macs`` on the whole model,
   probe head included): unpruned, DynamicViT, ``topk`` 0.7, ``evit`` 0.7 and random keep 0.7
   (DynamicViT's token counts, survivors drawn at random: the control for "the predictors
   learned something").

    flock /tmp/leanvit-cpu.lock python benchmarks/dynamicvit_fashion_mnist.py --bf16
    # -> benchmarks/results/dynamicvit_fashion_mnist.{json,md}, and the trained predictors
    #    (leanvit.save) beside them
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import leanvit
from leanvit._files import atomic_write_text
from leanvit.adapters import vit
from leanvit.losses import LossWeights, Output, total_loss
from leanvit.methods.dynamicvit import DECISION
from leanvit.models import create_model
from leanvit.probe import class_mean, fit_probe, save_head
from leanvit.data import read_idx
from leanvit.state import TokenState

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights" / "dinov2_vits14_224.safetensors"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).parent / "results"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FIRST = 3  # first reducing block of every variant: blocks 0..2 are cached


# -- data -----------------------------------------------------------------------------------

def load_subset(split: str, n: int, seed: int) -> tuple[Tensor, Tensor]:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(FMNIST / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(FMNIST / f"{prefix}-labels-idx1-ubyte.gz")
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


# -- features -------------------------------------------------------------------------------

def pooled(tokens: Tensor, state: TokenState) -> Tensor:
    """``[B, 2C]`` probe feature (``leanvit.heads.class_mean``): class token and the mean of
    the patch tokens, weighted as the model's own pooling weighs them
    (``leanvit.adapters.vit.token_weights``: by size, without padding or masked-out tokens)."""
    return class_mean(tokens, state.prefix, vit.token_weights(state, tokens))


# -- running the model from the cached block-3 input ----------------------------------------

def embed_and_first_blocks(model, x: Tensor) -> Tensor:
    """The input of block FIRST: the library's embedding and blocks 0..FIRST-1 of the patched
    model (``leanvit.adapters.vit.embed`` / ``run_blocks``; no variant acts before FIRST)."""
    return vit.run_blocks(model, *vit.embed(model, x), 0, FIRST)[0]


def run_from(model, x: Tensor, n0: int) -> tuple[Tensor, TokenState]:
    """Blocks FIRST.. of a patched model with its method's hooks, then the final norm
    (``leanvit.adapters.vit.run_blocks`` from a fresh per-forward state)."""
    state = model.leanvit.init_state(TokenState(prefix=model.num_prefix_tokens, n0=n0), x)
    return vit.run_blocks(model, x, state, FIRST)


# The random-keep control is the registered method ``random`` (leanvit/methods/random_keep.py):
# DynamicViT's counts before the same blocks, survivors drawn uniformly at random (seeded).


# -- main -----------------------------------------------------------------------------------

def batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


@torch.inference_mode()
def _cache(model, images_u8: Tensor, n0: int, bf16: bool, keep_tokens: bool) -> dict:
    """Block-3 inputs, probe features and (optionally) final tokens of the unpruned model."""
    x3s, feats, toks = [], [], []
    for sl in batches(len(images_u8), 50):
        with _autocast(bf16):
            x3 = embed_and_first_blocks(model, to_input(images_u8[sl]))
            tok, st = run_from(model, x3, n0)
        x3s.append(x3.float() if not bf16 else x3.to(torch.bfloat16))
        feats.append(pooled(tok.float(), st))
        if keep_tokens:
            toks.append(tok.to(torch.bfloat16))
    return {"x3": torch.cat(x3s), "feat": torch.cat(feats),
            "tokens": torch.cat(toks) if toks else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train", type=int, default=2000, help="training images (probe + predictors)")
    p.add_argument("--val", type=int, default=1000, help="held-out test-split images")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak lr of the predictors")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps, then cosine")
    p.add_argument("--keep-rate", type=float, default=0.7)
    p.add_argument("--ratio-weight", type=float, default=10.0,
                   help="ratio-loss weight (paper: 2.0 for 30 ImageNet epochs; with 2.0 this "
                        "short schedule leaves stages 2-3 keeping everything, see README)")
    p.add_argument("--monitor", type=int, default=200,
                   help="held-out images scored after each epoch (progress only)")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast for training and the training-set cache")
    p.add_argument("--init", default=None,
                   help="start from predictors saved by an earlier run (leanvit.save file): "
                        "a longer schedule in several runs")
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
    mac_images = xva_u8[:4]

    # 1. cache block-3 inputs and the unpruned model's outputs (held-out set always fp32)
    t0 = time.perf_counter()
    leanvit.patch(model, "none")
    n0 = model.patch_embed.num_patches + model.num_prefix_tokens
    train = _cache(model, xtr_u8, n0, args.bf16, keep_tokens=True)
    times["cache_train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    val = _cache(model, xva_u8, n0, False, keep_tokens=False)
    times["cache_val_s"] = time.perf_counter() - t0
    leanvit.unpatch(model)

    # 2. probe on the unpruned training features
    t0 = time.perf_counter()
    probe_info: dict = {}
    head = fit_probe(train["feat"], ytr, 10, info=probe_info).eval().requires_grad_(False)
    times["probe_s"] = time.perf_counter() - t0
    with torch.no_grad():
        t_logits = head(train["feat"])
        acc = (head(val["feat"]).argmax(-1) == yva).float().mean().item()
    results = {"unpruned": {"top1": 100 * acc, "gmacs": _gmacs(model, head, mac_images),
                            "steps": 0, "train_s": 0.0}}

    # 3. DynamicViT predictors
    if args.init:
        leanvit.load(model, args.init)
        if model.leanvit.options.keep_rate != args.keep_rate:
            raise SystemExit(f"{args.init} was trained at keep_rate "
                             f"{model.leanvit.options.keep_rate}, not {args.keep_rate}")
    else:
        leanvit.patch(model, "dynamicvit", keep_rate=args.keep_rate, locations=(3, 6, 9))
    preds = model.leanvit.predictor
    preds.requires_grad_(True)
    opt = torch.optim.AdamW(preds.parameters(), lr=args.lr, weight_decay=0.05)
    total_steps = args.epochs * math.ceil(args.train / args.batch_size)
    prior_steps = _prior_steps(args.init)
    weights = LossWeights(ratio=args.ratio_weight)
    targets = model.leanvit.keep_targets()
    log, monitor = [], []
    step = 0
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(args.train, generator=gen)
        for sl in batches(args.train, args.batch_size):
            idx = perm[sl]
            if step < args.warmup:
                lr = args.lr * (step + 1) / args.warmup
            else:
                t = (step - args.warmup) / max(1, total_steps - args.warmup)
                lr = args.lr * 0.5 * (1 + math.cos(math.pi * t))
            for g in opt.param_groups:
                g["lr"] = lr
            with _autocast(args.bf16):
                tok, st = run_from(model, train["x3"][idx].float(), n0)
                logits = head(pooled(tok.float(), st))
            student = Output(logits.float(), tok.float(), st.mask,
                             tuple(st.aux_values(DECISION)))
            teacher = Output(t_logits[idx], train["tokens"][idx].float())
            loss, parts = total_loss(student, ytr[idx], teacher, weights, targets,
                                     prefix=model.num_prefix_tokens)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            kept = [round(float(d.detach().mean()), 4) for d in student.decisions]
            log.append({"step": step, "epoch": epoch, "lr": lr, "loss": float(loss.detach()),
                        **parts, "kept": kept, "elapsed_s": round(time.perf_counter() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
        if args.monitor:
            m = min(args.monitor, args.val)
            r = _eval_patched(model, head, val["x3"][:m], yva[:m], n0, None)
            monitor.append({"epoch": epoch, "step": step, "top1_first_%d_val" % m: r["top1"]})
            print(json.dumps(monitor[-1]), flush=True)
    times["train_s"] = time.perf_counter() - t0
    model.eval()
    results["dynamicvit"] = {**_eval_patched(model, head, val["x3"], yva, n0, mac_images),
                             "steps": step + prior_steps, "train_s": times["train_s"]}
    t0 = time.perf_counter()
    diagnosis = _diagnose(model, head, val["x3"], yva, n0, args.seed)
    times["diagnose_s"] = time.perf_counter() - t0
    print(json.dumps(diagnosis), flush=True)
    leanvit.save(model, Path(args.out).with_suffix(".predictors.safetensors"))
    save_head(head, Path(args.out).with_suffix(".head.safetensors"),
              model="vit_small_patch14_dinov2", accuracy=results["unpruned"]["top1"])
    leanvit.unpatch(model)

    # 4. training-free methods and the random control, same keep rate and locations
    for name, method, opts in (
            ("topk", "topk", {"keep_rate": args.keep_rate, "locations": (3, 6, 9)}),
            ("evit", "evit", {"keep_rate": args.keep_rate, "locations": (3, 6, 9)}),
            ("random_keep", "random", {"keep_rate": args.keep_rate, "locations": (3, 6, 9),
                                       "seed": args.seed})):
        leanvit.patch(model, method, **opts)
        t0 = time.perf_counter()
        results[name] = {**_eval_patched(model, head, val["x3"], yva, n0, mac_images),
                         "steps": 0, "train_s": 0.0}
        times[f"eval_{name}_s"] = time.perf_counter() - t0
        leanvit.unpatch(model)
    times["total_s"] = time.perf_counter() - t_all

    report = {
        "model": "vit_small_patch14_dinov2 (real DINOv2 weights), 224 px, 257 tokens",
        "data": f"Fashion-MNIST: {args.train} train-split images (probe + predictors), "
                f"{args.val} test-split images held out; seed {args.seed}",
        "probe": {"fit": "leanvit.probe.fit_probe on unpruned training features", **probe_info},
        "keep_rate": args.keep_rate, "locations": [3, 6, 9],
        "training": {"steps": step, "epochs": args.epochs, "batch_size": args.batch_size,
                     "lr": args.lr, "warmup": args.warmup, "bf16": args.bf16,
                     "loss_weights": dataclasses.asdict(weights), "keep_targets": targets,
                     "init": args.init, "prior_steps": prior_steps,
                     "first": log[0], "last": log[-1], "monitor": monitor},
        "diagnosis": diagnosis,
        "results": results, "times_s": times,
        "threads": torch.get_num_threads(),
        "command": "python benchmarks/dynamicvit_fashion_mnist.py " + " ".join(sys.argv[1:]),
    }
    out = Path(args.out)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), _table(report))
    atomic_write_text(out.with_suffix(".log.jsonl"), "".join(json.dumps(r) + "\n" for r in log))
    print(_table(report))


def _table(report: dict) -> str:
    names = {"unpruned": "unpruned", "dynamicvit": "DynamicViT (trained predictors)",
             "topk": "top-k by class attention", "evit": "EViT (fused)",
             "random_keep": "random keep (DynamicViT's counts)"}
    lines = [f"DINOv2 ViT-S/14 + linear probe on Fashion-MNIST; {report['data']}; keep "
             f"{report['keep_rate']} at blocks 3, 6, 9.", "",
             "| variant | held-out top-1 | GMACs / image | training steps | training time (this run) |",
             "|---|---|---|---|---|"]
    for k, name in names.items():
        r = report["results"][k]
        t = f"{r['train_s']:.0f} s" if r["steps"] else "-"
        lines.append(f"| {name} | {r['top1']:.1f}% | {r['gmacs']:.3f} | {r['steps']} | {t} |")
    d = report.get("diagnosis")
    if d:
        lines += ["", f"DynamicViT in training mode (hard Gumbel decisions, tokens masked): "
                  f"{d['train_mode_top1']:.1f}% held-out top-1. Keep probabilities per stage "
                  "(mean / share confident, p<0.1 or p>0.9): " + ", ".join(
                      f"{x['mean_p']:.2f} / {x['confident']:.2f}" for x in d["stages"]) + "."]
    return "\n".join(lines) + "\n"


def _prior_steps(init) -> int:
    """Training steps of the run that saved ``init`` (from its JSON report beside it)."""
    if not init:
        return 0
    report = Path(init).with_suffix("").with_suffix(".json")
    if not report.is_file():
        raise SystemExit(f"--init {init}: its report {report} is missing (steps unknown)")
    return int(json.loads(report.read_text())["results"]["dynamicvit"]["steps"])


@torch.inference_mode()
def _diagnose(model, head, x3: Tensor, labels: Tensor, n0: int, seed: int) -> dict:
    """What the trained predictors do, on the held-out images.

    - ``train_mode_top1``: top-1 with the decisions the predictors were trained with (hard
      Gumbel samples of their keep probabilities, tokens masked in place), one sample.
    - per stage, over the tokens still kept when the predictor runs (training mode):
      ``mean_p`` (mean keep probability), ``confident`` (share with p < 0.1 or p > 0.9),
      ``kept`` (share of the stage's input tokens the Gumbel decisions kept).
    A predictor whose probabilities sit near the target ratio without being confident
    trains on nearly random subsets, while inference keeps the top-scored tokens: the two
    diverge until training makes the probabilities confident.
    """
    probs: dict[int, list] = {s: [] for s in range(len(model.leanvit.predictor))}

    def hook(s):
        def fn(mod, args, out):
            keep = args[1] if len(args) > 1 and args[1] is not None else None
            p = out[..., 0].float().exp()
            w = torch.ones_like(p) if keep is None else keep.float()
            probs[s].append((p, w))
        return fn

    handles = [m.register_forward_hook(hook(s)) for s, m in enumerate(model.leanvit.predictor)]
    torch.manual_seed(seed)
    model.train()
    correct = 0
    try:
        for sl in batches(len(x3), 100):
            tok, st = run_from(model, x3[sl].float(), n0)
            correct += int((head(pooled(tok, st)).argmax(-1) == labels[sl]).sum())
    finally:
        for h in handles:
            h.remove()
        model.eval()
    stages = []
    for s, items in probs.items():
        p = torch.cat([a.flatten() for a, _ in items])
        w = torch.cat([b.flatten() for _, b in items])
        n = w.sum()
        stages.append({"mean_p": float((p * w).sum() / n),
                       "confident": float((((p < 0.1) | (p > 0.9)).float() * w).sum() / n)})
    return {"train_mode_top1": 100.0 * correct / len(x3), "stages": stages}


def _gmacs(model, head, images_u8) -> float:
    """Whole-model GMACs per image (leanvit.count_macs) plus the probe head's MACs."""
    rep = leanvit.count_macs(model, to_input(images_u8))
    return (rep.total + head.in_features * head.out_features) / 1e9


@torch.inference_mode()
def _eval_patched(model, head, x3: Tensor, labels: Tensor, n0: int, mac_images) -> dict:
    was_training = model.training
    model.eval()
    correct = 0
    for sl in batches(len(x3), 100):
        tok, st = run_from(model, x3[sl].float(), n0)
        correct += int((head(pooled(tok, st)).argmax(-1) == labels[sl]).sum())
    model.train(was_training)
    out = {"top1": 100.0 * correct / len(x3)}
    if mac_images is not None:
        out["gmacs"] = _gmacs(model, head, mac_images)
    return out


if __name__ == "__main__":
    main()
