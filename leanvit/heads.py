"""Probe heads: the probe's pooling (class token + size-weighted mean patch token), and a
fitted head saved, loaded and attached to a backbone. Fitting is :mod:`leanvit.probe`.

The probe feature of an image is the final-norm class token concatenated with the mean of the
patch tokens, ``[B, 2C]`` (Oquab et al. 2023, DINOv2, linear evaluation: "class token
concatenated with the average-pooled patch tokens"). When a method merged tokens, the mean is
weighted by how many patches each token stands for (the adapter's ``token_weights``), and
padding is left out, so a patched model pools the same image content as the unpatched one.

    save_head(head, "head.safetensors", backbone=model, model="vit_small_patch14_dinov2",
              classes=[...])
    attach_head(model, load_head("head.safetensors"))  # model(images) -> logits [B, K]

A head fits the features of one backbone's weights. :func:`save_head` records them as
``backbone_fingerprint`` (:func:`backbone_fingerprint`: ``"sha256:<hex>"`` over the backbone's
tensors, the classifier left out), and :func:`attach_head` refuses a head whose fingerprint is
not the model's (``check_backbone=False`` overrides). Heads saved before the fingerprint
existed are attached with a warning.
"""
from __future__ import annotations

import hashlib
import json
import warnings
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
# Which backbone a head was fitted to

#: state-dict names left out of :func:`backbone_fingerprint`: the classifier and its pooling
#: (replaced by :func:`attach_head`) and a leanvit method's state (``model.leanvit``), none of
#: which changes the features a probe head reads
NOT_BACKBONE = ("head.", "head_dist.", "fc_norm.", "attn_pool.", "leanvit.")


def backbone_fingerprint(model: nn.Module) -> str:
    """``"sha256:<64 hex>"``: SHA-256 over the backbone's state dict (every tensor but those
    under :data:`NOT_BACKBONE`), in name order: each tensor's name, dtype and shape, then its
    bytes (C order).

    Equal for the same weights on any device, patched by a leanvit method or not, with any
    classifier; changes when any backbone weight, dtype or shape changes. Cost: one pass over
    the weights at the speed of SHA-256 (on a CPU with SHA instructions about a second for
    ViT-L's 1.2 GB of float32 weights), plus a copy to the CPU for a model on an
    accelerator.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.startswith(NOT_BACKBONE):
            continue
        t = t.detach().to("cpu").contiguous()
        header = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode()
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return "sha256:" + h.hexdigest()


def _short(fingerprint: str) -> str:
    return fingerprint[:19]  # "sha256:" and 12 hex digits


def check_head_backbone(model: nn.Module, head: nn.Linear, where: str = "head",
                        override: str = "pass check_backbone=False to attach_head to override"
                        ) -> None:
    """``ValueError`` when ``head`` (from :func:`load_head`) records a backbone other than
    ``model``'s weights; a warning when it comes from a file that records none (an older
    leanvit). In-memory heads (fresh from a fit) carry no record and are not checked.
    ``where`` names the head in messages; ``override`` is the error's last hint."""
    if not hasattr(head, "backbone_fingerprint"):
        return
    fitted = head.backbone_fingerprint
    if not fitted:
        warnings.warn(f"{where} records no backbone fingerprint (written by an older leanvit): "
                      "cannot check that it was fitted to this model's weights; fit it again "
                      "to record it", UserWarning, stacklevel=3)
        return
    mine = backbone_fingerprint(model)
    if mine != fitted:
        raise ValueError(
            f"{where} was fitted to backbone {_short(fitted)}, this model is {_short(mine)} "
            "(other weights: another checkpoint, or random weights of another seed); fit a "
            f"probe on this model{', or ' + override if override else ''}")


# --------------------------------------------------------------------------------------------
# Saving, loading, attaching


def save_head(head: nn.Linear, path: str | Path, *, backbone: Optional[nn.Module] = None,
              **meta: Any) -> Path:
    """Write ``head`` (``weight`` ``[K, D]``, ``bias`` ``[K]``) to a safetensors file, atomically.

    ``meta`` (e.g. ``model=``, ``classes=[names]``, ``img_size=``, ``accuracy=``) is stored
    as JSON strings in the file's metadata, with ``in_features`` and ``num_classes`` added,
    and ``width`` (C = D / 2) and ``feature`` unless ``meta`` names them (a dense head:
    ``width`` = D). ``backbone``: the model whose features the head was fitted on; its
    :func:`backbone_fingerprint` is stored as ``backbone_fingerprint``, which
    :func:`attach_head` checks.
    """
    from safetensors.torch import save_file

    if not isinstance(head, nn.Linear):
        raise TypeError(f"head must be an nn.Linear, got {type(head).__name__}")
    path = Path(path)
    info = dict(dict(width=head.in_features // 2, feature="class token + mean patch token"),
                **meta, in_features=head.in_features, num_classes=head.out_features)
    if backbone is not None:
        info["backbone_fingerprint"] = backbone_fingerprint(backbone)
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
    """The ``nn.Linear`` :func:`save_head` wrote (bit-identical weights, float32), with the
    backbone it was fitted to as its ``backbone_fingerprint`` attribute (``None`` for a file
    from before the fingerprint), which :func:`attach_head` checks."""
    from safetensors.torch import load_file

    meta = head_metadata(path)  # existence and readability, with clear errors
    tensors = load_file(str(path))
    if set(tensors) != {"weight", "bias"} or tensors["weight"].dim() != 2:
        raise ValueError(f"{path} is not a leanvit probe head (expected 'weight' [K, D] and "
                         f"'bias' [K], found {', '.join(sorted(tensors))})")
    k, d = tensors["weight"].shape
    head = nn.Linear(d, k, dtype=tensors["weight"].dtype)
    with torch.no_grad():
        head.weight.copy_(tensors["weight"])
        head.bias.copy_(tensors["bias"])
    fingerprint = meta.get("backbone_fingerprint")
    head.backbone_fingerprint = fingerprint if isinstance(fingerprint, str) else None
    head.source = str(path)
    return head


def attach_head(model: nn.Module, head: nn.Linear | str | Path, *,
                check_backbone: bool = True) -> nn.Module:
    """Make the timm ViT ``model`` a classifier on the probe feature, IN PLACE; returns it.

    Installs :class:`ClassMeanPool` as the model's ``attn_pool`` (with
    ``pool_include_prefix = True`` so it sees the class token), ``fc_norm`` as identity (the
    probe feature is built from the final-norm tokens) and ``head`` as ``model.head``. timm's
    own ``forward`` then gives logits ``[B, K]``; so does a leanvit-patched model, whose
    adapter passes token sizes to the pool. Works before or after :func:`leanvit.patch`.

    A head from a file (a path, or :func:`load_head`) must have been fitted to this model's
    weights (its ``backbone_fingerprint``, see :func:`backbone_fingerprint`);
    ``check_backbone=False`` attaches it anyway. A file without one gives a warning.

    Raises:
        ValueError: not a timm ViT with a class token, a head for another width
            (``head.in_features != 2 * model.embed_dim``), or a head fitted to other weights.
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
    if check_backbone:
        check_head_backbone(model, head, f"head {getattr(head, 'source', '')}".strip())
    p = next(model.parameters(), None)
    if p is not None:
        head = head.to(device=p.device, dtype=p.dtype)
    model.attn_pool = ClassMeanPool(model.num_prefix_tokens)
    model.pool_include_prefix = True
    model.fc_norm = nn.Identity()
    model.head = head
    model.num_classes = head.out_features
    return model

