"""Backbone adapters: one module per family, each exposing

- ``FAMILY`` (name) and ``DESCRIPTION`` (for error messages),
- ``matches(model_class) -> bool``, ``check_supported(model)`` (raises ``ValueError``),
- ``describe(model) -> ModelInfo``,
- ``forward_features(model, x, recorder=None, trace_source=False, on_block=None) ->
  (x, state)`` and
  ``forward_head(model, x, state, pre_logits=False, recorder=None)``,
- optionally ``loss_tokens(model, features, state) -> (tokens [B, N, C], keep [B, N])``: the
  tokens the token-distillation loss compares (hierarchical families: the final map per
  position) when they are not ``forward_features``'s output as it is,
- ``_PatchedX`` mixin class whose methods replace the model's ``forward`` while patched.
"""
from __future__ import annotations

import sys
from types import ModuleType

from torch import nn

from leanvit.adapters import convnext, eva, swin, vit

ADAPTERS: tuple[ModuleType, ...] = (vit, eva, convnext, swin)
_MIXINS = {vit: vit._PatchedViT, eva: eva._PatchedEva, convnext: convnext._PatchedConvNeXt,
           swin: swin._PatchedSwin}
_PATCHED_CLASSES: dict[type, type] = {}


def find_adapter(model: nn.Module) -> ModuleType:
    """The adapter of ``model``'s family; ``ValueError`` naming the supported ones otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    base = original_class(model)
    for adapter in ADAPTERS:
        if adapter.matches(base):
            adapter.check_supported(model)
            return adapter
    supported = "; ".join(a.DESCRIPTION for a in ADAPTERS)
    raise ValueError(
        f"unsupported model type {base.__name__}; supported families: {supported}"
    )


def is_patched(model: nn.Module) -> bool:
    return type(model) in _PATCHED_CLASSES.values()


def original_class(model: nn.Module) -> type:
    cls = type(model)
    for orig, patched in _PATCHED_CLASSES.items():
        if patched is cls:
            return orig
    return cls


def patched_class(adapter: ModuleType, cls: type) -> type:
    """The patched subclass of ``cls`` (made once, registered in this module so that
    ``pickle``/``torch.save`` of a whole patched model can find it)."""
    if cls not in _PATCHED_CLASSES:
        name = f"LeanVit{cls.__name__}"
        new = type(name, (_MIXINS[adapter], cls), {"__module__": __name__})
        setattr(sys.modules[__name__], name, new)
        _PATCHED_CLASSES[cls] = new
    return _PATCHED_CLASSES[cls]
