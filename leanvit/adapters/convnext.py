"""Adapter for timm's ``ConvNeXt`` (``convnext_*``; ConvNeXt-V1 with channels-last MLPs).

The only place that knows timm's ConvNeXt module names: ``stem``, ``stages[s].downsample``,
``stages[s].blocks[j]`` (``conv_dw``, ``norm``, ``mlp``, ``gamma``, ``drop_path``,
``shortcut``), ``norm_pre``, ``head`` (``NormMlpClassifierHead``: pool, ``norm``, ``fc``).
Patching swaps the model's class for a subclass whose ``forward`` runs the stages through
:func:`leanvit.adapters.stages.run_stage`; blocks are never replaced or copied. Maps are
``[B, C, H, W]`` (timm's layout).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from leanvit.adapters.base import input_size, patched_mixin
from leanvit.adapters.stages import BlockParts, linear_macs, run_stage
from leanvit.ops.precision import check_input_dtype
from leanvit.registry import ModelInfo, Reducer
from leanvit.state import TokenState

FAMILY = "convnext"
KIND = "hierarchical"
DESCRIPTION = "convnext (timm ConvNeXt: convnext_*)"


def matches(cls: type) -> bool:
    from timm.models.convnext import ConvNeXt

    return issubclass(cls, ConvNeXt)


def check_supported(model: nn.Module) -> None:
    """``ValueError`` for ConvNeXt variants the adapter cannot split faithfully."""
    from timm.layers import GlobalResponseNormMlp
    from timm.models.convnext import ConvNeXtBlock

    for s, stage in enumerate(model.stages):
        for j, blk in enumerate(stage.blocks):
            if type(blk) is not ConvNeXtBlock:
                raise ValueError(f"stage {s} block {j} is a {type(blk).__name__}; the convnext "
                                 "adapter supports timm's ConvNeXtBlock")
            if blk.use_conv_mlp:
                raise ValueError(f"stage {s} block {j} uses conv_mlp=True (NCHW 1x1-conv MLP, "
                                 "as timm's convnext_atto, femto, pico, nano build it); the "
                                 "convnext adapter supports channels-last MLPs (conv_mlp=False: "
                                 "convnext_tiny and larger, or create the model with "
                                 "conv_mlp=False)")
            if isinstance(blk.mlp, GlobalResponseNormMlp):
                raise ValueError(f"stage {s} block {j} uses a GRN MLP (ConvNeXt-V2); its global "
                                 "response norm pools over all positions, so the convnext "
                                 "adapter cannot run it on a subset of tokens")
            if not isinstance(blk.shortcut, nn.Identity):
                raise ValueError(f"stage {s} block {j} changes width or stride inside the "
                                 "block; the convnext adapter supports identity shortcuts")


def _dims(model: nn.Module) -> tuple[int, ...]:
    return tuple(stage.blocks[0].conv_dw.out_channels for stage in model.stages)


def describe(model: nn.Module) -> ModelInfo:
    h, w = input_size(model)  # ConvNeXt takes any size: the one its data config names
    stride = model.stem[0].stride[0] if isinstance(model.stem, nn.Sequential) else 4
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return ModelInfo(
        family=FAMILY, kind=KIND, depth=sum(len(s.blocks) for s in model.stages),
        embed_dim=model.num_features, num_heads=0, num_prefix_tokens=0,
        has_class_token=False, num_patches=(h // stride) * (w // stride),
        global_pool=getattr(model.head.global_pool, "pool_type", "avg"),
        name=cfg.get("architecture", ""), img_size=(h, w),
        stage_depths=tuple(len(s.blocks) for s in model.stages), stage_dims=_dims(model))


class Parts(BlockParts):
    """A ``ConvNeXtBlock``: ``base = x``, ``h = conv_dw(x)`` (channels last),
    ``branch = gamma * mlp(norm(h))``."""

    stream_residual = True

    def spatial(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, C, H, W = x.shape
        h = self.block.conv_dw(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
        return x, h

    def slow(self, h: Tensor) -> Tensor:
        blk = self.block
        y = blk.mlp(blk.norm(h))
        return y if blk.gamma is None else y.mul(blk.gamma)

    def finish(self, base: Tensor, y: Tensor) -> Tensor:
        return self.block.drop_path(self.from_tokens(y, base)) + base  # timm's order

    def to_tokens(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        return x.permute(0, 2, 3, 1).reshape(B, H * W, C)

    def from_tokens(self, t: Tensor, like: Tensor) -> Tensor:
        B, C, H, W = like.shape
        return t.reshape(B, H, W, C).permute(0, 3, 1, 2)

    def mask_like(self, mask: Tensor, like: Tensor) -> Tensor:
        B, C, H, W = like.shape
        return mask.reshape(B, 1, H, W).to(like.dtype)

    def spatial_macs(self, x: Tensor) -> int:
        return _conv_macs(self.block.conv_dw, x)  # depthwise, "same" padding: output = x's size

    @property
    def slow_macs(self) -> int:
        return linear_macs(self.block.mlp)

    def num_tokens(self, x: Tensor) -> int:
        return x.shape[2] * x.shape[3]


def _conv_macs(conv: nn.Conv2d, out: Tensor) -> int:
    """MACs of ``conv`` producing a map of ``out``'s spatial size ``[B, *, H, W]``."""
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return out.shape[2] * out.shape[3] * conv.out_channels * k * conv.in_channels // conv.groups


def block_parts(model: nn.Module) -> list[list[Parts]]:
    """Every block of the model as :class:`Parts`, per stage."""
    out, i = [], 0
    for stage in model.stages:
        parts = []
        for blk in stage.blocks:
            parts.append(Parts(blk, i, blk.conv_dw.out_channels))
            i += 1
        out.append(parts)
    return out


def check_input(model: nn.Module, x: object) -> None:
    """``ValueError`` unless ``x`` is an image batch ``[B, C, H, W]`` (ConvNeXt takes any size);
    ``TypeError`` for images of another dtype than the model's (outside autocast)."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"images must be a [B, C, H, W] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    stem = model.stem[0] if isinstance(model.stem, nn.Sequential) else model.stem
    if isinstance(getattr(stem, "weight", None), Tensor):
        check_input_dtype(x, stem.weight.dtype)


def forward_features(model: nn.Module, x: Tensor, recorder=None, **_: object
                     ) -> tuple[Tensor, TokenState]:
    """Stem, stages (the method's :meth:`~leanvit.registry.Reducer.run_stage` where it acts),
    ``norm_pre``: the final map ``[B, C, H, W]`` and the state."""
    check_input(model, x)
    reducer: Reducer = model.leanvit
    x = model.stem(x)
    if recorder is not None:
        conv = model.stem[0] if isinstance(model.stem, nn.Sequential) else None
        recorder.record_stem(_conv_macs(conv, x) if isinstance(conv, nn.Conv2d) else 0)
    state = TokenState(prefix=0, n0=x.shape[2] * x.shape[3], recorder=recorder)
    state = reducer.init_state(state, x)
    for s, (stage, parts) in enumerate(zip(model.stages, block_parts(model))):
        x = stage.downsample(x)
        if recorder is not None and not isinstance(stage.downsample, nn.Identity):
            convs = [m for m in stage.downsample.modules() if isinstance(m, nn.Conv2d)]
            recorder.record_layer(f"down{s}", sum(_conv_macs(c, x) for c in convs))
        x, state = run_stage(reducer, s, parts, x, state)
    x = model.norm_pre(x)
    return x, state


def forward_head(model: nn.Module, x: Tensor, state: TokenState, pre_logits: bool = False,
                 recorder=None) -> Tensor:
    """timm's ``forward_head`` (pooling over every position: no token is ever removed)."""
    if recorder is not None:
        fc = getattr(model.head, "fc", None)
        recorder.record_head(0 if pre_logits or not isinstance(fc, nn.Linear)
                             else linear_macs(fc) + linear_macs(
                                 getattr(model.head, "pre_logits", nn.Identity())))
    return model.forward_head(x, pre_logits=pre_logits)


def loss_tokens(model: nn.Module, x: Tensor, state: Optional[TokenState]
                ) -> tuple[Tensor, Tensor]:
    """Tokens for the token-distillation loss: the final map normed per position by the
    head's LayerNorm (the authors' ``featmap = norm(x.permute(0, 2, 3, 1))``), ``[B, N, C]``,
    and the positions to distil, ``[B, N]`` ones (all of them: no token is removed)."""
    norm = getattr(model.head, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        x = norm(x)
    B, C, H, W = x.shape
    tokens = x.permute(0, 2, 3, 1).reshape(B, H * W, C)
    return tokens, tokens.new_ones(B, H * W)


PATCHED = patched_mixin('_PatchedConvNeXt', forward_features, forward_head)

__all__ = ["FAMILY", "KIND", "DESCRIPTION", "PATCHED", "matches", "check_supported", "describe",
           "check_input",
           "forward_features", "forward_head", "loss_tokens", "block_parts", "Parts"]
