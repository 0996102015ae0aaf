"""DiffRate's token schedules: how many tokens each block keeps, as a versioned,
human-readable JSON file.

A schedule is what a DiffRate search produces and what the ``"diffrate"`` method deploys
(:mod:`leanvit.methods.diffrate.deploy`). Per block ``i`` it gives two kept-token counts, prefix
tokens (class, distillation, register tokens) included:

- ``prune_kept[i]``: tokens kept after sorting by class attention and dropping the tail;
- ``merge_kept[i]``: tokens left after merging the remaining tail into its most similar
  kept token.

A count equal to (or larger than) the tokens present changes nothing, so ``[197, 197]`` in
block 0 of DeiT-S means "leave block 0 alone".

The file (``format_version`` 1)::

    {
      "format": "leanvit-token-schedule",
      "format_version": 1,
      "model": "deit_small_patch16_224",      # timm name it was made for
      "img_size": [224, 224],                  # input size, pixels (H, W)
      "depth": 12,                             # blocks
      "num_tokens": 197,                       # tokens entering block 0, prefix included
      "prefix_tokens": 1,
      "prune_kept": [197, 196, 190, ...],      # one per block
      "merge_kept": [197, 194, 176, ...],      # one per block
      "gmacs": 2.905,                          # MACs per image it yields (1e9), or null
      "obtained": {"how": "search", ...}       # provenance: search settings, or the source
    }

Counts must never increase along the sequence ``prune_kept[0] >= merge_kept[0] >=
prune_kept[1] >= ...``, lie in ``[prefix_tokens + 1, num_tokens]``, and there must be one per
block. The authors' published lists (``compression_rate.json`` of OpenGVLab/DiffRate) contain
counts larger than the tokens already present, which change nothing at run time;
:func:`leanvit.methods.diffrate.authors.read_authors_schedule` stores their effective values (a running minimum) and records
which blocks it changed.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from leanvit._files import atomic_write_text

FORMAT = "leanvit-token-schedule"
FORMAT_VERSION = 1

#: The authors' model keys in ``compression_rate.json`` -> (timm name, image size, prefix).
AUTHORS_MODELS = {
    "ViT-T-DeiT": ("deit_tiny_patch16_224", 224),
    "ViT-S-DeiT": ("deit_small_patch16_224", 224),
    "ViT-B-DeiT": ("deit_base_patch16_224", 224),
    "ViT-B-MAE": ("vit_base_patch16_224.mae", 224),
    "ViT-L-MAE": ("vit_large_patch16_224.mae", 224),
    "ViT-H-MAE": ("vit_huge_patch14_224.mae", 224),
}


class ScheduleError(ValueError):
    """A schedule that is malformed or does not fit the model (a ``ValueError``)."""


@dataclass(frozen=True)
class Schedule:
    """Per-block kept-token counts (prefix tokens included); validated on creation.

    Attributes:
        model: timm model name the schedule was made for (informative; not enforced).
        img_size: ``(H, W)`` input size in pixels.
        num_tokens: tokens entering the first block, prefix included (197 for DeiT at 224).
        prefix_tokens: prefix tokens (class, distillation, registers), never pruned or merged.
        prune_kept: per block, tokens kept after pruning.
        merge_kept: per block, tokens left after merging.
        gmacs: MACs per image (in 1e9) the schedule yields on ``model``, when known.
        obtained: how it was obtained (``{"how": "search", "target_gmacs": ..., ...}`` or
            ``{"how": "authors", ...}`` or ``{"how": "manual"}``); free-form JSON.
    """

    model: str
    img_size: tuple[int, int]
    num_tokens: int
    prefix_tokens: int
    prune_kept: tuple[int, ...]
    merge_kept: tuple[int, ...]
    gmacs: Optional[float] = None
    obtained: dict = field(default_factory=lambda: {"how": "manual"}, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", _pair("img_size", self.img_size))
        object.__setattr__(self, "prune_kept", _counts("prune_kept", self.prune_kept))
        object.__setattr__(self, "merge_kept", _counts("merge_kept", self.merge_kept))
        if not isinstance(self.model, str):
            raise ScheduleError(f"model must be a string, got {self.model!r}")
        for name in ("num_tokens", "prefix_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ScheduleError(f"{name} must be a non-negative int, got {v!r}")
        if self.num_tokens <= self.prefix_tokens:
            raise ScheduleError(f"num_tokens ({self.num_tokens}) must exceed prefix_tokens "
                                f"({self.prefix_tokens})")
        if len(self.prune_kept) != len(self.merge_kept):
            raise ScheduleError(f"prune_kept has {len(self.prune_kept)} blocks but merge_kept "
                                f"has {len(self.merge_kept)}; give one count per block in both")
        if not self.prune_kept:
            raise ScheduleError("a schedule needs at least one block")
        lo, hi = self.prefix_tokens + 1, self.num_tokens
        for name, counts in (("prune_kept", self.prune_kept), ("merge_kept", self.merge_kept)):
            for i, c in enumerate(counts):
                if not lo <= c <= hi:
                    raise ScheduleError(
                        f"{name}[{i}] = {c} is outside [{lo}, {hi}]: a block keeps at least the "
                        f"{self.prefix_tokens} prefix token(s) plus one, and at most the model's "
                        f"{hi} tokens")
        prev, prev_name = self.num_tokens, "num_tokens"
        for i, (p, m) in enumerate(zip(self.prune_kept, self.merge_kept)):
            for name, c in ((f"prune_kept[{i}]", p), (f"merge_kept[{i}]", m)):
                if c > prev:
                    raise ScheduleError(
                        f"counts increase: {name} = {c} > {prev_name} = {prev}; kept counts "
                        "never increase (prune_kept[i] >= merge_kept[i] >= prune_kept[i+1])")
                prev, prev_name = c, name
        if self.gmacs is not None:
            if isinstance(self.gmacs, bool) or not isinstance(self.gmacs, (int, float)) or \
                    not math.isfinite(self.gmacs) or self.gmacs <= 0:
                raise ScheduleError(f"gmacs must be a positive number or null, got {self.gmacs!r}")
        if not isinstance(self.obtained, dict):
            raise ScheduleError(f"obtained must be a JSON object, got {self.obtained!r}")

    @property
    def depth(self) -> int:
        return len(self.prune_kept)

    def tokens_after(self) -> list[int]:
        """Tokens leaving each block (after its pruning and merging)."""
        return list(self.merge_kept)

    def check_model(self, *, depth: int, num_tokens: int, prefix_tokens: int,
                    img_size: Optional[Sequence[int]] = None, model: str = "") -> None:
        """``ScheduleError`` unless the schedule fits a model with these properties."""
        what = f" ({model})" if model else ""
        if depth != self.depth:
            raise ScheduleError(f"schedule has {self.depth} blocks but the model{what} has "
                                f"{depth}; it was made for {self.model or 'another model'}")
        if img_size is not None and tuple(img_size) != self.img_size:
            raise ScheduleError(
                f"schedule was made for {self.img_size[0]}x{self.img_size[1]} images but the "
                f"model{what} takes {img_size[0]}x{img_size[1]}")
        if prefix_tokens != self.prefix_tokens:
            raise ScheduleError(f"schedule assumes {self.prefix_tokens} prefix token(s) but the "
                                f"model{what} has {prefix_tokens}")
        if num_tokens != self.num_tokens:
            raise ScheduleError(f"schedule was made for {self.num_tokens} tokens but the "
                                f"model{what} has {num_tokens}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model": self.model,
            "img_size": list(self.img_size), "depth": self.depth, "num_tokens": self.num_tokens,
            "prefix_tokens": self.prefix_tokens, "prune_kept": list(self.prune_kept),
            "merge_kept": list(self.merge_kept), "gmacs": self.gmacs, "obtained": self.obtained,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "schedule") -> "Schedule":
        """Parse the JSON object of a schedule file; ``ScheduleError`` naming what is wrong."""
        if not isinstance(d, dict):
            raise ScheduleError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ScheduleError(f"{where}: not a leanvit schedule (\"format\" is "
                                f"{d.get('format')!r}, expected {FORMAT!r})")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ScheduleError(f"{where}: format_version {version!r} is not supported "
                                f"(this leanvit reads version {FORMAT_VERSION})")
        required = ("model", "img_size", "num_tokens", "prefix_tokens", "prune_kept",
                    "merge_kept")
        missing = [k for k in required if k not in d]
        if missing:
            raise ScheduleError(f"{where}: missing field(s) {', '.join(missing)}")
        try:
            s = cls(model=d["model"], img_size=d["img_size"], num_tokens=d["num_tokens"],
                    prefix_tokens=d["prefix_tokens"], prune_kept=d["prune_kept"],
                    merge_kept=d["merge_kept"], gmacs=d.get("gmacs"),
                    obtained=d.get("obtained") or {})
        except ScheduleError as e:
            raise ScheduleError(f"{where}: {e}") from None
        if "depth" in d and d["depth"] != s.depth:
            raise ScheduleError(f"{where}: \"depth\" is {d['depth']!r} but the lists have "
                                f"{s.depth} blocks")
        return s


def _pair(name: str, v: Any) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(
            isinstance(a, int) and not isinstance(a, bool) and a > 0 for a in v):
        raise ScheduleError(f"{name} must be [H, W] positive ints, got {v!r}")
    return (int(v[0]), int(v[1]))


def _counts(name: str, v: Any) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)):
        raise ScheduleError(f"{name} must be a list of ints (one per block), got {v!r}")
    out = []
    for i, c in enumerate(v):
        if isinstance(c, float) and c.is_integer():
            c = int(c)
        if isinstance(c, bool) or not isinstance(c, int):
            raise ScheduleError(f"{name}[{i}] must be an int, got {c!r}")
        out.append(c)
    return tuple(out)


def effective_counts(prune_kept: Sequence[int], merge_kept: Sequence[int], num_tokens: int
                     ) -> tuple[list[int], list[int]]:
    """The counts a block actually applies: a running minimum over
    ``num_tokens, prune_kept[0], merge_kept[0], prune_kept[1], ...`` (a count larger than the
    tokens present changes nothing)."""
    n, p_out, m_out = num_tokens, [], []
    for p, m in zip(prune_kept, merge_kept):
        n = min(n, int(p))
        p_out.append(n)
        n = min(n, int(m))
        m_out.append(n)
    return p_out, m_out



# -- files ---------------------------------------------------------------------------------

def save_schedule(schedule: Schedule, path: Union[str, os.PathLike]) -> Path:
    """Write ``schedule`` as JSON, atomically (temporary file + ``os.replace``)."""
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    return atomic_write_text(path, _format(schedule.to_dict()))


def _format(d: dict) -> str:
    """Indented JSON with each list of numbers on one line (one glance per list)."""
    body = json.dumps(d, indent=2)
    return re.sub(r"\[\s*([-\d.,\s]*?)\s*\]",
                  lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")
                                            if v.strip()) + "]", body) + "\n"


def load_schedule(path: Union[str, os.PathLike]) -> Schedule:
    """Read a schedule file written by :func:`save_schedule`; clear errors otherwise.

    A file in the authors' format (``model -> target -> {prune_kept_num, merge_kept_num}``)
    is recognised and the error says to use
    :func:`leanvit.methods.diffrate.authors.read_authors_schedule`.
    """
    path = Path(path)
    d = _read_json(path, "schedule file")
    if isinstance(d, dict) and "format" not in d and any(k in AUTHORS_MODELS for k in d):
        raise ScheduleError(
            f"{path} is in the DiffRate authors' format (model -> target GMACs); read it with "
            "leanvit.methods.diffrate.read_authors_schedule(path, model_key, target)")
    return Schedule.from_dict(d, where=f"schedule file {path}")


def _read_json(path: Path, what: str):
    """The JSON in ``path``; ``ScheduleError`` naming the file if missing or malformed."""
    if not path.is_file():
        raise ScheduleError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScheduleError(f"{what} {path} is not valid JSON: {e}") from None


def as_schedule(value: Any, *, model: str = "", img_size: Optional[Sequence[int]] = None,
                num_tokens: Optional[int] = None, prefix_tokens: Optional[int] = None
                ) -> Schedule:
    """A :class:`Schedule` from a path, a ``Schedule``, a ``dict`` (file contents) or a pair of
    per-block lists ``(prune_kept, merge_kept)`` (the model's properties fill the rest)."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, (str, os.PathLike)):
        return load_schedule(value)
    if isinstance(value, dict):
        return Schedule.from_dict(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, (tuple, list)) for v in value):
        if num_tokens is None or prefix_tokens is None or img_size is None:
            raise ScheduleError("a (prune_kept, merge_kept) pair needs the model's token counts "
                                "and image size")
        return Schedule(model=model, img_size=tuple(img_size),
                        num_tokens=num_tokens, prefix_tokens=prefix_tokens,
                        prune_kept=value[0], merge_kept=value[1])
    raise TypeError("schedule must be a path to a schedule file, a "
                    "leanvit.methods.diffrate.Schedule, or "
                    f"a pair of per-block lists (prune_kept, merge_kept); got {value!r}")
