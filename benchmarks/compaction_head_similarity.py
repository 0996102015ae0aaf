"""Head similarity (the paper's Table 4) and conversion fidelity on the real DINOv2 ViT-S/14.

The pretrained model is converted with ``leanvit.compact`` (no fine-tune: the trainer is issue
5's), calibrated on crops of some of scikit-image's bundled photos, and evaluated on OTHER
photos. Reported per variant:

- ``head_cos``: mean pairwise cosine similarity between the heads' attention maps (each
  post-softmax map ``[N, N]`` flattened), averaged over head pairs, images and blocks; the
  paper reports it above 50% for plain models and lower for hMHSA (after training).
- ``feat_cos``: cosine similarity of the converted model's features (class token after the
  final norm) to the plain model's, mean over the evaluation images (fidelity before any
  fine-tune; 1 = identical).
- ``logit_r2``: 1 - relative squared error of the hallucinated heads' row-centred logits
  against the pretrained heads they replace (on the evaluation images, model inputs of the
  plain model), mean over blocks.

    flock /tmp/leanvit-cpu.lock python benchmarks/compaction_head_similarity.py --out benchmarks/results/compaction_head_similarity.json
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

import leanvit
from leanvit.compaction.modules import HallucinatedAttention

WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / \
    "dinov2_vits14_224.safetensors"
CALIBRATION = ("astronaut", "coffee", "chelsea", "rocket")
EVALUATION = ("cat", "camera", "coins", "horse", "clock", "moon", "immunohistochemistry",
              "hubble_deep_field", "retina", "colorwheel", "page", "brick")
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def photos(names, crops_per_image: int, seed: int) -> torch.Tensor:
    """``[len(names) * crops, 3, 224, 224]``: random square crops (half to full of the short
    side) resized to 224, ImageNet-normalised; grayscale photos repeated to RGB."""
    import skimage.data

    g = torch.Generator().manual_seed(seed)
    out = []
    for name in names:
        img = torch.from_numpy(np.asarray(getattr(skimage.data, name)())).float() / 255.0
        img = img[..., None].repeat(1, 1, 3) if img.dim() == 2 else img[..., :3]
        img = img.permute(2, 0, 1)
        h, w = img.shape[1:]
        for c in range(crops_per_image):
            s = int(min(h, w) * (1.0 if c == 0 else float(0.5 + 0.5 * torch.rand((), generator=g))))
            top = int(torch.randint(0, h - s + 1, (), generator=g))
            left = int(torch.randint(0, w - s + 1, (), generator=g))
            crop = img[:, top:top + s, left:left + s][None]
            crop = F.interpolate(crop, size=(224, 224), mode="bicubic", align_corners=False)
            out.append(((crop[0].clamp(0, 1) - MEAN[:, None, None]) / STD[:, None, None]))
    return torch.stack(out)


def load_dinov2() -> torch.nn.Module:
    return timm.create_model("vit_small_patch14_dinov2", pretrained=True, img_size=224,
                             num_classes=0,
                             pretrained_cfg_overlay=dict(file=str(WEIGHTS))).eval()


@torch.no_grad()
def block_inputs(model, x):
    """Input of every block's attention (after norm1), ``[B, N, C]`` each."""
    seen = {}
    hooks = [blk.attn.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0]))
             for i, blk in enumerate(model.blocks)]
    feats = model(x)
    for h in hooks:
        h.remove()
    return [seen[i] for i in range(len(model.blocks))], feats


@torch.no_grad()
def maps_and_logits(attn, y):
    """All heads' post-softmax maps ``[B, H, N, N]`` and logits (plain timm or hMHSA)."""
    if isinstance(attn, HallucinatedAttention):
        q, k, _ = attn.leanvit_qkv(y)
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if attn.hallucinate is not None:
            logits = torch.cat([logits, attn.hallucinate(logits)], 1)
        return logits.softmax(-1), logits
    B, N, _ = y.shape
    qkv = attn.qkv(y).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    return logits.softmax(-1), logits


def mean_pairwise_cos(maps: torch.Tensor) -> float:
    """``maps`` ``[B, H, N, N]`` -> mean over images and head pairs of the cosine similarity."""
    f = F.normalize(maps.flatten(2), dim=-1)
    sim = f @ f.transpose(1, 2)  # [B, H, H]
    H = sim.shape[1]
    iu = torch.triu_indices(H, H, 1)
    return float(sim[:, iu[0], iu[1]].mean())


def centred(x):
    return x - x.mean(-1, keepdim=True)


@torch.no_grad()
def evaluate(plain, model, x, plain_inputs, plain_feats):
    ins, feats = block_inputs(model, x)
    head_cos, r2 = [], []
    for i, (blk, pblk) in enumerate(zip(model.blocks, plain.blocks)):
        maps, _ = maps_and_logits(blk.attn, ins[i])
        head_cos.append(mean_pairwise_cos(maps))
        if isinstance(blk.attn, HallucinatedAttention) and blk.attn.hallucinated_heads:
            # hallucinated logits from the PLAIN model's block input vs the heads replaced
            _, lg = maps_and_logits(blk.attn, plain_inputs[i])
            _, plg = maps_and_logits(pblk.attn, plain_inputs[i])
            order = blk.attn.head_order
            hc = blk.attn.computed_heads
            tgt = centred(plg[:, order[hc:]])
            err = (centred(lg[:, hc:]) - tgt).square().sum() / tgt.square().sum()
            r2.append(1 - float(err))
    feat_cos = float(F.cosine_similarity(feats, plain_feats, dim=-1).mean())
    return {"head_cos": float(np.mean(head_cos)), "head_cos_per_block": head_cos,
            "feat_cos": feat_cos, "logit_r2": float(np.mean(r2)) if r2 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-crops", type=int, default=4, help="crops per calibration photo")
    ap.add_argument("--eval-crops", type=int, default=2, help="crops per evaluation photo")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if not WEIGHTS.is_file():
        raise SystemExit(f"DINOv2 weights not found at {WEIGHTS}")
    calib = photos(CALIBRATION, args.calib_crops, seed=0)
    evalx = photos(EVALUATION, args.eval_crops, seed=1)
    plain = load_dinov2()
    plain_inputs, plain_feats = block_inputs(plain, evalx)
    results = {"plain": evaluate(plain, plain, evalx, plain_inputs, plain_feats)}
    variants = {
        "hMHSA mix, copy init (no calibration)": dict(ffn=None, hallucination="mix"),
        "hMHSA mix, fitted": dict(ffn=None, hallucination="mix", images=calib),
        "hMHSA dwconv 3x3, fitted": dict(ffn=None, hallucination="dwconv", images=calib),
        "cFFN t=2/3 (SVD)": dict(attention=None, images=calib),
        "hMHSA mix + cFFN t=2/3, fitted": dict(hallucination="mix", images=calib),
        "hMHSA dwconv + cFFN t=2/3, fitted": dict(hallucination="dwconv", images=calib),
    }
    for name, opts in variants.items():
        model = leanvit.compact(copy.deepcopy(plain), **opts).eval()
        results[name] = evaluate(plain, model, evalx, plain_inputs, plain_feats)
    print(f"calibration: {len(calib)} crops of {', '.join(CALIBRATION)}; evaluation: "
          f"{len(evalx)} crops of {', '.join(EVALUATION)} (scikit-image {__import__('skimage').__version__})")
    print(f"{'variant':38} {'head cos':>9} {'feat cos':>9} {'logit R2':>9}")
    for name, r in results.items():
        r2 = "" if r["logit_r2"] is None else f"{r['logit_r2']:9.3f}"
        print(f"{name:38} {r['head_cos']:9.3f} {r['feat_cos']:9.4f} {r2:>9}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
