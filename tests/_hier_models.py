"""Tiny random ConvNeXt and Swin models of real timm architectures for the hierarchical
tests (stage 3 has 5 blocks, so the authors' locations (1, 2, 3) fit and blocks 3-4 are
routed by the last decision)."""
from __future__ import annotations

import timm
import torch


def tiny_convnext(**kw) -> torch.nn.Module:
    """ConvNeXt (channels-last MLPs), widths 16-128, depths (1, 1, 5, 1); 64 px input gives a
    4x4 stage-3 map (16 tokens). Layer scales set to random O(1) values so that every branch
    matters in comparisons (timm initialises them to 1e-6)."""
    cfg = dict(dims=(16, 32, 64, 128), depths=(1, 1, 5, 1), conv_mlp=False, num_classes=5)
    cfg.update(kw)
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", **cfg).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for stage in model.stages:
            for blk in stage.blocks:
                blk.gamma.copy_(0.5 + torch.rand(blk.gamma.shape, generator=gen))
    return model


def tiny_swin(**kw) -> torch.nn.Module:
    """Swin-T architecture at 128 px with width 32, depths (1, 1, 5, 1), window 4: stage 3 is
    8x8 (64 tokens, four windows, shifted windows in its odd blocks); no drop-path, so
    training-mode forwards are deterministic apart from the Gumbel noise."""
    cfg = dict(img_size=128, embed_dim=32, depths=(1, 1, 5, 1), num_heads=(1, 2, 2, 4),
               window_size=4, num_classes=5, drop_path_rate=0.0)  # timm's Swin-T default: 0.1
    cfg.update(kw)
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", **cfg).eval()


def images(model, b: int = 2, seed: int = 1) -> torch.Tensor:
    from leanvit.models import input_size

    size = input_size(model) if hasattr(model, "patch_embed") else (64, 64)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, *size, generator=g)
