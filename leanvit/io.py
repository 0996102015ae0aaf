"""Saving and loading what a method learned (predictors, rates, ...), as safetensors.

``leanvit.save(model, path)`` writes the patched model's method name, options and the state
of its reducer (``model.leanvit.state_dict()``: any method's learned parameters and buffers)
to a safetensors file; ``leanvit.load(model, path)`` patches an unpatched timm model of the
same architecture with that method and state. Tensors are stored under the names they have
in the patched model (``leanvit.predictor.0.fc1.weight``); with ``backbone=True`` the model's
own weights (e.g. a fine-tuned backbone) are stored too, under their timm names.

Metadata (safetensors' string map): ``format`` = ``"leanvit"``, ``format_version``,
``leanvit_version``, ``method``, ``options`` (JSON), ``architecture`` (timm model name),
``model_info`` (JSON: depth, width, heads, prefix tokens, patches).

:func:`load` also reads the DynamicViT authors' released checkpoints for DeiT
(raoyongming/DynamicViT: ``.pth`` files holding ``{"model": state_dict, ...}`` with
``score_predictor.{s}.in_conv.*`` / ``out_conv.*`` predictor names and timm ViT backbone
names), so their users can bring their weights: the backbone and predictors are loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from leanvit._files import atomic_path

FORMAT = "leanvit"
FORMAT_VERSION = "1"
_PREFIX = "leanvit."
_STRUCTURE = ("depth", "embed_dim", "num_heads", "num_prefix_tokens")


def _adapter_and_info(model: nn.Module):
    from leanvit import adapters

    adapter = adapters.find_adapter(model)
    return adapter, adapter.describe(model)


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _options_json(options: Any) -> str:
    values = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    try:
        return json.dumps(values, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"options {values!r} cannot be saved as JSON: {e}") from None


def _options_from_json(method_options: type, text: str) -> dict[str, Any]:
    """Options as keyword arguments; JSON lists back to tuples where the default is a tuple."""
    values = json.loads(text)
    fields = {f.name: f for f in dataclasses.fields(method_options)}
    for k, v in list(values.items()):
        f = fields.get(k)
        if f is not None and isinstance(v, list) and isinstance(f.default, tuple):
            values[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    return values


def save(model: nn.Module, path: str | os.PathLike, *, backbone: bool = False) -> Path:
    """Write the patched ``model``'s method, options and learned method state to ``path``.

    Args:
        model: a model patched with :func:`leanvit.patch` (any method; methods without learned
            state give a file with metadata only).
        path: destination (``.safetensors`` recommended); written atomically (temporary file in
            the same folder, then ``os.replace``), so a crash never leaves a half-written file.
        backbone: also store the model's own weights (after fine-tuning); default False.

    Returns the path. Raises ``ValueError`` for an unpatched model or options that are not JSON.
    """
    from safetensors.torch import save_file

    import leanvit
    from leanvit.patching import ATTR, is_patched

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not is_patched(model):
        raise ValueError("model is not patched: leanvit.save stores a method's state; call "
                         "leanvit.patch(model, METHOD, ...) first")
    reducer = getattr(model, ATTR)
    _, info = _adapter_and_info(model)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in reducer.state_dict().items():
        tensors[_PREFIX + k] = v.detach().to("cpu").contiguous().clone()
    if backbone:
        for k, v in model.state_dict().items():
            if not k.startswith(_PREFIX):
                tensors[k] = v.detach().to("cpu").contiguous().clone()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "leanvit_version": leanvit.__version__,
        "method": reducer.method_name,
        "options": _options_json(reducer.options),
        "architecture": _architecture(model),
        "model_info": json.dumps({k: getattr(info, k) for k in _STRUCTURE + ("num_patches",)}),
        "backbone": "1" if backbone else "0",
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a leanvit or authors' file, with clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own types for corrupt headers/data
            raise ValueError(f"{path} is not a readable safetensors file "
                             f"(corrupt or truncated?): {e}") from None
        return tensors, meta
    return _read_torch(path), {}


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors starts with an 8-byte little-endian header length, then ``{``."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    """A torch checkpoint read without running pickled code (``weights_only``); the authors'
    files hold ``{"model": state_dict, "args": Namespace, ...}``."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is neither a safetensors file nor a readable torch checkpoint "
                         f"(corrupt, truncated or holding arbitrary objects?): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                         ) from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load(model: nn.Module, path: str | os.PathLike, **options: Any) -> nn.Module:
    """Patch the unpatched ``model`` with the method, options and state stored in ``path``.

    Args:
        model: an unpatched timm model of the architecture the file was saved from.
        path: a file written by :func:`save`, or an authors' DynamicViT checkpoint for DeiT
            (``.pth`` with ``score_predictor.*`` keys; its fine-tuned backbone is loaded too).
        **options: override stored options. The authors' files do not record the keep rate:
            pass ``keep_rate=`` unless the file name says it (``..._r0.7...``/``..._0.7.pth``).

    Returns ``model`` (patched in place; its train/eval mode is kept).

    Raises:
        ValueError: missing, empty, corrupt or foreign file; architecture mismatch (naming the
            field); missing/unexpected/mis-shaped tensors; an already patched model. The model
            is left unpatched when loading fails.
    """
    from leanvit.patching import ATTR, is_patched, patch, unpatch
    from leanvit.registry import get_method

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_patched(model):
        raise ValueError("model is already patched; leanvit.load patches an unpatched model "
                         "(call leanvit.unpatch(model) first)")
    tensors, meta = read(path)
    _, info = _adapter_and_info(model)
    if meta.get("format") == FORMAT:
        method = meta.get("method")
        if not method:
            raise ValueError(f"{path}: leanvit metadata without a method name (corrupt file?)")
        try:
            stored = json.loads(meta.get("model_info", "{}"))
        except json.JSONDecodeError:
            raise ValueError(f"{path}: unreadable model_info metadata (corrupt file?)") from None
        for k in _STRUCTURE:
            if k in stored and stored[k] != getattr(info, k):
                raise ValueError(
                    f"{path} was saved from {meta.get('architecture', '?')} with {k}="
                    f"{stored[k]}, but this model ({_architecture(model)}) has {k}="
                    f"{getattr(info, k)}")
        m = get_method(method)
        try:
            opts = _options_from_json(m.options_for(info.family), meta.get("options", "{}"))
        except json.JSONDecodeError:
            raise ValueError(f"{path}: unreadable options metadata (corrupt file?)") from None
        opts.update(options)
        reducer_sd = {k[len(_PREFIX):]: v for k, v in tensors.items() if k.startswith(_PREFIX)}
        backbone_sd = {k: v for k, v in tensors.items() if not k.startswith(_PREFIX)}
    elif any(k.startswith("score_predictor.") for k in tensors):
        from leanvit.methods.dynamicvit import from_authors_state_dict

        method = "dynamicvit"
        backbone_sd, reducer_sd, stages = from_authors_state_dict(tensors)
        opts: dict[str, Any] = {}
        if stages == 3:
            opts["locations"] = (3, 6, 9)  # the authors' pruning_loc for DeiT
        elif "locations" not in options:
            raise ValueError(f"{path}: the authors' checkpoint has {stages} predictors; pass "
                             "locations=(...) with one block index per predictor")
        rate = options.get("keep_rate", _rate_from_name(Path(path).name))
        if rate is None:
            raise ValueError(
                f"{path}: the authors' checkpoints do not record the keep rate; pass it, e.g. "
                "leanvit.load(model, path, keep_rate=0.7) (their DeiT-S release: 0.7)")
        opts.update(options)
        opts["keep_rate"] = rate
    else:
        raise ValueError(
            f"{path} is neither a leanvit file (no 'format: leanvit' metadata) nor an authors' "
            "DynamicViT checkpoint (no score_predictor.* tensors)")

    # Check everything before changing the model: patch, then load; undo on any failure.
    backbone_before = None
    if backbone_sd:
        _check_state(model, backbone_sd, path, "model weights")
        backbone_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    patch(model, method, **opts)
    try:
        reducer = getattr(model, ATTR)
        _check_state(reducer, reducer_sd, path, f"{method} state")
        reducer.load_state_dict(reducer_sd, strict=True)
        if backbone_sd:
            own = {k: v for k, v in model.state_dict().items() if not k.startswith(_PREFIX)}
            missing = sorted(set(own) - set(backbone_sd))
            if missing:
                raise ValueError(f"{path}: model weights missing {_names(missing)}")
            model.load_state_dict({**backbone_sd, **{_PREFIX + k: v
                                                     for k, v in reducer_sd.items()}})
    except BaseException:
        unpatch(model)
        if backbone_before is not None:
            model.load_state_dict(backbone_before)
        raise
    return model


def _names(keys: list[str], limit: int = 6) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_state(module: nn.Module, sd: dict[str, torch.Tensor], path, what: str) -> None:
    """``ValueError`` naming unexpected, missing (reducers only) and mis-shaped tensors."""
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(_PREFIX)}
    unexpected = sorted(set(sd) - set(own))
    if unexpected:
        raise ValueError(f"{path}: unexpected {what} tensors {_names(unexpected)} (saved from "
                         "another model or method?)")
    if what != "model weights":
        missing = sorted(set(own) - set(sd))
        if missing:
            raise ValueError(f"{path}: {what} is missing tensors {_names(missing)}")
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
           if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"{path}: {what} tensors of the wrong shape (file vs model): "
                         f"{_names(bad)}; saved from another architecture?")


def _rate_from_name(name: str) -> Optional[float]:
    """The keep rate in an authors' file name such as ``dynamic-vit_384_r0.7.pth``."""
    m = re.search(r"(?:^|[_\-])r?(0\.\d+)(?=[_\-.])", name)
    return float(m.group(1)) if m else None
