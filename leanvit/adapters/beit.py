"""Adapter for timm's ``Beit`` family (BEiT, BEiT v2: ``beit_*``, ``beitv2_*``) as in timm >= 1.0.

The only place that knows timm's Beit module names. Patching swaps the model's class for a
subclass whose ``forward`` runs each block's own submodules (``norm1``, ``attn``, ``gamma_1``,
``drop_path1``, ``norm2``, ``mlp``, ``gamma_2``, ``drop_path2``) with the method's hooks, as
the vit adapter does:

    before_block(i)                                   # DynamicViT predicts here
    x = x + gamma_1 * attn(norm1(x), rel_bias)         # select_queries(i) inside (ATS)
    after_attention(i)                                # EViT, ToMe, DiffRate, top-k
    x = x + gamma_2 * mlp(norm2(x))

Relative position bias. Each block's attention adds ``table[index[p, q]]`` (timm's
``relative_position_bias_table`` looked up by ``relative_position_index``, plus the model's
shared ``rel_pos_bias`` where it has one) for query position ``p`` and key position ``q``. The
bias follows the tokens: :attr:`~leanvit.state.TokenState.positions` holds each token's
original index, and the bias of the tokens present is the original bias's rows and columns at
those indices (``[B, H, N, N]``). A token a method merges (ToMe, DiffRate) keeps its
destination token's position, so its rows and columns are the destination's: it sits where
the token it was merged into sits. EViT's fused token takes index 0, the class token's
position: its bias is the learned class<->patch entries, the same for every patch, since a
token fused from all over the image has no one position (``docs/beit.md``).

While no token has moved (``positions`` is ``None``) and nothing needs exposing, the block's
own ``attn`` module runs with timm's own bias, so keep-all settings are bit-identical.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanvit.adapters.base import patched_mixin
from leanvit.adapters.vit import check_input, loss_tokens, token_weights
from leanvit.ops.attention import attention
from leanvit.ops.tokens import gather_tokens
from leanvit.registry import ModelInfo, Reducer
from leanvit.signals import Signals
from leanvit.state import TokenState, attention_bias, record_departures

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
    pe = model.patch_embed
    return ModelInfo(
        family=FAMILY,
        kind=KIND,
        depth=len(model.blocks),
        embed_dim=model.embed_dim,
        num_heads=model.blocks[0].attn.num_heads,
        num_prefix_tokens=model.num_prefix_tokens,
        has_class_token=True,
        num_patches=pe.num_patches,
        global_pool=model.global_pool,
        name=getattr(getattr(model, "pretrained_cfg", None) or {}, "get", lambda *_: "")(
            "architecture", ""),
        img_size=tuple(pe.img_size) if getattr(pe, "img_size", None) is not None else None,
    )


# --------------------------------------------------------------------------------------------
# Relative position bias


def _shared_bias(model: nn.Module) -> Optional[Tensor]:
    """The model's shared relative position bias ``[H, N0, N0]`` (timm computes it once per
    forward), or ``None``."""
    return model.rel_pos_bias() if model.rel_pos_bias is not None else None


def _pair_index(positions: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column indices ``[B, N, 1]``, ``[B, 1, N]`` of the tokens' original positions."""
    return positions[:, :, None], positions[:, None, :]


def _block_bias(attn: nn.Module, shared: Optional[Tensor], positions: Optional[Tensor]
                ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The block's relative position bias for the tokens present, as ``(own, shared)``.

    ``own``: the block's table looked up at the tokens' positions, ``[1, H, N0, N0]`` (timm's
    ``_get_rel_pos_bias``, while ``positions`` is ``None``) or ``[B, H, N, N]``; ``shared``:
    the model's shared bias at the same rows and columns (``[H, N0, N0]`` as timm passes it,
    or ``[B, H, N, N]``). Either is ``None`` when absent. Kept
    apart because timm adds them to the logits in different orders on its two paths.
    """
    own = None
    if attn.relative_position_bias_table is not None:
        if positions is None:
            own = attn._get_rel_pos_bias()
        else:
            rows, cols = _pair_index(positions)
            index = attn.relative_position_index[rows, cols]  # [B, N, N]
            own = attn.relative_position_bias_table[index].permute(0, 3, 1, 2)
    if shared is not None and positions is not None:  # else timm's own [H, N0, N0]
        rows, cols = _pair_index(positions)
        shared = shared[:, rows, cols].transpose(0, 1)  # [H, B, N, N] -> [B, H, N, N]
    return own, shared


def _select_rows(bias: Optional[Tensor], rows: Tensor) -> Optional[Tensor]:
    """The query rows ``rows`` ``[B, K]`` of a bias ``[1|B, H|1, N, N]`` or ``[H, N, N]``
    (-> ``[B, *, K, N]``)."""
    if bias is None or bias.shape[-2] == 1:
        return bias
    b = (bias if bias.dim() == 4 else bias[None]).expand(rows.shape[0], -1, -1, -1)
    return b.gather(2, rows[:, None, :, None].expand(-1, b.shape[1], -1, b.shape[3]))


# --------------------------------------------------------------------------------------------
# Forward


def _qkv(attn: nn.Module, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
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
    qkv = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def _attention(attn: nn.Module, i: int, y: Tensor, shared: Optional[Tensor], state: TokenState,
               reducer: Reducer) -> tuple[Tensor, Optional[Signals], Optional[Tensor],
                                          TokenState]:
    """timm's Beit ``Attention.forward`` on ``y`` ``[B, N, C]`` with the bias following the
    tokens, exposing q/k/v to the method. Returns (output ``[B, K, C]``, signals, selected
    query rows ``[B, K]`` or ``None``, state)."""
    B, N, _ = y.shape
    q, k, v = _qkv(attn, y)
    own, shared = _block_bias(attn, shared, state.positions)
    extra = attention_bias(state, q.dtype)  # [B, 1, 1, N]: log(size), -inf padding
    # the class token's row of everything added to the logits, for the methods' signals
    row = [b[..., :1, :] for b in (own, shared) if b is not None] + (
        [extra] if extra is not None else [])
    cls_bias = None
    for b in row:
        cls_bias = b if cls_bias is None else cls_bias + b
    signals = Signals(q, k, v, attn.scale, cls_bias)

    rows = None
    if reducer.selects_queries(i):
        rows, state = reducer.select_queries(i, signals, state)
        if rows is not None:
            q = q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
            own, shared = _select_rows(own, rows), _select_rows(shared, rows)

    if state.mask is not None and rows is not None:
        raise ValueError("query selection and a training keep-mask cannot be combined")
    # timm's explicit order of additions (relative bias, shared bias, then log(size)/padding)
    # on the explicit and masked paths; summed in that order into one mask when fused
    out = attention(q, k, v, attn.scale, bias=(own, shared, extra), keep=state.mask,
                    fused=attn.fused_attn, dropout=attn.attn_drop)
    out = out.transpose(1, 2).reshape(B, q.shape[2], -1)
    out = attn.proj(out)
    out = attn.proj_drop(out)
    return out, signals, rows, state


def _linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates per token of every ``nn.Linear`` inside ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def block_macs(blk: nn.Module, n_kv: Tensor, n_q: Tensor, n_mlp: Tensor,
                signals: Optional[Signals]) -> dict[str, Tensor]:
    """Per-image MACs of one block from the token counts it saw (``[B]`` each). The bias
    lookup is indexing, not arithmetic: 0 MACs (as timm's own forward)."""
    attn = blk.attn
    width = attn.qkv.out_features // 3  # heads x head dim
    attention = (n_kv * attn.qkv.in_features * attn.qkv.out_features  # q, k, v
                 + 2 * n_q * n_kv * width                               # q k^T, attn @ v
                 + n_q * attn.proj.in_features * attn.proj.out_features)
    sig = float(signals.macs) if signals is not None else 0.0
    return dict(tokens_in=n_kv, tokens_out=n_mlp, attention=attention,
                mlp=n_mlp * _linear_macs(blk.mlp), signals=torch.full_like(n_kv, sig))


def _scale(gamma: Optional[Tensor], a: Tensor) -> Tensor:
    """LayerScale as timm writes it (``gamma * a``) or nothing."""
    return a if gamma is None else gamma * a


def block_forward(blk: nn.Module, i: int, x: Tensor, state: TokenState, reducer: Reducer,
                  shared: Optional[Tensor] = None) -> tuple[Tensor, TokenState]:
    """timm Beit ``Block.forward`` with the method's hooks; ``x`` ``[B, N, C]`` ->
    ``[B, N', C]``; ``shared`` the model's shared relative bias ``[H, N0, N0]`` or ``None``."""
    if reducer.acts_before(i):
        before = state
        x_in, (x, state) = x, reducer.before_block(i, x, state)
        state = record_departures(x_in, before, state)  # no-op unless dense features traced
    if state.positions is None and x.shape[1] != state.n0:
        raise RuntimeError(f"block {i} got {x.shape[1]} tokens of {state.n0} without their "
                           "positions; a method changed the tokens without state.positions")
    counting = state.recorder is not None
    n_kv = state.token_counts(x) if counting else None
    rows, signals = None, None
    y = blk.norm1(x)
    if reducer.needs_signals(i) or state.positions is not None or state.valid is not None \
            or state.mask is not None or (state.prop_attn and state.size is not None):
        before = state
        a, signals, rows, state = _attention(blk.attn, i, y, shared, state, reducer)
        if rows is not None:
            state = record_departures(x, before, state)
            x = gather_tokens(x, rows)
    else:
        a = blk.attn(y, shared_rel_pos_bias=shared)  # nothing moved: the module itself
    del y
    x = x + blk.drop_path1(_scale(blk.gamma_1, a))
    del a
    n_q = state.token_counts(x) if counting else None
    if reducer.acts_after(i):
        before = state
        x_in, (x, state) = x, reducer.after_attention(i, x, signals, state)
        state = record_departures(x_in, before, state)
    x = x + blk.drop_path2(_scale(blk.gamma_2, blk.mlp(blk.norm2(x))))
    if counting:
        state.recorder.record_block(i, **block_macs(blk, n_kv, n_q, state.token_counts(x),
                                                     signals))
    return x, state


def _embed(model: nn.Module, x: Tensor) -> Tensor:
    """Patch embedding, class token, absolute positions (if any), dropout: ``[B, N0, C]``."""
    x = model.patch_embed(x)
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    return model.pos_drop(x)


def forward_features(model: nn.Module, x: Tensor, recorder=None, trace_source: bool = False,
                     on_block: Optional[Callable[[int, Tensor, TokenState], None]] = None,
                     trace_where: bool = False) -> tuple[Tensor, TokenState]:
    """Embeddings, blocks with the method's hooks, final norm: ``[B, N', C]`` and its state
    (arguments as :func:`leanvit.adapters.vit.forward_features`)."""
    check_input(model, x)
    reducer: Reducer = model.leanvit
    if recorder is not None:
        recorder.record_stem(model.patch_embed.proj.weight.numel() * model.patch_embed.num_patches)
    x = _embed(model, x)
    state = TokenState(prefix=model.num_prefix_tokens, n0=x.shape[1], recorder=recorder)
    if trace_source:
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        state = state.replace(source=eye.repeat(x.shape[0], 1, 1))
    if trace_where:  # dense features (leanvit.dense_features)
        state = state.replace(where=torch.arange(x.shape[1], device=x.device).repeat(
            x.shape[0], 1))
    state = reducer.init_state(state, x)
    shared = _shared_bias(model)
    for i, blk in enumerate(model.blocks):
        x, state = block_forward(blk, i, x, state, reducer, shared)
        if on_block is not None:
            on_block(i, x, state)
    return model.norm(x), state


def embed(model: nn.Module, x: Tensor) -> tuple[Tensor, TokenState]:
    """Tokens entering block 0, ``[B, N0, C]``, and the method's initial state."""
    check_input(model, x)
    x = _embed(model, x)
    state = TokenState(prefix=model.num_prefix_tokens, n0=x.shape[1])
    return x, model.leanvit.init_state(state, x)


def run_blocks(model: nn.Module, x: Tensor, state: TokenState, start: int = 0,
               stop: Optional[int] = None) -> tuple[Tensor, TokenState]:
    """Blocks ``start .. stop - 1`` with the method's hooks; with ``stop=None`` also the final
    norm, so ``run_blocks(model, *embed(model, images))`` equals :func:`forward_features`."""
    end = len(model.blocks) if stop is None else stop
    shared = _shared_bias(model)
    for i in range(start, end):
        x, state = block_forward(model.blocks[i], i, x, state, model.leanvit, shared)
    if stop is None:
        x = model.norm(x)
    return x, state


def pool(model: nn.Module, x: Tensor, state: TokenState) -> Tensor:
    """timm Beit's pooling with merged tokens weighted by size and padding / masked-out tokens
    left out: ``avg`` over the patch tokens, ``token`` the class token, ``''`` none."""
    if model.global_pool == "token":
        return x[:, 0]
    if model.global_pool != "avg":
        return x
    if state.size is None and state.valid is None and state.mask is None:
        return x[:, model.num_prefix_tokens:].mean(dim=1)
    p = model.num_prefix_tokens
    w = token_weights(state, x)[:, p:]
    return (x[:, p:] * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)


def forward_head(model: nn.Module, x: Tensor, state: TokenState, pre_logits: bool = False,
                 recorder=None) -> Tensor:
    """Pooling (size-aware), ``fc_norm`` and classifier, as timm's Beit ``forward_head``."""
    if recorder is not None:
        head = _linear_macs(model.head) if isinstance(model.head, nn.Linear) else 0
        recorder.record_head(0 if pre_logits else head)
    if state.size is None and state.valid is None and state.mask is None:
        return model.forward_head(x, pre_logits=pre_logits)
    x = pool(model, x, state)
    x = model.fc_norm(x)
    x = model.head_drop(x)
    return x if pre_logits else model.head(x)


PATCHED = patched_mixin('_PatchedBeit', forward_features, forward_head)
