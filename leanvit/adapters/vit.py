"""Adapter for timm's ``VisionTransformer`` family (ViT, DeiT, DeiT distilled, MAE, DINOv2,
register models; timm >= 1.0): the spec the token engine (:mod:`leanvit.adapters.tokens`) runs.

The only place that knows timm's ViT module names. Each block runs its own submodules
(``norm1``, ``attn``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``), not
replaced or copied; positions are absolute (added at embedding). The timm helpers here
(:func:`check_input`, :func:`timm_info`, :func:`timm_head`) serve the eva and beit specs too."""
from __future__ import annotations

from typing import Iterator, Optional

from torch import Tensor, nn

from leanvit.adapters.attention_pool import (attention_pool_forward, attention_pool_macs,
                                             is_attention_pool, pool_token_count)
from leanvit.adapters.base import CompactionSites, Site
from leanvit.adapters.tokens import (  # noqa: F401 (loss_tokens: the contract's)
    BlockParts, Embedding, TokenEngine, TokenSpec, check_images, has_contract, linear_of,
    loss_tokens, pool_tokens, residual, token_weights)
from leanvit.ops.attention import attention_logits
from leanvit.ops.precision import check_input_dtype
from leanvit.registry import ModelInfo
from leanvit.state import TokenState, attention_bias

FAMILY = "vit"
KIND = "tokens"
DESCRIPTION = "vit (timm VisionTransformer: vit_*, deit_*, DINOv2, MAE, register models)"


def matches(cls: type) -> bool:
    """Whether a model class (unpatched) belongs to this family."""
    from timm.models.vision_transformer import VisionTransformer

    return issubclass(cls, VisionTransformer)


def check_supported(model: nn.Module) -> None:
    """Raise ``ValueError`` for ViT variants the adapter cannot run faithfully."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise ValueError(
                f"block {i} is a {type(blk).__name__}; the vit adapter supports timm's pre-norm "
                "`Block` (post-norm and parallel blocks are not supported yet)")
        if type(blk.attn) is not Attention and not has_contract(blk.attn):
            raise ValueError(
                f"block {i} uses {type(blk.attn).__name__}; the vit adapter supports timm's "
                "`Attention` (rotary and other attention variants are not supported yet)")


def timm_info(model: nn.Module, family: str, global_pool: str) -> ModelInfo:
    """The :class:`ModelInfo` of a timm token model (``blocks``, ``patch_embed``, ...)."""
    pe, cfg = model.patch_embed, getattr(model, "pretrained_cfg", None) or {}
    return ModelInfo(
        family=family, kind=KIND, depth=len(model.blocks), embed_dim=model.embed_dim,
        num_heads=model.blocks[0].attn.num_heads, num_prefix_tokens=model.num_prefix_tokens,
        has_class_token=model.cls_token is not None, num_patches=pe.num_patches,
        global_pool=global_pool, name=cfg.get("architecture", "") if hasattr(cfg, "get") else "",
        img_size=tuple(pe.img_size) if getattr(pe, "img_size", None) is not None else None)


def describe(model: nn.Module) -> ModelInfo:
    pool = model.attn_pool  # a pooling module may name its kind (leanvit.heads.ClassMeanPool)
    kind = model.global_pool if pool is None else getattr(pool, "pool_type", "map")
    return timm_info(model, FAMILY, kind)


def check_input(model: nn.Module, x: Tensor) -> None:
    """Clear errors for inputs a timm token model cannot take (instead of a shape error deep
    inside): not a tensor, not ``[B, C, H, W]``, wrong channels, size or dtype."""
    pe = model.patch_embed
    proj = getattr(pe, "proj", None)
    strict = getattr(pe, "strict_img_size", True) and not getattr(model, "dynamic_img_size", 0)
    check_images(x, getattr(proj, "in_channels", None), tuple(pe.img_size) if strict else None,
                 "; create it with img_size={size} (timm.create_model(..., img_size=S)) to use "
                 "another size")
    if isinstance(getattr(proj, "weight", None), Tensor):
        check_input_dtype(x, proj.weight.dtype)


def timm_output(attn: nn.Module, out: Tensor, gate: Optional[Tensor]) -> Tensor:
    """timm's attention tail on ``out`` ``[B, H, K, D]``: heads concatenated, ``norm``, the
    optional gate, ``proj``, ``proj_drop`` -> ``[B, K, C]``."""
    B, H, K, D = out.shape
    out = attn.norm(out.transpose(1, 2).reshape(B, K, H * D))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def timm_head(model: nn.Module, x: Tensor, pre_logits: bool) -> Tensor:
    """timm's head after pooling: ``fc_norm``, ``head_drop``, ``head`` (not ``pre_logits``)."""
    x = model.head_drop(model.fc_norm(x))
    return x if pre_logits else model.head(x)


class ViTSpec(TokenSpec):
    """timm ``VisionTransformer``: ``Block`` (pre-norm, LayerScale) with ``Attention``."""

    takes_attn_mask = True
    check_input = staticmethod(check_input)

    def embed(self, model: nn.Module, images: Tensor) -> Embedding:
        pe = model.patch_embed
        stem = pe.proj.weight.numel() * pe.num_patches if isinstance(
            getattr(pe, "proj", None), nn.Conv2d) else 0
        x = model.norm_pre(model.patch_drop(model._pos_embed(pe(images))))
        return Embedding(x, stem, {})

    def parts(self, blk: nn.Module) -> BlockParts:
        return BlockParts(blk, blk.norm1, blk.attn, residual(blk.ls1, blk.drop_path1),
                          blk.norm2, blk.mlp, residual(blk.ls2, blk.drop_path2))

    def qkv(self, attn: nn.Module, y: Tensor):
        B, N, _ = y.shape
        gate = attn.gate(y).sigmoid() if getattr(attn, "gate", None) is not None else None
        qkv = attn.qkv(y).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v, gate

    output = staticmethod(timm_output)

    def head(self, model: nn.Module, x: Tensor, state: TokenState, pre_logits: bool) -> Tensor:
        from timm.models.vision_transformer import VisionTransformer

        token_pool = model.global_pool == "token" and model.attn_pool is None
        if token_pool or type(model).forward_head is not VisionTransformer.forward_head:
            return model.forward_head(x, pre_logits=pre_logits)
        return timm_head(model, pool(model, x, state), pre_logits)

    def head_macs(self, model: nn.Module, x: Tensor, state: TokenState, pre_logits: bool):
        """The classifier (0 with ``pre_logits``) plus an attention pool's on what it sees."""
        head = 0 if pre_logits else linear_of(model.head) + linear_of(
            getattr(model, "head_dist", None))
        if model.attn_pool is not None:  # the pool runs before the classifier, pre_logits too
            start = 0 if model.pool_include_prefix else model.num_prefix_tokens
            seen = pool_token_count(None if state.valid is None else state.valid[:, start:],
                                    x.shape[1] - start, x.shape[0])
            head = head + float(attention_pool_macs(model.attn_pool, seen).mean())
        return head


def pool(model: nn.Module, x: Tensor, state: TokenState) -> Tensor:
    """The model's pooling, merged tokens weighted by size, padding and masked-out tokens left
    out: ``token`` the class token (timm's); ``AttentionPoolLatent`` (``map``) with the blocks'
    key bias (``log(size)``, ``-inf`` padding); ``avg`` / ``avgmax`` / ``max`` weighted by size;
    an ``attn_pool`` with ``takes_token_weights = True`` gets ``weights=`` :func:`token_weights`
    (e.g. :class:`leanvit.heads.ClassMeanPool`, the linear-probe pooling)."""
    attn_pool = model.attn_pool
    start = 0 if model.pool_include_prefix else model.num_prefix_tokens
    if attn_pool is not None and getattr(attn_pool, "takes_token_weights", False):
        return attn_pool(x[:, start:], weights=token_weights(state, x)[:, start:])
    if is_attention_pool(attn_pool):  # the blocks' key bias: log(size), -inf padding
        bias = attention_bias(state, x.dtype)
        return attention_pool_forward(attn_pool, x[:, start:],
                                      None if bias is None else bias[..., start:])
    if attn_pool is not None or model.global_pool not in ("avg", "avgmax", "max") or (
            state.size is None and state.valid is None and state.mask is None):
        return model.pool(x)
    return pool_tokens(x, state, model.global_pool, start)


ENGINE = TokenEngine(ViTSpec(), "_PatchedViT")
forward_features, forward_head, embed, run_blocks, block_macs, PATCHED = ENGINE.exports()


# --------------------------------------------------------------------------------------------
# Layer compaction sites: blocks[i].attn (timm Attention), blocks[i].mlp.fc2 (nn.Linear)


def _attention_class() -> type:
    from leanvit.compaction.modules import ViTHallucinatedAttention

    return ViTHallucinatedAttention


def _attention_sites(model: nn.Module) -> Iterator[Site]:
    from timm.layers import Attention

    from leanvit.compaction.modules import HallucinatedAttention

    for i, blk in enumerate(model.blocks):
        if isinstance(blk.attn, (Attention, HallucinatedAttention)):
            yield Site(blk, "attn", f"blocks.{i}.attn")


def _ffn_sites(model: nn.Module) -> Iterator[Site]:
    for i, blk in enumerate(model.blocks):
        yield Site(blk.mlp, "fc2", f"blocks.{i}.mlp.fc2")


def _plain_logits(attn: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    q, k, _, _ = ENGINE.spec.qkv(attn, x)
    return attention_logits(q, k, attn.scale)


COMPACTION = CompactionSites(_attention_sites, _ffn_sites, _attention_class, _plain_logits,
                             conv_ffn=False)
