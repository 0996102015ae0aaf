"""Creating timm models by name, with local checkpoints and clear errors (no network)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import timm
from torch import nn


def checkpoint_keys(path: Path) -> Optional[set[str]]:
    """Parameter names in a safetensors checkpoint (``None`` for other formats)."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"checkpoint {path} is not a readable safetensors file: {e}") from None


def create_model(
    name: str,
    *,
    img_size: Optional[int] = None,
    checkpoint: Optional[str | Path] = None,
    num_classes: Optional[int] = None,
    head: Optional[str | Path] = None,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` with random weights, or weights from a local ``checkpoint``.

    Args:
        name: a timm model name, e.g. ``"deit_small_patch16_224"``.
        img_size: input size in pixels, passed to timm (position embeddings are resampled when
            a checkpoint was trained at another size).
        checkpoint: a timm state dict (``.safetensors``, ``.pth``, ``.bin``); loaded the timm
            way (``pretrained_cfg_overlay=dict(file=...)``), so the model's own key filters
            apply. A safetensors file without classifier weights gives a headless model.
        num_classes: classifier size; ``0`` for a headless backbone.
        head: a linear-probe head file (``leanvit probe``, :func:`leanvit.heads.save_head`)
            attached with :func:`leanvit.heads.attach_head`: the model then classifies from
            its class token + mean patch token.

    Raises:
        ValueError: unknown model name, missing or unreadable checkpoint, or a checkpoint that
            does not fit the model; a head fitted for another model or width.
    """
    model = _create(name, img_size=img_size, checkpoint=checkpoint, num_classes=num_classes,
                    **kwargs)
    if head is not None:
        _attach_head_file(model, name, head)
    return model


def _attach_head_file(model: nn.Module, name: str, head: str | Path) -> None:
    from leanvit.heads import attach_head, head_metadata, load_head

    meta = head_metadata(head)
    fitted_on = meta.get("model")
    if fitted_on and fitted_on != name:
        raise ValueError(f"head {head} was fitted on {fitted_on} features, not {name}")
    attach_head(model, load_head(head))


def _create(name: str, *, img_size, checkpoint, num_classes, **kwargs: Any) -> nn.Module:
    if not isinstance(name, str) or not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8] if isinstance(name, str) else []
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown timm model {name!r}{hint}")
    kw = dict(kwargs)
    if img_size is not None:
        if not isinstance(img_size, int) or img_size <= 0:
            raise ValueError(f"img_size must be a positive int, got {img_size!r}")
        kw["img_size"] = img_size
    if num_classes is not None:
        kw["num_classes"] = num_classes
    if checkpoint is None:
        return _size_free(name, kw, lambda **k: timm.create_model(name, pretrained=False, **k))
    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    keys = checkpoint_keys(path)
    if keys is not None and num_classes is None and not any(k.startswith("head.") for k in keys):
        kw["num_classes"] = 0  # a backbone without classifier (e.g. DINOv2 features)
    try:
        return _size_free(name, kw, lambda **k: timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **k))
    except (RuntimeError, KeyError, OSError, EOFError, ValueError) as e:
        msg = str(e).strip().splitlines()
        raise ValueError(
            f"could not load checkpoint {path} into {name}: {msg[0] if msg else type(e).__name__}"
        ) from None
    except Exception as e:  # unpickling errors of corrupt .pth files come in many types
        raise ValueError(f"could not load checkpoint {path} into {name}: "
                         f"{type(e).__name__}: {e}") from None


def _size_free(name: str, kw: dict, make) -> nn.Module:
    """``make(**kw)``; for convolutional models that take any input size and so have no
    ``img_size`` argument (ConvNeXt), ``img_size`` instead sets the input size of the model's
    data config (``pretrained_cfg["input_size"]``: transforms, benchmarks, MAC counts)."""
    try:
        return make(**kw)
    except TypeError as e:
        if "img_size" not in kw or "img_size" not in str(e):
            raise
    rest = {k: v for k, v in kw.items() if k != "img_size"}
    model = make(**rest)
    size = kw["img_size"]
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg["input_size"] = (3, size, size)
    model.pretrained_cfg = cfg
    return model


def input_size(model: nn.Module) -> tuple[int, int]:
    """The ``(H, W)`` input size a model is built or configured for: ``patch_embed.img_size``
    (ViT, Swin), else its data config's ``input_size`` (ConvNeXt: any size works; 224 by
    default, or what :func:`create_model`'s ``img_size`` set)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        return int(size[0]), int(size[1])
    cfg = getattr(model, "pretrained_cfg", None) or {}
    s = cfg.get("input_size", (3, 224, 224))
    return int(s[1]), int(s[2])
