"""``dynamicvit`` on flat-token families (ViT; every family of kind ``"tokens"``): learned token pruning with prediction modules (Rao et al., NeurIPS 2021,
"DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification"; TPAMI
extension arXiv 2207.01580).

Before each block in ``locations`` a small prediction module scores every patch token
(keep / drop) from its own features and a global feature of the tokens still kept:

    h = GELU(Linear(LayerNorm(x)))                     # [B, N, C]
    local = h[..., :C//2]; global = keep-weighted mean of h[..., C//2:] over kept tokens
    log p = log_softmax(MLP(concat(local, global)))    # C -> C/2 -> C/4 -> 2, GELU between
    p[..., 0] is the probability to KEEP the token     # channel 0 = keep (authors' code)

Training (``model.train()``): a hard Gumbel-softmax sample decides, and decisions are
hierarchical, ``D_s = sample_s * D_{s-1}`` (a dropped token stays dropped). Tokens stay in
place; dropped tokens are masked out of every later attention as keys, the diagonal kept,
with the authors' fp32 eps-softmax (:func:`leanvit.ops.attention.masked_softmax`, set
through ``state.mask``). Each stage's decision ``[B, N0 - prefix]`` is recorded in
``state.aux`` under :data:`DECISION` for the loss (:mod:`leanvit.losses`).

Inference (``model.eval()``): exactly ``int(N0 * keep_rate ** (s + 1))`` patch tokens per
image survive stage ``s`` (``N0`` = patch tokens of the input), chosen by descending keep
score among the survivors of the previous stage; the others are removed, so every block runs
the timm attention module itself (fused SDPA) on fewer tokens. Survivors keep their spatial
order. Their original patch indices are recorded in ``state.aux`` under :data:`KEPT`.

Prefix tokens (class, distillation, registers) are never scored or pruned. Predictor MACs are
recorded as ``extra["predictor"]`` in :func:`leanvit.count_macs`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanvit.methods.dynamicvit.predictor import DECISION, KEPT, Predictor
from leanvit.ops.tokens import gather_tokens
from leanvit.registry import ModelInfo, Reducer, check_locations, check_number
from leanvit.state import TokenState

@dataclass(frozen=True)
class DynamicViTOptions:
    """Options of ``dynamicvit``.

    Attributes:
        keep_rate: rho; stage ``s`` keeps ``int(N0 * rho ** (s + 1))`` patch tokens in
            inference and is trained towards that ratio. Default 0.7: the paper's main DeiT-S
            setting (Rao et al. 2021, Table 1: 137/96/67 of 196 tokens).
        locations: the blocks BEFORE which a prediction module runs. Default (3, 6, 9): the
            authors' ``pruning_loc`` for 12-block ViTs.
        tau: Gumbel-softmax temperature in training. Default 1.0 (the authors call
            ``F.gumbel_softmax`` with its default).
    """

    keep_rate: float = 0.7
    locations: tuple = (3, 6, 9)
    tau: float = 1.0

    def __post_init__(self) -> None:
        check_number("keep_rate", self.keep_rate, lo=0.0, hi=1.0, lo_open=True)
        check_number("tau", self.tau, lo=0.0, lo_open=True)
        if isinstance(self.locations, list):
            object.__setattr__(self, "locations", tuple(self.locations))
        check_locations("locations", self.locations, None)  # the depth in build


def keep_counts(num_patches: int, keep_rate: float, stages: int) -> list[int]:
    """Patch tokens kept after each stage in inference: ``int(N0 * rho ** (s + 1))``, at
    least 1 (DeiT-S at 224, rho 0.7: ``[137, 96, 67]``)."""
    return [max(1, int(num_patches * keep_rate ** (s + 1))) for s in range(stages)]


class DynamicViT(Reducer):
    """Runtime of ``dynamicvit``: one :class:`Predictor` per location in ``self.predictor``."""

    #: the per-stage keep decisions the ratio loss reads (training forward)
    decision_key = DECISION

    def __init__(self, options: DynamicViTOptions, info: ModelInfo):
        super().__init__(options, info)
        self.locations = options.locations
        self.stage = {loc: s for s, loc in enumerate(self.locations)}
        self.predictor = nn.ModuleList(Predictor(info.embed_dim) for _ in self.locations)

    def acts_before(self, i: int) -> bool:
        return i in self.stage

    def keep_targets(self) -> list[float]:
        """Target kept fraction of each stage for the ratio loss: ``rho ** (s + 1)``."""
        return [self.options.keep_rate ** (s + 1) for s in range(len(self.locations))]

    def before_block(self, i: int, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        s = self.stage[i]
        P = state.prefix
        patches = x[:, P:]
        pred = self.predictor[s]
        if state.recorder is not None:
            state.recorder.add_extra("predictor", patches.shape[1] * pred.macs_per_token())
        if self.training:
            return self._train_stage(s, x, state)
        return self._infer_stage(s, x, state)

    # -- training: hard Gumbel decisions, tokens kept in place and masked -------------------
    def _train_stage(self, s: int, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        P = state.prefix
        if state.mask is None:
            prev = x.new_ones(x.shape[0], x.shape[1] - P, dtype=torch.float32)
        else:
            prev = state.mask[:, P:].float()
        logp = self.predictor[s](x[:, P:], prev)
        decision = self._decide(s, logp, prev, state) * prev  # a dropped token stays dropped
        mask = torch.cat([prev.new_ones(prev.shape[0], P), decision], dim=1)
        return x, state.replace(mask=mask, aux=state.aux + ((DECISION, decision),))

    def _decide(self, s: int, logp: Tensor, prev: Tensor, state: TokenState) -> Tensor:
        """Hard keep decisions ``[B, N]`` (0/1, straight-through gradients into ``logp``)."""
        return F.gumbel_softmax(logp.float(), tau=self.options.tau, hard=True)[..., 0]

    # -- inference: exactly int(N0 * rho^(s+1)) survivors, really removed -------------------
    def _infer_stage(self, s: int, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        P = state.prefix
        B, N = x.shape[:2]
        n0_patches = state.n0 - P
        keep = keep_counts(n0_patches, self.options.keep_rate, s + 1)[s]
        prev_kept = state.aux_values(KEPT)
        original = (prev_kept[-1] if prev_kept else
                    torch.arange(N - P, device=x.device).expand(B, -1))
        if keep >= N - P:  # nothing to drop (keep_rate 1): leave x exactly as it is
            return x, state.replace(aux=state.aux + ((KEPT, original),))
        score = self.predictor[s](x[:, P:])[..., 0]
        idx = score.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values  # spatial order
        prefix_idx = torch.arange(P, device=x.device).expand(B, -1)
        index = torch.cat([prefix_idx, idx + P], dim=1)
        x = gather_tokens(x, index)
        state = state.gather(index)
        return x, state.replace(aux=state.aux + ((KEPT, original.gather(1, idx)),))


def build(options: DynamicViTOptions, info: ModelInfo) -> DynamicViT:
    check_locations("locations", options.locations, info.depth)
    return DynamicViT(options, info)


#: the authors' predictor names (``PredictorLG``: ``in_conv`` = LayerNorm, Linear, GELU;
#: ``out_conv`` = Linear, GELU, Linear, GELU, Linear, LogSoftmax) -> this module's names
_AUTHORS_NAMES = {"in_conv.0": "norm", "in_conv.1": "proj", "out_conv.0": "fc1",
                  "out_conv.2": "fc2", "out_conv.4": "fc3"}


def from_authors_state_dict(sd: dict[str, Tensor]
                            ) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
    """Split an authors' DynamicViT state dict (raoyongming/DynamicViT, DeiT models) into
    (timm backbone state dict, this reducer's state dict, number of predictors).

    Their backbone uses timm's ViT names; predictors are ``score_predictor.{s}.{in,out}_conv.*``.
    ``ValueError`` for predictor tensors this module does not know.
    """
    backbone, reducer, stages = {}, {}, set()
    pattern = re.compile(r"score_predictor\.(\d+)\.((?:in|out)_conv\.\d+)\.(weight|bias)$")
    for k, v in sd.items():
        if not k.startswith("score_predictor."):
            backbone[k] = v
            continue
        m = pattern.match(k)
        if m is None or m.group(2) not in _AUTHORS_NAMES:
            raise ValueError(f"unknown DynamicViT predictor tensor {k!r} in the authors' "
                             "checkpoint (expected score_predictor.S.in_conv.{0,1} / "
                             "out_conv.{0,2,4})")
        stages.add(int(m.group(1)))
        reducer[f"predictor.{m.group(1)}.{_AUTHORS_NAMES[m.group(2)]}.{m.group(3)}"] = v
    if sorted(stages) != list(range(len(stages))):
        raise ValueError(f"authors' checkpoint has predictors {sorted(stages)}, not 0..S-1")
    return backbone, reducer, len(stages)
