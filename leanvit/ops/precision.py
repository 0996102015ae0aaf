"""Precision helpers: which floating-point dtype a model computes in, and a clear error for
images of another dtype (instead of torch's "Input type (float) and bias type (c10::BFloat16)
should be the same" deep inside the patch embedding).

Pure functions on tensors and modules; nothing here knows timm.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def floating_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """The dtype of ``module``'s first floating-point parameter (or buffer), ``None`` if it
    has none (e.g. ``torch.bfloat16`` after ``model.bfloat16()``)."""
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    for t in module.buffers():
        if t.is_floating_point():
            return t.dtype
    return None


def check_input_dtype(x: Tensor, weight_dtype: torch.dtype) -> None:
    """Raise ``TypeError`` for images ``x`` ``[B, C, H, W]`` the model cannot take as they are.

    Images must be floating point; their dtype must be the model's (``weight_dtype``, e.g. the
    patch embedding's weight) unless autocast is on for ``x``'s device, which casts both.
    Traceable by ``torch.compile`` (dtype and autocast state are constants of the graph).
    """
    if not x.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor (normalised pixels), got "
                        f"{x.dtype}; convert them, e.g. images.float() / 255 and normalise")
    if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
        name = str(weight_dtype).replace("torch.", "")
        raise TypeError(
            f"images are {str(x.dtype).replace('torch.', '')} but the model's weights are "
            f"{name}: pass images.to(torch.{name}), or keep the model in float32 and run it "
            f"under torch.autocast({x.device.type!r}, dtype=torch.{name})")
