"""Adapter for timm's ``Eva`` family with rotary position embeddings: EVA02
(``eva02_*``: ``EvaAttention``, SwiGLU MLP), DINOv3 (``vit_*_dinov3``: class + 4 register
tokens, LayerScale, half-layout RoPE) and Perception Encoder (``vit_pe_core_*``:
``AttentionRope``, attention-pool head ``global_pool='map'``), as they are in timm >= 1.0:
the spec the token engine (:mod:`leanvit.adapters.tokens`) runs.

Each ``EvaBlock`` runs its own submodules (``norm1``, ``attn``, ``gamma_1``, ``drop_path1``,
``norm2``, ``mlp``, ``gamma_2``, ``drop_path2``) in timm's op order. Rotary positions
(:class:`~leanvit.adapters.tokens.Rotary`): timm's per-patch ``sin | cos`` table
(``model._pos_embed`` returns it), with identity rows for the prefix tokens in front, travels
in ``TokenState.rope``; each block rotates a token by the row at its original index
(:func:`token_rope`). A ToMe / DiffRate merged token takes its destination's position, EViT's
fused token none (``docs/eva.md``). ToMe's matching metric is the keys averaged over heads
AFTER the rotation (what the attention compares). Blocks in which the method needs nothing
run timm's own attention module with the tokens' rotations, so keep-all settings are
bit-identical to the unpatched model.

Not supported (clear ``ValueError``): post-norm blocks (``EvaBlockPostNorm``), per-block
"mixed" RoPE (``rope_type='mixed'``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanvit.adapters.attention_pool import attention_pool_forward, attention_pool_macs
from leanvit.adapters.tokens import (BlockParts, Embedding, Rotary, TokenEngine, TokenSpec,
                                     linear_of, loss_tokens, pool_tokens, residual, rope_table,
                                     token_rope, token_weights)
from leanvit.adapters.vit import check_input, timm_head, timm_info, timm_output
from leanvit.registry import ModelInfo
from leanvit.state import TokenState, attention_bias

FAMILY = "eva"
KIND = "tokens"
DESCRIPTION = ("eva (timm Eva with rotary positions: eva02_*, vit_*_dinov3, vit_pe_core_*, "
               "EVA)")
__all__ = ["FAMILY", "KIND", "DESCRIPTION", "PATCHED", "matches", "check_supported", "describe",
           "check_input", "forward_features", "forward_head", "loss_tokens", "embed",
           "run_blocks", "token_weights", "block_macs", "pool", "pool_bias", "token_rope",
           "rope_table"]


def matches(cls: type) -> bool:
    """Whether a model class (unpatched) belongs to this family."""
    from timm.models.eva import Eva

    return issubclass(cls, Eva)


def check_supported(model: nn.Module) -> None:
    """Raise ``ValueError`` for Eva variants the adapter cannot run faithfully."""
    from timm.layers import AttentionRope
    from timm.models.eva import EvaAttention, EvaBlock

    if getattr(model, "rope_mixed", False):
        raise ValueError("the eva adapter does not support per-block 'mixed' RoPE "
                         "(rope_type='mixed') yet; use a model with one rotary table")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not EvaBlock:
            raise ValueError(f"block {i} is a {type(blk).__name__}; the eva adapter supports "
                             "timm's pre-norm `EvaBlock` (post-norm blocks are not supported)")
        if type(blk.attn) not in (EvaAttention, AttentionRope):
            raise ValueError(f"block {i} uses {type(blk.attn).__name__}; the eva adapter "
                             "supports timm's `EvaAttention` and `AttentionRope`")


def describe(model: nn.Module) -> ModelInfo:
    return timm_info(model, FAMILY, model.global_pool if model.attn_pool is None else "map")


def _module_rope(state: TokenState, prefix: int) -> Optional[Tensor]:
    """The tokens' rotations in the layout timm's attention modules take (rows of the
    non-prefix tokens): ``[N - prefix, R]`` (timm's own table while no token has moved, so the
    call is timm's, bit for bit) or ``[B, 1, N - prefix, R]`` (broadcast over heads)."""
    rope = token_rope(state)
    if rope is None:
        return None
    return rope[prefix:] if rope.dim() == 2 else rope[:, None, prefix:]


def _rotate(attn: nn.Module, t: Tensor, rope: Tensor) -> Tensor:
    from timm.layers import apply_rot_embed_cat

    return apply_rot_embed_cat(t, rope, half=getattr(attn, "rotate_half", False))


class EvaSpec(TokenSpec):
    """timm ``Eva``: ``EvaBlock`` with ``EvaAttention`` / ``AttentionRope`` and rotary
    positions."""

    takes_attn_mask = True
    position = Rotary(_rotate)
    check_input = staticmethod(check_input)

    def embed(self, model: nn.Module, images: Tensor) -> Embedding:
        x = model.patch_embed(images)
        proj = getattr(model.patch_embed, "proj", None)
        patches = x.shape[1] * x.shape[2] if x.dim() == 4 else x.shape[1]  # NHWC or NLC
        stem = proj.weight.numel() * patches if isinstance(proj, nn.Conv2d) else 0
        x, rope = model._pos_embed(x)
        x = model.norm_pre(x)
        return Embedding(x, stem, {"rope": rope_table(rope, x.shape[1], model.num_prefix_tokens)})

    def parts(self, blk: nn.Module) -> BlockParts:
        return BlockParts(blk, blk.norm1, blk.attn, residual(blk.gamma_1, blk.drop_path1),
                          blk.norm2, blk.mlp, residual(blk.gamma_2, blk.drop_path2))

    def plain_attention(self, attn: nn.Module, y: Tensor, state: TokenState, ctx) -> Tensor:
        return attn(y, rope=_module_rope(state, attn.num_prefix_tokens))

    def qkv(self, attn: nn.Module, y: Tensor):
        """q, k, v ``[B, H(kv), N, D]`` (after q/k norm) and the gate, as timm computes them."""
        B, N, _ = y.shape
        H = attn.num_heads
        gate = attn.gate(y).sigmoid() if attn.gate is not None else None
        if attn.qkv is not None:
            q_bias = getattr(attn, "q_bias", None)
            if q_bias is None:
                qkv = attn.qkv(y)
            else:  # EvaAttention: q and v biases, a zero k bias buffer
                bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
                if attn.qkv_bias_separate:
                    qkv = attn.qkv(y)
                    qkv += bias
                else:
                    qkv = F.linear(y, weight=attn.qkv.weight, bias=bias)
            q, k, v = qkv.reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            Hkv = getattr(attn, "num_kv_heads", H)
            q = attn.q_proj(y).reshape(B, N, H, -1).transpose(1, 2)
            k = attn.k_proj(y).reshape(B, N, Hkv, -1).transpose(1, 2)
            v = attn.v_proj(y).reshape(B, N, Hkv, -1).transpose(1, 2)
        return attn.q_norm(q), attn.k_norm(k), v, gate

    output = staticmethod(timm_output)

    def head(self, model: nn.Module, x: Tensor, state: TokenState, pre_logits: bool) -> Tensor:
        from timm.models.eva import Eva

        if type(model).forward_head is not Eva.forward_head:
            return model.forward_head(x, pre_logits=pre_logits)
        return timm_head(model, pool(model, x, state), pre_logits)

    def head_macs(self, model: nn.Module, x: Tensor, state: TokenState, pre_logits: bool):
        head = 0 if pre_logits else linear_of(model.head)
        if model.attn_pool is not None:  # timm's Eva pools over all tokens, prefix included
            head = head + float(attention_pool_macs(model.attn_pool, state.token_counts(x)).mean())
        return head


def pool_bias(state: TokenState, x: Tensor) -> Optional[Tensor]:
    """Additive key bias ``[B, 1, 1, N]`` for the attention-pool head: the blocks' own
    (:func:`leanvit.state.attention_bias`: ``log(size)`` under proportional attention, so a
    merged token weighs as the patches it stands for, and ``-inf`` on padding), plus
    ``log(keep)`` of a training keep-mask (a dropped token gets no weight); ``None`` when
    there is none, which is timm's own call."""
    bias = attention_bias(state, x.dtype)
    if state.mask is not None:
        keep = state.mask.to(x.dtype).clamp_min(torch.finfo(x.dtype).tiny).log()
        keep = keep[:, None, None, :]
        bias = keep if bias is None else bias + keep
    return bias


def pool(model: nn.Module, x: Tensor, state: TokenState) -> Tensor:
    """The model's pooling with merged tokens weighted by size, padding and masked-out
    (training keep-mask) tokens left out: ``x`` ``[B, N, C]`` -> ``[B, C]``. ``map``
    (attention pool): the pool's keys get :func:`pool_bias`; ``avg`` / ``avgmax`` / ``max``:
    the patch tokens weighted by size (max over real tokens); ``token``: the class token."""
    if model.attn_pool is not None:
        return attention_pool_forward(model.attn_pool, x, pool_bias(state, x))
    if model.global_pool not in ("avg", "avgmax", "max") or (
            state.size is None and state.valid is None and state.mask is None):
        return model.pool(x)
    return pool_tokens(x, state, model.global_pool, model.num_prefix_tokens)


ENGINE = TokenEngine(EvaSpec(), "_PatchedEva")
forward_features, forward_head, embed, run_blocks, block_macs, PATCHED = ENGINE.exports()
