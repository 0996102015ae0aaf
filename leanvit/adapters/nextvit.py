"""Family record of timm's ``NextViT`` (``nextvit_*``): layer compaction and MACs
(:func:`leanvit.count_macs`, layer by layer: ``LAYERS``); no token methods yet.

Compaction sites: ``stages[s].blocks[i].e_mhsa`` of the ``NextTransformerBlock`` s (E-MHSA;
the convolutional ``NextConvBlock`` s have no attention maps) and ``blocks[i].mlp.fc2`` of every
block (1x1 ``nn.Conv2d`` of timm's ``ConvMlp``).
"""
from __future__ import annotations

from typing import Iterator

from torch import Tensor, nn

from leanvit.adapters.base import CompactionSites, Site
from leanvit.adapters.layer_macs import LayerMap
from leanvit.adapters.pvt_v2 import staged
from leanvit.ops.attention import attention_logits

FAMILY = "nextvit"
KIND = "hierarchical"
DESCRIPTION = "nextvit (timm NextViT: nextvit_*)"


def matches(cls: type) -> bool:
    from timm.models.nextvit import NextViT

    return issubclass(cls, NextViT)


def _attention_sites(model: nn.Module) -> Iterator[Site]:
    for path, blk in staged(model):
        if hasattr(blk, "e_mhsa"):
            yield Site(blk, "e_mhsa", f"{path}.e_mhsa")


def _ffn_sites(model: nn.Module) -> Iterator[Site]:
    for path, blk in staged(model):
        yield Site(blk.mlp, "fc2", f"{path}.mlp.fc2")


def _attention_class() -> type:
    from leanvit.compaction.modules import NextVitHallucinatedAttention

    return NextVitHallucinatedAttention


def _plain_logits(attn: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    B, N, _ = x.shape
    q = attn.q(x).reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    if attn.sr is not None:
        x = attn.norm(attn.sr(x.transpose(1, 2))).transpose(1, 2)
    k = attn.k(x).reshape(B, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
    return attention_logits(q, k, attn.scale)


COMPACTION = CompactionSites(_attention_sites, _ffn_sites, _attention_class, _plain_logits,
                             conv_ffn=True)


# --------------------------------------------------------------------------------------------
# MACs (leanvit.count_macs), counted layer by layer as the model runs, plain or compacted


def _block_paths(model: nn.Module) -> list[str]:
    return [p for p, _ in staged(model)]


def _attention_paths(model: nn.Module) -> list[str]:
    return [p + ".e_mhsa" for p, b in staged(model) if hasattr(b, "e_mhsa")]


LAYERS = LayerMap(_block_paths, _attention_paths, stem=("stem",))
