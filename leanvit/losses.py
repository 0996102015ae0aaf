"""Training losses for token methods: DynamicViT's objective and its parts.

DynamicViT (Rao et al. 2021, eq. 12; authors' ``DistillDiffPruningLoss`` with
``mse_token=True`` for DeiT):

    L = cls * CE(student, targets)                                     # soft targets (mixup)
      + ratio * mean_s mean_b (mean_n D_s[b, n] - rho^(s+1))^2         # keep ratio per stage
      + distill * KL(teacher || student)                               # logits, batchmean
      + token * MSE(student tokens, teacher tokens) over the finally kept patch tokens

Default weights (:class:`LossWeights`): 1.0, 2.0, 0.5, 0.5, the paper's DeiT setting
(DeiT-B used ratio 5.0). ``feature`` (default 0, leanvit's addition for methods that change
layers rather than tokens, e.g. compaction fine-tuned with method ``none``) adds
``feature * MSE(student tokens, teacher tokens)`` over ALL final tokens (prefix included),
when the student keeps every token in place (same shape as the teacher's). The teacher is the frozen unpatched model. Methods that record no
decisions (EViT, ToMe, ATS, top-k) get CE + KL; the token term needs tokens kept in place
(a training keep-mask), so it is skipped for methods that remove tokens while training.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms (defaults: DynamicViT's DeiT-S recipe, Rao et al. 2021)."""

    cls: float = 1.0
    ratio: float = 2.0
    distill: float = 0.5
    token: float = 0.5
    feature: float = 0.0  #: leanvit: all-token MSE to the teacher (layer-changing methods)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise ValueError(f"loss weight {f.name} must be a finite number >= 0, got {v!r}")


#: DynamicViT's weights for hierarchical backbones (DynamicSwin / DynamicConvNeXt, Rao et al.,
#: TPAMI extension arXiv 2207.01580; authors' ``main.py`` builds ``ConvNextDistillDiffPruningLoss``
#: with ``clf_weight=1.0, ratio_weight=10.0, mse_token=True`` and the default
#: ``distill_weight=0.5`` for both the logit KL and the token MSE). The token term there covers
#: EVERY position of the final normed map (no token is removed): the adapters' ``loss_tokens``
#: give an all-ones keep mask, so :func:`token_distillation` is the plain MSE over all
#: positions and channels. The ratio term is the same :func:`ratio_loss` with the independent
#: targets ``rho, rho - 0.2, rho - 0.4``.
HIERARCHICAL_WEIGHTS = LossWeights(cls=1.0, ratio=10.0, distill=0.5, token=0.5)


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy with class indices ``[B]`` or soft targets ``[B, K]`` (mixup/cutmix,
    label smoothing: ``timm.data.Mixup`` output); mean over the batch. Computed in fp32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if targets.dim() == 1:
        return F.nll_loss(logp, targets)
    if targets.shape != logits.shape:
        raise ValueError(f"soft targets {tuple(targets.shape)} do not match logits "
                         f"{tuple(logits.shape)}")
    return -(targets.float() * logp).sum(dim=-1).mean()


def ratio_loss(decisions: Sequence[Tensor], targets: Sequence[float]) -> Tensor:
    """Mean over stages of the batch mean of ``(kept fraction - target)^2``.

    Args:
        decisions: per stage ``[B, N]`` keep decisions (0/1, all patch tokens of the input).
        targets: per stage target fraction (DynamicViT: ``rho ** (s + 1)``).
    """
    if len(decisions) != len(targets):
        raise ValueError(f"{len(decisions)} stages of decisions but {len(targets)} targets")
    if not decisions:
        raise ValueError("ratio_loss needs at least one stage")
    terms = [((d.float().mean(dim=1) - t) ** 2).mean() for d, t in zip(decisions, targets)]
    return torch.stack(terms).sum() / len(terms)


def kl_to_teacher(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``KL(teacher || student)`` of the class distributions, summed over classes, mean over
    the batch (the authors' ``F.kl_div(..., reduction="batchmean", log_target=True)``)."""
    log_s = F.log_softmax(logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)


def token_distillation(tokens: Tensor, teacher_tokens: Tensor, keep: Tensor) -> Tensor:
    """Mean squared error of the finally kept tokens against the teacher's, averaged over kept
    tokens and channels; 0 when no token is kept.

    Args:
        tokens: student's final (normed) patch tokens ``[B, N, C]``, tokens in place.
        teacher_tokens: the teacher's ``[B, N, C]``.
        keep: ``[B, N]`` final keep mask (> 0.5 = kept).
    """
    if tokens.shape != teacher_tokens.shape:
        raise ValueError(f"student tokens {tuple(tokens.shape)} and teacher tokens "
                         f"{tuple(teacher_tokens.shape)} differ")
    sel = keep > 0.5
    if not bool(sel.any()):
        return tokens.new_zeros((), dtype=torch.float32)
    return F.mse_loss(tokens[sel].float(), teacher_tokens[sel].float())


def label_confidence(logits: Tensor, labels: Tensor, mixed: bool = False) -> Tensor:
    """The probability ``[B]`` the model gives each image's label; with ``mixed`` (mixup or
    cutmix, which timm's ``Mixup`` pairs with the flipped batch) plus the probability of the
    label of the image it was mixed with (the authors' MCTF ``engine.py``).

    Args:
        logits: ``[B, K]``.
        labels: ``[B]`` class indices (before mixing).
    """
    p = torch.softmax(logits.detach().float(), dim=-1)
    rows = torch.arange(labels.shape[0], device=labels.device)
    conf = p[rows, labels]
    if mixed:
        conf = conf + p[rows, labels.flip(0)]
    return conf


def consistency_loss(cls_token: Tensor, view_cls_token: Tensor, confidence: Tensor,
                     threshold: float) -> Tensor:
    """MCTF's token-reduction-consistency term (Lee et al., CVPR 2024, sec. 3.4; authors'
    ``models/deit.py`` and ``engine.py``): per image, the mean over channels of
    ``(view - student)^2`` of the final normed class tokens, the milder view's detached (it is
    the target); averaged over the images whose ``confidence`` (:func:`label_confidence` of
    the reduced view) exceeds ``threshold`` (authors' 0.4); 0 when none does.

    Args:
        cls_token: ``[B, C]`` the reduced view's final class token.
        view_cls_token: ``[B, C]`` the milder view's.
        confidence: ``[B]``.
    """
    if cls_token.shape != view_cls_token.shape:
        raise ValueError(f"class tokens {tuple(cls_token.shape)} and "
                         f"{tuple(view_cls_token.shape)} differ")
    per_image = ((view_cls_token.detach().float() - cls_token.float()) ** 2).mean(dim=1)
    passed = (confidence > threshold).to(per_image.dtype)
    if not bool(passed.any()):
        return per_image.sum() * 0.0  # no image is confident enough: 0, still in the graph
    return (per_image * passed).sum() / passed.sum()


@dataclass
class Output:
    """What one training forward returns (student or teacher).

    Attributes:
        logits: ``[B, K]``.
        tokens: final normed tokens ``[B, N, C]`` (prefix included).
        keep: final training keep-mask ``[B, N]`` or ``None`` (tokens not masked).
        decisions: per-stage keep decisions ``[B, N0 - prefix]`` (DynamicViT) or empty.
    """

    logits: Tensor
    tokens: Tensor
    keep: Optional[Tensor] = None
    decisions: tuple = ()


def total_loss(student: Output, targets: Tensor, teacher: Optional[Output] = None,
               weights: LossWeights = LossWeights(), keep_targets: Sequence[float] = (),
               prefix: int = 1) -> tuple[Tensor, dict[str, float]]:
    """The weighted sum of the terms that apply, and each term's value (for logs).

    ``ratio`` applies when the student recorded decisions; ``distill`` and ``token`` need a
    teacher; ``token`` also needs the student's tokens in place (a keep-mask, same count as the
    teacher's). ``prefix`` prefix tokens are left out of the token term.
    """
    parts: dict[str, Tensor] = {"cls": soft_target_cross_entropy(student.logits, targets)}
    if student.decisions and weights.ratio > 0:
        parts["ratio"] = ratio_loss(student.decisions, keep_targets)
    if teacher is not None:
        if weights.distill > 0:
            parts["distill"] = kl_to_teacher(student.logits, teacher.logits.detach())
        if (weights.token > 0 and student.keep is not None
                and student.tokens.shape == teacher.tokens.shape):
            parts["token"] = token_distillation(student.tokens[:, prefix:],
                                                teacher.tokens[:, prefix:].detach(),
                                                student.keep[:, prefix:])
        if weights.feature > 0 and student.tokens.shape == teacher.tokens.shape:
            parts["feature"] = F.mse_loss(student.tokens.float(), teacher.tokens.detach().float())
    loss = sum(getattr(weights, k) * v for k, v in parts.items())
    return loss, {k: float(v.detach()) for k, v in parts.items()}
