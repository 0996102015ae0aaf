"""DynamicViT's prediction module and the ``state.aux`` names its decisions are recorded under,
shared by the flat-token (:mod:`leanvit.methods.dynamicvit.tokens`) and hierarchical
(:mod:`leanvit.methods.dynamicvit.hierarchical`) algorithms (Rao et al., NeurIPS 2021).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: ``state.aux`` name of the per-stage training decisions, ``[B, N0 - prefix]`` 0/1 float
DECISION = "dynamicvit.decision"
#: ``state.aux`` name of the per-stage survivors in inference, original patch indices ``[B, K]``
KEPT = "dynamicvit.kept"



class Predictor(nn.Module):
    """The prediction module: patch tokens ``[B, N, C]`` -> keep/drop log-probabilities
    ``[B, N, 2]`` (channel 0 = keep).

    LayerNorm -> Linear(C, C) -> GELU; the first ``C // 2`` channels stay per token (local), the
    rest are averaged over the kept tokens (global); concat -> Linear(C, C/2) -> GELU ->
    Linear(C/2, C/4) -> GELU -> Linear(C/4, 2) -> log_softmax (Rao et al. 2021, eq. 1-3).
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        # torch's default eps 1e-5, as the authors' nn.LayerNorm (their ConvNeXt code: 1e-6)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, dim // 2)
        self.fc2 = nn.Linear(dim // 2, dim // 4)
        self.fc3 = nn.Linear(dim // 4, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated normal (std 0.02) weights, zero biases: the authors' ``_init_weights``."""
        for m in (self.proj, self.fc1, self.fc2, self.fc3):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def macs_per_token(self) -> int:
        """Multiply-accumulates per scored token (the linear layers; 1.625 C^2 + C/2)."""
        return sum(m.in_features * m.out_features
                   for m in (self.proj, self.fc1, self.fc2, self.fc3))

    def forward(self, x: Tensor, keep: Optional[Tensor] = None) -> Tensor:
        """``x`` ``[B, N, C]`` patch tokens, ``keep`` ``[B, N]`` mask of the tokens still kept
        (``None``: all) -> log-probabilities ``[B, N, 2]``."""
        h = F.gelu(self.proj(self.norm(x)))
        half = h.shape[-1] // 2
        local, rest = h[..., :half], h[..., half:]
        if keep is None:
            glob = rest.mean(dim=1, keepdim=True)
        else:
            w = keep.to(rest.dtype).unsqueeze(-1)
            # clamp: an image whose tokens were all dropped gets a zero global feature, not NaN
            glob = (rest * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1e-6)
        h = torch.cat([local, glob.expand_as(rest)], dim=-1)
        h = self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(h)))))
        return F.log_softmax(h, dim=-1)
