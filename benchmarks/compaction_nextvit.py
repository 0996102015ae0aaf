"""Why NextViT-S saves less than the paper's -11.5% MACs / -13.9% params, and what would.

1. Where NextViT-S's MACs are (``torch.utils.flop_counter`` per module, 224 px): FFN ``fc1``
   and ``fc2`` (1x1 convolutions of every block, ``NextConvBlock`` s included), the
   multi-head convolutional attention (``mhca``: grouped 3x3 convolution + 1x1 projection; no
   attention maps), the stem, E-MHSA (the only attention with maps), patch embeddings.
2. Savings of ``leanvit.compact`` (deploy form, traced MACs, parameters) for DeiT-S,
   PVTv2-b1 and NextViT-S at ``ffn_ratio`` 2/3 (the paper's ``t``, read as rank = t * C, the
   issue's contract) and 1/2, hMHSA + cFFN and each alone.

cFFN replaces ``m x C`` MACs per token by ``r (m + C)`` (``r`` = rank): with ``r = 2C/3`` it
saves ``1 - 2/3 (1 + C/m)`` of ``fc2``: 17 % at DeiT's ``m = 4C``, 11 % at NextViT's
``m = 3C`` (its conv blocks) and 0 at ``m = 2C`` (its transformer blocks).

    flock /tmp/leanvit-cpu.lock python benchmarks/compaction_nextvit.py
    # -> benchmarks/results/compaction_nextvit.json
"""
from __future__ import annotations

import collections
import copy
import json
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import leanvit
from leanvit._files import atomic_write_text
from leanvit.macs import traced_macs

OUT = Path(__file__).parent / "results" / "compaction_nextvit.json"
MODELS = ("deit_small_patch16_224", "pvt_v2_b1", "nextvit_small")
PAPER = {"pvt_v2_b1": {"macs": -15.2, "params": -13.2},
         "nextvit_small": {"macs": -11.5, "params": -13.9}}


def params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def breakdown(model, x) -> dict:
    """Share (%) of the traced MACs per kind of module."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    total = counter.get_total_flops()
    cats: collections.Counter = collections.Counter()
    for name, ops in counter.get_flop_counts().items():
        leaf = name.split(".")[-1]
        if name.endswith(("mlp.fc1", "mlp.fc2", ".e_mhsa", ".mhca", ".patch_embed")) or \
                name in ("NextViT.stem", "NextViT.head"):
            key = "fc1" if leaf == "fc1" else "fc2" if leaf == "fc2" else leaf
            cats[key] += sum(ops.values())
    return {k: round(100 * v / total, 2) for k, v in cats.most_common()}


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    results: dict = {"models": {}}
    variants = {"hMHSA + cFFN t=2/3": {}, "cFFN t=2/3": {"attention": None},
                "hMHSA": {"ffn": None}, "hMHSA + cFFN t=1/2": {"ffn_ratio": 0.5},
                "cFFN t=1/2": {"ffn_ratio": 0.5, "attention": None}}
    for name in MODELS:
        base = timm.create_model(name).eval()
        mb, pb = traced_macs(base, x), params(base)
        row = {"gmacs": mb / 1e9, "params": pb, "variants": {}}
        if name == "nextvit_small":
            row["mac_share_percent"] = breakdown(base, x)
            row["mlp_ratio_per_block"] = [b.mlp.fc1.out_channels // b.mlp.fc1.in_channels
                                          for st in base.stages for b in st.blocks]
        for vname, opts in variants.items():
            c = leanvit.compact(copy.deepcopy(base), **opts)
            if opts.get("ffn", "compact") is not None:
                leanvit.reparameterize(c)
            c.eval()
            row["variants"][vname] = {"macs_change_percent": round(100 * (traced_macs(c, x) / mb - 1), 2),
                                      "params_change_percent": round(100 * (params(c) / pb - 1), 2)}
            print(name, vname, row["variants"][vname], flush=True)
        if name in PAPER:
            row["paper_percent"] = PAPER[name]
        results["models"][name] = row
    results["command"] = "flock /tmp/leanvit-cpu.lock python benchmarks/compaction_nextvit.py"
    atomic_write_text(OUT, json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["models"]["nextvit_small"].get("mac_share_percent")))


if __name__ == "__main__":
    main()
