"""Dense outputs of a reduced model: final patch features on the full patch grid.

Token reduction leaves fewer tokens than patches at the end of the network, so a dense head
(segmentation, depth, matching) cannot read the output as it is. :func:`dense_features` puts
one feature vector back on every patch:

- a token that still holds patches at the end gives its final features to each of them; a
  merged token (ToMe, DiffRate's merging) goes back to every patch of its group;
- a token that left the sequence (pruned, or fused away into EViT's fused token) keeps the
  features it had at the moment it left, passed through the final norm.

What each method does with it (and why):

==================  =========================================================================
``none``            every patch keeps its own token: the unpatched model's patch tokens,
                    bit for bit.
``tome``            merges only: each patch gets its group's final features (a merged token
                    is the size-weighted mean of the patches it holds, so it stands for all).
``evit``            kept tokens: their final features. Inattentive tokens leave in block
                    ``i`` after the attention residual, before the MLP: they keep those
                    features (the fused token is a class-attention-weighted sum of many
                    unrelated patches, mostly background, so it describes none of them; the
                    fused token itself gives its features to no patch).
``topk``            as ``evit``: a dropped token keeps its features after the attention of the
                    block that dropped it.
``ats``             tokens not sampled as queries in block ``i`` leave before its attention
                    updates them: they keep the block's input (block ``i - 1``'s output);
                    they served as keys in block ``i`` but got no new features there.
``dynamicvit``      (inference) the predictor drops tokens before block ``i``: they keep block
                    ``i - 1``'s output.
``diffrate``        pruned tokens keep their features after the attention of the pruning
                    block; merged tokens follow their destination (as ToMe).
==================  =========================================================================

Families: every ``"tokens"`` family (ViT/DeiT/DINOv2 ``vit``; ``beit``; ``eva``: EVA02,
DINOv3, PE-Core), each adapter tracing the index map below; hierarchical families (ConvNeXt,
Swin) output a feature map already and are refused.

How: the forward pass traces an index map ``state.where`` ``[B, N0]`` (the current row of the
token that holds each original token, ``-1`` once it left), updated on every gather and merge
at ``O(B * N0)``, and copies only the rows that leave; no ``[B, N, N0]`` source matrix is
carried. The MACs are the patched model's own (:func:`leanvit.count_macs`): the scatter does
no multiply-accumulates.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from leanvit import adapters
from leanvit.state import present

#: the family kind whose tokens are patches on a grid (hierarchical families output a map
#: already; see :mod:`leanvit.adapters.base`)
TOKEN_KIND = "tokens"


def dense_features(model: nn.Module, images: Tensor) -> Tensor:
    """Final patch features of ``model`` (patched or not) on the full patch grid.

    Args:
        model: a timm model of a ``"tokens"`` family (ViT and the families built on it,
            :mod:`leanvit.adapters.base`), patched with any
            method or unpatched (then exactly ``model.forward_features(images)`` without the
            prefix tokens). Run in the mode it is in (call ``model.eval()`` for inference:
            in training mode the keep-mask methods keep every token in place).
        images: ``[B, 3, H, W]`` preprocessed as the model expects.

    Returns:
        ``[B, H_p, W_p, C]``: ``H_p = H / patch``, ``W_p = W / patch`` (the model's patch
        grid), ``C`` the width; the final norm applied as timm's ``forward_features`` does;
        class, distillation and register tokens left out. See the module docstring for what
        a pruned, fused or merged token gives its patches.

    Raises:
        TypeError / ValueError: not a model, a hierarchical family, or images the model
            cannot take (the adapter's one-line errors).
    """
    adapter = _token_adapter(model)
    adapter.check_input(model, images)
    gh, gw = _grid(model, images)
    prefix = _prefix(model)
    if not adapters.is_patched(model):
        plain = getattr(adapter, "plain_tokens", None)  # families without timm's names
        x = (model.forward_features(images) if plain is None else plain(model, images))
        x = x[:, prefix:]
        return x.reshape(x.shape[0], gh, gw, x.shape[-1])
    x, state = adapter.forward_features(model, images, trace_where=True)
    out = _scatter(model, x, state)[:, prefix:]
    if out.shape[1] != gh * gw:
        raise ValueError(f"the model has {out.shape[1]} patch tokens, not the {gh}x{gw} grid "
                         "of its patch embedding")
    return out.reshape(x.shape[0], gh, gw, x.shape[-1])


def _scatter(model: nn.Module, x: Tensor, state) -> Tensor:
    """``[B, N0, C]``: each original token's features from the token that holds it at the end
    (``x`` ``[B, N, C]``, normed), or its features when it left (normed here)."""
    B, C = x.shape[0], x.shape[-1]
    out = x.gather(1, state.where.clamp_min(0)[..., None].expand(-1, -1, C))
    missing = ~present(state)
    if state.left:
        flat = torch.cat([i for i, _ in state.left])
        norm = getattr(adapters.find_adapter(model), "final_norm", None)  # else timm's
        norm = model.norm if norm is None else norm(model)
        feats = norm(torch.cat([f for _, f in state.left]))
        # in place: ``out`` is the gather's own new tensor (no second full-grid copy)
        out.view(B * state.n0, C).index_put_((flat,), feats.to(out.dtype))
        missing = missing.reshape(-1).index_put((flat,), torch.tensor(False)).reshape(B, -1)
    if bool(missing.any()):  # pragma: no cover - guards method authors
        raise RuntimeError("dense_features: some tokens neither stayed nor left (a method "
                           "changed the tokens without updating state.where)")
    return out


def _token_adapter(model: nn.Module):
    adapter = adapters.find_adapter(model)
    if adapter.KIND != TOKEN_KIND:
        raise ValueError(
            f"dense_features supports the token families (kind {TOKEN_KIND!r}); a "
            f"{adapter.FAMILY} model's forward_features is a feature map already")
    return adapter


def _prefix(model: nn.Module) -> int:
    """Prefix tokens in front of the patches: the adapter's ``prefix_tokens(model)`` where
    the family has one (a model without timm's attribute names), else timm's
    ``model.num_prefix_tokens``."""
    fn = getattr(adapters.find_adapter(model), "prefix_tokens", None)
    return model.num_prefix_tokens if fn is None else fn(model)


def _grid(model: nn.Module, images: Tensor) -> tuple[int, int]:
    """Patch grid ``(rows, cols)`` of ``images`` for ``model``'s patch embedding (the
    adapter's ``patch_grid(model, images)`` where the family has one)."""
    fn = getattr(adapters.find_adapter(model), "patch_grid", None)
    if fn is not None:
        return tuple(fn(model, images))
    pe = model.patch_embed
    if getattr(model, "dynamic_img_size", False):
        return tuple(pe.dynamic_feat_size(tuple(images.shape[-2:])))
    return tuple(pe.grid_size)


# --------------------------------------------------------------------------------------------
# MACs, per-patch targets, segmentation scores


def dense_with_macs(model: nn.Module, images: Tensor):
    """:func:`dense_features` and the backbone's :class:`~leanvit.macs.MacReport` from ONE
    forward pass (as :func:`leanvit.macs.forward_with_macs`; an unpatched model runs through
    the identity method ``"none"`` and is left as it was; eval mode, no gradients, the mode
    restored). The report has no head MACs (``head == 0``): a dense head adds its own."""
    from leanvit.macs import report_from
    from leanvit.recorder import MacRecorder
    from leanvit.patching import patch, unpatch

    adapter = _token_adapter(model)
    was_patched, was_training = adapters.is_patched(model), model.training
    if not was_patched:
        patch(model, "none")
    try:
        model.eval()
        p = next(model.parameters(), None)
        if p is not None:
            images = images.to(device=p.device, dtype=p.dtype)
        adapter.check_input(model, images)
        gh, gw = _grid(model, images)
        recorder = MacRecorder()
        with torch.no_grad():
            x, state = adapter.forward_features(model, images, recorder=recorder,
                                                trace_where=True)
            out = _scatter(model, x, state)[:, _prefix(model):]
        return out.reshape(x.shape[0], gh, gw, x.shape[-1]), report_from(recorder,
                                                                          images.shape[0])
    finally:
        model.train(was_training)
        if not was_patched:
            unpatch(model)


#: intensity threshold of :func:`foreground_targets`: a pixel is foreground when the mean of
#: its R, G, B in [0, 1] (the model's input with its normalisation undone) is above 0.1
#: (25.5 / 255). Chosen for Fashion-MNIST, whose background is exactly 0 and whose darkest
#: garments' pixels mostly lie above it (45% of its pixels are above 26/255, 50% are 0).
FOREGROUND_THRESHOLD = 0.1
#: a patch is foreground when more than this share of its pixels are (issue 15)
FOREGROUND_SHARE = 0.5


def foreground_targets(images: Tensor, mean, std, patch_size, threshold: float =
                       FOREGROUND_THRESHOLD, share: float = FOREGROUND_SHARE) -> Tensor:
    """Per-patch foreground labels of preprocessed ``images`` ``[B, 3, H, W]``.

    Args:
        mean, std: the per-channel normalisation the images went through (3 numbers each,
            the model's data config), undone here to get intensities in [0, 1].
        patch_size: ``(ph, pw)`` or an int, the model's patch size.
        threshold: pixel intensity (mean of R, G, B) above which a pixel is foreground;
            default :data:`FOREGROUND_THRESHOLD`.
        share: a patch is foreground (1) when the share of its foreground pixels is above
            ``share`` (default 0.5), background (0) otherwise.

    Returns:
        ``[B, H / ph, W / pw]`` long in {0, 1}.
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError("images must be a [B, 3, H, W] tensor, got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else images!r}")
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    B, _, H, W = images.shape
    if H % ph or W % pw:
        raise ValueError(f"images {H}x{W} are not a whole number of {ph}x{pw} patches")
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    intensity = (images.float() * s + m).mean(1)  # [B, H, W] in [0, 1]
    fg = (intensity > threshold).float().reshape(B, H // ph, ph, W // pw, pw)
    return (fg.mean((2, 4)) > share).long()


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``[K, K]`` long counts, rows the target class, columns the predicted one."""
    idx = target.flatten().long() * num_classes + pred.flatten().long()
    return torch.bincount(idx.cpu(), minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def segmentation_scores(confusion: Tensor) -> dict:
    """Per-patch accuracy and mean IoU (percent) from a :func:`confusion_matrix`.

    IoU of class ``k``: ``TP / (TP + FP + FN)``; the mean is over the classes present in the
    targets or predictions (a class absent from both has no IoU), as in mmsegmentation.
    """
    c = confusion.double()
    tp = c.diag()
    union = c.sum(0) + c.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    seen = union > 0
    return {"pixel_accuracy": 100.0 * float(tp.sum() / c.sum().clamp_min(1)),
            "miou": 100.0 * float(iou[seen].mean()) if seen.any() else float("nan"),
            "iou": [100.0 * float(v) for v in iou], "patches": int(c.sum())}


# --------------------------------------------------------------------------------------------
# Dense (segmentation) probe evaluation


class DenseProbe(nn.Module):
    """A backbone and a per-patch linear head: images ``[B, 3, H, W]`` -> logits
    ``[B, H_p, W_p, K]`` (what ``leanvit compare --dense`` times)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: Tensor) -> Tensor:
        return self.head(dense_features(self.backbone, images))


def model_foreground_targets(model: nn.Module, threshold: float = FOREGROUND_THRESHOLD):
    """``images -> [B, H_p, W_p]`` :func:`foreground_targets` with ``model``'s normalisation
    (its timm data config) and patch size."""
    from leanvit.data import data_config

    cfg = data_config(model)
    patch = tuple(model.patch_embed.patch_size)
    return lambda images: foreground_targets(images, cfg["mean"], cfg["std"], patch, threshold)


def dense_batch_fn(threshold: float = FOREGROUND_THRESHOLD):
    """A per-batch feature function for :func:`leanvit.probe.extract_features`:
    ``(model, images, labels) -> ([B * P, C] patch features, [B * P] foreground targets)``
    (the image labels are not used)."""

    def fn(model: nn.Module, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        feats, _ = dense_with_macs(model, images)
        targets = model_foreground_targets(model, threshold)(images)
        return feats.flatten(0, 2), targets.flatten()

    return fn


class DenseEvaluation:
    """``leanvit compare --dense``'s evaluation of one setting, called as
    ``evaluation(model, loader, progress=, warmup=, repeats=, desc=)``.

    Per batch: :func:`dense_with_macs` (the patched backbone's MACs on these images), the
    head's per-patch logits, :func:`foreground_targets`; returns per-patch accuracy and mIoU
    (:func:`segmentation_scores`), GMACs per image (backbone + head: ``P * C * K``), the
    throughput of :class:`DenseProbe` on the first batch
    (:func:`leanvit.evaluate.measure_throughput`), and ``cosine``: the mean over patches of
    the cosine similarity between this setting's dense features and those of the first
    setting evaluated (the unmodified model in :func:`leanvit.compare.run_compare`), kept in
    memory (float32) for that.
    """

    def __init__(self, head: nn.Linear, threshold: float = FOREGROUND_THRESHOLD):
        self.head = head
        self.threshold = threshold
        self.reference: Optional[list[Tensor]] = None

    def __call__(self, model: nn.Module, loader, *, progress: bool = True, warmup: int = 1,
                 repeats: int = 3, desc: str = "eval", throughput: bool = True) -> dict:
        from tqdm import tqdm

        from leanvit.evaluate import measure_throughput

        head = self.head.to(next(model.parameters()).device)
        targets_of = model_foreground_targets(model, self.threshold)
        k = head.out_features
        conf = torch.zeros(k, k, dtype=torch.long)
        first, total, macs, cos_sum, n_patches = None, 0, 0.0, 0.0, 0
        keep = self.reference is None
        feats_kept: list[Tensor] = []
        for b, (images, _) in enumerate(tqdm(loader, desc=desc, disable=not progress,
                                             unit="batch")):
            if first is None:
                first = images
            feats, report = dense_with_macs(model, images)
            with torch.no_grad():
                pred = head(feats).argmax(-1)
            conf += confusion_matrix(pred, targets_of(images.to(feats.device)), k)
            P = feats.shape[1] * feats.shape[2]
            macs += (report.total + P * head.in_features * k) * images.shape[0]
            total += images.shape[0]
            if keep:
                feats_kept.append(feats.float().cpu())
            else:
                ref = self.reference[b].to(feats.device, feats.dtype)
                cos = torch.nn.functional.cosine_similarity(feats, ref, dim=-1)
                cos_sum += float(cos.double().sum())
                n_patches += cos.numel()
        if total == 0:
            raise ValueError("no images to evaluate")
        out = dict(segmentation_scores(conf), images=total, gmacs=macs / total / 1e9,
                   confusion=conf.tolist(), threshold=self.threshold)
        if keep:
            self.reference = feats_kept
            out["cosine"] = 1.0
        else:
            out["cosine"] = cos_sum / n_patches
        if throughput:
            out.update(measure_throughput(DenseProbe(model, head).eval(), first, warmup=warmup,
                                          repeats=repeats))
        return out


def load_dense_head(path) -> tuple[nn.Linear, float]:
    """A head written by ``leanvit probe --dense`` and its foreground threshold;
    ``ValueError`` for a classifier head or an unreadable file."""
    from leanvit.heads import head_metadata, load_head

    meta = head_metadata(path)
    if not meta.get("dense"):
        raise ValueError(f"{path} is a classifier probe head, not a dense one; fit one with "
                         "'leanvit probe --dense'")
    return load_head(path), float(meta.get("threshold", FOREGROUND_THRESHOLD))
