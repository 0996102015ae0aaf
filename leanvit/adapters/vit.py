"""Adapter for timm's ``VisionTransformer`` family (ViT, DeiT, DeiT distilled, MAE, DINOv2,
register models) as they are in timm >= 1.0.

The only place that knows timm's ViT module names. Patching swaps the model's class for a
subclass whose ``forward`` runs the blocks through :func:`block_forward`, which calls the
block's own submodules (``norm1``, ``attn``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``,
``ls2``, ``drop_path2``) with three hooks of the method's :class:`~leanvit.registry.Reducer`:

    before_block(i)                          # DynamicViT predicts here
    x = x + ls1(attn(norm1(x), bias))         # fused SDPA; select_queries(i) inside (ATS)
    after_attention(i)                       # the main reduction hook (EViT, ToMe, ...)
    x = x + ls2(mlp(norm2(x)))

Block modules are not replaced or copied, so weights and their names are untouched.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from leanvit.adapters.attention_pool import (attention_pool_forward, attention_pool_macs,
                                             is_attention_pool, pool_token_count)
from leanvit.adapters.base import CompactionSites, Site, patched_mixin
from leanvit.ops.attention import attention, attention_logits
from leanvit.ops.precision import check_input_dtype
from leanvit.ops.tokens import gather_tokens
from leanvit.registry import ModelInfo, Reducer
from leanvit.signals import Signals
from leanvit.state import TokenState, attention_bias, record_departures

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
                "`Block` (post-norm and parallel blocks are not supported yet)"
            )
        if type(blk.attn) is not Attention and not _has_contract(blk.attn):
            raise ValueError(
                f"block {i} uses {type(blk.attn).__name__}; the vit adapter supports timm's "
                "`Attention` (rotary and other attention variants are not supported yet)"
            )


def _has_contract(attn: nn.Module) -> bool:
    """Whether ``attn`` runs itself under the adapter (e.g. leanvit.compact's hMHSA).

    The contract: ``attn.leanvit_forward(y, bias, keep, select) -> (out [B, K, C], signals,
    rows)`` where ``bias`` is the attention bias ``[B, 1, 1, N]`` or ``None``, ``keep`` the
    training keep-mask ``[B, N]`` or ``None``, ``select(signals) -> rows [B, K] | None`` the
    method's query selection (``None`` when the method selects none); and
    ``attn.leanvit_macs(n_q, n_kv)`` giving its MACs per image (projections included).
    """
    return callable(getattr(attn, "leanvit_forward", None)) and callable(
        getattr(attn, "leanvit_macs", None))


def describe(model: nn.Module) -> ModelInfo:
    # a pooling module may name its kind (leanvit.heads.ClassMeanPool does)
    pool = model.global_pool if model.attn_pool is None else getattr(
        model.attn_pool, "pool_type", "map")
    return ModelInfo(
        family=FAMILY,
        kind=KIND,
        depth=len(model.blocks),
        embed_dim=model.embed_dim,
        num_heads=model.blocks[0].attn.num_heads,
        num_prefix_tokens=model.num_prefix_tokens,
        has_class_token=model.cls_token is not None,
        num_patches=model.patch_embed.num_patches,
        global_pool=pool,
        name=getattr(getattr(model, "pretrained_cfg", None) or {}, "get", lambda *_: "")(
            "architecture", ""
        ),
        img_size=tuple(model.patch_embed.img_size)
        if getattr(model.patch_embed, "img_size", None) is not None else None,
    )


# --------------------------------------------------------------------------------------------
# Forward


def _attention(
    attn: nn.Module, i: int, y: Tensor, state: TokenState, reducer: Reducer
) -> tuple[Tensor, Optional[Signals], Optional[Tensor], TokenState]:
    """timm ``Attention.forward`` on ``y`` ``[B, N, C]``, exposing q/k/v to the method.

    Same operations in the same order as timm's module, so results are bit-identical where
    the method changes nothing. Returns (output ``[B, K, C]``, signals, selected query rows
    ``[B, K]`` or ``None``, state).
    """
    if _has_contract(attn):
        return _contract_attention(attn, i, y, state, reducer)
    B, N, C = y.shape
    gate = attn.gate(y).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(y).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = attention_bias(state, q.dtype)
    signals = Signals(q, k, v, attn.scale, bias)

    rows = None
    if reducer.selects_queries(i):
        rows, state = reducer.select_queries(i, signals, state)
        if rows is not None:
            gate = None if gate is None else gather_tokens(gate, rows)
            if bias is not None and bias.shape[2] != 1:  # pragma: no cover - biases are per key
                raise RuntimeError("per-query attention bias with query selection")
    # fused SDPA unless a training keep-mask needs the explicit fp32 form (or the module
    # is set to timm's explicit path): leanvit.ops.attention keeps timm's op order
    out = attention(q, k, v, attn.scale, bias=bias, keep=state.mask, rows=rows,
                    fused=attn.fused_attn, dropout=attn.attn_drop)
    out = out.transpose(1, 2).reshape(B, out.shape[2], attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj(out)
    out = attn.proj_drop(out)
    return out, signals, rows, state


def _contract_attention(attn, i, y, state, reducer):
    """:func:`_attention` for a module with the adapter contract (see :func:`_has_contract`)."""
    bias = attention_bias(state, y.dtype)
    box = [state]

    def select(signals: Signals) -> Optional[Tensor]:
        rows, box[0] = reducer.select_queries(i, signals, box[0])
        return rows

    out, signals, rows = attn.leanvit_forward(
        y, bias, state.mask, select if reducer.selects_queries(i) else None)
    return out, signals, rows, box[0]


def _linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates per token of every ``nn.Linear`` inside ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def block_macs(blk: nn.Module, n_kv: Tensor, n_q: Tensor, n_mlp: Tensor,
                signals: Optional[Signals]) -> dict[str, Tensor]:
    """Per-image MACs of one block from the token counts it saw (``[B]`` each)."""
    attn = blk.attn
    if _has_contract(attn):  # the module counts itself (e.g. hallucinated heads)
        attention = attn.leanvit_macs(n_q, n_kv)
    else:
        qkv = n_kv * (attn.qkv.in_features * attn.qkv.out_features)
        gate = getattr(attn, "gate", None)
        if gate is not None:
            qkv = qkv + n_kv * gate.in_features * gate.out_features
        scores = 2 * n_q * n_kv * attn.attn_dim  # q k^T and attn @ v
        proj = n_q * attn.proj.in_features * attn.proj.out_features
        attention = qkv + scores + proj
    sig = float(signals.macs) if signals is not None else 0.0
    return dict(tokens_in=n_kv, tokens_out=n_mlp, attention=attention,
                mlp=n_mlp * _linear_macs(blk.mlp), signals=torch.full_like(n_kv, sig))


def block_forward(blk: nn.Module, i: int, x: Tensor, state: TokenState, reducer: Reducer
                  ) -> tuple[Tensor, TokenState]:
    """timm ``Block.forward`` with the method's hooks; ``x`` ``[B, N, C]`` -> ``[B, N', C]``."""
    if reducer.acts_before(i):
        before = state
        x_in, (x, state) = x, reducer.before_block(i, x, state)
        state = record_departures(x_in, before, state)  # no-op unless dense features traced
    counting = state.recorder is not None
    n_kv = state.token_counts(x) if counting else None
    rows, signals = None, None
    y = blk.norm1(x)
    if reducer.needs_signals(i) or state.valid is not None or state.mask is not None or (
        state.prop_attn and state.size is not None
    ):
        before = state
        a, signals, rows, state = _attention(blk.attn, i, y, state, reducer)
        if rows is not None:
            state = record_departures(x, before, state)
            x = gather_tokens(x, rows)
    else:
        a = blk.attn(y)  # nothing to expose or bias: the module itself, untouched
    del y
    x = x + blk.drop_path1(blk.ls1(a))
    del a
    n_q = state.token_counts(x) if counting else None
    if reducer.acts_after(i):
        before = state
        x_in, (x, state) = x, reducer.after_attention(i, x, signals, state)
        state = record_departures(x_in, before, state)
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    if counting:
        state.recorder.record_block(i, **block_macs(blk, n_kv, n_q, state.token_counts(x),
                                                     signals))
    return x, state


def check_input(model: nn.Module, x: Tensor) -> None:
    """Clear errors for inputs the model cannot take (instead of a shape error deep inside)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(x.shape)}")
    pe = model.patch_embed
    in_chans = pe.proj.in_channels if hasattr(pe, "proj") else x.shape[1]
    if x.shape[1] != in_chans:
        raise ValueError(f"model takes {in_chans}-channel images, got {x.shape[1]} channels")
    if getattr(pe, "strict_img_size", True) and not getattr(model, "dynamic_img_size", False):
        expected = tuple(pe.img_size)
        if tuple(x.shape[-2:]) != expected:
            raise ValueError(
                f"model was built for {expected[0]}x{expected[1]} images, got "
                f"{x.shape[-2]}x{x.shape[-1]}; create it with img_size={x.shape[-1]} "
                "(timm.create_model(..., img_size=S)) to use another size"
            )
    proj = getattr(pe, "proj", None)
    if isinstance(getattr(proj, "weight", None), Tensor):
        check_input_dtype(x, proj.weight.dtype)


def forward_features(model: nn.Module, x: Tensor, recorder=None, trace_source: bool = False,
                     on_block: Optional[Callable[[int, Tensor, TokenState], None]] = None,
                     trace_where: bool = False) -> tuple[Tensor, TokenState]:
    """Embeddings, blocks with the method's hooks, final norm: ``[B, N', C]`` and its state.

    Args:
        recorder: a :class:`~leanvit.recorder.MacRecorder` to count MACs into.
        trace_source: start ``state.source`` as the identity ``[B, N0, N0]`` (each token holds
            itself), so that every later gather/merge tracks which original tokens each token
            holds (visualisation, :mod:`leanvit.viz`).
        on_block: called as ``on_block(i, x, state)`` after block ``i`` with its output tokens
            ``[B, N, C]`` and state (inspection: source snapshots, features); must not modify
            them.
        trace_where: start ``state.where`` as ``arange(N0)`` (the index map of the original
            tokens) and record the features of tokens as they leave (``state.left``), for
            :func:`leanvit.dense_features`.
    """
    check_input(model, x)
    reducer: Reducer = model.leanvit
    if recorder is not None:
        recorder.record_stem(model.patch_embed.proj.weight.numel() * model.patch_embed.num_patches
                             if isinstance(getattr(model.patch_embed, "proj", None), nn.Conv2d)
                             else 0)
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    state = TokenState(prefix=model.num_prefix_tokens, n0=x.shape[1], recorder=recorder)
    if trace_source:
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        state = state.replace(source=eye.repeat(x.shape[0], 1, 1))  # own memory: merges write
    if trace_where:
        state = state.replace(where=torch.arange(x.shape[1], device=x.device).repeat(
            x.shape[0], 1))
    state = reducer.init_state(state, x)
    for i, blk in enumerate(model.blocks):
        x, state = block_forward(blk, i, x, state, reducer)
        if on_block is not None:
            on_block(i, x, state)
    x = model.norm(x)
    return x, state


def embed(model: nn.Module, x: Tensor) -> tuple[Tensor, TokenState]:
    """Tokens entering block 0, ``[B, N0, C]``, and the method's initial state (the first
    part of :func:`forward_features`; with :func:`run_blocks` a caller can cache what frozen
    blocks compute, e.g. a rate search)."""
    check_input(model, x)
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    state = TokenState(prefix=model.num_prefix_tokens, n0=x.shape[1])
    return x, model.leanvit.init_state(state, x)


def run_blocks(model: nn.Module, x: Tensor, state: TokenState, start: int = 0,
               stop: Optional[int] = None) -> tuple[Tensor, TokenState]:
    """Blocks ``start .. stop - 1`` with the method's hooks; with ``stop=None`` also the final
    norm, so ``run_blocks(model, *embed(model, images))`` equals :func:`forward_features`."""
    end = len(model.blocks) if stop is None else stop
    for i in range(start, end):
        x, state = block_forward(model.blocks[i], i, x, state, model.leanvit)
    if stop is None:
        x = model.norm(x)
    return x, state


def token_weights(state: TokenState, x: Tensor) -> Tensor:
    """Pooling weight of each token, ``[B, N]`` in ``x``'s dtype: how many patches it stands
    for (1 before any merge), 0 for padding, times the training keep-mask (dropped tokens stay
    in place during training but are not pooled)."""
    w = state.sizes_like(x)
    if state.valid is not None:
        w = w * state.valid.to(w.dtype)
    if state.mask is not None:
        w = w * state.mask.to(w.dtype)
    return w


def pool(model: nn.Module, x: Tensor, state: TokenState) -> Tensor:
    """The model's pooling with merged tokens weighted by size, padding and masked-out
    (training keep-mask) tokens left out.

    ``token`` pooling reads the class token as timm does; timm's attention pool
    (``AttentionPoolLatent``, ``global_pool='map'``) gets the blocks' key bias (``log(size)``
    under proportional attention, ``-inf`` on padding); ``avg`` and ``avgmax``
    average over the patch tokens weighted by how many patches each stands for. A pooling
    module in ``model.attn_pool`` with ``takes_token_weights = True`` is called as
    ``attn_pool(x, weights=w)`` with ``w`` ``[B, N]`` = token size, 0 on padding (e.g.
    :class:`leanvit.heads.ClassMeanPool`, the linear-probe pooling).
    """
    if model.attn_pool is not None and getattr(model.attn_pool, "takes_token_weights", False):
        start = 0 if model.pool_include_prefix else model.num_prefix_tokens
        return model.attn_pool(x[:, start:], weights=token_weights(state, x)[:, start:])
    if is_attention_pool(model.attn_pool):  # the blocks' key bias: log(size), -inf padding
        start = 0 if model.pool_include_prefix else model.num_prefix_tokens
        bias = attention_bias(state, x.dtype)
        return attention_pool_forward(model.attn_pool, x[:, start:],
                                      None if bias is None else bias[..., start:])
    if model.attn_pool is not None or model.global_pool not in ("avg", "avgmax", "max"):
        return model.pool(x)
    if state.size is None and state.valid is None and state.mask is None:
        return model.pool(x)
    start = 0 if model.pool_include_prefix else model.num_prefix_tokens
    xs = x[:, start:]
    w = token_weights(state, x)[:, start:]
    avg = (xs * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)
    if model.global_pool == "avg":
        return avg
    if state.valid is not None:
        xs = xs.masked_fill(~state.valid[:, start:, None], float("-inf"))
    mx = xs.amax(dim=1)
    return mx if model.global_pool == "max" else 0.5 * (mx + avg)


def loss_tokens(model: nn.Module, x: Tensor, state: Optional[TokenState]
                ) -> tuple[Tensor, Optional[Tensor]]:
    """Tokens for the token-distillation loss: the final normed tokens ``x`` ``[B, N, C]`` as
    they are, and the training keep-mask ``[B, N]`` (``None``: every token counts)."""
    return x, None if state is None else state.mask


def forward_head(model: nn.Module, x: Tensor, state: TokenState, pre_logits: bool = False,
                 recorder=None) -> Tensor:
    """Pooling (size-aware) and classifier, as timm's ``forward_head``.

    MACs (with a ``recorder``): the classifier (0 with ``pre_logits``) plus an attention
    pool's, from the tokens it sees (:func:`leanvit.adapters.attention_pool.attention_pool_macs`),
    recorded together as the report's ``head``."""
    if recorder is not None:
        head = _linear_macs(model.head) if isinstance(model.head, nn.Linear) else 0
        dist = getattr(model, "head_dist", None)
        if isinstance(dist, nn.Linear):
            head += _linear_macs(dist)
        head = 0 if pre_logits else head
        if model.attn_pool is not None:  # the pool runs before the classifier, pre_logits too
            start = 0 if model.pool_include_prefix else model.num_prefix_tokens
            seen = pool_token_count(None if state.valid is None else state.valid[:, start:],
                                    x.shape[1] - start, x.shape[0])
            head = head + float(attention_pool_macs(model.attn_pool, seen).mean())
        recorder.record_head(head)
    needs_own_pool = state.size is not None or state.valid is not None or state.mask is not None
    token_pool = model.global_pool == "token" and model.attn_pool is None
    if not needs_own_pool or token_pool or type(model).forward_head is not _vit_forward_head():
        return model.forward_head(x, pre_logits=pre_logits)
    x = pool(model, x, state)
    x = model.fc_norm(x)
    x = model.head_drop(x)
    return x if pre_logits else model.head(x)


def _vit_forward_head():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer.forward_head


PATCHED = patched_mixin('_PatchedViT', forward_features, forward_head, takes_attn_mask=True)


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
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return attention_logits(q, k, attn.scale)


COMPACTION = CompactionSites(_attention_sites, _ffn_sites, _attention_class, _plain_logits,
                             conv_ffn=False)
