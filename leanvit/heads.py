"""Probe heads: the probe's pooling (class token + size-weighted mean patch token), and a
fitted head saved, loaded and attached to a backbone. Fitting is :mod:`leanvit.probe`.

The probe feature of an image is the final-norm class token concatenated with the mean of the
patch tokens, ``[B, 2C]`` (Oquab et al. 2023, DINOv2, linear evaluation: "class token
concatenated with the average-pooled patch tokens"). When a method merged tokens, the mean is
weighted by how many patches each token stands for (the adapter's ``token_weights``), and
padding is left out, so a patched model pools the same image content as the unpatched one.

    save_head(head, "head.safetensors", model="vit_small_patch14_dinov2", classes=[...])
    attach_head(model, load_head("head.safetensors"))  # model(images) -> logits [B, K]
"""
from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import torch
from torch import Tensor, nn

from leanvit import adapters
from leanvit._files import atomic_path

#: name under which the probe pooling reports itself (``ModelInfo.global_pool``)
POOL_TYPE = "token+avg"


class ClassMeanPool(nn.Module):
    """``[B, N, C]`` tokens (prefix tokens first) -> ``[B, 2C]``: class token, weighted mean
    of the patch tokens.

    ``weights`` ``[B, N]`` (token sizes, 0 for padding; the leanvit adapter passes them, see
    ``leanvit.adapters.vit.pool``) weight the mean; ``None`` is a plain mean. Installed as
    the ViT's ``attn_pool`` by :func:`attach_head`, so timm's own ``forward_head`` uses it too.
    """

    takes_token_weights = True  # the adapter passes per-token weights to such a pool
    pool_type = POOL_TYPE

    def __init__(self, num_prefix_tokens: int):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: Tensor, weights: Optional[Tensor] = None) -> Tensor:
        return class_mean(x, self.num_prefix_tokens, weights)

    def extra_repr(self) -> str:
        return f"num_prefix_tokens={self.num_prefix_tokens}"


def class_mean(x: Tensor, num_prefix_tokens: int, weights: Optional[Tensor] = None) -> Tensor:
    """``cat(x[:, 0], weighted mean of x[:, num_prefix_tokens:])``: ``[B, N, C]`` -> ``[B, 2C]``.

    Register tokens (prefix tokens after the class token) are in neither half, as in DINOv2.
    """
    patches = x[:, num_prefix_tokens:]
    if weights is None:
        mean = patches.mean(dim=1)
    else:
        w = weights[:, num_prefix_tokens:].to(x.dtype).unsqueeze(-1)
        mean = (patches * w).sum(dim=1) / w.sum(dim=1)
    return torch.cat([x[:, 0], mean], dim=-1)

def check_probe_model(model: nn.Module) -> ModuleType:
    """The adapter of ``model`` (:func:`leanvit.adapters.find_adapter`); ``ValueError`` unless
    it is a flat-token family with a class token (what the probe feature reads)."""
    adapter = adapters.find_adapter(model)
    if adapter.KIND != "tokens":
        raise ValueError(f"the probe feature reads a class token and patch tokens; "
                         f"{adapter.FAMILY} models have stages of maps")
    if getattr(model, "cls_token", None) is None:
        raise ValueError("the probe feature needs a class token; this model has none "
                         "(class_token=False)")
    return adapter


# --------------------------------------------------------------------------------------------
# Saving, loading, attaching


def save_head(head: nn.Linear, path: str | Path, **meta: Any) -> Path:
    """Write ``head`` (``weight`` ``[K, D]``, ``bias`` ``[K]``) to a safetensors file, atomically.

    ``meta`` (e.g. ``model=``, ``classes=[names]``, ``img_size=``, ``accuracy=``) is stored
    as JSON strings in the file's metadata, with ``in_features`` and ``num_classes`` added,
    and ``width`` (C = D / 2) and ``feature`` unless ``meta`` names them (a dense head:
    ``width`` = D).
    """
    from safetensors.torch import save_file

    if not isinstance(head, nn.Linear):
        raise TypeError(f"head must be an nn.Linear, got {type(head).__name__}")
    path = Path(path)
    info = dict(dict(width=head.in_features // 2, feature="class token + mean patch token"),
                **meta, in_features=head.in_features, num_classes=head.out_features)
    if "classes" in info and len(info["classes"]) != head.out_features:
        raise ValueError(f"{len(info['classes'])} class names for {head.out_features} outputs")
    tensors = {"weight": head.weight.detach().cpu().contiguous(),
               "bias": (head.bias if head.bias is not None
                        else torch.zeros(head.out_features)).detach().cpu().contiguous()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in info.items()})
    return path


def head_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata :func:`save_head` stored (decoded from JSON)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"head file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"head {path} is not a readable safetensors file: {e}") from None
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def load_head(path: str | Path) -> nn.Linear:
    """The ``nn.Linear`` :func:`save_head` wrote (bit-identical weights, float32)."""
    from safetensors.torch import load_file

    head_metadata(path)  # existence and readability, with clear errors
    tensors = load_file(str(path))
    if set(tensors) != {"weight", "bias"} or tensors["weight"].dim() != 2:
        raise ValueError(f"{path} is not a leanvit probe head (expected 'weight' [K, D] and "
                         f"'bias' [K], found {', '.join(sorted(tensors))})")
    k, d = tensors["weight"].shape
    head = nn.Linear(d, k, dtype=tensors["weight"].dtype)
    with torch.no_grad():
        head.weight.copy_(tensors["weight"])
        head.bias.copy_(tensors["bias"])
    return head


def attach_head(model: nn.Module, head: nn.Linear | str | Path) -> nn.Module:
    """Make the timm ViT ``model`` a classifier on the probe feature, IN PLACE; returns it.

    Installs :class:`ClassMeanPool` as the model's ``attn_pool`` (with
    ``pool_include_prefix = True`` so it sees the class token), ``fc_norm`` as identity (the
    probe feature is built from the final-norm tokens) and ``head`` as ``model.head``. timm's
    own ``forward`` then gives logits ``[B, K]``; so does a leanvit-patched model, whose
    adapter passes token sizes to the pool. Works before or after :func:`leanvit.patch`.

    Raises:
        ValueError: not a timm ViT with a class token, or a head for another width
            (``head.in_features != 2 * model.embed_dim``).
    """
    if isinstance(head, (str, Path)):
        if head_metadata(head).get("dense"):
            raise ValueError(f"{head} is a per-patch (dense) probe head; use it with "
                             "'leanvit compare --dense --head', not as a classifier")
        head = load_head(head)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head must be an nn.Linear or a path, got {type(head).__name__}")
    check_probe_model(model)
    from timm.models.vision_transformer import VisionTransformer

    if adapters.original_class(model).forward_head is not VisionTransformer.forward_head:
        raise ValueError(f"{adapters.original_class(model).__name__} has its own forward_head "
                         "(e.g. DeiT's distillation head); attach_head supports plain timm "
                         "VisionTransformer heads")
    width = model.embed_dim
    if head.in_features != 2 * width:
        raise ValueError(
            f"head takes {head.in_features} features (a probe for width {head.in_features // 2}),"
            f" but the model's probe feature is {2 * width} wide (width {width}); fit a probe "
            "for this model")
    p = next(model.parameters(), None)
    if p is not None:
        head = head.to(device=p.device, dtype=p.dtype)
    model.attn_pool = ClassMeanPool(model.num_prefix_tokens)
    model.pool_include_prefix = True
    model.fc_norm = nn.Identity()
    model.head = head
    model.num_classes = head.out_features
    return model

