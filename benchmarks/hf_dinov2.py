"""The real DINOv2 ViT-S/14 (timm state dict) converted into Hugging Face ``Dinov2Model``:
the unpatched HF model equals the timm model, and each token method on the HF model equals
the same method on the timm model, on real photos and Fashion-MNIST (features within 1e-4
relative). Writes ``benchmarks/results/hf_dinov2.json``; no speed measured here.

    python benchmarks/hf_dinov2.py [--fashion 64] [--out FILE] [--save-pretrained DIR]
    python benchmarks/hf_dinov2.py --probe HEAD [--data DIR] [--cache DIR]

``--probe``: the results page's probe through the converted ``Dinov2Model`` against timm's
(:func:`probe_check`), written to ``benchmarks/results/hf_dinov2_probe.json``.

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

#: methods and settings compared (mid-strength settings of each registered token method;
#: DiffRate: 12 tokens pruned then 12 merged in every block)
_KEPT = [257 - 24 * i for i in range(10)] + [17, 17]
SETTINGS = [("none", {}), ("tome", {"r": 13}), ("pitome", {"r": 13}), ("mctf", {"r": 13}),
            ("tofu", {"r": 13}), ("evit", {"keep_rate": 0.7}), ("topk", {"keep_rate": 0.7}),
            ("ats", {}), ("zerotprune", {"r": 13}), ("divprune", {"keep_rate": 0.7}),
            ("dynamicvit", {"keep_rate": 0.7}), ("random", {"keep_rate": 0.7}),
            ("diffrate", {"schedule": (_KEPT, [k - 12 if k > 17 else k for k in _KEPT])})]


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
    base = hf.base_model
    emb = base.embeddings
    # (HF tensors, timm keys, dim): the timm tensors concatenated along ``dim`` are the HF
    # ones concatenated along ``dim`` (q/k/v rows of qkv; class and distillation tokens)
    pairs: list[tuple[list, list, int]] = [
        ([emb.cls_token] + ([emb.distillation_token] if hasattr(emb, "distillation_token")
                            else []), ["cls_token", "dist_token"], 1),
        ([emb.position_embeddings], ["pos_embed"], 0)]
    one = lambda dst, key: pairs.append(([dst], [key], 0))  # noqa: E731
    for name, mod in (("patch_embed.proj", emb.patch_embeddings.projection),
                      ("norm", base.layernorm)):
        one(mod.weight, name + ".weight"), one(mod.bias, name + ".bias")
    layers = base.layers if hasattr(base, "layers") else base.encoder.layer
    for i, blk in enumerate(layers):  # transformers 5 names
        t, at = f"blocks.{i}.", blk.attention
        pairs += [([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight],
                   [t + "attn.qkv.weight"], 0),
                  ([at.q_proj.bias, at.k_proj.bias, at.v_proj.bias], [t + "attn.qkv.bias"], 0)]
        norm1 = getattr(blk, "norm1", None) or blk.layernorm_before
        norm2 = getattr(blk, "norm2", None) or blk.layernorm_after
        for name, mod in (("attn.proj", at.o_proj), ("norm1", norm1), ("norm2", norm2),
                          ("mlp.fc1", blk.mlp.fc1), ("mlp.fc2", blk.mlp.fc2)):
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


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-image ``||a - b|| / ||b||`` (``inf`` when the token counts differ)."""
    if a.shape != b.shape:
        return float("inf")
    return float(((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max())


def compare(hf: nn.Module, tm: nn.Module, x: torch.Tensor) -> dict:
    """Unpatched and each of :data:`SETTINGS`: the HF model's final tokens against timm's."""
    import leanvit

    with torch.no_grad():
        rows = {"unpatched": {"relative": relative(hf(x).last_hidden_state,
                                                   tm.forward_features(x))}}
    for method, options in SETTINGS:
        leanvit.patch(tm, method, **options)
        leanvit.patch(hf, method, **options)
        hf.leanvit.load_state_dict(tm.leanvit.state_dict())  # DynamicViT's predictors
        with torch.no_grad():
            torch.manual_seed(0)
            a = hf(x).last_hidden_state
            torch.manual_seed(0)
            b = tm.forward_features(x)  # patched: the final tokens left
        rows[method] = {"options": {k: str(v) for k, v in options.items()},
                        "tokens": int(b.shape[1]), "relative": relative(a, b)}
        leanvit.unpatch(tm), leanvit.unpatch(hf)
    return rows


def fashion_images(model: nn.Module, n: int) -> torch.Tensor:
    """``n`` class-balanced Fashion-MNIST test images as ``model``'s input."""
    import tempfile

    from PIL import Image

    from leanvit.data import eval_transform, export_fashion_mnist

    with tempfile.TemporaryDirectory() as tmp:
        root = export_fashion_mnist(Path(tmp) / "fm", train=10, val=n)
        files = sorted((root / "val").glob("*/*.png"))
        t = eval_transform(model)
        return torch.stack([t(Image.open(f).convert("RGB")) for f in files])


def probe_check(hf: nn.Module, head: str, data: str, cache: str, limit: int = 500) -> dict:
    """Top-1 of the probe ``head`` on the results page's ``limit`` val images of ``data``
    (its fixed seeded subset) through the HF model's final tokens (class token + mean patch
    token, as ``leanvit.heads.class_mean``) and through timm's (the unpatched timm features
    the page cached in ``cache``, all val images); identical predictions and the largest
    relative feature difference on those images."""
    from safetensors.torch import load_file
    from torch.utils.data import Subset

    from leanvit.data import fixed_subset, loader
    from leanvit.evaluate import load_split
    from leanvit.heads import class_mean, load_head

    ds = load_split(_common.dinov2(num_classes=0), data, "val")
    labels = torch.tensor([t for _, t in ds.samples])
    timm_all = next(load_file(str(f))["features"] for f in sorted(Path(cache).glob(
        "*-val-*.safetensors")) if torch.equal(load_file(str(f))["labels"], labels))
    sub = fixed_subset(ds, limit)
    idx = torch.tensor(sub.indices if isinstance(sub, Subset) else range(len(ds)))
    hf_feats = torch.cat([class_mean(hf(x).last_hidden_state, 1) for x, _ in loader(sub, 50)])
    lin = load_head(head)
    pred = {"timm": lin(timm_all[idx]).argmax(1), "hf": lin(hf_feats).argmax(1)}
    top1 = {k: 100.0 * float((v == labels[idx]).float().mean()) for k, v in pred.items()}
    return {"images": len(idx), "of": len(ds), "top1": top1,
            "timm_top1_all_val": 100.0 * float((lin(timm_all).argmax(1) == labels).float()
                                               .mean()),
            "same_predictions": int((pred["timm"] == pred["hf"]).sum()),
            "max_relative_feature_difference": relative(hf_feats, timm_all[idx])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fashion", type=int, default=20, help="Fashion-MNIST test images")
    ap.add_argument("--out", default=None, help="default benchmarks/results/hf_dinov2.json "
                    "(with --probe: hf_dinov2_probe.json)")
    ap.add_argument("--probe", default=None, metavar="HEAD", help="the results page's head")
    ap.add_argument("--data", default="results/tmp/fmnist")
    ap.add_argument("--cache", default="results/tmp/cache")
    ap.add_argument("--save-pretrained", metavar="DIR", help="also write the converted model "
                    "as a local Hugging Face folder (config.json + weights), the input of "
                    "e.g. 'leanvit bench DIR --method tome --set r=13'")
    args = ap.parse_args(argv)
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    torch.set_grad_enabled(False)
    _common.require(_common.DINOV2_WEIGHTS)
    sd = load_file(str(_common.DINOV2_WEIGHTS))
    hf = Dinov2Model._from_config(dinov2_config(sd), attn_implementation="sdpa")
    hf = load_timm_into_hf(hf, sd).eval()
    if args.save_pretrained:
        hf.save_pretrained(args.save_pretrained)
    if args.probe is not None:
        r = {"command": _common.command("hf_dinov2.py", argv), **probe_check(
            hf, args.probe, args.data, args.cache)}
        path = _common.write_results(args.out or _common.RESULTS / "hf_dinov2_probe.json", r)
        print(json.dumps(r, indent=1), f"wrote {path}", sep="\n")
        return 0
    tm = _common.dinov2(num_classes=0)
    sets = {"photos": _common.photos(tm), "fashion_mnist": fashion_images(tm, args.fashion)}
    result = {"command": _common.command("hf_dinov2.py", argv), "tolerance": 1e-4,
              "model": "Dinov2Model (sdpa) from " + _common.DINOV2_WEIGHTS.name,
              "images": {k: int(v.shape[0]) for k, v in sets.items()},
              "results": {k: compare(hf, tm, v) for k, v in sets.items()}}
    worst = max(r["relative"] for rows in result["results"].values() for r in rows.values())
    result["max_relative"], result["pass"] = worst, worst <= 1e-4
    path = _common.write_results(args.out or _common.RESULTS / "hf_dinov2.json", result)
    print(f"max relative difference {worst:.3g} over {len(SETTINGS)} settings "
          f"({'pass' if result['pass'] else 'FAIL'}); wrote {path}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
