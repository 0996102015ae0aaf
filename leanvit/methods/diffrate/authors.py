"""The DiffRate authors' published schedules (``compression_rate.json`` of OpenGVLab/DiffRate)
read into :class:`~leanvit.methods.diffrate.schedule.Schedule` objects.
"""
from __future__ import annotations

import ast
import math
import os
from pathlib import Path
from typing import Any, Union

from leanvit.methods.diffrate.schedule import (AUTHORS_MODELS, Schedule, ScheduleError,
                                               _read_json, effective_counts)


def read_authors_schedule(path: Union[str, os.PathLike], model_key: str,
                          target: Union[str, float]) -> Schedule:
    """One schedule from the authors' ``compression_rate.json`` (OpenGVLab/DiffRate).

    Their format: ``{model_key: {target_gmacs_string: {"prune_kept_num": "[197, ...]",
    "merge_kept_num": "[...]"}}}`` with stringified lists, class token included. The keys are
    the search targets, not measured results. Counts larger than the tokens present change
    nothing, so their effective values (a running minimum) are stored; ``obtained`` lists the
    blocks where that changed a number.

    Args:
        path: the authors' JSON file.
        model_key: e.g. ``"ViT-S-DeiT"`` (see :data:`leanvit.methods.diffrate.schedule.AUTHORS_MODELS`).
        target: e.g. ``"2.9"`` or ``2.9``.
    """
    path = Path(path)
    data = _read_json(path, "file")
    if not isinstance(data, dict):
        raise ScheduleError(f"{path}: expected a JSON object of models")
    if model_key not in data:
        raise ScheduleError(f"{path} has no model {model_key!r}; it has: {', '.join(data)}")
    if model_key not in AUTHORS_MODELS:
        raise ScheduleError(f"{model_key!r} is not a ViT schedule leanvit can deploy; "
                            f"supported: {', '.join(AUTHORS_MODELS)}")
    entries = data[model_key]
    key = target if isinstance(target, str) else _target_key(target, entries)
    if not isinstance(entries, dict) or key not in entries:
        have = ", ".join(entries) if isinstance(entries, dict) else "(none)"
        raise ScheduleError(f"{path}: {model_key} has no target {target!r}; targets: {have}")
    entry = entries[key]
    lists = {}
    for name in ("prune_kept_num", "merge_kept_num"):
        raw = entry.get(name) if isinstance(entry, dict) else None
        try:
            value = ast.literal_eval(raw) if isinstance(raw, str) else raw
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, list):
            raise ScheduleError(f"{path}: {model_key}/{key}/{name} is not a list of counts "
                                f"(got {raw!r})")
        lists[name] = value
    prune, merge = lists["prune_kept_num"], lists["merge_kept_num"]
    if len(prune) != len(merge):
        raise ScheduleError(f"{path}: {model_key}/{key}: prune_kept_num has {len(prune)} blocks, "
                            f"merge_kept_num {len(merge)}")
    num_tokens = int(prune[0]) if prune else 0
    p_eff, m_eff = effective_counts(prune, merge, num_tokens)
    changed = [i for i in range(len(prune)) if (p_eff[i], m_eff[i]) != (prune[i], merge[i])]
    name, size = AUTHORS_MODELS[model_key]
    obtained = {"how": "authors", "source": "OpenGVLab/DiffRate compression_rate.json",
                "model_key": model_key, "target_gmacs": float(key),
                "published_prune_kept": list(prune), "published_merge_kept": list(merge),
                "blocks_with_no_op_counts": changed}
    try:
        return Schedule(model=name, img_size=(size, size), num_tokens=num_tokens, prefix_tokens=1,
                        prune_kept=p_eff, merge_kept=m_eff, obtained=obtained)
    except ScheduleError as e:
        raise ScheduleError(f"{path}: {model_key}/{key}: {e}") from None


def _target_key(target: float, entries: Any) -> str:
    if isinstance(entries, dict):
        for k in entries:
            try:
                if math.isclose(float(k), float(target)):
                    return k
            except ValueError:
                continue
    return str(target)
