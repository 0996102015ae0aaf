"""Adapter for timm's ``Beit`` family (BEiT, BEiT v2: ``beit_*``, ``beitv2_*``) as in timm >= 1.0:
the spec the token engine (:mod:`leanvit.adapters.tokens`) runs, and the only place that knows
timm's Beit module names.

Each block runs its own submodules (``norm1``, ``attn``, ``gamma_1``, ``drop_path1``,
``norm2``, ``mlp``, ``gamma_2``, ``drop_path2``) with the method's hooks.

Relative position bias (:class:`~leanvit.adapters.tokens.RelativeBias`). Each block's attention
adds ``table[index[p, q]]`` (timm's ``relative_position_bias_table`` looked up by
``relative_position_index``, plus the model's shared ``rel_pos_bias`` where it has one) for
query position ``p`` and key position ``q``. The bias follows the tokens:
:attr:`~leanvit.state.TokenState.positions` holds each token's original index, and the bias of
the tokens present is the original bias's rows and columns at those indices (``[B, H, N, N]``).
A token a method merges (ToMe, DiffRate) keeps its destination token's position; EViT's fused
token takes index 0, the class token's position (``docs/beit.md``). While no token has moved
(``positions`` is ``None``) and nothing needs exposing, the block's own ``attn`` module runs
with timm's own bias, so keep-all settings are bit-identical.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanvit.adapters.tokens import (BlockParts, Embedding, RelativeBias, TokenEngine,
                                     TokenSpec, linear_of, loss_tokens, pool_tokens, residual,
                                     token_weights)
from leanvit.adapters.vit import check_input, timm_head, timm_info
from leanvit.registry import ModelInfo
from leanvit.state import TokenState

FAMILY = "beit"
KIND = "tokens"
DESCRIPTION = "beit (timm Beit: beit_*, beitv2_*; relative position bias)"

__all__ = ["FAMILY", "KIND", "DESCRIPTION", "PATCHED", "matches", "check_supported", "describe",
           "check_input", "forward_features", "forward_head", "loss_tokens", "embed",
           "run_blocks", "token_weights", "block_macs", "pool"]


def matches(cls: type) -> bool:
    """Whether a model class (unpatched) is timm's ``Beit``."""
    from timm.models.beit import Beit

    return issubclass(cls, Beit)


def check_supported(model: nn.Module) -> None:
    """``ValueError`` for Beit variants the adapter cannot run faithfully."""
    from timm.models.beit import Attention, Block

    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise ValueError(f"block {i} is a {type(blk).__name__} with "
                             f"{type(getattr(blk, 'attn', None)).__name__}; the beit adapter "
                             "supports timm's Beit `Block` with its `Attention`")
    if model.global_pool not in ("", "avg", "token"):  # pragma: no cover - timm asserts it too
        raise ValueError(f"unsupported global_pool {model.global_pool!r} for a Beit model")


def describe(model: nn.Module) -> ModelInfo:
    return timm_info(model, FAMILY, model.global_pool)  # Beit always has a class token


def _block_bias(attn: nn.Module, shared: Optional[Tensor], positions: Optional[Tensor],
                queries: Optional[Tensor] = None) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The block's relative position bias for the tokens present, as ``(own, shared)``.

    ``own``: the block's table looked up at the tokens' positions: ``[1, H, N0, N0]`` (timm's
    ``_get_rel_pos_bias``, while ``positions`` is ``None``) or ``[b, H, K, N]`` for query rows
    at original indices ``queries`` ``[b, K]`` (``None``: ``positions``) and keys at
    ``positions`` ``[b, N]``; ``shared``: the model's shared bias ``[H, N0, N0]`` (one per
    forward, the engine's context) at the same rows and columns (as timm passes it, or
    ``[b, H, K, N]``). Either is ``None`` when absent. Kept apart because timm adds them to the
    logits in different orders on its two paths.
    """
    own = None
    if positions is not None:
        rows = (positions if queries is None else queries)[:, :, None]
        cols = positions[:, None, :]
    if attn.relative_position_bias_table is not None:
        if positions is None:
            own = attn._get_rel_pos_bias()
        else:
            index = attn.relative_position_index[rows, cols]  # [b, K, N]
            own = attn.relative_position_bias_table[index].permute(0, 3, 1, 2)
    if shared is not None and positions is not None:  # else timm's own [H, N0, N0]
        shared = shared[:, rows, cols].transpose(0, 1)  # [H, b, K, N] -> [b, H, K, N]
    return own, shared


class BeitSpec(TokenSpec):
    """timm ``Beit``: ``Block`` with its ``Attention`` and a relative position bias."""

    position = RelativeBias(_block_bias)
    check_input = staticmethod(check_input)

    def embed(self, model: nn.Module, images: Tensor) -> Embedding:
        """Patch embedding, class token, absolute positions (if any), dropout."""
        x = model.patch_embed(images)
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        stem = model.patch_embed.proj.weight.numel() * model.patch_embed.num_patches
        return Embedding(model.pos_drop(x), stem, {})

    def context(self, model: nn.Module) -> Optional[Tensor]:
        """The model's shared relative position bias ``[H, N0, N0]`` (timm computes it once
        per forward), or ``None``."""
        return model.rel_pos_bias() if model.rel_pos_bias is not None else None

    def parts(self, blk: nn.Module) -> BlockParts:
        return BlockParts(blk, blk.norm1, blk.attn, residual(blk.gamma_1, blk.drop_path1),
                          blk.norm2, blk.mlp, residual(blk.gamma_2, blk.drop_path2))

    def plain_attention(self, attn: nn.Module, y: Tensor, state: TokenState, shared) -> Tensor:
        return attn(y, shared_rel_pos_bias=shared)  # nothing moved: the module itself

    def qkv(self, attn: nn.Module, y: Tensor):
        """q, k, v ``[B, H, N, D]`` as timm's Beit ``Attention.forward`` computes them."""
        B, N, _ = y.shape
        if attn.q_bias is None:
            qkv = attn.qkv(y)
        else:
            qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            if attn.qkv_bias_separate:
                qkv = attn.qkv(y)
                qkv += qkv_bias
            else:
                qkv = F.linear(y, weight=attn.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v, None

    def output(self, attn: nn.Module, out: Tensor, gate: Optional[Tensor]) -> Tensor:
        B, H, K, D = out.shape
        out = out.transpose(1, 2).reshape(B, K, H * D)
        return attn.proj_drop(attn.proj(out))

    def head(self, model: nn.Module, x: Tensor, state: TokenState, pre_logits: bool) -> Tensor:
        return timm_head(model, pool(model, x, state), pre_logits)

    def head_macs(self, model: nn.Module, x: Tensor, state: TokenState, pre_logits: bool):
        return 0 if pre_logits else linear_of(model.head)


def pool(model: nn.Module, x: Tensor, state: TokenState) -> Tensor:
    """timm Beit's pooling with merged tokens weighted by size and padding / masked-out tokens
    left out: ``avg`` over the patch tokens, ``token`` the class token, ``''`` none."""
    if model.global_pool == "token":
        return x[:, 0]
    if model.global_pool != "avg":
        return x
    if state.size is None and state.valid is None and state.mask is None:
        return x[:, model.num_prefix_tokens:].mean(dim=1)
    return pool_tokens(x, state, "avg", model.num_prefix_tokens)


ENGINE = TokenEngine(BeitSpec(), "_PatchedBeit")
forward_features, forward_head, embed, run_blocks, block_macs, PATCHED = ENGINE.exports()
