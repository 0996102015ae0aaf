"""MAC accounting from the token counts each block actually saw.

Convention (fvcore / DeiT / the methods' papers): one multiply-accumulate = 1 MAC; counted are
the matrix products (patch embedding, q/k/v, attention scores, attention-weighted values,
projections, MLP, classifier, and whatever a method adds: predictors, attention-row signals).
Normalisations, activations, softmax and additions are not counted. Per ViT block with N
tokens and width C: ``4NC^2 + 2N^2C`` (attention) + ``8NC^2`` (MLP, ratio 4).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from leanvit.recorder import MacRecorder  # noqa: F401  (its home before; imported from here)


@dataclass
class BlockMacs:
    """One block, averaged over the images: tokens entering (keys) and leaving, and MACs."""

    index: int
    tokens_in: float
    tokens_out: float
    attention: float
    mlp: float
    signals: float

    @property
    def macs(self) -> float:
        return self.attention + self.mlp + self.signals


@dataclass
class MacReport:
    """MACs per image, averaged over the batch.

    ``float(report) == report.total``; ``report.gmacs == report.total / 1e9``.
    """

    total: float
    stem: float
    head: float
    per_block: list[BlockMacs]
    extra: dict[str, float] = field(default_factory=dict)
    images: int = 0
    #: backbone layers outside the blocks (downsampling of hierarchical models), per image
    layers: dict[str, float] = field(default_factory=dict)

    @property
    def gmacs(self) -> float:
        return self.total / 1e9

    def __float__(self) -> float:
        return float(self.total)

    def table(self) -> str:
        names = ["block", "stem", "head", *self.layers, *self.extra]
        w = max(len(n) for n in names)
        lines = [f"{'block':>{w}} {'tokens in':>10} {'tokens out':>10} {'MMACs':>10}"]
        lines.append(f"{'stem':>{w}} {'':>10} {'':>10} {self.stem / 1e6:10.2f}")
        for b in self.per_block:
            lines.append(f"{b.index:>{w}} {b.tokens_in:10.1f} {b.tokens_out:10.1f} "
                         f"{b.macs / 1e6:10.2f}")
        for k, v in self.layers.items():
            lines.append(f"{k:>{w}} {'':>10} {'':>10} {v / 1e6:10.2f}")
        lines.append(f"{'head':>{w}} {'':>10} {'':>10} {self.head / 1e6:10.2f}")
        for k, v in self.extra.items():
            lines.append(f"{k:>{w}} {'':>10} {'':>10} {v / 1e6:10.2f}")
        lines.append(f"total {self.gmacs:.4f} GMACs per image (mean over {self.images} images)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "total": self.total, "gmacs": self.gmacs, "stem": self.stem, "head": self.head,
            "extra": dict(self.extra), "images": self.images, "layers": dict(self.layers),
            "per_block": [b.__dict__ | {"macs": b.macs} for b in self.per_block],
        }


def report_from(recorder: MacRecorder, images: int) -> MacReport:
    blocks = []
    for i in sorted(recorder.blocks):
        v = recorder.blocks[i]
        mean = {k: float(t.mean()) for k, t in v.items()}
        blocks.append(BlockMacs(index=i, tokens_in=mean["tokens_in"],
                                tokens_out=mean["tokens_out"], attention=mean["attention"],
                                mlp=mean["mlp"], signals=mean.get("signals", 0.0)))
    extra = {k: float(t.mean()) for k, t in recorder.extra.items()}
    total = (recorder.stem + recorder.head + sum(b.macs for b in blocks) + sum(extra.values())
             + sum(recorder.layers.values()))
    return MacReport(total=total, stem=recorder.stem, head=recorder.head, per_block=blocks,
                     extra=extra, images=images, layers=dict(recorder.layers))


def count_macs(model: nn.Module, images: Tensor) -> MacReport:
    """MACs per image that ``model`` performs on ``images`` (``[B, 3, H, W]``).

    Works on patched and unpatched models alike (an unpatched model is measured through the
    identity method ``"none"`` and left as it was), and on families that run no token method
    but are counted layer by layer (PVTv2, NextViT; plain or compacted by
    :func:`leanvit.compact`, :mod:`leanvit.adapters.layer_macs`). The model runs once in
    eval mode without gradients; its train/eval mode is restored. Data-dependent methods are
    averaged over the images; padding does not count.

    Raises:
        ValueError: an empty batch (no image to average over) or images without pixels.
    """
    return forward_with_macs(model, images)[1]


def check_images(images: object, what: str = "count_macs") -> None:
    """``TypeError`` unless ``images`` is a tensor; ``ValueError`` for an empty batch or images
    without pixels: MACs are reported per image, averaged over the batch, and a mean over no
    image is undefined (it would come out as NaN)."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{what}: images must be a torch.Tensor [B, 3, H, W], got "
                        f"{type(images).__name__}")
    if images.dim() >= 1 and images.shape[0] == 0:
        raise ValueError(f"{what} needs at least one image: got an empty batch "
                         f"{list(images.shape)} (MACs are per image, averaged over the batch)")
    if images.numel() == 0:
        raise ValueError(f"{what}: images {list(images.shape)} hold no pixels")


def forward_with_macs(model: nn.Module, images: Tensor) -> tuple[Tensor, MacReport]:
    """The model's output on ``images`` and its :class:`MacReport`, from ONE forward pass.

    As :func:`count_macs` (same conditions), for evaluation loops that need the predictions
    and the MACs of the same images without running the model twice. A family that runs as
    itself (PVTv2, NextViT, plain or compacted: :mod:`leanvit.adapters.layer_macs`) is counted
    layer by layer (stem, one entry per block, ``attention``: its attention module, ``mlp``:
    the rest of the block, layers between blocks, head); the others through their adapter,
    an unpatched model patched with ``none`` for the pass.
    """
    from leanvit import adapters
    from leanvit.patching import patch, unpatch

    check_images(images)
    model = adapters.image_tower(model)  # open_clip's CLIP: its image tower

    layers = adapters.layer_map(model)
    if layers is not None:
        from leanvit.adapters.layer_macs import forward_with_layer_macs

        return _counted_forward(
            model, images, lambda x, rec: forward_with_layer_macs(model, x, layers, rec))
    adapter = adapters.find_adapter(model)

    def run(x: Tensor, recorder: MacRecorder) -> Tensor:
        y, state = adapter.forward_features(model, x, recorder=recorder)
        return adapter.forward_head(model, y, state, recorder=recorder)

    was_patched = adapters.is_patched(model)
    if not was_patched:
        patch(model, "none")
    try:
        return _counted_forward(model, images, run)
    finally:
        if not was_patched:
            unpatch(model)


def _counted_forward(model: nn.Module, images: Tensor,
                     run: Callable[[Tensor, MacRecorder], Tensor]) -> tuple[Tensor, MacReport]:
    """``run(images, recorder)`` in eval mode without gradients, ``images`` moved to the
    model's device and dtype; its output and the :class:`MacReport` of what it recorded. The
    model's train/eval mode is restored."""
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters(), None)
        if p is not None:
            images = images.to(device=p.device, dtype=p.dtype)
        recorder = MacRecorder()
        with torch.no_grad():
            out = run(images, recorder)
        return out, report_from(recorder, images.shape[0])
    finally:
        model.train(was_training)


def traced_macs(model: nn.Module, images: Tensor) -> float:
    """MACs per image of one eval forward pass, counted by ``torch.utils.flop_counter``.

    For models no leanvit adapter describes (PVTv2, NextViT, layer-compacted models): the
    counter sees every matrix product and convolution that actually runs (``aten`` level:
    ``mm``/``addmm``/``bmm``/``einsum``'s products, convolutions, SDPA), so materialised
    attention maps and hallucination operations count as they execute. MACs = FLOPs / 2; as in
    :func:`count_macs`, normalisations, activations and softmax are not counted (the counter
    has no formulas for them). Token methods' data-dependent counts are not averaged here.
    """
    from torch.utils.flop_counter import FlopCounterMode

    check_images(images, "traced_macs")
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters(), None)
        if p is not None:
            images = images.to(device=p.device, dtype=p.dtype)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(images)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / images.shape[0]
