"""Creating timm models by name, with local checkpoints and clear errors (no network).

Without a checkpoint the weights are random but the same in every process: they are drawn
from torch's CPU generator seeded with :data:`RANDOM_WEIGHTS_SEED` (the caller's random state
is left as it was), so a probe head fitted in one ``leanvit`` command fits the model another
command builds. A ``UserWarning`` says so (the CLI prints it once on stderr).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import timm
import torch
from torch import nn

from leanvit.adapters.base import input_size  # noqa: F401  (public here: leanvit.models.input_size)


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


#: seed of the random weights of a model created without a checkpoint (see the module docstring)
RANDOM_WEIGHTS_SEED = 0


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

    Random weights (no ``checkpoint``) are seeded with :data:`RANDOM_WEIGHTS_SEED`: two calls
    with the same arguments give identical weights, in any process; a warning says the model
    has random weights. timm draws the classifier's initial weights before the backbone's
    final ones, so the backbone depends on the class count too: with ``head`` the model is
    built headless (``num_classes=0``), as ``leanvit probe`` builds the model it fits on.

    Args:
        name: a timm model name, e.g. ``"deit_small_patch16_224"``, or a local Hugging Face
            folder (``save_pretrained`` output: ``config.json`` and weights), loaded with
            transformers from that folder only (no hub access; see :func:`is_hf_folder`).
        img_size: input size in pixels, passed to timm (position embeddings are resampled when
            a checkpoint was trained at another size).
        checkpoint: a timm state dict (``.safetensors``, ``.pth``, ``.bin``); loaded the timm
            way (``pretrained_cfg_overlay=dict(file=...)``), so the model's own key filters
            apply. A safetensors file without classifier weights gives a headless model.
        num_classes: classifier size; ``0`` for a headless backbone. Ignored with ``head``
            (which replaces the classifier).
        head: a linear-probe head file (``leanvit probe``, :func:`leanvit.heads.save_head`)
            attached with :func:`leanvit.heads.attach_head`: the model then classifies from
            its class token + mean patch token.

    Raises:
        ValueError: unknown model name, missing or unreadable checkpoint, or a checkpoint that
            does not fit the model; a head fitted for another model or width.
    """
    if is_hf_folder(name):
        return _create_hf(Path(name), img_size=img_size, checkpoint=checkpoint,
                          num_classes=num_classes, head=head, **kwargs)
    if head is not None:
        # the head replaces the classifier: build headless, as 'leanvit probe' built the model
        # it fitted the head on (timm's random initial weights depend on the class count)
        num_classes = 0
    model = _create(name, img_size=img_size, checkpoint=checkpoint, num_classes=num_classes,
                    **kwargs)
    if head is not None:
        _attach_head_file(model, name, head)
    return model


def is_hf_folder(name: Any) -> bool:
    """Whether ``name`` is an existing folder holding a Hugging Face ``config.json``."""
    if not isinstance(name, (str, Path)):
        return False
    path = Path(name)
    return path.is_dir() and (path / "config.json").is_file()


def _create_hf(path: Path, *, img_size, checkpoint, num_classes, head, **kwargs: Any
               ) -> nn.Module:
    """The transformers model saved in the folder ``path`` (the class its config's
    ``architectures`` names, else ``AutoModelForImageClassification`` / ``AutoModel``), in
    eval mode, from local files only. Options that only timm models take are refused."""
    given = [k for k, v in (("checkpoint", checkpoint), ("num_classes", num_classes),
                            ("head", head)) if v is not None] + sorted(kwargs)
    if given:
        raise ValueError(f"{path} is a Hugging Face folder: {', '.join(given)} cannot be "
                         "given (its weights and head are the folder's)")
    try:
        import transformers
    except ImportError:
        raise ValueError(f"{path} is a Hugging Face folder; loading it needs transformers "
                         "(pip install 'leanvit[hf]')") from None
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"could not read the Hugging Face config in {path}: "
                         f"{load_error_summary(e)}") from None
    size = getattr(cfg, "image_size", None)
    if img_size is not None and img_size != size:
        raise ValueError(f"{path} is configured for image_size={size}; img_size={img_size} "
                         "cannot be given (save the model with another image_size)")
    archs = list(getattr(cfg, "architectures", None) or [])
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        classifies = any("ForImageClassification" in a for a in archs)
        cls = transformers.AutoModelForImageClassification if classifies else \
            transformers.AutoModel
    try:
        model = cls.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"could not load the Hugging Face model in {path}: "
                         f"{load_error_summary(e)}") from None
    return model.eval()


def _attach_head_file(model: nn.Module, name: str, head: str | Path) -> None:
    from leanvit.heads import attach_head, head_metadata, load_head

    meta = head_metadata(head)
    if meta.get("dense"):
        raise ValueError(f"{head} is a per-patch (dense) probe head; use it with "
                         "'leanvit compare --dense --head', not as a classifier")
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
        return _random_weights(name, kw)
    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    classifiers = _classifier_names(name)
    rows = checkpoint_classes(path, classifiers)
    # Load strictly with the checkpoint's own classifier size (timm loads non-strictly, and so
    # ignores ANY missing tensor, when the class count differs); then replace the classifier
    # if another class count was asked for: the only tensors a checkpoint may lack.
    load_kw = dict(kw, num_classes=rows)
    try:
        model = _size_free(name, load_kw, lambda **k: timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=rows),
            **k))
    except (RuntimeError, KeyError, OSError, EOFError, ValueError) as e:
        raise ValueError(f"could not load checkpoint {path} into {name}: "
                         f"{load_error_summary(e)}") from None
    except Exception as e:  # unpickling errors of corrupt .pth files come in many types
        raise ValueError(f"could not load checkpoint {path} into {name}: "
                         f"{type(e).__name__}: {e}") from None
    if num_classes is not None and num_classes != rows:
        if not hasattr(model, "reset_classifier"):
            raise ValueError(f"{name} has no reset_classifier(); cannot change its {rows} "
                             f"classes to {num_classes}")
        model.reset_classifier(num_classes)
    return model


def _random_weights(name: str, kw: dict) -> nn.Module:
    """``name`` with weights drawn after seeding torch's CPU generator with
    :data:`RANDOM_WEIGHTS_SEED`; the generator's state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(RANDOM_WEIGHTS_SEED)
        model = _size_free(name, kw, lambda **k: timm.create_model(name, pretrained=False, **k))
    warnings.warn(f"{name} has random weights (no checkpoint given; seeded with "
                  f"{RANDOM_WEIGHTS_SEED}, the same in every run)", UserWarning, stacklevel=4)
    return model


def _classifier_names(name: str) -> tuple[str, ...]:
    """The classifier module names of a timm model (its pretrained config's ``classifier``)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    names = getattr(cfg, "classifier", None) or "head"
    return (names,) if isinstance(names, str) else tuple(names)


def checkpoint_classes(path: Path, classifiers: tuple[str, ...] = ("head",)) -> int:
    """The number of classes of the classifier stored in a checkpoint (rows of
    ``<classifier>.weight``); ``0`` when it holds no classifier (a headless backbone)."""
    shapes = checkpoint_shapes(path)
    for c in tuple(classifiers) + ("head", "head.fc", "fc"):
        shape = shapes.get(f"{c}.weight")
        if shape:
            return int(shape[0])
    return 0


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a checkpoint file (safetensors read lazily; ``.pth``/``.bin``
    through timm's loader, which unwraps ``state_dict``/``model`` entries)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"checkpoint {path} is not a readable safetensors file: {e}") from None
    from timm.models import load_state_dict

    try:
        sd = load_state_dict(str(path))
    except Exception as e:  # unpickling errors of corrupt .pth files come in many types
        raise ValueError(f"could not load checkpoint {path}: not a readable state dict "
                         f"({type(e).__name__}: {e})") from None
    return {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}


def _names(keys: list[str], limit: int = 8) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_error_summary(e: BaseException) -> str:
    """One line from a ``load_state_dict`` error: missing and unexpected keys (the first few
    and how many more) and every size mismatch, instead of torch's multi-line message."""
    import re

    text = str(e).strip()
    if not text:
        return type(e).__name__
    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*?)\.\s*$"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*?)\.\s*$")):
        for m in re.finditer(pattern, text, re.M):
            keys = re.findall(r'"([^"]+)"', m.group(1))
            parts.append(f"{len(keys)} {label} tensor(s): {_names(keys)}")
    mismatches = re.findall(r"size mismatch for ([^:]+): copying a param with shape "
                            r"torch\.Size\(\[([^\]]*)\]\) from checkpoint, the shape in current "
                            r"model is torch\.Size\(\[([^\]]*)\]\)", text)
    if mismatches:
        parts.append("shape mismatch: " + "; ".join(
            f"{k} is [{a}] in the checkpoint, [{b}] in the model" for k, a, b in mismatches[:8])
            + (f" (+{len(mismatches) - 8} more)" if len(mismatches) > 8 else ""))
    if parts:
        return "; ".join(parts)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


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
