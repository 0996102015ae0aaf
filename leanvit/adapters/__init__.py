"""Backbone adapters and the ONE registry of backbone families (token methods and layer
compaction alike).

A family is one module in this package implementing the contract of
:mod:`leanvit.adapters.base` (:class:`~leanvit.adapters.base.Backbone`, and
:class:`~leanvit.adapters.base.TokenBackbone` for ``KIND = "tokens"``), plus one
:func:`register_family` line below. Callers find a model's family with :func:`find_family`
(or its method-running adapter with :func:`find_adapter`) and use only the contract's
functions.
"""
from __future__ import annotations

import sys
from types import ModuleType
from typing import Optional

from torch import nn

from leanvit.adapters import (beit, convnext, eva, hf_clip, hf_vit, nextvit, open_clip, pvt_v2,
                              swin, vit)
from leanvit.adapters.base import KINDS, Backbone, CompactionSites, Family, Site, TokenBackbone

FAMILIES: dict[str, Family] = {}


def register_family(module: ModuleType) -> Family:
    """Register the adapter file ``module`` (its name must be new); returns its record."""
    family = Family.from_module(module)
    if family.name in FAMILIES:
        raise ValueError(f"backbone family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


# -- the families, one line each (the order is the order of the error messages)
register_family(vit)
register_family(eva)
register_family(beit)
register_family(hf_vit)
register_family(convnext)
register_family(swin)
register_family(pvt_v2)
register_family(nextvit)
register_family(open_clip)
register_family(hf_clip)

_PATCHED_CLASSES: dict[type, type] = {}


def family_names(kind: Optional[str] = None) -> tuple[str, ...]:
    """Names of the registered families that run methods (of ``kind``, when given)."""
    return tuple(f.name for f in FAMILIES.values()
                 if f.adapter is not None and (kind is None or f.kind == kind))


def find_family(model: nn.Module, *, compaction: bool = False) -> Family:
    """The registered family of ``model`` (patched or not). With ``compaction``: one that
    :func:`leanvit.compact` supports. ``ValueError`` naming the supported ones otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    base = original_class(model)
    for fam in FAMILIES.values():
        if (fam.compaction is not None if compaction else fam.adapter is not None) \
                and fam.matches(base):
            return fam
    if compaction:
        supported = "; ".join(f.description.split(" (", 1)[-1].rstrip(")")
                              for f in FAMILIES.values() if f.compaction is not None)
        raise ValueError(f"leanvit.compact supports {supported} models, not {base.__name__}")
    supported = "; ".join(f.description for f in FAMILIES.values() if f.adapter is not None)
    raise ValueError(f"unsupported model type {base.__name__}; supported families: {supported}")


def image_tower(model: nn.Module) -> nn.Module:
    """The module leanvit patches, counts and saves for ``model``: ``model`` itself, or the
    image tower a family's optional ``image_tower(model)`` hook finds inside a wrapper (open_clip:
    a CLIP model's ``visual``, a ``TimmModel``'s timm ``trunk``), followed down to the module
    no hook wraps."""
    for _ in range(8):  # a wrapper of a wrapper (CLIP -> TimmModel -> trunk); no cycles
        inner = None
        for fam in FAMILIES.values():
            hook = getattr(fam.adapter, "image_tower", None)
            inner = hook(model) if hook is not None else None
            if inner is not None:
                break
        if inner is None:
            return model
        model = inner
    return model


def layer_map(model: nn.Module):
    """The :class:`~leanvit.adapters.layer_macs.LayerMap` of ``model``'s family when it runs
    no methods but :func:`leanvit.count_macs` counts it layer by layer (PVTv2, NextViT, plain
    or compacted), else ``None``."""
    base = original_class(model)
    for fam in FAMILIES.values():
        if fam.adapter is None and fam.layers is not None and fam.matches(base):
            return fam.layers
    return None


def find_adapter(model: nn.Module) -> ModuleType:
    """The adapter (a :class:`~leanvit.adapters.base.Backbone` module) of ``model``'s family,
    after its ``check_supported``; ``ValueError`` naming the supported families otherwise."""
    adapter = find_family(model).adapter
    adapter.check_supported(model)
    return adapter


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
        # timm's classes keep their name; another library's are named with it too (open_clip's
        # VisionTransformer -> LeanVitOpenClipVisionTransformer), so that two classes of one
        # name never share a name here (pickle finds the class by it)
        package = cls.__module__.split(".")[0]
        library = "" if package == "timm" else "".join(w.title() for w in package.split("_"))
        name = f"LeanVit{library}{cls.__name__}"
        if getattr(sys.modules[__name__], name, None) is not None:
            raise RuntimeError(f"two model classes would be patched as {name}")  # pragma: no cover
        new = type(name, (adapter.PATCHED, cls), {"__module__": __name__})
        setattr(sys.modules[__name__], name, new)
        _PATCHED_CLASSES[cls] = new
    return _PATCHED_CLASSES[cls]


__all__ = ["KINDS", "Backbone", "TokenBackbone", "Family", "CompactionSites", "Site", "FAMILIES",
           "register_family", "family_names", "find_family", "image_tower", "find_adapter",
           "layer_map", "is_patched", "original_class", "patched_class"]
