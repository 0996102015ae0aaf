"""The per-forward MAC recorder the adapters write into (the bottom layer: torch only).
Reports are made from it by :mod:`leanvit.macs` (:func:`leanvit.macs.report_from`)."""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor


class MacRecorder:
    """Collects per-image MACs and token counts during one forward pass.

    Values are ``[B]`` tensors (per image) or numbers (the same for every image).
    """

    def __init__(self) -> None:
        self.stem = 0.0
        self.head = 0.0
        self.blocks: dict[int, dict[str, Tensor]] = {}
        self.extra: dict[str, Tensor] = defaultdict(lambda: torch.zeros(()))
        self.layers: dict[str, float] = {}

    def record_stem(self, macs: float) -> None:
        self.stem = float(macs)

    def record_head(self, macs: float) -> None:
        self.head = float(macs)

    def record_layer(self, name: str, macs: float) -> None:
        """MACs per image of a backbone layer outside the blocks (hierarchical models'
        downsampling between stages: ConvNeXt's strided conv, Swin's patch merging)."""
        self.layers[name] = float(macs)

    def record_block(self, i: int, **values: Tensor) -> None:
        """Block ``i``'s per-image values: ``tokens_in``, ``tokens_out`` and MAC terms."""
        self.blocks[i] = {k: torch.as_tensor(v, dtype=torch.float64).detach().cpu()
                          for k, v in values.items()}

    def add_extra(self, name: str, macs) -> None:
        """MACs of a module the method adds (e.g. ``"predictor"``), per image."""
        self.extra[name] = self.extra[name] + torch.as_tensor(macs, dtype=torch.float64).cpu()
