"""Adapter for timm's ``Eva`` family with rotary position embeddings: EVA02
(``eva02_*``: ``EvaAttention``, SwiGLU MLP), DINOv3 (``vit_*_dinov3``: class + 4 register
tokens, LayerScale, half-layout RoPE) and Perception Encoder (``vit_pe_core_*``:
``AttentionRope``, attention-pool head ``global_pool='map'``), as they are in timm >= 1.0.

The only place that knows timm's Eva module names. Patching swaps the model's class for a
subclass whose ``forward`` runs the blocks through :func:`block_forward`, which calls the
``EvaBlock``'s own submodules (``norm1``, ``attn``, ``gamma_1``, ``drop_path1``, ``norm2``,
``mlp``, ``gamma_2``, ``drop_path2``) with the three hooks of the method's
:class:`~leanvit.registry.Reducer`, in timm's op order:

    before_block(i)                                   # DynamicViT predicts here
    x = x + gamma_1 * attn(norm1(x), rope)            # select_queries(i) inside (ATS)
    after_attention(i)                                # EViT, ToMe, top-k, DiffRate
    x = x + gamma_2 * mlp(norm2(x))

Rotary positions. timm rotates q and k of the non-prefix tokens by a per-patch ``sin | cos``
table (``model._pos_embed`` returns it, ``[N_patches, 2 * head_dim]``). Here the table, with
identity rows (sin 0, cos 1) in front for the prefix tokens, travels in ``TokenState.rope``,
and every token carries its original index in ``TokenState.positions`` (the mechanism the
``beit`` adapter uses for its relative position bias), gathered with the tokens by every
prune; each block rotates a token by the table row at its index (:func:`token_rope`), so a
kept token keeps the rotation of the patch it came from however the sequence is reordered.
The rules for tokens that stand for several patches (set by the methods, see
:class:`~leanvit.state.TokenState`):

- a **ToMe / DiffRate merged token takes its destination token's position**: the
  destination is the token that survives in place and that the merged sources were judged
  similar to; its row of the table is a true rotation, whereas an average of rotations is
  not one (its norm shrinks, which would scale that token's attention logits).
- **EViT's fused token gets no rotation** (index 0: the class token's identity): it is a
  class-attention-weighted sum of tokens scattered over the whole image, so no single patch
  position describes it, and any one position would bias its attention towards that
  location; unrotated, it interacts with every token by content alone, as the class and
  register tokens do.

ToMe's matching metric is the keys averaged over heads AFTER the rotation (what the
attention compares), so it prefers merging similar tokens that are also close in the image.

Block modules are not replaced or copied, so weights and their names are untouched; blocks in
which the method needs nothing run timm's own attention module (fused SDPA) with the tokens'
rotations, so keep-all settings are bit-identical to the unpatched model.

Not supported (clear ``ValueError``): post-norm blocks (``EvaBlockPostNorm``), per-block
"mixed" RoPE (``rope_type='mixed'``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanvit.adapters.base import patched_mixin
from leanvit.adapters.attention_pool import attention_pool_forward, attention_pool_macs
from leanvit.adapters.vit import check_input, token_weights  # noqa: F401 (the contract's)
from leanvit.ops.attention import attention
from leanvit.ops.tokens import gather_tokens
from leanvit.registry import ModelInfo, Reducer
from leanvit.signals import Signals
from leanvit.state import TokenState, attention_bias, record_departures

FAMILY = "eva"
KIND = "tokens"
DESCRIPTION = ("eva (timm Eva with rotary positions: eva02_*, vit_*_dinov3, vit_pe_core_*, "
               "EVA)")


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
    pool = model.global_pool if model.attn_pool is None else "map"
    cfg = getattr(model, "pretrained_cfg", None) or {}
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
        name=cfg.get("architecture", "") if hasattr(cfg, "get") else "",
        img_size=tuple(model.patch_embed.img_size)
        if getattr(model.patch_embed, "img_size", None) is not None else None,
    )


# --------------------------------------------------------------------------------------------
# Rotary positions


def rope_table(rope: Optional[Tensor], n_tokens: int, prefix: int) -> Optional[Tensor]:
    """The forward pass's rotary table by ORIGINAL token index, for ``TokenState.rope``.

    Args:
        rope: timm's table of the patch tokens from ``model._pos_embed``, ``[N0 - prefix, R]``
            (``R = 2 * head_dim``, ``sin | cos``), or ``[B, 1, N0 - prefix, R]`` after timm's
            patch dropout (training); ``None`` for models without rotary positions.
        n_tokens: ``N0``, tokens entering the first block (prefix included).
        prefix: the prefix tokens in front.

    Returns:
        ``[N0, R]`` (``[B, N0, R]`` after patch dropout): identity rows (sin 0, cos 1) for the
        prefix tokens, then timm's rows; ``None`` if ``rope`` is ``None``.
    """
    if rope is None:
        return None
    if rope.dim() == 4:
        rope = rope[:, 0]
    elif rope.dim() != 2:
        raise ValueError(f"unsupported rotary table of shape {tuple(rope.shape)}")
    if rope.shape[-2] != n_tokens - prefix:
        raise ValueError(f"rotary table has {rope.shape[-2]} rows for {n_tokens - prefix} "
                         "patch tokens")
    if prefix == 0:
        return rope
    width, half = rope.shape[-1], rope.shape[-1] // 2
    ident = torch.cat([rope.new_zeros(*rope.shape[:-2], prefix, half),
                       rope.new_ones(*rope.shape[:-2], prefix, width - half)], dim=-1)
    return torch.cat([ident, rope], dim=-2)


def token_rope(state: TokenState) -> Optional[Tensor]:
    """Each token's rotation ``sin | cos``: the table row at its original index
    (``state.positions``), ``[B, N, R]``; the table itself (``[N0, R]`` or ``[B, N0, R]``)
    while no token has moved; ``None`` without rotary positions."""
    table = state.rope
    if table is None or state.positions is None:
        return table
    if table.dim() == 2:
        return table[state.positions]
    return gather_tokens(table, state.positions)


def _module_rope(state: TokenState, prefix: int) -> Optional[Tensor]:
    """The tokens' rotations in the layout timm's attention modules take (rows of the
    non-prefix tokens): ``[N - prefix, R]`` (timm's own table while no token has moved, so the
    call is timm's, bit for bit) or ``[B, 1, N - prefix, R]`` (broadcast over heads)."""
    rope = token_rope(state)
    if rope is None:
        return None
    return rope[prefix:] if rope.dim() == 2 else rope[:, None, prefix:]


# --------------------------------------------------------------------------------------------
# Forward


def _qkv(attn: nn.Module, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v ``[B, H(kv), N, D]`` of ``EvaAttention`` / ``AttentionRope``, as timm computes
    them (same ops in the same order)."""
    B, N, _ = y.shape
    H = attn.num_heads
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
        qkv = qkv.reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
    else:
        Hkv = getattr(attn, "num_kv_heads", H)
        q = attn.q_proj(y).reshape(B, N, H, -1).transpose(1, 2)
        k = attn.k_proj(y).reshape(B, N, Hkv, -1).transpose(1, 2)
        v = attn.v_proj(y).reshape(B, N, Hkv, -1).transpose(1, 2)
    return q, k, v


def _attention(attn: nn.Module, i: int, y: Tensor, state: TokenState, reducer: Reducer
               ) -> tuple[Tensor, Optional[Signals], Optional[Tensor], TokenState]:
    """timm ``EvaAttention`` / ``AttentionRope`` forward on ``y`` ``[B, N, C]`` with each
    token's own rotation, exposing q/k/v (after norm and rotation) to the method.

    Returns (output ``[B, K, C]``, signals, selected query rows ``[B, K]`` or ``None``, state).
    """
    from timm.layers import apply_rot_embed_cat

    B, N, _ = y.shape
    gate = attn.gate(y).sigmoid() if attn.gate is not None else None
    q, k, v = _qkv(attn, y)
    q, k = attn.q_norm(q), attn.k_norm(k)
    rope = token_rope(state)
    if rope is not None:
        # every token at once: the prefix tokens' identity rows leave them exactly as they are
        # (q * 1 + rot(q) * 0), so timm's slice-rotate-concatenate copy is not needed
        rope = rope if rope.dim() == 2 else rope[:, None]
        half = getattr(attn, "rotate_half", False)
        q = apply_rot_embed_cat(q, rope, half=half).type_as(v)
        k = apply_rot_embed_cat(k, rope, half=half).type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:  # grouped-query attention: K/V heads expanded after norm and rotation
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    bias = attention_bias(state, q.dtype)
    signals = Signals(q, k, v, attn.scale, bias)

    rows = None
    if reducer.selects_queries(i):
        rows, state = reducer.select_queries(i, signals, state)
        if rows is not None:
            gate = None if gate is None else gather_tokens(gate, rows)
    # fused SDPA unless a training keep-mask needs the explicit fp32 form (or the module is
    # set to timm's explicit path): the one attention function, in timm's op order
    out = attention(q, k, v, attn.scale, bias=bias, keep=state.mask, rows=rows,
                    fused=attn.fused_attn, dropout=attn.attn_drop)
    out = out.transpose(1, 2).reshape(B, out.shape[2], attn.num_heads * attn.head_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj(out)
    out = attn.proj_drop(out)
    return out, signals, rows, state


def _linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates per token of every ``nn.Linear`` inside ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def block_macs(blk: nn.Module, n_kv: Tensor, n_q: Tensor, n_mlp: Tensor,
                signals: Optional[Signals]) -> dict[str, Tensor]:
    """Per-image MACs of one block from the token counts it saw (``[B]`` each).

    Attention: the input projections (q/k/v, fused or not, grouped-query K/V, the optional
    gate) on every token that enters, ``2 * n_q * n_kv * H * D`` for the scores and the
    weighted values, the output projection on the query rows. The rotation, norms and
    softmax are elementwise and not counted (the MAC convention of :mod:`leanvit.macs`).
    """
    attn = blk.attn
    into = _linear_macs(attn) - attn.proj.in_features * attn.proj.out_features
    scores = 2 * n_q * n_kv * attn.num_heads * attn.head_dim
    attention = n_kv * into + scores + n_q * attn.proj.in_features * attn.proj.out_features
    sig = float(signals.macs) if signals is not None else 0.0
    return dict(tokens_in=n_kv, tokens_out=n_mlp, attention=attention,
                mlp=n_mlp * _linear_macs(blk.mlp), signals=torch.full_like(n_kv, sig))


def block_forward(blk: nn.Module, i: int, x: Tensor, state: TokenState, reducer: Reducer
                  ) -> tuple[Tensor, TokenState]:
    """timm ``EvaBlock.forward`` with the method's hooks; ``x`` ``[B, N, C]`` -> ``[B, N', C]``."""
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
    else:  # nothing to expose or bias: timm's module itself, with the tokens' rotations
        a = blk.attn(y, rope=_module_rope(state, blk.attn.num_prefix_tokens))
    del y
    if blk.gamma_1 is not None:
        a = blk.gamma_1 * a
    x = x + blk.drop_path1(a)
    del a
    n_q = state.token_counts(x) if counting else None
    if reducer.acts_after(i):
        before = state
        x_in, (x, state) = x, reducer.after_attention(i, x, signals, state)
        state = record_departures(x_in, before, state)
    m = blk.mlp(blk.norm2(x))
    if blk.gamma_2 is not None:
        m = blk.gamma_2 * m
    x = x + blk.drop_path2(m)
    if counting:
        state.recorder.record_block(i, **block_macs(blk, n_kv, n_q, state.token_counts(x),
                                                     signals))
    return x, state


def _embed(model: nn.Module, x: Tensor, recorder=None) -> tuple[Tensor, TokenState]:
    """Patch embedding, positions, pre-norm: tokens ``[B, N0, C]`` and a fresh state holding
    each token's rotation (no method hook yet)."""
    check_input(model, x)
    x = model.patch_embed(x)
    if recorder is not None:
        proj = getattr(model.patch_embed, "proj", None)
        patches = x.shape[1] * x.shape[2] if x.dim() == 4 else x.shape[1]  # NHWC or NLC
        recorder.record_stem(proj.weight.numel() * patches if isinstance(proj, nn.Conv2d) else 0)
    x, rope = model._pos_embed(x)
    x = model.norm_pre(x)
    prefix = model.num_prefix_tokens
    state = TokenState(prefix=prefix, n0=x.shape[1], recorder=recorder,
                       rope=rope_table(rope, x.shape[1], prefix))
    return x, state


def forward_features(model: nn.Module, x: Tensor, recorder=None, trace_source: bool = False,
                     on_block: Optional[Callable[[int, Tensor, TokenState], None]] = None,
                     trace_where: bool = False) -> tuple[Tensor, TokenState]:
    """Embeddings, blocks with the method's hooks, final norm: ``[B, N', C]`` and its state.

    Arguments as :func:`leanvit.adapters.vit.forward_features` (``recorder`` counts MACs,
    ``trace_source`` starts ``state.source`` as the identity, ``on_block(i, x, state)`` is
    called after each block).
    """
    reducer: Reducer = model.leanvit
    x, state = _embed(model, x, recorder)
    if trace_source:
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        state = state.replace(source=eye.repeat(x.shape[0], 1, 1))
    if trace_where:  # dense features (leanvit.dense_features)
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
    part of :func:`forward_features`, for callers that cache frozen blocks)."""
    x, state = _embed(model, x)
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


# --------------------------------------------------------------------------------------------
# Head


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
    (training keep-mask) tokens left out: ``x`` ``[B, N, C]`` -> ``[B, C]``.

    ``map`` (attention pool, :mod:`leanvit.adapters.attention_pool`): the pool's keys get
    :func:`pool_bias`. ``avg`` / ``avgmax`` /
    ``max``: the patch tokens weighted by size (max over real tokens). ``token``: the class
    token, as timm.
    """
    if model.attn_pool is not None:
        return attention_pool_forward(model.attn_pool, x, pool_bias(state, x))
    if model.global_pool not in ("avg", "avgmax", "max") or (
            state.size is None and state.valid is None and state.mask is None):
        return model.pool(x)
    start = model.num_prefix_tokens
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
    """Pooling (size-aware) and classifier, as timm's ``Eva.forward_head``."""
    if recorder is not None:
        head = 0 if pre_logits or not isinstance(model.head, nn.Linear) else \
            _linear_macs(model.head)
        if model.attn_pool is not None:  # timm's Eva pools over all tokens, prefix included
            head = head + float(attention_pool_macs(model.attn_pool, state.token_counts(x)).mean())
        recorder.record_head(head)
    own = type(model).forward_head is not _eva_forward_head()
    if own or (state.size is None and state.valid is None and state.mask is None):
        return model.forward_head(x, pre_logits=pre_logits)
    x = pool(model, x, state)
    x = model.fc_norm(x)
    x = model.head_drop(x)
    return x if pre_logits else model.head(x)


def _eva_forward_head():
    from timm.models.eva import Eva

    return Eva.forward_head


PATCHED = patched_mixin('_PatchedEva', forward_features, forward_head, takes_attn_mask=True)
