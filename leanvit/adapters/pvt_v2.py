"""Family record of timm's ``PyramidVisionTransformerV2`` (``pvt_v2_*``): layer compaction and
MACs (:func:`leanvit.count_macs`, layer by layer: ``LAYERS``); no token methods yet.

Compaction sites: ``stages[s].blocks[i].attn`` (spatial-reduction ``Attention``; 1, 2, 5, 8
heads in the b0-b5 models: the 1-head first stage stays plain, 5 heads split 3 + 2) and
``stages[s].blocks[i].mlp.fc2`` (``nn.Linear``).
"""
from __future__ import annotations

from typing import Iterator

from torch import Tensor, nn

from leanvit.adapters.base import CompactionSites, Site
from leanvit.adapters.layer_macs import LayerMap
from leanvit.ops.attention import attention_logits

FAMILY = "pvt_v2"
KIND = "hierarchical"
DESCRIPTION = "pvt_v2 (timm PyramidVisionTransformerV2: pvt_v2_*)"


def matches(cls: type) -> bool:
    from timm.models.pvt_v2 import PyramidVisionTransformerV2

    return issubclass(cls, PyramidVisionTransformerV2)


def staged(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(dotted path, block)`` of every block of ``model.stages``."""
    for s, stage in enumerate(model.stages):
        for i, blk in enumerate(stage.blocks):
            yield f"stages.{s}.blocks.{i}", blk


def _attention_sites(model: nn.Module) -> Iterator[Site]:
    for path, blk in staged(model):
        yield Site(blk, "attn", f"{path}.attn")


def _ffn_sites(model: nn.Module) -> Iterator[Site]:
    for path, blk in staged(model):
        yield Site(blk.mlp, "fc2", f"{path}.mlp.fc2")


def _attention_class() -> type:
    from leanvit.compaction.modules import PvtHallucinatedAttention

    return PvtHallucinatedAttention


def _plain_logits(attn: nn.Module, x: Tensor, feat_size, *args, **kwargs) -> Tensor:
    B, N, C = x.shape
    q = attn.q(x).reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    kv = attn.kv(_attention_class()._reduce(attn, x, feat_size))
    k = kv[..., :C].reshape(B, -1, attn.num_heads, attn.head_dim).transpose(1, 2)
    return attention_logits(q, k, attn.scale)


COMPACTION = CompactionSites(_attention_sites, _ffn_sites, _attention_class, _plain_logits,
                             conv_ffn=False)


# --------------------------------------------------------------------------------------------
# MACs (leanvit.count_macs), counted layer by layer as the model runs, plain or compacted


def _block_paths(model: nn.Module) -> list[str]:
    return [p for p, _ in staged(model)]


def _attention_paths(model: nn.Module) -> list[str]:
    return [p + ".attn" for p, _ in staged(model)]


LAYERS = LayerMap(_block_paths, _attention_paths, stem=("patch_embed",))
