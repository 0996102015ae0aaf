"""Adapter for Hugging Face transformers' CLIP and SigLIP image towers: the spec the token
engine (:mod:`leanvit.adapters.tokens`) runs.

Models: ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``SiglipVisionModel`` and
``Siglip2VisionModel`` (``attn_implementation`` ``"eager"`` or ``"sdpa"``). The image tower is
the module holding ``embeddings`` / ``encoder`` (the model itself, or its ``vision_model``).
Each ``encoder.layers[i]`` runs its own ``layer_norm1``, ``self_attn`` (``q_proj`` /
``k_proj`` / ``v_proj`` / ``out_proj``), ``layer_norm2`` and ``mlp``; positions are absolute.

- CLIP: class token in front; ``pre_layrnorm`` after the embedding; no norm on the tokens
  (``last_hidden_state`` is the encoder's output, as in transformers); the pooled output is
  ``post_layernorm`` of the class token, ``image_embeds`` its ``visual_projection``.
- SigLIP / SigLIP 2: no class token (methods that need one refuse, as on timm models
  without one); ``post_layernorm`` on the tokens; the attention-pool head
  (``MultiheadAttentionPoolingHead``: one learned probe attending to the tokens) sees the
  merged tokens with the blocks' key bias (``log(size)`` under proportional attention,
  ``-inf`` at padding), as timm's ``global_pool='map'`` pool does.
- SigLIP 2 runs at a fixed patch grid: images ``[B, C, H, W]`` (``H``, ``W`` multiples of the
  patch size; patchified as its image processor does), or its own NaFlex call
  ``(pixel_values [B, N, p*p*C], pixel_attention_mask, spatial_shapes)`` when every image of
  the batch has the same grid and no padding. Padded (variable-size) NaFlex batches are
  refused with a one-line error: the methods would have to keep the padding out of every
  merge, which they do through their own ``valid`` field, not the processor's mask.

The patched model's ``forward`` keeps the model's own signature and output types
(``BaseModelOutputWithPooling``, ``CLIPVisionModelOutput`` with ``image_embeds``,
``return_dict=False`` tuples); ``output_attentions`` / ``output_hidden_states`` and
``interpolate_pos_encoding=True`` are refused. A whole ``CLIPModel`` / ``SiglipModel`` is
refused with a pointer to its ``vision_model`` (patch that; the text tower stays as it is).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from leanvit.adapters.attention_pool import pool_token_count
from leanvit.adapters.tokens import (  # noqa: F401 (loss_tokens, token_weights: the contract's)
    BlockParts, Embedding, TokenEngine, TokenSpec, check_images, linear_macs, linear_of,
    loss_tokens, token_weights)
from leanvit.registry import ModelInfo
from leanvit.state import TokenState, attention_bias

FAMILY = "hf_clip"
KIND = "tokens"
DESCRIPTION = ("hf_clip (Hugging Face CLIPVisionModel[WithProjection], SiglipVisionModel, "
               "Siglip2VisionModel)")

_TOWERS = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "SiglipVisionModel",
           "Siglip2VisionModel")
_WHOLE = ("CLIPModel", "SiglipModel", "Siglip2Model")


def _transformers_classes(names: tuple[str, ...]) -> tuple[type, ...]:
    import transformers

    return tuple(getattr(transformers, n) for n in names)


def matches(cls: type) -> bool:
    """Whether a model class (unpatched) is one of the towers (or a whole CLIP/SigLIP model,
    refused by :func:`check_supported` with a pointer to its image tower)."""
    if not any(c.__module__.startswith("transformers.") for c in cls.__mro__):
        return False  # not a transformers model: no need to import it
    return issubclass(cls, _transformers_classes(_TOWERS + _WHOLE))


def tower(model: nn.Module) -> nn.Module:
    """The image tower: the module with ``embeddings`` and ``encoder`` (``model`` or the
    ``vision_model`` it wraps, transformers 4.x and 5.x)."""
    t = model
    while not hasattr(t, "embeddings"):
        t = t.vision_model
    return t


def _is_clip(t: nn.Module) -> bool:
    return hasattr(t, "pre_layrnorm")


def _is_naflex(t: nn.Module) -> bool:
    return isinstance(t.embeddings.patch_embedding, nn.Linear)


def check_supported(model: nn.Module) -> None:
    """``ValueError`` for a whole two-tower model (patch its image tower instead)."""
    if isinstance(model, _transformers_classes(_WHOLE)):
        raise ValueError(f"{type(model).__name__} holds a text and an image tower; patch its "
                         "image tower: leanvit.patch(model.vision_model, ...)")


def describe(model: nn.Module) -> ModelInfo:
    t = tower(model)
    cfg, emb = t.config, t.embeddings
    clip = _is_clip(t)
    side = int(emb.position_embedding_size) * cfg.patch_size if _is_naflex(t) else emb.image_size
    pool = "token" if clip else ("map" if getattr(t, "use_head", False) else "")
    return ModelInfo(family=FAMILY, kind=KIND, depth=len(t.encoder.layers),
                     embed_dim=cfg.hidden_size, num_heads=cfg.num_attention_heads,
                     num_prefix_tokens=int(clip), has_class_token=clip,
                     num_patches=emb.num_patches, global_pool=pool,
                     name=_model_class(model).__name__, img_size=(side, side))


def _model_class(model: nn.Module) -> type:
    """The transformers class of ``model`` (patched or not: the patched class subclasses it)."""
    return next(c for c in type(model).__mro__ if c.__module__.startswith("transformers."))


def check_input(model: nn.Module, x: Any) -> None:
    """One-line errors for images the tower cannot take: not ``[B, C, H, W]``, wrong channels
    or size (CLIP, SigLIP: the configured size; SigLIP 2: multiples of the patch size)."""
    t = tower(model)
    cfg = t.config
    if _is_naflex(t):
        check_images(x, cfg.num_channels, None)
        p = cfg.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"SigLIP 2 takes images whose sides are multiples of its patch size "
                             f"{p}, got {x.shape[-2]}x{x.shape[-1]}")
        return
    check_images(x, cfg.num_channels, (cfg.image_size, cfg.image_size),
                 "; leanvit-patched models do not interpolate positions "
                 "(interpolate_pos_encoding)")


def patchify(images: Tensor, patch: int) -> tuple[Tensor, Tensor]:
    """SigLIP 2's input from images ``[B, C, H, W]``: patches ``[B, h*w, p*p*C]`` in its image
    processor's order (rows of patches, then pixel rows, pixel columns, channels) and the
    grid ``spatial_shapes`` ``[B, 2]`` (``h = H / p``, ``w = W / p``)."""
    B, C, H, W = images.shape
    h, w = H // patch, W // patch
    x = images.reshape(B, C, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1)
    shapes = torch.tensor([h, w], device=images.device).expand(B, 2)
    return x.reshape(B, h * w, patch * patch * C), shapes


def unpatchify(pixel_values: Tensor, mask: Optional[Tensor], shapes: Tensor, patch: int
               ) -> Tensor:
    """Images ``[B, C, H, W]`` from a SigLIP 2 NaFlex batch in which every image has the same
    grid and no padding (the inverse of :func:`patchify`); ``ValueError`` otherwise."""
    if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 3:
        raise ValueError("SigLIP 2 pixel_values must be [B, N, patch*patch*C] patches")
    B, N, D = pixel_values.shape
    shapes = torch.as_tensor(shapes)
    h, w = (int(v) for v in shapes[0])
    if bool((shapes != shapes[0]).any()) or h * w != N or (
            mask is not None and not bool(mask.bool().all())):
        raise ValueError("leanvit runs SigLIP 2 at a fixed patch grid: every image of the batch "
                         "the same spatial_shapes, no padding in pixel_attention_mask "
                         "(variable-size NaFlex batches are not supported)")
    C = D // (patch * patch)
    x = pixel_values.reshape(B, h, w, patch, patch, C).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, C, h * patch, w * patch)


class HFClipSpec(TokenSpec):
    """transformers' CLIP / SigLIP encoder layers (pre-norm, no layer scale)."""

    check_input = staticmethod(check_input)

    def embed(self, model: nn.Module, images: Tensor) -> Embedding:
        t = tower(model)
        emb = t.embeddings
        pe = emb.patch_embedding
        if _is_naflex(t):
            pixels, shapes = patchify(images, t.config.patch_size)
            x = emb(pixels, shapes)
            # patch linear, and the position table resized to the grid (a [N, G*G] x [G*G, C]
            # product per image in transformers' resize_positional_embeddings)
            n = x.shape[1]
            return Embedding(x, n * linear_of(pe) + n * emb.position_embedding.weight.numel(),
                             {})
        x = emb(images)
        stem = pe.weight.numel() * emb.num_patches
        return Embedding(t.pre_layrnorm(x) if _is_clip(t) else x, stem, {})

    def blocks(self, model: nn.Module):
        return tower(model).encoder.layers

    def prefix(self, model: nn.Module) -> int:
        return int(_is_clip(tower(model)))

    def final_norm(self, model: nn.Module):
        t = tower(model)
        return None if _is_clip(t) else t.post_layernorm

    def parts(self, blk: nn.Module) -> BlockParts:
        return BlockParts(blk, blk.layer_norm1, blk.self_attn, None, blk.layer_norm2, blk.mlp,
                          None)

    def plain_attention(self, attn: nn.Module, y: Tensor, state: TokenState, ctx: Any
                        ) -> Tensor:
        return attn(y)[0]  # the module itself (its eager or SDPA interface), untouched

    def qkv(self, attn: nn.Module, y: Tensor):
        B, N, _ = y.shape
        shape = (B, N, -1, attn.head_dim)
        return (attn.q_proj(y).view(shape).transpose(1, 2),
                attn.k_proj(y).view(shape).transpose(1, 2),
                attn.v_proj(y).view(shape).transpose(1, 2), None)

    def output(self, attn: nn.Module, out: Tensor, gate: Optional[Tensor]) -> Tensor:
        B, H, K, D = out.shape
        return attn.out_proj(out.transpose(1, 2).reshape(B, K, H * D))

    def params(self, attn: nn.Module):
        # eager models: the explicit fp32-softmax form, as transformers' eager interface
        fused = attn.config._attn_implementation != "eager"
        return attn.scale, fused, attn.dropout if attn.training else 0.0

    def out_proj(self, attn: nn.Module) -> nn.Linear:
        return attn.out_proj

    def plain_head(self, model: nn.Module, x: Tensor, pre_logits: bool) -> Tensor:
        return self._finish(model, self._pool(model, x, None), pre_logits)

    def head(self, model: nn.Module, x: Tensor, state: TokenState, pre_logits: bool) -> Tensor:
        return self._finish(model, self._pool(model, x, state), pre_logits)

    @staticmethod
    def _pool(model: nn.Module, x: Tensor, state: Optional[TokenState]) -> Optional[Tensor]:
        """The pooled output ``[B, C]`` (``None``: SigLIP without a head)."""
        t = tower(model)
        if _is_clip(t):
            return t.post_layernorm(x[:, 0])
        if not getattr(t, "use_head", False):
            return None
        bias = None if state is None else attention_bias(state, x.dtype)
        return probe_pool(t.head, x, bias)

    @staticmethod
    def _finish(model: nn.Module, pooled: Optional[Tensor], pre_logits: bool):
        proj = getattr(model, "visual_projection", None)
        return pooled if pre_logits or proj is None else proj(pooled)

    def head_macs(self, model: nn.Module, x: Tensor, state: TokenState, pre_logits: bool):
        t = tower(model)
        macs = 0.0
        if not pre_logits:
            macs += linear_of(getattr(model, "visual_projection", None))
        if not _is_clip(t) and getattr(t, "use_head", False):
            seen = pool_token_count(state.valid, x.shape[1], x.shape[0])
            macs += float(probe_pool_macs(t.head, seen).mean())
        return macs

    def patched_mixin(self, name: str, forward_features, forward_head) -> type:
        return patched_mixin(name, forward_features, forward_head)


def probe_pool(head: nn.Module, x: Tensor, bias: Optional[Tensor]) -> Tensor:
    """transformers' ``MultiheadAttentionPoolingHead`` on ``x`` ``[B, N, C]`` with an additive
    key bias ``[B, 1, 1, N]`` (``None``: the module itself, bit for bit) -> ``[B, C]``."""
    if bias is None:
        return head(x)
    mha = head.attention
    B, N = x.shape[:2]
    mask = bias.to(x.dtype).expand(B, mha.num_heads, 1, N).reshape(B * mha.num_heads, 1, N)
    probe = head.probe.repeat(B, 1, 1)
    h = mha(probe, x, x, attn_mask=mask, need_weights=False)[0]
    h = h + head.mlp(head.layernorm(h))
    return h[:, 0]


def probe_pool_macs(head: nn.Module, n_tokens: Tensor) -> Tensor:
    """MACs per image of the pooling head on ``n_tokens`` keys ``[B]``: the probe's query and
    the output projection and MLP on one row, keys and values of every token, scores and
    weighted values ``2 N C``."""
    c = head.attention.embed_dim
    fixed = c * c + linear_macs(head.attention) + linear_macs(head.mlp)  # q, out_proj, MLP
    return n_tokens * (2 * c * c + 2 * c) + fixed


def patched_mixin(name: str, forward_features, forward_head) -> type:
    """The patched class: transformers' ``forward`` signature and output types."""

    def features(self, x: Tensor) -> Tensor:
        return forward_features(self, x)[0]

    def forward(self, pixel_values: Optional[Tensor] = None, *args, **kwargs):
        images = _images(self, pixel_values, args, kwargs)
        x, state = forward_features(self, images)
        pooled = forward_head(self, x, state, pre_logits=True)
        out = _output(self, x, pooled)
        return out if kwargs.get("return_dict", True) is not False else out.to_tuple()

    doc = "Mixed in front of the model's own class by :func:`leanvit.patch`."
    return type(name, (), {"forward_features": features, "forward": forward, "__doc__": doc,
                           "__module__": __name__})


def _images(model: nn.Module, pixel_values: Any, args: tuple, kwargs: dict) -> Any:
    """Images ``[B, C, H, W]`` from the patched forward's arguments; one-line errors for what
    a patched model does not return or take."""
    for key in ("output_attentions", "output_hidden_states"):
        if kwargs.get(key):
            raise ValueError(f"leanvit-patched models do not return {key[7:]} (tokens change "
                             "between layers); call it with the model unpatched")
    if kwargs.get("interpolate_pos_encoding") or (args and args[0] is True and not _is_naflex(
            tower(model))):
        raise ValueError("leanvit-patched models do not take interpolate_pos_encoding=True; "
                         "use the size the model was built for")
    t = tower(model)
    if not _is_naflex(t) or (isinstance(pixel_values, Tensor) and pixel_values.dim() == 4):
        return pixel_values
    mask = kwargs.get("pixel_attention_mask", args[0] if args else None)
    shapes = kwargs.get("spatial_shapes", args[1] if len(args) > 1 else None)
    if shapes is None:
        raise ValueError("SigLIP 2 needs spatial_shapes with patchified pixel_values (or pass "
                         "images [B, C, H, W])")
    return unpatchify(pixel_values, mask, shapes, t.config.patch_size)


def _output(model: nn.Module, x: Tensor, pooled: Optional[Tensor]):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    proj = getattr(model, "visual_projection", None)
    if proj is None:
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)
    from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

    return CLIPVisionModelOutput(image_embeds=proj(pooled), last_hidden_state=x)


def final_norm(model: nn.Module) -> Optional[nn.Module]:
    """The norm on the final tokens (:func:`leanvit.dense_features` applies it to tokens that
    left early): SigLIP's ``post_layernorm``; ``None`` for CLIP (``last_hidden_state`` is the
    encoder's output, ``post_layernorm`` normalises the pooled class token only)."""
    return ENGINE.spec.final_norm(model)


def patch_grid(model: nn.Module, images: Tensor) -> tuple[int, int]:
    """Patch grid ``(rows, cols)`` of ``images`` ``[B, C, H, W]`` (for dense features)."""
    p = tower(model).config.patch_size
    return images.shape[-2] // p, images.shape[-1] // p


ENGINE = TokenEngine(HFClipSpec(), "_PatchedHFClip")
forward_features, forward_head, embed, run_blocks, block_macs, PATCHED = ENGINE.exports()
