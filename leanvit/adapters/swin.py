"""Adapter for timm's ``SwinTransformer`` (``swin_*``, V1).

The only place that knows timm's Swin module names: ``patch_embed``, ``layers[s]``
(``downsample`` = ``PatchMerging`` or identity, ``blocks[j]``: ``norm1``, ``_attn`` (cyclic
shift, padding, window attention, reverse), ``drop_path1``, ``norm2``, ``mlp``,
``drop_path2``), ``norm``, ``head``. Patching swaps the model's class for a subclass whose
``forward`` runs the stages through :func:`leanvit.adapters.stages.run_stage`; blocks are never
replaced or copied. Maps are ``[B, H, W, C]`` (timm's layout).
"""
from __future__ import annotations

import math
from typing import Optional

from torch import Tensor, nn

from leanvit.adapters.base import patched_mixin
from leanvit.adapters.stages import BlockParts, linear_macs, run_stage
from leanvit.ops.precision import check_input_dtype
from leanvit.registry import ModelInfo, Reducer
from leanvit.state import TokenState

FAMILY = "swin"
KIND = "hierarchical"
DESCRIPTION = "swin (timm SwinTransformer: swin_*)"


def matches(cls: type) -> bool:
    from timm.models.swin_transformer import SwinTransformer

    return issubclass(cls, SwinTransformer)


def check_supported(model: nn.Module) -> None:
    """``ValueError`` for Swin variants the adapter cannot split faithfully."""
    from timm.models.swin_transformer import SwinTransformerBlock

    for s, stage in enumerate(model.layers):
        for j, blk in enumerate(stage.blocks):
            if type(blk) is not SwinTransformerBlock:
                raise ValueError(f"stage {s} block {j} is a {type(blk).__name__}; the swin "
                                 "adapter supports timm's SwinTransformerBlock (Swin V1)")


def describe(model: nn.Module) -> ModelInfo:
    pe = model.patch_embed
    h, w = tuple(pe.img_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return ModelInfo(
        family=FAMILY, kind=KIND, depth=sum(len(s.blocks) for s in model.layers),
        embed_dim=model.num_features, num_heads=model.layers[-1].blocks[0].attn.num_heads,
        num_prefix_tokens=0, has_class_token=False,
        num_patches=pe.grid_size[0] * pe.grid_size[1],
        global_pool=getattr(model.head.global_pool, "pool_type", "avg"),
        name=cfg.get("architecture", ""), img_size=(h, w),
        stage_depths=tuple(len(s.blocks) for s in model.layers),
        stage_dims=tuple(s.blocks[0].norm1.normalized_shape[0] for s in model.layers))


class Parts(BlockParts):
    """A ``SwinTransformerBlock``: ``base = x + drop_path1(attn(norm1(x)))``, ``h = base``,
    ``branch = mlp(norm2(h))``."""

    stream_residual = False

    def spatial(self, x: Tensor) -> tuple[Tensor, Tensor]:
        blk = self.block
        base = x + blk.drop_path1(blk._attn(blk.norm1(x)))  # timm's order
        B, H, W, C = x.shape
        return base, base.reshape(B, H * W, C)

    def slow(self, h: Tensor) -> Tensor:
        return self.block.mlp(self.block.norm2(h))

    def finish(self, base: Tensor, y: Tensor) -> Tensor:
        B, H, W, C = base.shape
        return (base.reshape(B, H * W, C) + self.block.drop_path2(y)).reshape(B, H, W, C)

    def to_tokens(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        return x.reshape(B, H * W, C)

    def from_tokens(self, t: Tensor, like: Tensor) -> Tensor:
        return t.reshape(like.shape[:3] + t.shape[-1:])

    def mask_like(self, mask: Tensor, like: Tensor) -> Tensor:
        B, H, W, C = like.shape
        return mask.reshape(B, H, W, 1).to(like.dtype)

    def spatial_macs(self, x: Tensor) -> int:
        """Window attention on the padded map: q/k/v and output projections on every padded
        position, ``q k^T`` and ``attn @ v`` within each window (``2 * area * C`` per token)."""
        blk, attn = self.block, self.block.attn
        _, H, W, C = x.shape
        wh, ww = blk.window_size
        hp, wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
        n = hp * wp
        return (n * linear_macs(attn.qkv) + 2 * n * wh * ww * attn.qkv.out_features // 3
                + n * linear_macs(attn.proj))

    @property
    def slow_macs(self) -> int:
        return linear_macs(self.block.mlp)

    def num_tokens(self, x: Tensor) -> int:
        return x.shape[1] * x.shape[2]


def block_parts(model: nn.Module) -> list[list[Parts]]:
    """Every block of the model as :class:`Parts`, per stage."""
    out, i = [], 0
    for stage in model.layers:
        parts = []
        for blk in stage.blocks:
            parts.append(Parts(blk, i, blk.norm1.normalized_shape[0]))
            i += 1
        out.append(parts)
    return out


def check_input(model: nn.Module, x: object) -> None:
    """``ValueError`` unless ``x`` is an image batch ``[B, C, H, W]`` of the built size;
    ``TypeError`` for images of another dtype than the model's (outside autocast)."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"images must be a [B, C, H, W] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    expected = tuple(model.patch_embed.img_size)
    if getattr(model.patch_embed, "strict_img_size", True) and tuple(x.shape[-2:]) != expected:
        raise ValueError(f"model was built for {expected[0]}x{expected[1]} images, got "
                         f"{x.shape[-2]}x{x.shape[-1]}; create it with img_size="
                         f"{x.shape[-1]} to use another size")
    check_input_dtype(x, model.patch_embed.proj.weight.dtype)


def forward_features(model: nn.Module, x: Tensor, recorder=None, **_: object
                     ) -> tuple[Tensor, TokenState]:
    """Patch embedding, stages (the method's :meth:`~leanvit.registry.Reducer.run_stage`
    where it acts), final norm: the map ``[B, H, W, C]`` and the state."""
    check_input(model, x)
    reducer: Reducer = model.leanvit
    x = model.patch_embed(x)
    if recorder is not None:
        proj = model.patch_embed.proj
        k = proj.kernel_size[0] * proj.kernel_size[1]
        recorder.record_stem(x.shape[1] * x.shape[2] * proj.out_channels * proj.in_channels * k)
    state = TokenState(prefix=0, n0=x.shape[1] * x.shape[2], recorder=recorder)
    state = reducer.init_state(state, x)
    for s, (stage, parts) in enumerate(zip(model.layers, block_parts(model))):
        x = stage.downsample(x)
        if recorder is not None and not isinstance(stage.downsample, nn.Identity):
            recorder.record_layer(f"down{s}", x.shape[1] * x.shape[2]
                                  * linear_macs(stage.downsample))
        x, state = run_stage(reducer, s, parts, x, state)
    x = model.norm(x)
    return x, state


def forward_head(model: nn.Module, x: Tensor, state: TokenState, pre_logits: bool = False,
                 recorder=None) -> Tensor:
    """timm's ``forward_head`` (pooling over every position: no token is ever removed)."""
    if recorder is not None:
        fc = getattr(model.head, "fc", None)
        recorder.record_head(0 if pre_logits or not isinstance(fc, nn.Linear)
                             else linear_macs(fc))
    return model.forward_head(x, pre_logits=pre_logits)


def loss_tokens(model: nn.Module, x: Tensor, state: Optional[TokenState]
                ) -> tuple[Tensor, Tensor]:
    """Tokens for the token-distillation loss: the final normed map as ``[B, N, C]`` (the
    authors' ``featmap = norm(x)``) and the positions to distil, ``[B, N]`` ones (all)."""
    B, H, W, C = x.shape
    tokens = x.reshape(B, H * W, C)
    return tokens, tokens.new_ones(B, H * W)


PATCHED = patched_mixin('_PatchedSwin', forward_features, forward_head)
