"""``patch`` / ``unpatch``: turn a method on and off on an existing timm model, in place."""
from __future__ import annotations

from typing import Any

from torch import nn

from leanvit import adapters
from leanvit.ops.precision import floating_dtype
from leanvit.registry import Reducer, available_methods, get_method

#: attribute under which the method's reducer (an ``nn.Module``) hangs on a patched model
ATTR = "leanvit"


def patch(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Turn ``method`` on in ``model``, in place; weights untouched. Returns ``model``.

    Args:
        model: a timm model of a supported family (e.g. ``timm.create_model("deit_small_
            patch16_224")``), pretrained or not.
        method: a name from :func:`leanvit.available_methods` (``"none"`` is the identity).
        **options: the method's options (fields of its options dataclass).

    The method's modules (e.g. DynamicViT's predictors) are created on the model's device in
    its floating-point dtype (that of its first floating-point parameter).

    Raises:
        ValueError: unknown method or option, option out of range, unsupported model, or a
            model that is already patched (call :func:`unpatch` first). Nothing is changed.
        TypeError: an option of the wrong type.

    A multimodal model whose image tower a family knows (open_clip's CLIP: ``model.visual``)
    has that tower patched (:func:`leanvit.adapters.image_tower`); ``model`` is returned.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    outer, model = model, adapters.image_tower(model)  # the model itself unless a wrapper
    if adapters.is_patched(model):
        current = getattr(model, ATTR, None)
        name = getattr(current, "method_name", "?")
        raise ValueError(
            f"model is already patched with method {name!r}; call leanvit.unpatch(model) first"
        )
    m, family = check_serves(model, method)
    adapter = family.adapter
    adapter.check_supported(model)
    opts = m.make_options(adapter.FAMILY, **options)
    info = adapter.describe(model)
    reducer = m.build(opts, info)
    if not isinstance(reducer, Reducer):  # pragma: no cover - guards method authors
        raise TypeError(f"method {method!r} built {type(reducer).__name__}, not a Reducer")
    reducer.method_name = m.name
    # Only now change the model: every check above leaves it as it was. The method's modules
    # (predictors, fast paths) follow the model's device and floating-point dtype, so a model
    # cast with .half()/.bfloat16() before patching runs as one that is cast after.
    p = next(model.parameters(), None)
    if p is not None:
        reducer.to(device=p.device)
    dtype = floating_dtype(model)
    if dtype is not None:
        reducer.to(dtype=dtype)
    reducer.train(model.training)  # a fresh module is in train mode; follow the model's mode
    model.add_module(ATTR, reducer)
    model.__class__ = adapters.patched_class(adapter, type(model))
    return outer


#: what a method serving a kind needs, and what a model of that kind is (error messages)
_NEEDS = {"tokens": "a flat-token model (the ViT families: {})",
          "hierarchical": "a hierarchical model ({})"}
_IS = {"tokens": "flat tokens", "hierarchical": "hierarchical: stages of 2-D maps"}


def check_serves(model: nn.Module, method: str):
    """The registered ``method`` and the model's family, or ``ValueError`` when the method does
    not serve that family (an unknown method or an unsupported model raise as well).

    Whether the method serves the model's family comes before the family's own checks of
    its variants: a token method on ConvNeXt is refused for being a token method, not for a
    detail of the ConvNeXt variant (conv_mlp=True) that no method needs to hear about.
    """
    m = get_method(method)
    family = adapters.find_family(model)
    if not m.serves(family.name, family.kind):
        raise ValueError(unserved_message(m.name, m.families, family.name, family.kind))
    return m, family


def unserved_message(method: str, families: tuple[str, ...], family: str, kind: str) -> str:
    """One line: what ``method`` (serving ``families``: family names and/or kinds) needs, what
    the model of ``family`` (of ``kind``) is, and which methods do serve it."""
    needs = [_NEEDS[f].format(", ".join(adapters.family_names(f))) if f in _NEEDS
             else f"a {f} model" for f in families]
    serving = [name for name in available_methods() if get_method(name).serves(family, kind)]
    return (f"method {method!r} needs {' or '.join(needs)}; this is a {family} model "
            f"({_IS.get(kind, kind)}), on which leanvit runs {', '.join(serving) or 'no method'}")


def unpatch(model: nn.Module) -> nn.Module:
    """Restore ``model``'s original class and behaviour, in place; returns ``model``.

    Modules the method added (``model.leanvit``) are removed. ``ValueError`` if the model is
    not patched. A multimodal model: its image tower (as :func:`patch`).
    """
    tower = adapters.image_tower(model)
    if tower is not model:
        unpatch(tower)
        return model
    if not adapters.is_patched(model):
        raise ValueError("model is not patched by leanvit")
    model.__class__ = adapters.original_class(model)
    delattr(model, ATTR)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` (or its image tower, :func:`patch`) currently has a leanvit method
    on."""
    return adapters.is_patched(adapters.image_tower(model))


def patched_method(model: nn.Module) -> tuple[str, Any] | None:
    """``(method name, options)`` of a patched model (or image tower), or ``None``."""
    model = adapters.image_tower(model)
    if not adapters.is_patched(model):
        return None
    reducer = getattr(model, ATTR)
    return reducer.method_name, reducer.options


def warn_if_untrained(model: nn.Module) -> None:
    """Warn when the method just patched into ``model`` has learned parameters (DynamicViT's
    prediction modules): freshly initialised, its keep decisions are random, so accuracy and
    pictures of which tokens it keeps mislead (MACs and speed do not depend on them).
    For commands that patch a fresh model (``bench``, ``eval``, ``compare``, ``viz``)."""
    import warnings

    reducer = getattr(model, ATTR, None)
    if reducer is None:
        return
    n = sum(p.numel() for p in reducer.parameters())
    if n:
        warnings.warn(
            f"{reducer.method_name}'s {n} learned parameters are freshly initialised (random): "
            "which tokens it keeps is random, so accuracy and token pictures do not show the "
            "trained method (MACs and speed do); train it (leanvit train) and load the saved "
            "state (leanvit.load; eval and compare: --set load=FILE)", UserWarning, stacklevel=2)
