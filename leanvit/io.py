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

Compacted models (:func:`leanvit.compact`, hMHSA/cFFN), patched or not, in training form or
after :func:`leanvit.reparameterize`: compaction replaces the backbone's attention and FFN
weights (fewer query/key rows, reordered heads, factorised projections, BatchNorm branches,
fine-tuned values), so such a file always stores the WHOLE model state (``backbone`` is
implied: a self-contained file, independent of the weights of the model it is loaded into),
plus ``compaction`` (JSON: :func:`leanvit.compaction_spec`, i.e. the options, the family,
``deployed`` and the per-site head order) and ``model_class``. ``method``/``options`` are
present only when a token method was applied on top. :func:`load` on a plain timm model of the
same architecture re-creates the compaction (same spec and form), loads the weights, then
patches with the stored method. These files have ``format_version`` ``"2"``; files without
compaction keep version ``"1"`` and its exact layout (both are read).

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
#: version of files holding a compacted model (adds ``compaction`` and ``model_class``)
COMPACTED_FORMAT_VERSION = "2"
_READABLE_VERSIONS = (FORMAT_VERSION, COMPACTED_FORMAT_VERSION)
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


def _model_info_json(model: nn.Module) -> str:
    """The token adapter's structure fields; ``{}`` for families without a token adapter
    (PVTv2, NextViT: compaction only), whose structure the state-dict shapes check."""
    try:
        _, info = _adapter_and_info(model)
    except ValueError:
        return "{}"
    return json.dumps({k: getattr(info, k) for k in _STRUCTURE + ("num_patches",)})


def save(model: nn.Module, path: str | os.PathLike, *, backbone: bool = False) -> Path:
    """Write the patched ``model``'s method, options and learned method state to ``path``;
    for a compacted model, its compaction and all its weights (see the module docstring).

    Args:
        model: a model patched with :func:`leanvit.patch` (any method; methods without learned
            state give a file with metadata only), and/or compacted with
            :func:`leanvit.compact` (any supported family, training or deploy form).
        path: destination (``.safetensors`` recommended); written atomically (temporary file in
            the same folder, then ``os.replace``), so a crash never leaves a half-written file.
        backbone: also store the model's own weights (after fine-tuning); default False.
            Always on for a compacted model.

    Returns the path. Raises ``ValueError`` for a model neither patched nor compacted, or
    options that are not JSON.
    """
    from safetensors.torch import save_file

    import leanvit
    from leanvit.compaction import compaction_spec
    from leanvit.patching import ATTR, is_patched

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    spec = compaction_spec(model)
    patched = is_patched(model)
    if not patched and spec is None:
        raise ValueError("model is not patched (nor compacted): leanvit.save stores a "
                         "method's state; call leanvit.patch(model, METHOD, ...) or "
                         "leanvit.compact(model) first")
    backbone = backbone or spec is not None
    tensors: dict[str, torch.Tensor] = {}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if spec is None else COMPACTED_FORMAT_VERSION,
        "leanvit_version": leanvit.__version__,
    }
    if patched:
        reducer = getattr(model, ATTR)
        for k, v in reducer.state_dict().items():
            tensors[_PREFIX + k] = v.detach().to("cpu").contiguous().clone()
        meta["method"] = reducer.method_name
        meta["options"] = _options_json(reducer.options)
    if backbone:
        for k, v in model.state_dict().items():
            if not k.startswith(_PREFIX):
                tensors[k] = v.detach().to("cpu").contiguous().clone()
    meta["architecture"] = _architecture(model)
    meta["model_info"] = _model_info_json(model)
    meta["backbone"] = "1" if backbone else "0"
    if spec is not None:
        from leanvit import adapters

        meta["compaction"] = json.dumps(spec, sort_keys=True)
        meta["model_class"] = adapters.original_class(model).__name__
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
    """Patch the unpatched ``model`` with the method, options and state stored in ``path``;
    for a file of a compacted model, first re-create the compaction and load its weights.

    Args:
        model: an unpatched (and not compacted) timm model of the architecture the file was
            saved from.
        path: a file written by :func:`save`, or an authors' DynamicViT checkpoint for DeiT
            (``.pth`` with ``score_predictor.*`` keys; its fine-tuned backbone is loaded too).
        **options: override stored options. The authors' files do not record the keep rate:
            pass ``keep_rate=`` unless the file name says it (``..._r0.7...``/``..._0.7.pth``).

    Returns ``model`` (patched and/or compacted in place; its train/eval mode is kept). A
    compacted model's outputs equal the saved model's (same modules, same weights).

    Raises:
        ValueError: missing, empty, corrupt or foreign file; architecture mismatch (naming the
            field); missing/unexpected/mis-shaped tensors; an already patched or compacted
            model. The model is left as it was (unpatched, not compacted, same weights) when
            loading fails.
    """
    from leanvit.compaction import compaction_spec, rebuild
    from leanvit.patching import ATTR, is_patched, patch, unpatch
    from leanvit.registry import get_method

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_patched(model):
        raise ValueError("model is already patched; leanvit.load patches an unpatched model "
                         "(call leanvit.unpatch(model) first)")
    if compaction_spec(model) is not None:
        raise ValueError("model is already compacted; leanvit.load re-creates the stored "
                         "compaction on a plain timm model of the saved architecture")
    tensors, meta = read(path)
    spec = None
    if meta.get("format") == FORMAT:
        version = meta.get("format_version", FORMAT_VERSION)
        if version not in _READABLE_VERSIONS:
            raise ValueError(f"{path} has format_version {version!r}; this leanvit "
                             f"({_version()}) reads versions {', '.join(_READABLE_VERSIONS)} "
                             "(written by a newer leanvit?)")
        method = meta.get("method")
        if "compaction" in meta:
            try:
                spec = json.loads(meta["compaction"])
            except json.JSONDecodeError:
                spec = None
            if not isinstance(spec, dict):
                raise ValueError(f"{path}: unreadable compaction metadata (corrupt file?)")
            _check_compacted_model(model, meta, spec, path)
        elif not method:
            raise ValueError(f"{path}: leanvit metadata without a method name (corrupt file?)")
        try:
            stored = json.loads(meta.get("model_info", "{}"))
        except json.JSONDecodeError:
            raise ValueError(f"{path}: unreadable model_info metadata (corrupt file?)") from None
        if method or stored:
            _, info = _adapter_and_info(model)
            for k in _STRUCTURE:
                if k in stored and stored[k] != getattr(info, k):
                    raise ValueError(
                        f"{path} was saved from {meta.get('architecture', '?')} with {k}="
                        f"{stored[k]}, but this model ({_architecture(model)}) has {k}="
                        f"{getattr(info, k)}")
        opts: dict[str, Any] = {}
        if method:
            m = get_method(method)
            try:
                opts = _options_from_json(m.options_for(info.family), meta.get("options", "{}"))
            except json.JSONDecodeError:
                raise ValueError(f"{path}: unreadable options metadata (corrupt file?)"
                                 ) from None
            opts.update(options)
        elif options:
            raise ValueError(f"{path} holds no token method, so options "
                             f"{', '.join(sorted(options))} do not apply")
        reducer_sd = {k[len(_PREFIX):]: v for k, v in tensors.items() if k.startswith(_PREFIX)}
        backbone_sd = {k: v for k, v in tensors.items() if not k.startswith(_PREFIX)}
        if spec is not None and not backbone_sd:
            raise ValueError(f"{path}: a compacted model's file without its weights "
                             "(corrupt file?)")
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

    # Check everything before changing the model: (compact,) patch, then load; undo on any
    # failure.
    backbone_before = None
    if backbone_sd:
        backbone_before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    undo_compaction = None
    try:
        if spec is not None:
            undo_compaction = rebuild(model, spec)
        if backbone_sd:
            _check_state(model, backbone_sd, path, "model weights")
        if spec is not None:  # the compacted modules' weights: all of them are in the file
            own = {k: v for k, v in model.state_dict().items() if not k.startswith(_PREFIX)}
            missing = sorted(set(own) - set(backbone_sd))
            if missing:
                raise ValueError(f"{path}: model weights missing {_names(missing)}")
        if method:
            patch(model, method, **opts)
            reducer = getattr(model, ATTR)
            _check_state(reducer, reducer_sd, path, f"{method} state")
            reducer.load_state_dict(reducer_sd, strict=True)
        elif reducer_sd:
            raise ValueError(f"{path}: method tensors {_names(sorted(reducer_sd))} but no "
                             "method name (corrupt file?)")
        if backbone_sd:
            own = {k: v for k, v in model.state_dict().items() if not k.startswith(_PREFIX)}
            missing = sorted(set(own) - set(backbone_sd))
            if missing:
                raise ValueError(f"{path}: model weights missing {_names(missing)}")
            model.load_state_dict({**backbone_sd, **{_PREFIX + k: v
                                                     for k, v in reducer_sd.items()}})
    except BaseException:
        if is_patched(model):
            unpatch(model)
        if undo_compaction is not None:
            undo_compaction()
        if backbone_before is not None:
            model.load_state_dict(backbone_before)
        raise
    return model


def _version() -> str:
    import leanvit

    return leanvit.__version__


def _check_compacted_model(model: nn.Module, meta: dict[str, str], spec: dict[str, Any],
                           path) -> None:
    """``ValueError`` when ``model`` is not of the class the compacted file was saved from."""
    from leanvit import adapters

    stored = meta.get("model_class")
    cls = adapters.original_class(model).__name__
    if stored and stored != cls:
        raise ValueError(f"{path} holds a compacted {meta.get('architecture', stored)} "
                         f"({stored}); this model is a {_architecture(model)} ({cls})")


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
