"""Saving and loading what a method learned (predictors, rates, ...), as safetensors.

``leanvit.save(model, path)`` writes the patched model's method name, options and the state
of its reducer (``model.leanvit.state_dict()``: any method's learned parameters and buffers)
to a safetensors file; ``leanvit.load(model, path)`` patches an unpatched timm model of the
same architecture with that method and state. Tensors are stored under the names they have
in the patched model (``leanvit.predictor.0.fc1.weight``); with ``backbone=True`` the model's
own weights (e.g. a fine-tuned backbone) are stored too, under their timm names.

Metadata (safetensors' string map):

- ``format`` = ``"leanvit"``, ``format_version``, ``leanvit_version``;
- ``method``, ``options`` (JSON) and ``options_tuples`` (JSON: the paths, lists of keys and
  indices, of the option values that were tuples: JSON has only lists, and a tuple can mean
  something else than a list, e.g. ToMe's ``r=(2, -1.0)`` vs ``r=[2, 1]``). Options are
  stored self-contained: a DiffRate ``schedule`` given as a file (or a
  :class:`leanvit.methods.diffrate.Schedule`) is stored as the schedule itself (its JSON object), so
  editing or deleting the file later does not change what :func:`load` gives; any other
  option whose value is a file is refused by :func:`save` (its content would not be kept);
- the architecture the file was made on: ``architecture`` (timm model name, else the class
  name), ``model_class`` (class name) and ``model_info`` (JSON: ``family``, ``kind``,
  ``depth``, ``embed_dim``, ``num_heads``, ``num_prefix_tokens``, ``num_patches``,
  ``patch_size``, ``grid_size``, ``stage_depths``, ``stage_dims``; the adapter's fields, empty
  for families without a token adapter). :func:`load` refuses a model whose class, family,
  depth, width, heads, prefix tokens, patch size or stages differ, with one line naming both
  models; another patch count or timm name only gives a warning (a method's state does not
  depend on them; methods that do, e.g. DiffRate's schedule, check it themselves);
- ``tensors_sha256``: the SHA-256 of the stored tensors (:func:`tensors_sha256`: names,
  dtypes, shapes and bytes, in name order); :func:`read` refuses a file whose tensors do not
  match it ("checksum mismatch: the file is corrupt or was edited"). The metadata itself is
  not covered.

Files written before these fields existed (no ``options_tuples``, ``tensors_sha256``,
``model_class`` or full ``model_info``) still load: what is missing is treated as unknown and
not checked, with one warning.

Compacted models (:func:`leanvit.compact`, hMHSA/cFFN), patched or not, in training form or
after :func:`leanvit.reparameterize`: compaction replaces the backbone's attention and FFN
weights (fewer query/key rows, reordered heads, factorised projections, BatchNorm branches,
fine-tuned values), so such a file always stores the WHOLE model state (``backbone`` is
implied: a self-contained file, independent of the weights of the model it is loaded into),
plus ``compaction`` (JSON: :func:`leanvit.compaction_spec`, i.e. the options, the family,
``deployed`` and the per-site head order). ``method``/``options`` are
present only when a token method was applied on top. :func:`load` on a plain timm model of the
same architecture re-creates the compaction (same spec and form), loads the weights, then
patches with the stored method. These files have ``format_version`` ``"2"``; files without
compaction keep version ``"1"`` (both are read). The checksum, ``options_tuples`` and the
architecture record were added without a new version: they are extra metadata, which older
leanvit versions ignore.

:func:`load` also reads the checkpoints a method's authors released, through the importers
the method declares (:attr:`leanvit.registry.Method.importers`): today the DynamicViT authors'
checkpoints for DeiT (raoyongming/DynamicViT: ``.pth`` files holding ``{"model": state_dict,
...}`` with ``score_predictor.{s}.in_conv.*`` / ``out_conv.*`` predictor names and timm ViT
backbone names, :mod:`leanvit.methods.dynamicvit.authors`), so their users can bring their
weights: the backbone and predictors are loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
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


def _adapter_and_info(model: nn.Module):
    from leanvit import adapters

    adapter = adapters.find_adapter(model)
    return adapter, adapter.describe(model)


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or _model_class(model))  # no timm name: the class


def _model_class(model: nn.Module) -> str:
    from leanvit import adapters

    return adapters.original_class(model).__name__


# -- options: self-contained, tuples kept --------------------------------------------------

def _saved_options(reducer: nn.Module) -> dict[str, Any]:
    """The reducer's options as stored: file-valued options its method declares
    (:attr:`leanvit.registry.Method.file_options`) replaced by their content; ``ValueError``
    for any other option that names a file (its content would be lost)."""
    from leanvit.registry import get_method

    options = reducer.options
    embedded = get_method(reducer.method_name).file_options
    values: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        v = getattr(options, f.name)
        embed = embedded.get(f.name)
        if embed is not None and not isinstance(v, (dict, list, tuple)):
            v = embed(reducer)
        elif isinstance(v, os.PathLike) or (
                isinstance(v, str) and not isinstance(f.default, str) and Path(v).is_file()):
            raise ValueError(
                f"option {f.name}={str(v)!r} of {reducer.method_name} is a file, whose content "
                "leanvit.save cannot store; pass the content itself instead of the path")
        values[f.name] = v
    return values


def _tuple_paths(value: Any, at: tuple = ()) -> list[list]:
    """The paths (keys and indices) of every tuple inside ``value`` (tuples themselves too)."""
    out: list[list] = []
    if isinstance(value, tuple):
        out.append(list(at))
    if isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            out += _tuple_paths(v, at + (i,))
    elif isinstance(value, dict):
        for k, v in value.items():
            out += _tuple_paths(v, at + (str(k),))
    return out


def _restore_tuples(value: Any, tuples: set[tuple], at: tuple = ()) -> Any:
    """``value`` read from JSON with the lists at the paths ``tuples`` made tuples again."""
    if isinstance(value, list):
        items = [_restore_tuples(v, tuples, at + (i,)) for i, v in enumerate(value)]
        return tuple(items) if at in tuples else items
    if isinstance(value, dict):
        return {k: _restore_tuples(v, tuples, at + (k,)) for k, v in value.items()}
    return value


def _options_json(values: dict[str, Any]) -> tuple[str, str]:
    """``(options, options_tuples)`` metadata strings."""
    try:
        return (json.dumps(values, sort_keys=True),
                json.dumps(_tuple_paths(values), sort_keys=True))
    except TypeError as e:
        raise ValueError(f"options {values!r} cannot be saved as JSON: {e}") from None


def _options_from_json(method_options: type, text: str, tuples_text: Optional[str]
                       ) -> dict[str, Any]:
    """Options as keyword arguments. Files with ``options_tuples`` get their tuples back
    exactly; older files: JSON lists back to tuples where the option's default is a tuple."""
    values = json.loads(text)
    if tuples_text is not None:
        paths = {tuple(p) for p in json.loads(tuples_text)}
        return _restore_tuples(values, paths)
    fields = {f.name: f for f in dataclasses.fields(method_options)}
    for k, v in list(values.items()):
        f = fields.get(k)
        if f is not None and isinstance(v, list) and isinstance(f.default, tuple):
            values[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    return values


# -- architecture record ---------------------------------------------------------------------

#: fields a file's model must share with the model it is loaded into (else ``ValueError``)
_MUST_MATCH = ("family", "depth", "embed_dim", "num_heads", "num_prefix_tokens", "patch_size",
               "stage_depths", "stage_dims")
#: fields that may differ (a warning): another input size, same weights' shapes
_MAY_DIFFER = ("num_patches", "grid_size")


def _model_info(model: nn.Module) -> dict[str, Any]:
    """The architecture record of ``model`` (see the module docstring); ``{}`` for families
    without a token adapter (PVTv2, NextViT: compaction only), whose structure the state-dict
    shapes check."""
    try:
        _, info = _adapter_and_info(model)
    except ValueError:
        return {}
    out: dict[str, Any] = {k: getattr(info, k) for k in (
        "family", "kind", "depth", "embed_dim", "num_heads", "num_prefix_tokens",
        "num_patches")}
    out["stage_depths"], out["stage_dims"] = list(info.stage_depths), list(info.stage_dims)
    pe = getattr(model, "patch_embed", None)
    for k in ("patch_size", "grid_size"):
        v = getattr(pe, k, None)
        if v is not None:
            out[k] = [int(a) for a in v] if isinstance(v, (tuple, list)) else int(v)
    return out


def _describe(name: str, cls: Optional[str], info: dict[str, Any]) -> str:
    """``deit_tiny_patch16_224 (VisionTransformer, vit, depth 12, width 192, 3 heads, ...)``."""
    parts = [cls or "class unknown"]
    if "family" in info:
        parts.append(f"{info['family']} family")
    for k, label in (("depth", "depth"), ("embed_dim", "width"), ("num_heads", "heads"),
                     ("num_prefix_tokens", "prefix tokens"), ("patch_size", "patch"),
                     ("grid_size", "grid")):
        if k in info:
            v = info[k]
            parts.append(f"{label} {'x'.join(map(str, v)) if isinstance(v, list) else v}")
    return f"{name} ({', '.join(parts)})"


def _check_architecture(model: nn.Module, meta: dict[str, str], stored: dict[str, Any],
                        path) -> None:
    """``ValueError`` naming both models when the file was made on another architecture;
    warnings for another patch grid or timm name. Unrecorded fields are not checked."""
    import warnings

    current = _model_info(model)
    name, cls = _architecture(model), _model_class(model)
    saved_name, saved_cls = meta.get("architecture", "?"), meta.get("model_class")
    diffs = []
    if saved_cls and saved_cls != cls:
        diffs.append(f"class {saved_cls} in the file, {cls} in this model")
    diffs += [f"{k}={stored[k]} in the file, {current[k]} in this model" for k in _MUST_MATCH
              if k in stored and k in current and stored[k] != current[k]]
    if diffs:
        what = "a compacted " if "compaction" in meta else ""
        raise ValueError(f"{path} was saved from {what}{_describe(saved_name, saved_cls, stored)}; "
                         f"this model is {_describe(name, cls, current)}: "
                         f"{'; '.join(diffs)}")
    loose = [f"{k}={stored[k]} in the file, {current[k]} in this model" for k in _MAY_DIFFER
             if k in stored and k in current and stored[k] != current[k]]
    if saved_name not in ("?", name):
        loose.append(f"saved from {saved_name}, loaded into {name}")
    if loose:
        warnings.warn(f"{path}: {'; '.join(loose)} (same architecture; loading it)",
                      UserWarning, stacklevel=4)


# -- checksum --------------------------------------------------------------------------------

def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of ``tensors``: for each name in sorted order, a JSON header ``[name,
    dtype, shape]`` (its length first) and the tensor's bytes (C order, native byte order:
    little-endian on every platform torch supports). Stored by :func:`save` as
    ``tensors_sha256``."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        header = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode()
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


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

    Returns the path. Raises ``ValueError`` for a model neither patched nor compacted,
    options that are not JSON, or an option naming a file whose content cannot be stored.

    The file records the options self-contained (a DiffRate schedule file's content, tuples
    as tuples), the architecture the model has, and a checksum of the tensors (see the
    module docstring). Replacing an existing file keeps its permission bits.
    """
    from safetensors.torch import save_file

    import leanvit
    from leanvit.compaction import compaction_spec
    from leanvit import adapters
    from leanvit.patching import ATTR, is_patched

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if adapters.image_tower(model) is not model:  # open_clip's CLIP: its patched image tower
        return save(adapters.image_tower(model), path, backbone=backbone)
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
        meta["options"], meta["options_tuples"] = _options_json(_saved_options(reducer))
    if backbone:
        for k, v in model.state_dict().items():
            if not k.startswith(_PREFIX):
                tensors[k] = v.detach().to("cpu").contiguous().clone()
    meta["architecture"] = _architecture(model)
    meta["model_class"] = _model_class(model)
    meta["model_info"] = json.dumps(_model_info(model), sort_keys=True)
    meta["backbone"] = "1" if backbone else "0"
    if spec is not None:
        meta["compaction"] = json.dumps(spec, sort_keys=True)
    meta["tensors_sha256"] = tensors_sha256(tensors)
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a leanvit or authors' file, with clear errors for bad files
    (missing, empty, truncated, unreadable, or tensors that do not match the file's
    ``tensors_sha256``)."""
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
        expected = meta.get("tensors_sha256")
        if expected is not None and tensors_sha256(tensors) != expected:
            raise ValueError(f"{path}: checksum mismatch: the file is corrupt or was edited "
                             "(its tensors do not match the tensors_sha256 saved with them)")
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
    from leanvit import adapters
    from leanvit.compaction import compaction_spec
    from leanvit.patching import is_patched

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if adapters.image_tower(model) is not model:  # open_clip's CLIP: its image tower
        load(adapters.image_tower(model), path, **options)
        return model
    if is_patched(model):
        raise ValueError("model is already patched; leanvit.load patches an unpatched model "
                         "(call leanvit.unpatch(model) first)")
    if compaction_spec(model) is not None:
        raise ValueError("model is already compacted; leanvit.load re-creates the stored "
                         "compaction on a plain timm model of the saved architecture")
    tensors, meta = read(path)
    if meta.get("format") == FORMAT:
        plan = _leanvit_plan(model, tensors, meta, path, options)
    else:
        plan = _authors_plan(tensors, path, options)
    _apply(model, path, *plan)
    return model


def _leanvit_plan(model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                  path, options: dict[str, Any]) -> tuple:
    """``(method, options, compaction spec, reducer state, backbone state)`` of a leanvit
    file, after checking its version and architecture against ``model``."""
    from leanvit.registry import get_method

    version = meta.get("format_version", FORMAT_VERSION)
    if version not in _READABLE_VERSIONS:
        raise ValueError(f"{path} has format_version {version!r}; this leanvit "
                         f"({_version()}) reads versions {', '.join(_READABLE_VERSIONS)} "
                         "(written by a newer leanvit?)")
    method, spec = meta.get("method"), None
    if "compaction" in meta:
        try:
            spec = json.loads(meta["compaction"])
        except json.JSONDecodeError:
            spec = None
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: unreadable compaction metadata (corrupt file?)")
    elif not method:
        raise ValueError(f"{path}: leanvit metadata without a method name (corrupt file?)")
    try:
        stored = json.loads(meta.get("model_info", "{}"))
    except json.JSONDecodeError:
        raise ValueError(f"{path}: unreadable model_info metadata (corrupt file?)") from None
    if not isinstance(stored, dict):
        raise ValueError(f"{path}: unreadable model_info metadata (corrupt file?)")
    _check_architecture(model, meta, stored, path)
    _warn_if_unchecked(meta, stored, path)
    opts: dict[str, Any] = {}
    if method:
        _, info = _adapter_and_info(model)
        m = get_method(method)
        try:
            opts = _options_from_json(m.options_for(info.family), meta.get("options", "{}"),
                                      meta.get("options_tuples"))
        except (json.JSONDecodeError, TypeError):
            raise ValueError(f"{path}: unreadable options metadata (corrupt file?)") from None
        opts.update(options)
    elif options:
        raise ValueError(f"{path} holds no token method, so options "
                         f"{', '.join(sorted(options))} do not apply")
    reducer_sd = {k[len(_PREFIX):]: v for k, v in tensors.items() if k.startswith(_PREFIX)}
    backbone_sd = {k: v for k, v in tensors.items() if not k.startswith(_PREFIX)}
    if spec is not None and not backbone_sd:
        raise ValueError(f"{path}: a compacted model's file without its weights "
                         "(corrupt file?)")
    return method, opts, spec, reducer_sd, backbone_sd


def _warn_if_unchecked(meta: dict[str, str], stored: dict[str, Any], path) -> None:
    """One warning for a file written before the checksum and architecture record existed."""
    import warnings

    missing = [what for what, present in (
        ("a tensor checksum", "tensors_sha256" in meta),
        ("the model class", "model_class" in meta),
        ("the model family", "family" in stored or not stored and "compaction" in meta),
    ) if not present]
    if missing:
        listed = ", ".join(missing[:-1]) + (" or " if len(missing) > 1 else "") + missing[-1]
        warnings.warn(f"{path} (leanvit {meta.get('leanvit_version', '?')}) does not record "
                      f"{listed}: loaded without checking them (re-save it with leanvit.save "
                      "to add them)", UserWarning, stacklevel=4)


def _authors_plan(tensors: dict[str, torch.Tensor], path, options: dict[str, Any]) -> tuple:
    """The plan (see :func:`_leanvit_plan`) of a checkpoint as a method's authors released it:
    the first importer a registered method declares (:attr:`leanvit.registry.Method.importers`)
    that recognizes the tensors reads it; ``ValueError`` naming the formats known otherwise."""
    from leanvit.registry import registered

    known = []
    for name, method in registered().items():
        for importer in method.importers:
            if importer.recognizes(tensors):
                opts, reducer_sd, backbone_sd = importer.plan(tensors, path, options)
                return name, opts, None, reducer_sd, backbone_sd
            known.append(importer.what)
    raise ValueError(f"{path} is neither a leanvit file (no 'format: leanvit' metadata) nor "
                     f"{' nor '.join(known) or 'a checkpoint any method imports'}")


def _apply(model: nn.Module, path, method: Optional[str], opts: dict[str, Any],
           spec: Optional[dict], reducer_sd: dict[str, torch.Tensor],
           backbone_sd: dict[str, torch.Tensor]) -> None:
    """(Compact,) patch, then load the state into ``model``; undo everything on any failure
    (the model is left unpatched, not compacted, with its weights)."""
    from leanvit.compaction import rebuild
    from leanvit.patching import ATTR, is_patched, patch, unpatch

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
            _check_complete(model, backbone_sd, path)
        if method:
            patch(model, method, **opts)
            reducer = getattr(model, ATTR)
            _check_state(reducer, reducer_sd, path, f"{method} state")
            reducer.load_state_dict(reducer_sd, strict=True)
        elif reducer_sd:
            raise ValueError(f"{path}: method tensors {_names(sorted(reducer_sd))} but no "
                             "method name (corrupt file?)")
        if backbone_sd:
            _check_complete(model, backbone_sd, path)
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


def _check_complete(model: nn.Module, backbone_sd: dict[str, torch.Tensor], path) -> None:
    """``ValueError`` when the file lacks some of the model's own weights."""
    own = {k for k in model.state_dict() if not k.startswith(_PREFIX)}
    missing = sorted(own - set(backbone_sd))
    if missing:
        raise ValueError(f"{path}: model weights missing {_names(missing)}")


def _version() -> str:
    import leanvit

    return leanvit.__version__


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
