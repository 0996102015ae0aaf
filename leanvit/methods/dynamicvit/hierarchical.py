"""``dynamicvit`` on hierarchical backbones: DynamicSwin and DynamicConvNeXt ("DynamicCNN"),
the TPAMI extension of DynamicViT (Rao et al., "Dynamic Spatial Sparsification for Efficient
Vision Transformers and Convolutional Neural Networks", arXiv 2207.01580; authors' code
raoyongming/DynamicViT ``models/dyconvnext.py``, ``models/dyswin.py``).

Registered under the same name as the flat-token method (:mod:`leanvit.methods.dynamicvit`,
algorithm in :mod:`leanvit.methods.dynamicvit.tokens`); this file holds the algorithm for the ``convnext`` and ``swin`` families. Feature maps keep their
spatial layout, so tokens are never removed. Only stage 3 (index 2) is dynamic:

- Before blocks ``locations`` of stage 3 (authors: (1, 2, 3) for -T models) a prediction
  module (:class:`~leanvit.methods.dynamicvit.predictor.Predictor`, global feature = the PLAIN mean over
  all positions) scores every position. Decision ``s`` keeps the ratio
  ``keep_rate - s * ratio_step`` (authors: rho, rho - 0.2, rho - 0.4), independently of the
  earlier decisions (not multiplied); each decision routes the blocks from its location up to
  the next one, the last decision the rest of stage 3 (ConvNeXt-T: block 0 dense, block 1 at
  rho, 2 at rho - 0.2, 3..8 at rho - 0.4).
- In a routed block the spatial part (depthwise convolution / window attention) runs densely
  on the whole map; the MLP branch is routed per position: kept positions take the block's own
  MLP (slow path), the others a fast path ``LayerNorm -> Linear(C, C)`` (:class:`FastPath`,
  one per routed block; ConvNeXt's with its own layer scale initialised to 1e-6).

Training (``model.train()``), as the authors: hard Gumbel-softmax decisions ``[B, N]`` and two
full-size streams, the slow stream ``s1`` and the fast stream ``s2``. A routed block with the
current decision ``m`` computes the spatial part once on ``x0 = s1 * m + s2 * (1 - m)``, then
both paths on EVERY position: the slow path on ``h`` where ``m = 1`` (elsewhere on ``s1``'s own
value), the fast path on ``h`` where ``m = 0`` (elsewhere on ``s2``'s own value), each stream
adding its branch to its own value (ConvNeXt) or to the shared ``base`` (Swin). A predictor
sees ``s1 * m + s2 * (1 - m)`` with the previous decision; after stage 3 the streams are
combined the same way. Decisions go to ``state.aux`` under
:data:`~leanvit.methods.dynamicvit.DECISION` for the ratio loss (targets
:meth:`DynamicHierarchical.keep_targets`); loss defaults :data:`leanvit.losses.
HIERARCHICAL_WEIGHTS`.

Inference (``model.eval()``): exactly ``int(N * ratio_s)`` positions per image by descending
keep score take the slow path, the rest the fast path (gathered, each path on its own tokens,
scattered back: :func:`leanvit.ops.route.route`). A decision whose ratio is >= 1 routes nothing:
its blocks are timm's own, unchanged (``keep_rate=1`` is the unpatched model).
MACs: predictors as ``extra["predictor"]``, fast paths as ``extra["fast_path"]``, each block's
MLP on its slow tokens.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanvit.losses import HIERARCHICAL_WEIGHTS
from leanvit.methods.dynamicvit.predictor import DECISION, KEPT, Predictor
from leanvit.ops.route import mix, route, split_by_score
from leanvit.registry import ModelInfo, Reducer, check_locations, check_number
from leanvit.state import TokenState

#: the dynamic stage (0-based): the third stage, the authors' choice for both families
STAGE = 2
#: authors' predictor locations by the depth of stage 3 (``main.py``): ConvNeXt-T (9 blocks)
#: and Swin-T (6) (1, 2, 3); ConvNeXt-S/B (27) (3, 6, 9); Swin-S/B (18) (2, 4, 6)
AUTHORS_LOCATIONS = {9: (1, 2, 3), 6: (1, 2, 3), 27: (3, 6, 9), 18: (2, 4, 6)}
#: LayerNorm eps of the added modules: the authors' ConvNeXt code uses its LayerNorm with eps
#: 1e-6, their Swin code ``nn.LayerNorm`` (1e-5)
_NORM_EPS = {"convnext": 1e-6, "swin": 1e-5}


@dataclass(frozen=True)
class HierarchicalOptions:
    """Options of ``dynamicvit`` on Swin (and, with :class:`ConvNeXtOptions`, ConvNeXt).

    Attributes:
        keep_rate: rho, the slow-path ratio of the first decision; valid in (0.4, 1] (the last
            of three decisions keeps rho - 0.4). Default 0.7: the published DynamicSwin-T /
            DynamicConvNeXt-T setting (paper Tables 5-6; authors' ``--base_rate``).
        locations: blocks of stage 3 before which a prediction module runs (0-based, within
            the stage). Default ``None``: the authors' positions for the stage's depth
            (:data:`AUTHORS_LOCATIONS`; other depths: (1, 2, 3)).
        ratio_step: decision ``s`` keeps ``keep_rate - s * ratio_step``. Default ``None``:
            0.2, the authors' ``SPARSE_RATIO = [base, base - 0.2, base - 0.4]``, when
            ``keep_rate < 1``, and 0 when ``keep_rate == 1``, so that keep ratio 1 keeps every
            position on the slow path at every decision (the unpatched model; the authors'
            formula would still route 20 % / 40 % there, pass ``ratio_step=0.2`` for that).
        tau: Gumbel-softmax temperature in training. Default 1.0 (``F.gumbel_softmax``'s
            default, as the authors call it).
    """

    keep_rate: float = 0.7
    locations: Optional[tuple] = None
    ratio_step: Optional[float] = None
    tau: float = 1.0

    def __post_init__(self) -> None:
        check_number("keep_rate", self.keep_rate, lo=0.4, hi=1.0, lo_open=True)
        if self.ratio_step is not None:
            check_number("ratio_step", self.ratio_step, lo=0.0, hi=0.5)
        check_number("tau", self.tau, lo=0.0, lo_open=True)
        if self.locations is not None:
            if isinstance(self.locations, list):
                object.__setattr__(self, "locations", tuple(self.locations))
            check_locations("locations", self.locations, None)  # the stage depth in build


@dataclass(frozen=True)
class ConvNeXtOptions(HierarchicalOptions):
    """Options of ``dynamicvit`` on ConvNeXt: :class:`HierarchicalOptions` and

    Attributes:
        fast_layer_scale: initial value of the fast paths' own layer scale (ConvNeXt only).
            Default 1e-6: the authors' ``layer_scale_init_value`` (``dyconvnext.py``).
    """

    fast_layer_scale: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("fast_layer_scale", self.fast_layer_scale, lo=0.0, lo_open=True)


def effective_ratio_step(options: HierarchicalOptions) -> float:
    """``options.ratio_step``, or its default: 0.2 (the authors') below keep ratio 1, 0 at 1."""
    if options.ratio_step is not None:
        return float(options.ratio_step)
    return 0.0 if options.keep_rate >= 1.0 else 0.2


class FastPath(nn.Module):
    """The fast path of one routed block: ``LayerNorm -> Linear(C, C)`` (times a per-channel
    layer scale when ``layer_scale`` is given), tokens ``[B, K, C]`` -> ``[B, K, C]``."""

    def __init__(self, dim: int, eps: float, layer_scale: Optional[float] = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, dim)
        self.gamma = (nn.Parameter(torch.full((dim,), float(layer_scale)))
                      if layer_scale is not None else None)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)  # the authors' _init_weights
        nn.init.zeros_(self.proj.bias)

    def macs_per_token(self) -> int:
        return self.proj.in_features * self.proj.out_features

    def forward(self, h: Tensor) -> Tensor:
        y = self.proj(self.norm(h))
        return y if self.gamma is None else y * self.gamma


class DynamicHierarchical(Reducer):
    """Runtime of ``dynamicvit`` on ConvNeXt/Swin: ``predictor`` (one per location) and
    ``fast`` (one :class:`FastPath` per routed block of stage 3, from ``locations[0]``)."""

    #: loss weights the trainer uses unless told otherwise (authors' ConvNeXt/Swin recipe)
    default_loss_weights = dataclasses.asdict(HIERARCHICAL_WEIGHTS)
    #: the per-stage routing decisions the ratio loss reads (training forward)
    decision_key = DECISION

    def __init__(self, options: HierarchicalOptions, info: ModelInfo, locations: tuple):
        super().__init__(options, info)
        dim = info.stage_dims[STAGE]
        eps = _NORM_EPS[info.family]
        self.locations = locations
        self.decision_of = {loc: s for s, loc in enumerate(locations)}
        self.predictor = nn.ModuleList(Predictor(dim, eps=eps) for _ in locations)
        ls = getattr(options, "fast_layer_scale", None)
        self.fast = nn.ModuleList(FastPath(dim, eps, ls)
                                  for _ in range(locations[0], info.stage_depths[STAGE]))

    def ratios(self) -> list[float]:
        """Slow-path ratio of each decision: ``keep_rate - s * ratio_step``, rounded to 12
        decimals so that 0.7 - 0.2 is 0.5 (the authors' float ``0.49999999999999994`` keeps
        97 of ConvNeXt-T's 196 positions instead of 98)."""
        o = self.options
        step = effective_ratio_step(o)
        return [round(o.keep_rate - s * step, 12) for s in range(len(self.locations))]

    def keep_targets(self) -> list[float]:
        """Targets of the ratio loss (the same ratios: independent decisions)."""
        return self.ratios()

    def acts_on_stage(self, s: int) -> bool:
        return s == STAGE

    def run_stage(self, s: int, blocks: Sequence, x: Tensor, state: TokenState
                  ) -> tuple[Tensor, TokenState]:
        if self.training:
            return self._train_stage(blocks, x, state)
        return self._infer_stage(blocks, x, state)

    # -- inference: each path on its own tokens, scattered back ------------------------------
    def _infer_stage(self, blocks, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        first = self.locations[0]
        ratios = self.ratios()
        kept = rest = None  # None: every position takes the slow path (the block as timm's)
        k = None
        for j, p in enumerate(blocks):
            if j in self.decision_of:
                d = self.decision_of[j]
                n = p.num_tokens(x)
                k = int(n * ratios[d])
                if k >= n:
                    kept = rest = None
                else:
                    pred = self.predictor[d]
                    if state.recorder is not None:
                        state.recorder.add_extra("predictor", n * pred.macs_per_token())
                    score = pred(p.to_tokens(x))[..., 0]
                    kept, rest = split_by_score(score, k)
                    state = state.replace(aux=state.aux + ((KEPT, kept),))
            if j < first or kept is None:
                if state.recorder is not None:
                    p.record(state, x, p.num_tokens(x))
                x = p.dense(x)
                continue
            fast = self.fast[j - first]
            if state.recorder is not None:
                p.record(state, x, k)
                state.recorder.add_extra("fast_path", rest.shape[1] * fast.macs_per_token())
            base, h = p.spatial(x)
            x = p.finish(base, route(h, kept, rest, p.slow, fast))
        return x, state

    # -- training: two dense streams with hard Gumbel masks (the authors' scheme) -------------
    def _train_stage(self, blocks, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        first = self.locations[0]
        s1 = s2 = m = mt = None
        for j, p in enumerate(blocks):
            if j in self.decision_of:
                d = self.decision_of[j]
                joint = x if s1 is None else mix(s1, s2, m)
                logp = self.predictor[d](p.to_tokens(joint))
                dec = F.gumbel_softmax(logp.float(), tau=self.options.tau, hard=True)[..., 0]
                state = state.replace(aux=state.aux + ((DECISION, dec),))
                if s1 is None:
                    s1 = s2 = x
                m = p.mask_like(dec, x)
                mt = dec.to(x.dtype).unsqueeze(-1)
            if j < first:
                x = p.dense(x)
                continue
            fast = self.fast[j - first]
            base, h = p.spatial(mix(s1, s2, m))
            y1 = p.slow(mix(h, p.to_tokens(s1), mt))   # slow stream: h where kept
            y2 = fast(mix(p.to_tokens(s2), h, mt))     # fast stream: h where dropped
            r1, r2 = (s1, s2) if p.stream_residual else (base, base)
            s1, s2 = p.finish(r1, y1), p.finish(r2, y2)
        if s1 is not None:
            x = mix(s1, s2, m)
        return x, state


def build(options: HierarchicalOptions, info: ModelInfo) -> DynamicHierarchical:
    """The reducer for a ConvNeXt or Swin model; ``ValueError`` for a model without a third
    stage, locations outside it, or a ratio schedule reaching 0."""
    if info.family not in _NORM_EPS or len(info.stage_depths) <= STAGE:
        raise ValueError(f"dynamicvit on hierarchical models needs a model with at least "
                         f"{STAGE + 1} stages (ConvNeXt, Swin); got {info.family} with stages "
                         f"{info.stage_depths}")
    depth = info.stage_depths[STAGE]
    locations = options.locations
    if locations is None:
        locations = AUTHORS_LOCATIONS.get(depth, (1, 2, 3))
        if max(locations) >= depth:
            raise ValueError(f"stage 3 has {depth} blocks, too few for the default locations "
                             f"{locations}; pass locations=(...) with blocks 0..{depth - 1}")
    else:
        try:
            locations = check_locations("locations", locations, depth)
        except ValueError as e:
            raise ValueError(f"{e} (on {info.family} models, locations are block indices "
                             f"within stage 3, which has {depth} blocks)") from None
        if not locations:  # the fast paths start at the first location: there must be one
            raise ValueError(f"locations is empty; on {info.family} models dynamicvit needs at "
                             f"least one block of stage 3 (0..{depth - 1}) to route from")
    step = effective_ratio_step(options)
    last = options.keep_rate - (len(locations) - 1) * step
    if last <= 0:
        raise ValueError(f"keep_rate {options.keep_rate} - {len(locations) - 1} x ratio_step "
                         f"{step} = {last:.3g}: the last decision would keep "
                         "nothing; raise keep_rate or lower ratio_step")
    return DynamicHierarchical(options, info, tuple(locations))
