"""Adapter for Hugging Face transformers' plain ViT encoders: ``ViTModel`` /
``ViTForImageClassification``, ``DeiTModel`` / ``DeiTForImageClassification`` /
``DeiTForImageClassificationWithTeacher``, ``Dinov2Model`` / ``Dinov2ForImageClassification``,
``Dinov2WithRegistersModel`` / ``Dinov2WithRegistersForImageClassification`` (transformers
4.50 to 5.x): the spec the token engine (:mod:`leanvit.adapters.tokens`) runs.

The only place that knows these transformers module names. The encoder is the model's
``base_model`` (the model itself, or ``model.vit`` / ``.deit`` / ``.dinov2`` /
``.dinov2_with_registers`` of a classifier); its layers are ``base.layers`` (ViT, DeiT in
transformers 5) or ``base.encoder.layer``. Each layer runs its own submodules:
``layernorm_before`` / ``norm1``, ``attention`` (``q_proj`` / ``k_proj`` / ``v_proj`` /
``o_proj``; ``query`` / ``key`` / ``value`` and ``output.dense`` in transformers 4),
``dropout`` or ``layer_scale1`` + ``drop_path``, ``layernorm_after`` / ``norm2``, ``mlp``.
Positions are absolute (added by the model's own ``embeddings``). Prefix tokens: the class
token, DeiT's distillation token, DINOv2's registers, never reduced.

Attention: blocks in which the method needs nothing run the module itself (bit for bit the
unpatched model, whatever its ``attn_implementation``); exposed blocks compute q/k/v here and
attend through :func:`leanvit.ops.attention.attention`: the fused SDPA form for ``sdpa`` (and
other kernel) models, the explicit form for ``eager`` ones.

Outputs keep their types: the patched ``forward(pixel_values, labels=None, ...)`` returns
``BaseModelOutputWithPooling`` (encoders), ``ImageClassifierOutput`` (classifiers, with the
loss when ``labels`` are given) or DeiT's teacher output; ``last_hidden_state`` holds the
tokens left after the method. ``output_attentions`` / ``output_hidden_states``,
``bool_masked_pos``, ``attention_mask`` and ``interpolate_pos_encoding=True`` are refused
(the layers see fewer tokens than the input has, so per-layer maps and masks do not line
up). The pooled classifier input of DINOv2 classifiers ``[cls, mean(patches)]`` weights
merged tokens by the patches they stand for.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from leanvit.adapters.tokens import (  # noqa: F401 (loss_tokens: the contract's)
    BlockParts, Embedding, TokenEngine, TokenSpec, check_images, linear_of, loss_tokens,
    residual, token_weights)
from leanvit.ops.precision import check_input_dtype
from leanvit.registry import ModelInfo
from leanvit.state import TokenState

FAMILY = "hf_vit"
KIND = "tokens"
DESCRIPTION = ("hf_vit (Hugging Face transformers ViTModel, DeiTModel, Dinov2Model, "
               "Dinov2WithRegistersModel and their image classifiers)")

#: model class name -> head kind (see :func:`head_kind`)
_CLASSES = {
    "ViTModel": "encoder", "DeiTModel": "encoder", "Dinov2Model": "encoder",
    "Dinov2WithRegistersModel": "encoder",
    "ViTForImageClassification": "class", "DeiTForImageClassification": "class",
    "DeiTForImageClassificationWithTeacher": "teacher",
    "Dinov2ForImageClassification": "class_mean",
    "Dinov2WithRegistersForImageClassification": "class_mean",
}
_LAYERS = ("ViTLayer", "DeiTLayer", "Dinov2Layer", "Dinov2WithRegistersLayer")


def _hf_classes() -> dict[type, str]:
    """The transformers classes of :data:`_CLASSES` that this transformers version has."""
    import transformers

    return {getattr(transformers, n): k for n, k in _CLASSES.items() if hasattr(transformers, n)}


def matches(cls: type) -> bool:
    """Whether a model class (unpatched) belongs to this family (subclasses included)."""
    if "transformers" not in {c.__module__.split(".")[0] for c in cls.__mro__}:
        return False  # transformers not imported for a model that cannot be one of its
    return any(issubclass(cls, c) for c in _hf_classes())


def head_kind(model: nn.Module) -> str:
    """``encoder`` (class token; ViT's/DeiT's ``pooler`` when present), ``class``
    (classifier on the class token), ``teacher`` (DeiT: mean of the class and distillation
    tokens' classifiers) or ``class_mean`` (DINOv2: classifier on ``[cls, mean(patches)]``)."""
    for cls in type(model).__mro__:  # the patched class's too: the original is in it
        if cls.__name__ in _CLASSES and cls.__module__.startswith("transformers"):
            return _CLASSES[cls.__name__]
    raise ValueError(f"{type(model).__name__} is not a supported transformers ViT model")


def encoder(model: nn.Module) -> nn.Module:
    """The ``ViTModel`` / ``DeiTModel`` / ``Dinov2Model`` ... inside ``model`` (or itself)."""
    return getattr(model, "base_model", model)


def layers(base: nn.Module) -> nn.ModuleList:
    """The encoder's layers: ``base.layers`` (transformers 5 ViT/DeiT) or ``encoder.layer``."""
    found = getattr(base, "layers", None)
    return found if found is not None else base.encoder.layer


def num_prefix(base: nn.Module) -> int:
    """Class token, plus DeiT's distillation token, plus DINOv2's register tokens."""
    emb = base.embeddings
    n = 1 + int(getattr(emb, "distillation_token", None) is not None)
    reg = getattr(emb, "register_tokens", None)
    return n + (reg.shape[1] if reg is not None else 0)


def _attn_parts(attn: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    """``(q, k, v, out)`` projections: transformers 5 names, or 4's ``attention`` /
    ``output.dense``."""
    if hasattr(attn, "q_proj"):
        return attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    self_attn = attn.attention
    return self_attn.query, self_attn.key, self_attn.value, attn.output.dense


def check_supported(model: nn.Module) -> None:
    """``ValueError`` for variants the adapter cannot run faithfully (layers of another
    class, e.g. a subclass that changes the layer)."""
    for i, blk in enumerate(layers(encoder(model))):
        if type(blk).__name__ not in _LAYERS:
            raise ValueError(f"layer {i} is a {type(blk).__name__}; the hf_vit adapter supports "
                             f"transformers' {', '.join(_LAYERS)}")


def describe(model: nn.Module) -> ModelInfo:
    base = encoder(model)
    cfg, pe = base.config, base.embeddings.patch_embeddings
    size = tuple(pe.image_size) if hasattr(pe, "image_size") else None
    return ModelInfo(
        family=FAMILY, kind=KIND, depth=len(layers(base)), embed_dim=cfg.hidden_size,
        num_heads=cfg.num_attention_heads, num_prefix_tokens=num_prefix(base),
        has_class_token=True, num_patches=pe.num_patches,
        global_pool="class_mean" if head_kind(model) == "class_mean" else "token",
        name=str(getattr(cfg, "_name_or_path", "") or type(model).__name__),
        img_size=(int(size[0]), int(size[1])) if size is not None else None)


def check_input(model: nn.Module, x: Any) -> None:
    """Clear errors for images the model cannot take: not a tensor, not ``[B, C, H, W]``,
    wrong channels, another size than the configured one (ViT, DeiT: their
    ``interpolate_pos_encoding`` is not supported under a method; DINOv2 interpolates
    positions to any multiple of the patch), wrong dtype."""
    base = encoder(model)
    pe = base.embeddings.patch_embeddings
    # ViT/DeiT embeddings keep image_size and refuse others; DINOv2's interpolate positions
    interpolates = not hasattr(base.embeddings, "image_size")
    check_images(x, pe.num_channels, None if interpolates else tuple(pe.image_size),
                 "; build it with image_size={size} in its config to use another size")
    if interpolates and (x.shape[-2] % pe.patch_size[0] or x.shape[-1] % pe.patch_size[1]):
        raise ValueError(f"image size {x.shape[-2]}x{x.shape[-1]} is not a multiple of the "
                         f"patch size {tuple(pe.patch_size)}")
    check_input_dtype(x, pe.projection.weight.dtype)


def patch_grid(model: nn.Module, images: Tensor) -> tuple[int, int]:
    """Patch grid ``(rows, cols)`` of ``images`` (:func:`leanvit.dense_features`)."""
    p = encoder(model).embeddings.patch_embeddings.patch_size
    return images.shape[-2] // p[0], images.shape[-1] // p[1]


def final_norm(model: nn.Module) -> nn.Module:
    """The encoder's final ``layernorm`` (:func:`leanvit.dense_features` normalises tokens
    that left early with it)."""
    return encoder(model).layernorm


# --------------------------------------------------------------------------------------------
# Heads: ``x`` are the final normed tokens [B, N, C]


def _pooled(model: nn.Module, x: Tensor, weights: Optional[Tensor]) -> Tensor:
    """The classifier input: ``[B, C]`` (class token) or ``[B, 2C]`` (``class_mean``: class
    token and the mean of the patch tokens weighted by ``weights`` ``[B, N]``, registers in
    neither half)."""
    if head_kind(model) != "class_mean":
        return x[:, 0]
    patches = x[:, num_prefix(encoder(model)):]
    if weights is None:  # the model's own mean, bit for bit
        mean = patches.mean(dim=1)
    else:
        w = weights[:, x.shape[1] - patches.shape[1]:, None].to(x.dtype)
        mean = (patches * w).sum(dim=1) / w.sum(dim=1)
    return torch.cat([x[:, 0], mean], dim=-1)


def head_forward(model: nn.Module, x: Tensor, weights: Optional[Tensor], pre_logits: bool
                 ) -> Tensor:
    """Encoders: ``pooler_output`` (ViT/DeiT ``pooler`` on the class token when the model has
    one, else the class token); classifiers: logits ``[B, num_labels]`` (the pooled input
    with ``pre_logits``; DeiT's teacher model: its two tokens concatenated)."""
    kind = head_kind(model)
    if kind == "encoder":
        pooler = getattr(model, "pooler", None)
        return x[:, 0] if pooler is None or pre_logits else pooler(x)
    if kind == "teacher":
        if pre_logits:
            return torch.cat([x[:, 0], x[:, 1]], dim=-1)
        return (model.cls_classifier(x[:, 0]) + model.distillation_classifier(x[:, 1])) / 2
    pooled = _pooled(model, x, weights)
    return pooled if pre_logits else model.classifier(pooled)


class HFViTSpec(TokenSpec):
    """transformers ``ViTLayer`` / ``DeiTLayer`` / ``Dinov2Layer`` encoders."""

    check_input = staticmethod(check_input)

    def embed(self, model: nn.Module, images: Tensor) -> Embedding:
        emb = encoder(model).embeddings
        proj = emb.patch_embeddings.projection
        x = emb(images.to(proj.weight.dtype))
        patches = (images.shape[-2] // proj.stride[0]) * (images.shape[-1] // proj.stride[1])
        return Embedding(x, proj.weight.numel() * patches, {})

    def blocks(self, model: nn.Module):
        return layers(encoder(model))

    def prefix(self, model: nn.Module) -> int:
        return num_prefix(encoder(model))

    def final_norm(self, model: nn.Module):
        return encoder(model).layernorm

    def parts(self, blk: nn.Module) -> BlockParts:
        if hasattr(blk, "layernorm_before"):  # ViT, DeiT: dropout on both branches
            return BlockParts(blk, blk.layernorm_before, blk.attention, residual(None, blk.dropout),
                              blk.layernorm_after, blk.mlp, residual(None, blk.dropout))
        post1 = residual(blk.layer_scale1, blk.drop_path)  # DINOv2: layer scale, drop path
        post2 = residual(blk.layer_scale2, blk.drop_path)
        return BlockParts(blk, blk.norm1, blk.attention, post1, blk.norm2, blk.mlp, post2)

    def qkv(self, attn: nn.Module, y: Tensor):
        B, N, _ = y.shape
        q, k, v, _ = _attn_parts(attn)
        shape = (B, N, -1, _head_dim(attn))
        return (q(y).view(shape).transpose(1, 2), k(y).view(shape).transpose(1, 2),
                v(y).view(shape).transpose(1, 2), None)

    def output(self, attn: nn.Module, out: Tensor, gate: Optional[Tensor]) -> Tensor:
        B, H, K, D = out.shape
        out = out.transpose(1, 2).reshape(B, K, H * D)
        if hasattr(attn, "o_proj"):
            return attn.o_proj(out)
        return attn.output.dropout(attn.output.dense(out))  # transformers 4

    def params(self, attn: nn.Module) -> tuple[float, bool, Any]:
        cfg = getattr(attn, "config", None)
        impl = getattr(cfg, "_attn_implementation", None) or "eager"
        p = getattr(attn, "attention_dropout", None)
        if p is None:  # transformers 4: the self-attention's dropout module
            p = attn.attention.dropout
        else:
            p = p if attn.training else 0.0
        return _head_dim(attn) ** -0.5, impl != "eager", p

    def plain_attention(self, attn: nn.Module, y: Tensor, state: TokenState, ctx) -> Tensor:
        return attn(y)[0]

    def out_proj(self, attn: nn.Module) -> nn.Linear:
        return _attn_parts(attn)[3]

    def plain_head(self, model: nn.Module, x: Tensor, pre_logits: bool) -> Tensor:
        return head_forward(model, x, None, pre_logits)

    def head(self, model: nn.Module, x: Tensor, state: TokenState, pre_logits: bool) -> Tensor:
        return head_forward(model, x, token_weights(state, x), pre_logits)

    def head_macs(self, model: nn.Module, x: Tensor, state: TokenState, pre_logits: bool):
        kind = head_kind(model)
        if pre_logits:
            return 0
        if kind == "encoder":
            pooler = getattr(model, "pooler", None)
            return linear_of(getattr(pooler, "dense", None))
        if kind == "teacher":
            return linear_of(model.cls_classifier) + linear_of(model.distillation_classifier)
        return linear_of(model.classifier)

    def patched_mixin(self, name, forward_features, forward_head) -> type:
        return _patched_mixin(name, forward_features, forward_head)


def _head_dim(attn: nn.Module) -> int:
    hd = getattr(attn, "head_dim", None)
    return hd if hd is not None else attn.attention.attention_head_size


# --------------------------------------------------------------------------------------------
# The patched class: the model's own forward signature and output types


def _refuse(output_attentions, output_hidden_states, extra: dict) -> None:
    if output_attentions or output_hidden_states:
        raise ValueError("leanvit-patched Hugging Face models do not return per-layer "
                         "attentions or hidden states (the method changes the tokens between "
                         "layers); call leanvit.unpatch(model) first")
    for key in ("bool_masked_pos", "attention_mask", "head_mask"):
        if extra.pop(key, None) is not None:
            raise ValueError(f"leanvit-patched Hugging Face models do not take {key}")
    if extra.pop("interpolate_pos_encoding", None):
        raise ValueError("leanvit-patched ViT/DeiT models do not take interpolate_pos_encoding="
                         "True; build the model with image_size set to the input size")
    extra.pop("return_dict", None)
    if extra:
        raise ValueError(f"leanvit-patched Hugging Face models do not take "
                         f"{', '.join(sorted(extra))}")


def _outputs(model: nn.Module, x: Tensor, state: TokenState, forward_head, labels):
    """The model's own output object for the final tokens ``x`` ``[B, N', C]``."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

    kind = head_kind(model)
    out = forward_head(model, x, state)
    if kind == "encoder":
        if hasattr(model, "pooler") and model.pooler is None:
            out = None  # ViT/DeiT without a pooler: no pooler_output, as the model itself
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=out)
    if kind == "teacher":
        from transformers.models.deit.modeling_deit import (
            DeiTForImageClassificationWithTeacherOutput)

        return DeiTForImageClassificationWithTeacherOutput(
            logits=out, cls_logits=model.cls_classifier(x[:, 0]),
            distillation_logits=model.distillation_classifier(x[:, 1]))
    loss = None if labels is None else model.loss_function(labels, out, model.config)
    return ImageClassifierOutput(loss=loss, logits=out)


def _patched_mixin(name: str, forward_features, forward_head) -> type:
    """The mixin put in front of a transformers model's class while patched."""

    def features(self, x: Tensor) -> Tensor:
        return forward_features(self, x)[0]

    def forward(self, pixel_values: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                **kwargs: Any):
        cfg = self.config
        _refuse(output_attentions if output_attentions is not None
                else getattr(cfg, "output_attentions", False),
                output_hidden_states if output_hidden_states is not None
                else getattr(cfg, "output_hidden_states", False), kwargs)
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        if labels is not None and head_kind(self) in ("encoder", "teacher"):
            raise ValueError(f"{type(self).__name__} takes no labels")
        x, state = forward_features(self, pixel_values)
        out = _outputs(self, x, state, forward_head, labels)
        if return_dict is False or (return_dict is None
                                    and getattr(cfg, "return_dict", True) is False):
            return out.to_tuple()
        return out

    doc = "Mixed in front of the model's own class by :func:`leanvit.patch`."
    return type(name, (), {"forward_features": features, "forward": forward, "__doc__": doc,
                           "__module__": __name__})


ENGINE = TokenEngine(HFViTSpec(), "_PatchedHFViT")
forward_features, forward_head, embed, run_blocks, block_macs, PATCHED = ENGINE.exports()
