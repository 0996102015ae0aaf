"""Reading the DynamicViT authors' released checkpoints (raoyongming/DynamicViT, DeiT models):
``.pth`` files holding ``{"model": state_dict, ...}`` with ``score_predictor.{s}.in_conv.*`` /
``out_conv.*`` predictor names and timm ViT backbone names. The method declares
:data:`IMPORTER` on its registry entry; :func:`leanvit.load` finds it there.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from torch import Tensor

from leanvit.methods.dynamicvit.tokens import from_authors_state_dict
from leanvit.registry import Importer

#: the authors' pruning locations for DeiT (``pruning_loc = [3, 6, 9]``)
AUTHORS_LOCATIONS = (3, 6, 9)


def recognizes(tensors: Mapping[str, Tensor]) -> bool:
    """Whether a file's tensors are an authors' checkpoint (predictors named
    ``score_predictor.*``)."""
    return any(k.startswith("score_predictor.") for k in tensors)


def rate_from_name(name: str) -> Optional[float]:
    """The keep rate in an authors' file name such as ``dynamic-vit_384_r0.7.pth``."""
    m = re.search(r"(?:^|[_\-])r?(0\.\d+)(?=[_\-.])", name)
    return float(m.group(1)) if m else None


def plan(tensors: dict[str, Tensor], path: Union[str, os.PathLike], options: dict[str, Any]
         ) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor]]:
    """``(options, predictor state, backbone state)`` of an authors' checkpoint; the user's
    ``options`` override. The files do not record the keep rate: ``keep_rate=`` or a file name
    that says it (``..._r0.7...``) is needed; three predictors are at the authors' DeiT
    locations, any other count needs ``locations=``."""
    backbone_sd, reducer_sd, stages = from_authors_state_dict(tensors)
    opts: dict[str, Any] = {}
    if stages == len(AUTHORS_LOCATIONS):
        opts["locations"] = AUTHORS_LOCATIONS
    elif "locations" not in options:
        raise ValueError(f"{path}: the authors' checkpoint has {stages} predictors; pass "
                         "locations=(...) with one block index per predictor")
    rate = options.get("keep_rate", rate_from_name(Path(path).name))
    if rate is None:
        raise ValueError(
            f"{path}: the authors' checkpoints do not record the keep rate; pass it, e.g. "
            "leanvit.load(model, path, keep_rate=0.7) (their DeiT-S release: 0.7)")
    opts.update(options)
    opts["keep_rate"] = rate
    return opts, reducer_sd, backbone_sd


IMPORTER = Importer("DynamicViT authors' checkpoint (score_predictor.* tensors)", recognizes,
                    plan)
