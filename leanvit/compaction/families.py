"""Where each backbone family keeps its attention and FFN modules (one thin adapter each).

A family lists *sites*: ``(parent module, attribute name)`` pairs of the modules compaction
replaces, and knows how to compute its original attention's per-head logits (for fitting the
hallucination when converting a pretrained model).

- ``vit``: timm ``VisionTransformer`` (``deit_*``, ``vit_*``, DINOv2): ``blocks[i].attn``
  (timm ``Attention``), ``blocks[i].mlp.fc2`` (``nn.Linear``).
- ``pvt_v2``: ``stages[s].blocks[i].attn`` (spatial-reduction ``Attention``; 1, 2, 5, 8 heads
  in the b0-b5 models: the 1-head first stage stays plain, 5 heads split 3 + 2),
  ``stages[s].blocks[i].mlp.fc2`` (``nn.Linear``).
- ``nextvit``: ``stages[s].blocks[i].e_mhsa`` of the ``NextTransformerBlock`` s (E-MHSA; the
  convolutional ``NextConvBlock`` s have no attention maps), ``blocks[i].mlp.fc2`` of every
  block (1x1 ``nn.Conv2d`` of timm's ``ConvMlp``).
"""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

from torch import Tensor, nn

from leanvit.compaction import modules as M


class Site(NamedTuple):
    parent: nn.Module
    name: str
    path: str  # dotted name in the model, for messages and the recorded head orders

    @property
    def module(self) -> nn.Module:
        return getattr(self.parent, self.name)


class Family(NamedTuple):
    name: str
    matches: Callable[[nn.Module], bool]
    attention_sites: Callable[[nn.Module], Iterator[Site]]
    ffn_sites: Callable[[nn.Module], Iterator[Site]]
    attention_class: type
    plain_logits: Callable[..., Tensor]  # (original attention, *its forward args) -> [B,H,Nq,Nk]
    conv_ffn: bool


# -- ViT


def _vit_matches(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _vit_attention(model: nn.Module) -> Iterator[Site]:
    from timm.layers import Attention

    for i, blk in enumerate(model.blocks):
        if isinstance(blk.attn, (Attention, M.HallucinatedAttention)):
            yield Site(blk, "attn", f"blocks.{i}.attn")


def _vit_ffn(model: nn.Module) -> Iterator[Site]:
    for i, blk in enumerate(model.blocks):
        yield Site(blk.mlp, "fc2", f"blocks.{i}.mlp.fc2")


def _vit_logits(attn: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return (q * attn.scale) @ k.transpose(-2, -1)


# -- PVTv2


def _pvt_matches(model: nn.Module) -> bool:
    from timm.models.pvt_v2 import PyramidVisionTransformerV2

    return isinstance(model, PyramidVisionTransformerV2)


def _staged(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for s, stage in enumerate(model.stages):
        for i, blk in enumerate(stage.blocks):
            yield f"stages.{s}.blocks.{i}", blk


def _pvt_attention(model: nn.Module) -> Iterator[Site]:
    for path, blk in _staged(model):
        yield Site(blk, "attn", f"{path}.attn")


def _pvt_ffn(model: nn.Module) -> Iterator[Site]:
    for path, blk in _staged(model):
        yield Site(blk.mlp, "fc2", f"{path}.mlp.fc2")


def _pvt_logits(attn: nn.Module, x: Tensor, feat_size, *args, **kwargs) -> Tensor:
    B, N, C = x.shape
    q = attn.q(x).reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    kv = attn.kv(M.PvtHallucinatedAttention._reduce(attn, x, feat_size))
    k = kv[..., :C].reshape(B, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
    return (q * attn.scale) @ k.transpose(-2, -1)


# -- NextViT


def _nextvit_matches(model: nn.Module) -> bool:
    from timm.models.nextvit import NextViT

    return isinstance(model, NextViT)


def _nextvit_attention(model: nn.Module) -> Iterator[Site]:
    for path, blk in _staged(model):
        if hasattr(blk, "e_mhsa"):
            yield Site(blk, "e_mhsa", f"{path}.e_mhsa")


def _nextvit_ffn(model: nn.Module) -> Iterator[Site]:
    for path, blk in _staged(model):
        yield Site(blk.mlp, "fc2", f"{path}.mlp.fc2")


def _nextvit_logits(attn: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    B, N, _ = x.shape
    q = attn.q(x).reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    if attn.sr is not None:
        x = attn.norm(attn.sr(x.transpose(1, 2))).transpose(1, 2)
    k = attn.k(x).reshape(B, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
    return (q * attn.scale) @ k.transpose(-2, -1)


FAMILIES = (
    Family("vit", _vit_matches, _vit_attention, _vit_ffn, M.ViTHallucinatedAttention,
           _vit_logits, conv_ffn=False),
    Family("pvt_v2", _pvt_matches, _pvt_attention, _pvt_ffn, M.PvtHallucinatedAttention,
           _pvt_logits, conv_ffn=False),
    Family("nextvit", _nextvit_matches, _nextvit_attention, _nextvit_ffn,
           M.NextVitHallucinatedAttention, _nextvit_logits, conv_ffn=True),
)


def find_family(model: nn.Module) -> Family:
    """The family of ``model``; ``ValueError`` naming the supported ones otherwise."""
    from leanvit import adapters

    base = adapters.original_class(model)
    for fam in FAMILIES:
        if fam.matches(model):
            return fam
    raise ValueError(f"leanvit.compact supports timm VisionTransformer (deit_*, vit_*), "
                     f"PyramidVisionTransformerV2 (pvt_v2_*) and NextViT (nextvit_*) models, "
                     f"not {base.__name__}")
