"""Adapter for open_clip's own image tower, ``open_clip.transformer.VisionTransformer``
(``model.visual`` of ``open_clip.create_model("ViT-B-32")`` and the other non-timm ViT towers):
the spec the token engine (:mod:`leanvit.adapters.tokens`) runs.

The only place that knows open_clip's module names. Embedding as open_clip's ``_embeds``:
``conv1`` patches, ``class_embedding`` in front, ``positional_embedding`` added (absolute),
``patch_dropout`` (training only), ``ln_pre``. Blocks ``transformer.resblocks[i]``
(``ResidualAttentionBlock``: ``ln_1``, ``attn`` an ``nn.MultiheadAttention`` with the fused
``in_proj_weight`` ``[3C, C]`` and ``out_proj``, ``ls_1``, ``ln_2``, ``mlp``, ``ls_2``); the
module itself runs unless the method needs q/k/v. The head is open_clip's ``_pool`` then
``@ proj``: ``ln_post`` where the model applies it (before pooling: the engine's final norm;
after pooling with ``final_ln_after_pool``; after the attention pool, CoCa), ``tok`` (class
token), ``avg`` (patch tokens weighted by size), ``none``, and the ``AttentionalPooler``
variants (its keys biased by ``log(size)`` / ``-inf`` padding like the blocks').

A CLIP model (``CLIP``, ``CustomTextCLIP``, ``CoCa``: anything with ``visual`` and
``encode_image``) and open_clip's ``TimmModel`` are not patched themselves:
:func:`image_tower` names the module :func:`leanvit.patch` patches inside them
(``model.visual``; a ``TimmModel``'s timm ``trunk``, run by the timm families), so
``encode_image`` and ``forward`` run the patched tower and the text tower is never touched.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanvit.adapters.tokens import (  # noqa: F401 (loss_tokens: the contract's)
    BlockParts, Embedding, TokenEngine, TokenSpec, check_images, loss_tokens, pool_tokens,
    residual, token_weights)
from leanvit.ops.precision import check_input_dtype
from leanvit.registry import ModelInfo
from leanvit.state import TokenState, attention_bias

FAMILY = "open_clip"
KIND = "tokens"
DESCRIPTION = "open_clip (open_clip VisionTransformer: model.visual of ViT-B-32, ViT-L-14, ...)"

#: open_clip's pool_type -> the ModelInfo.global_pool name methods read
_POOL_NAMES = {"tok": "token", "avg": "avg", "none": "none"}


def _transformer_module():
    """``open_clip.transformer`` when open_clip has been imported, else ``None`` (a model of
    it cannot exist before; leanvit never imports open_clip itself)."""
    return sys.modules.get("open_clip.transformer")


def matches(cls: type) -> bool:
    """Whether a model class (unpatched) is open_clip's ``VisionTransformer``."""
    mod = _transformer_module()
    return mod is not None and issubclass(cls, mod.VisionTransformer)


def image_tower(model: nn.Module) -> Optional[nn.Module]:
    """The module inside ``model`` that :func:`leanvit.patch` patches: a CLIP model's
    ``visual`` (open_clip ``CLIP``, ``CustomTextCLIP``, ``CoCa``), a ``TimmModel``'s timm
    ``trunk``; ``None`` when ``model`` is neither (it is patched itself)."""
    if sys.modules.get("open_clip") is None:
        return None
    timm_model = sys.modules.get("open_clip.timm_model")
    if timm_model is not None and isinstance(model, timm_model.TimmModel):
        return model.trunk
    if isinstance(getattr(model, "visual", None), nn.Module) and callable(
            getattr(model, "encode_image", None)) and type(model).__module__.startswith(
            "open_clip"):
        return model.visual
    return None


def check_supported(model: nn.Module) -> None:
    """``ValueError`` for open_clip towers the adapter cannot run faithfully: custom blocks
    (``qk_norm``, scaled cosine attention, ...: open_clip's own ``Attention``), cross
    attention blocks, a sequence-first transformer."""
    mod = _transformer_module()
    if not getattr(model.transformer, "batch_first", True):
        raise ValueError("the open_clip adapter supports batch-first transformers "
                         "(open_clip >= 2.24), not a sequence-first one")
    for i, blk in enumerate(model.transformer.resblocks):
        if type(blk) is not mod.ResidualAttentionBlock:
            raise ValueError(
                f"block {i} is a {type(blk).__name__}; the open_clip adapter supports "
                "ResidualAttentionBlock with nn.MultiheadAttention (custom blocks: qk_norm, "
                "scaled cosine attention, scale_heads are not supported yet)")
        attn = blk.attn
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim \
                or not attn.batch_first or attn.bias_k is not None or hasattr(blk, "ln_1_kv"):
            raise ValueError(f"block {i}'s attention is not a batch-first self-attention "
                             "nn.MultiheadAttention with a fused in_proj_weight")


def describe(model: nn.Module) -> ModelInfo:
    blocks = model.transformer.resblocks
    pool = "map" if model.attn_pool is not None else _POOL_NAMES.get(model.pool_type,
                                                                       model.pool_type)
    grid = tuple(model.grid_size)
    return ModelInfo(family=FAMILY, kind=KIND, depth=len(blocks),
                     embed_dim=model.conv1.out_channels, num_heads=blocks[0].attn.num_heads, num_prefix_tokens=1,
                     has_class_token=True, num_patches=grid[0] * grid[1], global_pool=pool,
                     img_size=tuple(model.image_size))


def check_input(model: nn.Module, x: Tensor) -> None:
    """Clear errors for images the tower cannot take: not a tensor, not ``[B, 3, H, W]``, not
    the size its positional embedding was built for, another dtype than its weights."""
    check_images(x, model.conv1.in_channels, tuple(model.image_size),
                 "; build it with image_size={size} (open_clip's vision config) to use another "
                 "size")
    check_input_dtype(x, model.conv1.weight.dtype)


def _final_norm(model: nn.Module) -> Optional[nn.Module]:
    """``ln_post`` when the model applies it to every token before pooling, else ``None``
    (``final_ln_after_pool``, or the CoCa attention pool: applied in the head)."""
    if model.attn_pool is not None:
        return model.ln_post if model.attn_pool_contrastive is not None else None
    return None if model.final_ln_after_pool else model.ln_post


class OpenClipSpec(TokenSpec):
    """open_clip ``VisionTransformer``: ``ResidualAttentionBlock`` with
    ``nn.MultiheadAttention``."""

    check_input = staticmethod(check_input)

    def embed(self, model: nn.Module, images: Tensor) -> Embedding:
        x = model.conv1(images)  # [B, C, gh, gw]
        stem = model.conv1.weight.numel() * x.shape[-2] * x.shape[-1]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = model.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + model.positional_embedding.to(x.dtype)
        return Embedding(model.ln_pre(model.patch_dropout(x)), stem, {})

    def blocks(self, model: nn.Module):
        return model.transformer.resblocks

    def prefix(self, model: nn.Module) -> int:
        return 1

    def final_norm(self, model: nn.Module):
        return _final_norm(model)

    def parts(self, blk: nn.Module) -> BlockParts:
        return BlockParts(blk, blk.ln_1, blk.attn, residual(blk.ls_1, None), blk.ln_2, blk.mlp,
                          residual(blk.ls_2, None))

    def plain_attention(self, attn: nn.Module, y: Tensor, state: TokenState, ctx) -> Tensor:
        return attn(y, y, y, need_weights=False)[0]  # as ResidualAttentionBlock.attention

    def qkv(self, attn: nn.Module, y: Tensor):
        B, N, _ = y.shape
        qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)
        qkv = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q, k, v, None

    def output(self, attn: nn.Module, out: Tensor, gate: Optional[Tensor]) -> Tensor:
        B, H, K, D = out.shape
        return attn.out_proj(out.transpose(1, 2).reshape(B, K, H * D))

    def params(self, attn: nn.Module):
        return attn.head_dim ** -0.5, True, attn.dropout if attn.training else 0.0

    def out_proj(self, attn: nn.Module) -> nn.Linear:
        return attn.out_proj

    def attention_macs(self, attn: nn.Module, n_kv: Tensor, n_q: Tensor) -> Tensor:
        """``in_proj_weight`` is a bare parameter (no ``nn.Linear``): q/k/v ``3 C^2`` per key
        token, ``2 n_q n_kv C`` for scores and weighted values, ``C^2`` per query row out."""
        c = attn.embed_dim
        return n_kv * 3 * c * c + 2 * n_q * n_kv * c + n_q * c * c

    def plain_head(self, model: nn.Module, x: Tensor, pre_logits: bool):
        return _head(model, x, None, pre_logits)

    def head(self, model: nn.Module, x: Tensor, state: TokenState, pre_logits: bool):
        return _head(model, x, state, pre_logits)

    def head_macs(self, model: nn.Module, x: Tensor, state: TokenState, pre_logits: bool):
        return _head_macs(model, x, state, pre_logits)


# --------------------------------------------------------------------------------------------
# The head: open_clip's _pool and proj, merged tokens weighted by size


def _head(model: nn.Module, x: Tensor, state: Optional[TokenState], pre_logits: bool):
    """open_clip's ``forward`` after the blocks on ``x`` ``[B, N, C]`` (``ln_post`` already
    applied when :func:`_final_norm` names it): pooled ``[B, output_dim]`` (``[B, C]`` before
    ``proj`` with ``pre_logits``), with the tokens when the model has ``output_tokens``.
    ``state`` ``None``: the model's own pooling, nothing merged, padded or masked."""
    plain = state is None or (state.size is None and state.valid is None and state.mask is None)
    if model.attn_pool is not None:
        bias = None if plain else attention_bias(state, x.dtype)
        if model.attn_pool_contrastive is not None:  # ln_post applied before the pools
            tokens = _attentional_pool(model.attn_pool, x, bias)
            if model.attn_pool_type == "parallel":
                pooled = _attentional_pool(model.attn_pool_contrastive, x, bias)
            else:  # cascade: on the first pool's fixed set of outputs
                pooled = model.attn_pool_contrastive(tokens)
        else:  # CoCa: the pool's outputs are normed and pooled by open_clip itself
            pooled, tokens = model._global_pool(model.ln_post(
                _attentional_pool(model.attn_pool, x, bias)))
    else:
        if plain or model.pool_type != "avg":
            pooled, tokens = model._global_pool(x)
        else:
            pooled, tokens = pool_tokens(x, state, "avg", 1), x[:, 1:]
        if model.final_ln_after_pool:
            pooled = model.ln_post(pooled)
    if model.proj is not None and not pre_logits:
        pooled = pooled @ model.proj
    return (pooled, tokens) if model.output_tokens else pooled


def _attentional_pool(pool: nn.Module, x: Tensor, bias: Optional[Tensor]) -> Tensor:
    """open_clip's ``AttentionalPooler`` on ``x`` ``[B, N, C]`` -> ``[B, L, d]`` with the
    blocks' key bias ``[B, 1, 1, N]`` (``log(size)``, ``-inf`` padding) added to its logits;
    ``None``: the module itself, bit for bit."""
    if bias is None:
        return pool(x)
    B, heads = x.shape[0], pool.attn.num_heads
    k = pool.ln_k(x)
    q = pool.ln_q(pool.query).unsqueeze(0).expand(B, -1, -1)
    mask = bias.expand(B, heads, q.shape[1], x.shape[1]).reshape(B * heads, q.shape[1], -1)
    return pool.attn(q, k, k, need_weights=False, attn_mask=mask)[0]


def _pooler_macs(pool: nn.Module, n_tokens: Tensor) -> Tensor:
    """MACs per image of an ``AttentionalPooler`` attending to ``n_tokens`` ``[B]``: q and
    output projections on its ``L`` queries, k/v projections on every token, scores and
    weighted values ``2 L N d``."""
    attn, latent = pool.attn, pool.query.shape[0]
    d = attn.embed_dim
    kv = 2 * attn.kdim * d
    return n_tokens * (kv + 2 * latent * d) + latent * 2 * d * d


def _head_macs(model: nn.Module, x: Tensor, state: TokenState, pre_logits: bool) -> float:
    """MACs per image of the head: the attention pools on the tokens they see, ``proj``
    (0 with ``pre_logits``)."""
    macs = 0.0
    if model.attn_pool is not None:
        seen = torch.full((x.shape[0],), float(x.shape[1])) if state.valid is None \
            else state.valid.sum(1).float()
        macs += float(_pooler_macs(model.attn_pool, seen).mean())
        contrastive = model.attn_pool_contrastive
        if contrastive is not None:
            n = seen if model.attn_pool_type == "parallel" else torch.full_like(
                seen, float(model.attn_pool.query.shape[0]))
            macs += float(_pooler_macs(contrastive, n).mean())
    if model.proj is not None and not pre_logits:
        macs += model.proj.shape[0] * model.proj.shape[1]
    return macs


ENGINE = TokenEngine(OpenClipSpec(), "_PatchedOpenClip")
forward_features, forward_head, embed, run_blocks, block_macs, PATCHED = ENGINE.exports()


# --------------------------------------------------------------------------------------------
# What leanvit.dense_features reads of a token family beyond the contract


def final_norm(model: nn.Module) -> Optional[nn.Module]:
    """The norm :func:`forward_features` ends with (``ln_post`` where the model applies it to
    every token, else ``None``)."""
    return _final_norm(model)


def patch_grid(model: nn.Module, images: Tensor) -> tuple[int, int]:
    """The patch grid ``(rows, cols)`` of the images the tower takes (its fixed size)."""
    return int(model.grid_size[0]), int(model.grid_size[1])
