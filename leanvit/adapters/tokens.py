"""The token engine: what every flat-token family runs, driven by a small per-family spec.

A ``"tokens"`` family (:mod:`leanvit.adapters.base`) is a :class:`TokenSpec` subclass in its
adapter file plus one line that builds its :class:`TokenEngine` and exports the engine's
functions as the file's contract functions::

    ENGINE = TokenEngine(ViTSpec())
    forward_features, forward_head, embed, run_blocks, block_macs, PATCHED = ENGINE.exports()

The engine owns the block loop with the three :class:`~leanvit.registry.Reducer` hooks, the
:class:`~leanvit.state.TokenState` fields (``size`` with ``prop_attn`` -> ``log(size)`` key bias,
``valid`` -> ``-inf`` key bias, ``mask`` -> the fp32 masked softmax, ``source``, ``where``), the
choice between the attention module itself and the exposed attention (q/k/v computed here,
through :func:`leanvit.ops.attention.attention`: fused SDPA, or explicit where a map or mask is
needed), ``run_blocks`` / ``forward_features``, pooling weights (:func:`token_weights`,
:func:`pool_tokens`), ``loss_tokens`` and the MAC records. Each block runs as::

    before_block(i)                              # DynamicViT predicts here
    x = x + post1(attn(norm1(x)))                # select_queries(i) inside (ATS)
    after_attention(i)                           # EViT, ToMe, top-k, DiffRate
    x = x + post2(mlp(norm2(x)))

The attention is the module itself (``spec.plain_attention``, bit for bit the unpatched
model) unless the reducer needs signals in block ``i``, or a state field biases or masks
keys, or (relative position bias) tokens have moved; then it is exposed::

    q, k, v, gate = spec.qkv(attn, y)            # [B, H, N, D]; K/V may have fewer heads
    q, k, biases = position rule (below)         # then K/V heads repeated to H (grouped query)
    out = attention(q, k, v, scale, bias=(*biases, log(size) / -inf padding), keep=mask)
    a = spec.output(attn, out, gate)             # [B, H, K, D] -> [B, K, C]: norm, gate, proj

The spec contract (override what differs from the defaults; every method is bound once, when
the engine is built, so the per-block path reads plain attributes):

- model: ``check_input(model, images)``; ``embed(model, images) -> Embedding(tokens [B, N0,
  C], stem_macs, state_fields)`` (patch embedding, prefix tokens, absolute positions: all
  that comes before block 0; ``state_fields`` e.g. ``rope`` for :class:`Rotary`);
  ``blocks(model)``; ``prefix(model)`` (class/distillation/register tokens in front, never
  reduced); ``final_norm(model)`` (``None``: none); ``context(model)``: one value per forward
  pass given to the position rule and ``plain_attention`` (BEiT's shared relative bias).
- block: ``parts(block) -> BlockParts(block, norm1, attn, post1, norm2, mlp, post2)``:
  callables (``post*``: layer scale and drop path, ``None`` when both are identities, see
  :func:`residual`); ``mlp_macs(block)`` per token.
- attention module: ``qkv(attn, y)`` (after q/k norm, before positions); ``output(attn, out,
  gate)``; ``params(attn) -> (scale, fused, dropout)`` (timm: ``attn.scale``,
  ``attn.fused_attn``, ``attn.attn_drop``); ``plain_attention(attn, y, state, ctx)`` (timm ViT:
  ``attn(y)``); ``attention_macs(attn, n_kv, n_q)`` (default: every ``nn.Linear`` of the
  module on the keys, ``out_proj(attn)`` on the query rows, ``2 n_q n_kv width``).
  A module whose class has ``leanvit_forward`` / ``leanvit_macs`` runs and counts itself
  (:func:`contract_attention`; leanvit.compact's hMHSA).
- ``position``: :data:`ABSOLUTE` (added at embedding: nothing in the blocks), :class:`Rotary`
  (each kept token's q/k rotated by the table row at its original index), or
  :class:`RelativeBias` (the bias rows and columns of the kept tokens' original indices).
- head: ``plain_head(model, x, pre_logits)`` (no token merged, padded or masked: the model's
  own head), ``head(model, x, state, pre_logits)`` (size-weighted pooling, classifier),
  ``head_macs(model, x, state, pre_logits)``; ``patched_mixin(name, forward_features,
  forward_head)`` the class put in front of the model's (default
  :func:`leanvit.adapters.base.patched_mixin`; a family whose forward returns output objects
  builds them there).

How other encoders map onto it: Hugging Face ``ViTLayer`` (``layernorm_before``; ``attention``
with ``query`` / ``key`` / ``value`` and ``output.dense`` as ``out_proj``; ``layernorm_after``;
``mlp`` = ``output.dense(intermediate(.))``; no layer scale), ``Dinov2Layer`` (``layer_scale1``
-> ``post1``), CLIP (``pre_layrnorm`` inside ``embed``; ``final_norm`` ``None``, its
``post_layernorm`` belongs to the head), SigLIP (``prefix`` 0, attention-pool head in
``head``); open_clip's ``VisionTransformer`` (``ln_pre`` inside ``embed``; ``qkv`` from
``nn.MultiheadAttention.in_proj_weight``, ``out_proj``; ``plain_attention`` the module called
with ``need_weights=False``). ``params``' dropout is the module's ``nn.Dropout`` or a
probability that is already 0 outside training.

Per-image token counts (``state.valid``, ATS) run packed (:class:`PackedRunner`, option
``packed`` of the method: ``"auto"`` | ``True`` | ``False``): the batch's real tokens end to
end, ``[1, T, C]``, through norms, linear layers and MLP, the attention on q/k/v padded back
to ``[B, H, N, D]``. Under ``"auto"`` a block that selects query rows packs, a batch that
arrives padded packs from :data:`PACK_MIN_PADDING` padding on, and equal counts run the
padded blocks; training, tracing, relative position biases and hooks that see the tokens
keep the padded blocks.

Shapes: ``B`` batch, ``N`` tokens present (prefix included), ``N0`` tokens entering block 0,
``C`` width, ``H`` heads, ``D`` head width, ``K`` query rows computed.
"""
from __future__ import annotations

from itertools import islice
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from leanvit.adapters.base import patched_mixin
from leanvit.ops.attention import (attention, image_bias, image_groups, map_attention,
                                   received_attention, select_rows)
from leanvit.ops.packed import (
    Packing, check_packed, moved_rows, pack, packing, pad_fraction, pad_heads, unpack,
)
from leanvit.ops.tokens import gather_tokens
from leanvit.recorder import MacRecorder
from leanvit.registry import Reducer
from leanvit.signals import Signals
from leanvit.state import TokenState, attention_bias, record_departures

OnBlock = Optional[Callable[[int, Tensor, TokenState], None]]


class Embedding(NamedTuple):
    """What a spec's ``embed`` returns: tokens entering block 0 ``[B, N0, C]``, the patch
    embedding's MACs per image, and extra :class:`TokenState` fields (e.g. ``rope``)."""

    tokens: Tensor
    stem_macs: int
    state_fields: dict


class BlockParts(NamedTuple):
    """One block's callables, in the order they run (see the module docstring)."""

    block: nn.Module
    norm1: Callable[[Tensor], Tensor]
    attn: nn.Module
    post1: Optional[Callable[[Tensor], Tensor]]
    norm2: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]
    post2: Optional[Callable[[Tensor], Tensor]]


def residual(scale: Any, drop_path: Optional[nn.Module]) -> Optional[Callable[[Tensor], Tensor]]:
    """``a -> drop_path(scale(a))`` for a residual branch, skipping identities (``None`` when
    both are): ``scale`` a module (timm ``LayerScale``), a tensor (``gamma * a``, as timm's
    Eva and Beit write it) or ``None``/``nn.Identity``; ``drop_path`` a module or ``None``."""
    if isinstance(scale, Tensor):
        gamma = scale
        scale = lambda a: gamma * a  # noqa: E731
    elif scale is None or isinstance(scale, nn.Identity):
        scale = None
    if drop_path is None or isinstance(drop_path, nn.Identity):
        return scale
    if scale is None:
        return drop_path
    return lambda a: drop_path(scale(a))


def linear_macs(module: Optional[nn.Module]) -> int:
    """Multiply-accumulates per token of every ``nn.Linear`` inside ``module`` (0 for None)."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def linear_of(module: Optional[nn.Module]) -> int:
    """MACs per row of ``module`` when it is an ``nn.Linear`` (a classifier), else 0."""
    return module.in_features * module.out_features if isinstance(module, nn.Linear) else 0


# --------------------------------------------------------------------------------------------
# Position rules


class Absolute:
    """Positions added to the tokens at embedding: nothing to do in the blocks."""

    moved_tokens_need_exposing = False


ABSOLUTE = Absolute()


def rope_table(rope: Optional[Tensor], n_tokens: int, prefix: int) -> Optional[Tensor]:
    """The forward pass's rotary table by ORIGINAL token index, for ``TokenState.rope``.

    Args:
        rope: the table of the patch tokens, ``[N0 - prefix, R]`` (timm ``Eva._pos_embed``:
            ``R = 2 * head_dim``, ``sin | cos``), or ``[B, 1, N0 - prefix, R]`` after timm's
            patch dropout (training); ``None`` for models without rotary positions.
        n_tokens: ``N0``, tokens entering the first block (prefix included).
        prefix: the prefix tokens in front.

    Returns:
        ``[N0, R]`` (``[B, N0, R]`` after patch dropout): identity rows (sin 0, cos 1) for the
        prefix tokens, then the given rows; ``None`` if ``rope`` is ``None``.
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


class Rotary:
    """Rotary positions: each token's q and k rotated by the row of ``state.rope`` at its
    original index (``state.positions``), so a kept token keeps the rotation of the patch it
    came from however the sequence is reordered; a merged token takes its destination's
    (a true rotation, whereas an average of rotations is not one), EViT's fused token the
    class token's identity row (no single patch describes it). The prefix tokens' identity
    rows leave them as they are, so all tokens are rotated at once.

    Args:
        rotate: ``(attn, t [B, H, N, D], rope [N, R] | [B, 1, N, R]) -> t`` rotated (timm:
            ``apply_rot_embed_cat`` with the module's ``rotate_half`` layout).
    """

    moved_tokens_need_exposing = False

    def __init__(self, rotate: Callable[[nn.Module, Tensor, Tensor], Tensor]):
        self.rotate = rotate

    def apply(self, attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, state: TokenState,
              ctx: Any) -> tuple[Tensor, Tensor, tuple]:
        rope = token_rope(state)
        if rope is None:
            return q, k, ()
        rope = rope if rope.dim() == 2 else rope[:, None]
        return (self.rotate(attn, q, rope).type_as(v), self.rotate(attn, k, rope).type_as(v), ())


class RelativeBias:
    """A relative position bias added to the logits: the bias of the tokens present is the
    original bias's rows and columns at their original indices (``state.positions``); a
    merged token sits where its destination sits, EViT's fused token at index 0 (the class
    token's). Once tokens have moved, the module itself cannot run (it would add the full
    bias), so the attention is exposed, and the bias, now one per image, is looked up a group
    of images at a time (:class:`ImageBias`).

    Args:
        lookup: ``(attn, ctx, positions [b, N] | None, queries [b, K] | None) -> tuple of
            biases`` broadcastable to ``[b, H, K, N]`` (``None`` entries allowed), added to
            the logits in that order: the bias of query rows at original indices ``queries``
            (``None``: ``positions``) over keys at ``positions``; ``positions`` ``None``: the
            module's own bias, nothing moved.
    """

    moved_tokens_need_exposing = True

    def __init__(self, lookup: Callable[..., tuple]):
        self.lookup = lookup

    def apply(self, attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, state: TokenState,
              ctx: Any) -> tuple[Tensor, Tensor, Any]:
        if state.positions is None:
            return q, k, self.lookup(attn, ctx, None, None)
        return q, k, ImageBias(self.lookup, attn, ctx, state.positions)


class LazyBias:
    """Attention biases looked up on demand for a group of images, so that the batch's
    ``[B, H, K, N]`` bias is never held whole: ``bias(images)`` -> the tuple of biases of those
    images (a slice of the batch; all of them by default), ``class_row()`` -> those of the
    first query row (the class token's), ``select(rows)`` keeps the query rows ``rows``
    ``[B, K]``. :func:`attend` and :func:`_chunk_biases` take one in place of a tuple."""

    def __call__(self, images: slice = slice(None)) -> tuple:
        raise NotImplementedError

    def class_row(self) -> tuple:
        raise NotImplementedError

    def select(self, rows: Tensor) -> None:
        raise NotImplementedError


class ImageBias(LazyBias):
    """A bias per query row that differs per image (a relative position bias once tokens have
    moved), looked up on demand for a group of images, so that the batch's ``[B, H, K, N]``
    bias is never held whole.

    Args:
        lookup: :class:`RelativeBias`'s ``lookup``.
        positions: ``[B, N]`` original index of each token (keys and, until :meth:`select`,
            queries).
    """

    def __init__(self, lookup: Callable[..., tuple], attn: nn.Module, ctx: Any,
                 positions: Tensor):
        self.lookup, self.attn, self.ctx = lookup, attn, ctx
        self.positions = self.queries = positions

    def select(self, rows: Tensor) -> None:
        """Keep the query rows ``rows`` ``[B, K]`` (query selection)."""
        self.queries = self.queries.gather(1, rows)

    def class_row(self) -> tuple:
        """The biases of the first query row (the class token's), ``[B, H, 1, N]`` each."""
        return self.lookup(self.attn, self.ctx, self.positions, self.queries[:, :1])

    def __call__(self, images: slice = slice(None)) -> tuple:
        """The biases of the images ``images``, ``[b, H, K, N]`` each."""
        return self.lookup(self.attn, self.ctx, self.positions[images], self.queries[images])


class SelectedRowsBias(LazyBias):
    """The query rows ``rows`` ``[B, K]`` (a query selection) of biases that are the same for
    every image (``[1|H, N, N]``, or ``[H, N, N]`` as timm passes BEiT's), gathered for a group
    of images at a time: gathered for the whole batch, the rows are a ``[B, H, K, N]`` tensor
    as large as the attention map."""

    def __init__(self, biases: tuple, rows: Tensor):
        self.biases, self.rows = biases, rows

    def select(self, rows: Tensor) -> None:
        self.rows = self.rows.gather(1, rows)

    def class_row(self) -> tuple:
        return tuple(_bias_rows(b, self.rows[:, :1]) for b in self.biases)

    def __call__(self, images: slice = slice(None)) -> tuple:
        return tuple(_bias_rows(image_bias(b, images), self.rows[images])
                     for b in self.biases)


def mlp_half(p: BlockParts, x: Tensor) -> Tensor:
    """A block's second residual, ``x + post2(mlp(norm2(x)))`` (``post2``: layer scale or
    none), ``x`` ``[B, N, C]`` or packed ``[1, T, C]``; the MLP's output is freed on return."""
    m = p.mlp(p.norm2(x))
    return x + (m if p.post2 is None else p.post2(m))


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, biases: Any, extra: Optional[Tensor],
           keep: Optional[Tensor] = None, **kw: Any) -> Any:
    """:func:`leanvit.ops.attention.attention` with ``biases`` then ``extra`` added to the
    logits; ``biases`` a tuple of tensors or a :class:`LazyBias`.

    A :class:`LazyBias`, and the explicit form (a map returned, a keep-mask, or the module
    set to the explicit path), run for as many images at a time as fit
    :data:`leanvit.ops.attention.MAP_CHUNK_BYTES`
    (each image's result does not depend on the others; outputs, and maps with
    ``return_weights``, written into one tensor each), except under ``torch.compile``, which
    plans its own buffers. ``q`` ``[B, H, K, D]``, ``k``/``v`` ``[B, H, N, D]``, ``extra``
    ``[B|1, 1, 1, N]`` or ``None``, ``keep`` ``[B, N]`` or ``None``; ``kw``: ``attention``'s
    options."""
    per_image = isinstance(biases, LazyBias)
    B, H, K, N = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    groups = image_groups(B, H * K * N * q.element_size())
    explicit = kw.get("return_weights") or not kw.get("fused", True) or keep is not None
    if len(groups) == 1 or not (per_image or explicit):
        biases = biases() if per_image else biases
        return attention(q, k, v, scale, bias=(*biases, extra) if biases else extra,
                         keep=keep, **kw)
    results = None
    for part in groups:
        bias = biases(part) if per_image else tuple(image_bias(b, part) for b in biases)
        res = attention(q[part], k[part], v[part], scale,
                        bias=(*bias, image_bias(extra, part)),
                        keep=None if keep is None else keep[part], **kw)
        res = res if isinstance(res, tuple) else (res,)
        if results is None:
            results = [r.new_empty((B,) + r.shape[1:]) for r in res]
        for whole, r in zip(results, res):
            whole[part] = r
        del res, bias
    return results[0] if len(results) == 1 else tuple(results)


def _chunk_biases(biases: Any, extra: Optional[Tensor]) -> Callable[[slice], tuple]:
    """``images -> (*biases, extra)`` of those images, for
    :func:`leanvit.ops.attention.map_attention`; a :class:`LazyBias` is looked up for the
    chunk only."""
    def chunk(images: slice) -> tuple:
        own = biases(images) if isinstance(biases, LazyBias) else tuple(
            image_bias(b, images) for b in biases)
        return (*own, image_bias(extra, images))
    return chunk


def _bias_rows(bias: Optional[Tensor], rows: Tensor) -> Optional[Tensor]:
    """The query rows ``rows`` ``[B, K]`` of a bias ``[1|B, H|1, N, N]`` or ``[H, N, N]``
    (-> ``[B, *, K, N]``); per-key biases (one row) as they are."""
    if bias is None or bias.shape[-2] == 1:
        return bias
    b = (bias if bias.dim() == 4 else bias[None]).expand(rows.shape[0], -1, -1, -1)
    return b.gather(2, rows[:, None, :, None].expand(-1, b.shape[1], -1, b.shape[3]))


# --------------------------------------------------------------------------------------------
# The spec


class TokenSpec:
    """A flat-token family's spec; the defaults follow timm's ``VisionTransformer`` naming
    (``model.blocks``, ``model.norm``, ``model.num_prefix_tokens``, ``attn.scale`` ...).
    The contract is in the module docstring."""

    #: the patched class keeps timm's ``attn_mask`` / ``is_causal`` arguments (refused)
    takes_attn_mask = False
    position: Any = ABSOLUTE

    def check_input(self, model: nn.Module, images: Any) -> None:
        raise NotImplementedError

    def embed(self, model: nn.Module, images: Tensor) -> Embedding:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.blocks

    def prefix(self, model: nn.Module) -> int:
        return model.num_prefix_tokens

    def final_norm(self, model: nn.Module) -> Optional[Callable[[Tensor], Tensor]]:
        return model.norm

    context = None  # or a method: model -> one value per forward pass

    def parts(self, blk: nn.Module) -> BlockParts:
        raise NotImplementedError

    def qkv(self, attn: nn.Module, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        raise NotImplementedError

    def output(self, attn: nn.Module, out: Tensor, gate: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def params(self, attn: nn.Module) -> tuple[float, bool, Any]:
        return attn.scale, attn.fused_attn, attn.attn_drop

    plain_attention = None  # or a method (attn, y, state, ctx) -> [B, N, C]; None: attn(y)

    def out_proj(self, attn: nn.Module) -> nn.Linear:
        return attn.proj

    def attention_macs(self, attn: nn.Module, n_kv: Tensor, n_q: Tensor) -> Tensor:
        proj = self.out_proj(attn)
        out = proj.in_features * proj.out_features
        return (n_kv * (linear_macs(attn) - out) + 2 * n_q * n_kv * proj.in_features
                + n_q * out)

    def mlp_macs(self, blk: nn.Module) -> int:
        return linear_macs(blk.mlp)

    def plain_head(self, model: nn.Module, x: Tensor, pre_logits: bool) -> Tensor:
        return model.forward_head(x, pre_logits=pre_logits)

    def head(self, model: nn.Module, x: Tensor, state: TokenState, pre_logits: bool) -> Tensor:
        raise NotImplementedError

    def head_macs(self, model: nn.Module, x: Tensor, state: TokenState, pre_logits: bool
                  ) -> float:
        raise NotImplementedError

    def patched_mixin(self, name: str, forward_features: Callable, forward_head: Callable
                      ) -> type:
        return patched_mixin(name, forward_features, forward_head,
                             takes_attn_mask=self.takes_attn_mask)


# --------------------------------------------------------------------------------------------
# The engine


class TokenEngine:
    """The block loop and the contract functions of one family, built from its spec."""

    def __init__(self, spec: TokenSpec, name: str = ""):
        self.spec = spec
        # bound once: the per-block path reads these attributes, nothing through the spec
        self._parts, self._qkv, self._output = spec.parts, spec.qkv, spec.output
        self._params, self._plain = spec.params, spec.plain_attention
        rule = spec.position
        self._position = None if isinstance(rule, Absolute) else rule.apply
        self._moved_exposes = bool(rule.moved_tokens_need_exposing)
        self._context, self._blocks = spec.context, spec.blocks
        self._attention_macs, self._mlp_macs = spec.attention_macs, spec.mlp_macs
        self.PATCHED = spec.patched_mixin(name or f"_Patched{type(spec).__name__}",
                                          self.forward_features, self.forward_head)

    def exports(self) -> tuple:
        """``(forward_features, forward_head, embed, run_blocks, block_macs, PATCHED)``: the
        family file's contract functions (:class:`leanvit.adapters.base.TokenBackbone`)."""
        return (self.forward_features, self.forward_head, self.embed, self.run_blocks,
                self.block_macs, self.PATCHED)

    # -- whole passes
    def _start(self, model: nn.Module, images: Tensor, recorder: Optional[MacRecorder]
               ) -> tuple[Tensor, TokenState]:
        self.spec.check_input(model, images)
        x, stem, fields = self.spec.embed(model, images)
        if recorder is not None:
            recorder.record_stem(stem)
        return x, TokenState(prefix=self.spec.prefix(model), n0=x.shape[1], recorder=recorder,
                             **fields)

    def embed(self, model: nn.Module, x: Tensor) -> tuple[Tensor, TokenState]:
        """Tokens entering block 0, ``[B, N0, C]``, and the method's initial state (the first
        part of :meth:`forward_features`; with :meth:`run_blocks` a caller can cache what
        frozen blocks compute, e.g. a rate search)."""
        x, state = self._start(model, x, None)
        return x, model.leanvit.init_state(state, x)

    def forward_features(self, model: nn.Module, x: Tensor,
                         recorder: Optional[MacRecorder] = None, trace_source: bool = False,
                         on_block: OnBlock = None, trace_where: bool = False
                         ) -> tuple[Tensor, TokenState]:
        """Embeddings, blocks with the method's hooks, final norm: ``[B, N', C]`` and its state.

        Args:
            recorder: a :class:`~leanvit.recorder.MacRecorder` to count MACs into.
            trace_source: start ``state.source`` as the identity ``[B, N0, N0]`` (each token
                holds itself), so every later gather/merge tracks which original tokens each
                token holds (visualisation, :mod:`leanvit.viz`).
            on_block: called as ``on_block(i, x, state)`` after block ``i`` with its output
                tokens ``[B, N, C]`` and state (inspection); must not modify them.
            trace_where: start ``state.where`` as ``arange(N0)`` and record the features of
                tokens as they leave (``state.left``), for :func:`leanvit.dense_features`.
        """
        reducer: Reducer = model.leanvit
        x, state = self._start(model, x, recorder)
        if trace_source:  # own memory: merges write into it
            eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
            state = state.replace(source=eye.repeat(x.shape[0], 1, 1))
        if trace_where:
            state = state.replace(where=torch.arange(x.shape[1], device=x.device).repeat(
                x.shape[0], 1))
        state = reducer.init_state(state, x)
        box = [x]  # handed over, not held here: the embedding would stay alive to the end
        del x
        return self._run(model, box, state, reducer, 0, None, on_block)

    def run_blocks(self, model: nn.Module, x: Tensor, state: TokenState, start: int = 0,
                   stop: Optional[int] = None) -> tuple[Tensor, TokenState]:
        """Blocks ``start .. stop - 1`` with the method's hooks; with ``stop=None`` also the
        final norm, so ``run_blocks(model, *embed(model, images))`` equals
        :meth:`forward_features`."""
        return self._run(model, [x], state, model.leanvit, start, stop, None)

    def _run(self, model, box, state, reducer, start, stop, on_block):
        # the tokens come in a one-element list that is emptied, so that no caller's frame
        # keeps the first block's input alive through every block (a block's peak)
        ctx = None if self._context is None else self._context(model)
        parts = self._parts
        # per-image token counts: blocks may run packed (see "Packed execution" below)
        block = self._block if on_block is not None else packed_runner(self, model, state,
                                                                        reducer)
        # iterated, not indexed: nn.Sequential's indexing walks its modules
        for i, blk in islice(enumerate(self._blocks(model)), start, stop):
            x, state = block(parts(blk), i, box, state, reducer, ctx)
            if on_block is not None:
                on_block(i, x, state)
            box.append(x)  # the next block's input, held by the box alone
            del x
        x = box.pop()
        if stop is None:
            norm = self.spec.final_norm(model)
            if norm is not None:
                x = norm(x)
        if isinstance(block, PackedRunner):
            x = block.finish(x)  # the padded layout [B, N, C] again
        return x, state

    # -- one block
    def _block(self, p: BlockParts, i: int, box: list, state: TokenState, reducer: Reducer,
               ctx: Any) -> tuple[Tensor, TokenState]:
        """One block with the method's hooks: ``x`` ``[B, N, C]`` (taken out of ``box``, so
        that it is freed once the attention's residual replaces it) -> ``[B, N', C]``."""
        x = box.pop()
        if reducer.acts_before(i):
            before = state
            x_in, (x, state) = x, reducer.before_block(i, x, state)
            state = record_departures(x_in, before, state)  # no-op unless dense features traced
        moved = self._moved_exposes and state.positions is not None
        if self._moved_exposes and not moved and x.shape[1] != state.n0:
            raise RuntimeError(f"block {i} got {x.shape[1]} tokens of {state.n0} without their "
                               "positions; a method changed the tokens without state.positions")
        counting = state.recorder is not None
        n_kv = state.token_counts(x) if counting else None
        rows, signals = None, None
        y = p.norm1(x)
        if reducer.needs_signals(i) or state.valid is not None or state.mask is not None or (
                state.prop_attn and state.size is not None) or moved:
            before = state
            a, signals, rows, state = self._attention(p.attn, i, y, state, reducer, ctx)
            if rows is not None:
                state = record_departures(x, before, state)
                x = gather_tokens(x, rows)
        elif self._plain is None:
            a = p.attn(y)  # nothing to expose or bias: the module itself, untouched
        else:
            a = self._plain(p.attn, y, state, ctx)
        del y
        x = x + (a if p.post1 is None else p.post1(a))
        del a
        n_q = state.token_counts(x) if counting else None
        if reducer.acts_after(i):
            before = state
            x_in, (x, state) = x, reducer.after_attention(i, x, signals, state)
            state = record_departures(x_in, before, state)
            del x_in, before
        # the signals hold q, k, v (and any map): free them before the MLP, the block's peak
        sig_macs = 0.0 if signals is None else float(signals.macs)
        del signals
        x = mlp_half(p, x)
        if counting:
            state.recorder.record_block(i, **self._macs(p, n_kv, n_q, state.token_counts(x),
                                                        sig_macs))
        return x, state

    def _attention(self, attn: nn.Module, i: int, y: Tensor, state: TokenState,
                   reducer: Reducer, ctx: Any
                   ) -> tuple[Tensor, Optional[Signals], Optional[Tensor], TokenState]:
        """The attention on ``y`` ``[B, N, C]`` with q/k/v exposed to the method, in the
        module's op order (bit-identical where the method changes nothing). Returns (output
        ``[B, K, C]``, signals, selected query rows ``[B, K]`` or ``None``, state)."""
        if has_contract(attn):
            return contract_attention(attn, i, y, state, reducer)
        q, k, v, gate = self._qkv(attn, y)
        biases: tuple = ()
        if self._position is not None:
            q, k, biases = self._position(attn, q, k, v, state, ctx)
        if k.shape[1] != q.shape[1]:  # grouped-query: K/V heads repeated after norm and rotation
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        extra = attention_bias(state, q.dtype)  # [B, 1, 1, N]: log(size), -inf padding
        scale, fused, dropout = self._params(attn)
        per_image = isinstance(biases, LazyBias)
        row0 = biases.class_row() if per_image else biases
        signals = Signals(q, k, v, scale, _class_row(row0, extra) if row0 else extra)
        del row0
        if per_image:  # a bias per query row (relative position): the full map needs them all
            signals.full_bias = lambda: (*biases(), extra)
        elif biases:
            signals.full_bias = (*biases, extra)
        rows = None
        if reducer.selects_queries(i):
            rows, state = reducer.select_queries(i, signals, state)
            if rows is not None:
                if state.mask is not None:
                    raise ValueError("query selection and a training keep-mask cannot be "
                                     "combined")
                gate = None if gate is None else gather_tokens(gate, rows)
                q = select_rows(q, rows)
                if per_image:
                    biases.select(rows)
                elif any(b is not None and b.shape[-2] != 1 for b in biases):
                    biases = SelectedRowsBias(biases, rows)  # looked up per group of images
        # fused SDPA unless a keep-mask needs the explicit fp32 form (or the module is set to
        # the explicit path); biases added in the module's order, then log(size) / padding
        whole = rows is None and state.mask is None and q.dtype in _MAP_DTYPES
        if whole and reducer.reads_received(i):  # the map's head and query mean, row chunks
            out, signals._attn_received = received_attention(
                q, k, v, scale, bias=_chunk_biases(biases, extra), dropout=dropout)
        elif whole and reducer.needs_attention_map(i):
            if reducer.reads_map(i):  # a statistic per image: chunks of images, in cache
                sig, st = signals, state
                out, signals.map_read = map_attention(
                    q, k, v, scale, lambda w, images: reducer.read_map(i, w, sig, st, images),
                    bias=_chunk_biases(biases, extra), dropout=dropout)
            else:  # the method reads the whole map: one explicit attention, output and map
                out, signals._attn = attend(q, k, v, scale, biases, extra, fused=False,
                                            dropout=dropout, return_weights=True)
        else:
            out = attend(q, k, v, scale, biases, extra, keep=state.mask, fused=fused,
                         dropout=dropout)
        return self._output(attn, out, gate), signals, rows, state

    # -- MACs
    def block_macs(self, blk: nn.Module, n_kv: Tensor, n_q: Tensor, n_mlp: Tensor,
                   signals: Optional[Signals]) -> dict[str, Tensor]:
        """Per-image MACs of one block from the token counts it saw (``[B]`` each: keys/values
        entering, query rows computed, tokens through the MLP): ``MacRecorder.record_block``'s
        keyword arguments. Position lookups, norms and softmax are not counted."""
        sig_macs = 0.0 if signals is None else float(signals.macs)
        return self._macs(self._parts(blk), n_kv, n_q, n_mlp, sig_macs)

    def _macs(self, p: BlockParts, n_kv, n_q, n_mlp, sig_macs: float) -> dict[str, Tensor]:
        attn = p.attn
        if has_contract(attn):  # the module counts itself (e.g. hallucinated heads)
            macs = attn.leanvit_macs(n_q, n_kv)
        else:
            macs = self._attention_macs(attn, n_kv, n_q)
        return dict(tokens_in=n_kv, tokens_out=n_mlp, attention=macs,
                    mlp=n_mlp * self._mlp_macs(p.block), signals=torch.full_like(n_kv, sig_macs))

    # -- head
    def forward_head(self, model: nn.Module, x: Tensor, state: TokenState,
                     pre_logits: bool = False, recorder: Optional[MacRecorder] = None
                     ) -> Tensor:
        """Pooling (merged tokens weighted by size, padding and masked-out tokens left out)
        and classifier; the model's own head when no token is merged, padded or masked.
        ``recorder``: records the head's MACs (pooling modules and classifier)."""
        if recorder is not None:
            recorder.record_head(self.spec.head_macs(model, x, state, pre_logits))
        if state.size is None and state.valid is None and state.mask is None:
            return self.spec.plain_head(model, x, pre_logits)
        return self.spec.head(model, x, state, pre_logits)


#: dtypes in which the attention's own map serves as :attr:`Signals.attn` (which is at least
#: float32: a half-precision map would rank tokens on 2-3 significant digits)
_MAP_DTYPES = (torch.float32, torch.float64)


def _class_row(biases: tuple, extra: Optional[Tensor]) -> Optional[Tensor]:
    """The class token's row of everything added to the logits (the signals' bias)."""
    out = None
    for b in [b[..., :1, :] for b in biases if b is not None] + [extra]:
        if b is not None:
            out = b if out is None else out + b
    return out


def has_contract(attn: nn.Module) -> bool:
    """Whether ``attn``'s class runs itself under the engine (e.g. leanvit.compact's hMHSA).

    The contract: ``attn.leanvit_forward(y, bias, keep, select) -> (out [B, K, C], signals,
    rows)`` where ``bias`` is the attention bias ``[B, 1, 1, N]`` or ``None``, ``keep`` the
    training keep-mask ``[B, N]`` or ``None``, ``select(signals) -> rows [B, K] | None`` the
    method's query selection (``None`` when the method selects none); and
    ``attn.leanvit_macs(n_q, n_kv)`` its MACs per image (projections included).
    """
    cls = type(attn)
    return callable(getattr(cls, "leanvit_forward", None)) and callable(
        getattr(cls, "leanvit_macs", None))


def contract_attention(attn, i, y, state, reducer):
    """:meth:`TokenEngine._attention` for a module with the contract (:func:`has_contract`)."""
    bias = attention_bias(state, y.dtype)
    box = [state]

    def select(signals: Signals) -> Optional[Tensor]:
        rows, box[0] = reducer.select_queries(i, signals, box[0])
        return rows

    out, signals, rows = attn.leanvit_forward(
        y, bias, state.mask, select if reducer.selects_queries(i) else None)
    return out, signals, rows, box[0]


# --------------------------------------------------------------------------------------------
# Pooling by token weights


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


def pool_tokens(x: Tensor, state: TokenState, kind: str, start: int) -> Tensor:
    """``avg`` / ``max`` / ``avgmax`` of the tokens ``x[:, start:]`` ``[B, N, C]`` -> ``[B, C]``:
    the mean weighted by :func:`token_weights`, the max over real (non-padding) tokens."""
    xs = x[:, start:]
    w = token_weights(state, x)[:, start:]
    avg = (xs * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)
    if kind == "avg":
        return avg
    if state.valid is not None:
        xs = xs.masked_fill(~state.valid[:, start:, None], float("-inf"))
    mx = xs.amax(dim=1)
    return mx if kind == "max" else 0.5 * (mx + avg)


def loss_tokens(model: nn.Module, x: Tensor, state: Optional[TokenState]
                ) -> tuple[Tensor, Optional[Tensor]]:
    """Tokens for the token-distillation loss: the final normed tokens ``x`` ``[B, N, C]`` as
    they are, and the training keep-mask ``[B, N]`` (``None``: every token counts)."""
    return x, None if state is None else state.mask


def check_images(x: Any, in_chans: Optional[int], size: Optional[tuple[int, int]],
                 hint: str = "") -> None:
    """One-line ``TypeError``/``ValueError`` for images ``x`` a model cannot take: not a
    tensor, not ``[B, C, H, W]``, not ``in_chans`` channels, not ``size`` ``(H, W)`` (``None``:
    any); ``hint`` (``{size}`` replaced by the images' width) says how to use another size."""
    if not isinstance(x, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(x.shape)}")
    if in_chans is not None and x.shape[1] != in_chans:
        raise ValueError(f"model takes {in_chans}-channel images, got {x.shape[1]} channels")
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        raise ValueError(f"model was built for {size[0]}x{size[1]} images, got "
                         f"{x.shape[-2]}x{x.shape[-1]}" + hint.replace("{size}",
                                                                     str(x.shape[-1])))


# --------------------------------------------------------------------------------------------
# Packed execution of per-image token counts

#: Smallest share of padding rows (in a block's padded ``[B, N]`` layout) at which
#: ``packed="auto"`` packs the batch; below it the padded blocks run (packing has a fixed cost
#: per block: the index of the real rows, q/k/v copied into the padded layout for the
#: attention and its output back). A choice, not a measurement (``docs/ats.md``).
PACK_MIN_PADDING = 0.05


def packed_mode(reducer: Reducer) -> Any:
    """The method's ``packed`` option (``"auto"`` when its options have none)."""
    return check_packed(getattr(reducer.options, "packed", "auto"))


def packed_runner(engine: TokenEngine, model: nn.Module, state: TokenState, reducer: Reducer
                  ) -> Callable:
    """The block function of one forward pass: ``engine._block`` itself when no block can run
    packed (option ``packed=False``; compiled code, whose shapes must not depend on the data;
    training, whose drop path and keep-masks are per image; dense-feature tracing;
    proportional attention on merged sizes; a relative position bias, indexed per pair of
    tokens), else a :class:`PackedRunner`."""
    mode = packed_mode(reducer)
    if (mode is False or torch.compiler.is_compiling() or model.training
            or state.mask is not None or state.where is not None or state.prop_attn
            or isinstance(engine.spec.position, RelativeBias)):
        return engine._block
    return PackedRunner(engine, mode)


class PackedRunner:
    """Runs blocks on the batch's real tokens packed into one sequence once images keep
    different counts (``state.valid`` set), and the padded blocks otherwise.

    The rule (``packed="auto"``): a padded batch is packed at the first block that can run
    packed and whose padding share (:func:`leanvit.ops.packed.pad_fraction`) is at least
    :data:`PACK_MIN_PADDING`; ``packed=True`` packs whenever there is padding. A block whose
    method selects query rows (ATS) runs packed from its first such block on (``True`` and
    ``"auto"``): its MLP then already runs on the rows each image keeps. Once packed, the
    tokens stay packed until every image has the same count again (the padded blocks, with
    no padding), under ``"auto"`` until a block leaves less than :data:`PACK_MIN_PADDING`
    padding (packing's per-block copies would cost more than the padding), or a block the
    packed form cannot serve: a method hook that sees the tokens
    (``before_block``, ``after_attention``), the whole attention map, or an attention module
    that runs itself (:func:`has_contract`); there the batch is padded again. Methods whose
    images keep equal counts (ToMe, EViT, ...) never reach a packed block.

    A packed block (:func:`packed_block`): norms, q/k/v, output projection and MLP on the
    packed ``[1, T, C]``; q/k/v padded to ``[B, H, N, D]`` (the padded layout of ``state``)
    for the method's signals, its query selection and one SDPA with the ``-inf`` padding
    bias (faster on a CPU than one call per image; only the attention, a small part of the
    block, still computes padding). Outputs equal the padded blocks' (the same attention
    call on the same values; the linear layers' rows do not depend on the other rows); MACs
    are recorded per image as there.
    """

    def __init__(self, engine: TokenEngine, mode: Any):
        self.engine, self.mode = engine, mode
        self.pk: Optional[Packing] = None  # the layout while x is packed, else None

    def _can(self, p: BlockParts, i: int, reducer: Reducer) -> bool:
        return not (reducer.acts_before(i) or reducer.acts_after(i) or has_contract(p.attn)
                    or reducer.needs_attention_map(i) or reducer.reads_received(i))

    def __call__(self, p: BlockParts, i: int, box: list, state: TokenState, reducer: Reducer,
                 ctx: Any) -> tuple[Tensor, TokenState]:
        # ``box``: the one-element list of the block loop (TokenEngine._block), emptied here
        x = box.pop()
        if self.pk is None:
            if state.valid is None:  # no padding yet: pack the tail of a block that may
                enter = reducer.selects_queries(i)  # leave images with different counts
            else:
                enter = self.mode is True or pad_fraction(state.valid) >= PACK_MIN_PADDING
            if not (enter and self._can(p, i, reducer)):
                return self.engine._block(p, i, [x], state, reducer, ctx)
            self.pk = packing(state.valid, x.shape[0], x.shape[1], x.device)
            x = pack(x, self.pk)[None]
        elif not self._can(p, i, reducer):
            x, self.pk = unpack(x[0], self.pk), None
            return self.engine._block(p, i, [x], state, reducer, ctx)
        x, state, self.pk = packed_block(self.engine, p, i, x, self.pk, state, reducer, ctx)
        if self.pk.uniform or (self.mode is not True and
                               self.pk.pad_share < PACK_MIN_PADDING):
            # every image kept the same count (a view), or too little padding left to pay
            # for packing: the padded blocks
            x, self.pk = unpack(x[0], self.pk), None
        return x, state

    def finish(self, x: Tensor) -> Tensor:
        """``x`` in the padded layout ``[B, N, C]`` (padding rows 0 if it was packed)."""
        return x if self.pk is None else unpack(x[0], self.pk)


def _packed_positions(engine: TokenEngine, attn: nn.Module, q: Tensor, k: Tensor, v: Tensor,
                      state: TokenState, pk: Packing) -> tuple[Tensor, Tensor]:
    """Rotary positions on packed ``q``, ``k`` ``[1, H, T, D]``: each token's row of the table
    at its original index (absolute positions: nothing to do)."""
    rule = engine.spec.position
    if not isinstance(rule, Rotary):
        return q, k
    rope = token_rope(state)
    if rope is None:
        return q, k
    if rope.dim() == 2:  # nothing moved yet: row j for token j of every image
        rope = rope[:pk.width].expand(pk.batch, -1, -1)
    rope = pack(rope, pk)  # [T, R]
    return rule.rotate(attn, q, rope).type_as(v), rule.rotate(attn, k, rope).type_as(v)


def packed_block(engine: TokenEngine, p: BlockParts, i: int, x: Tensor, pk: Packing,
                 state: TokenState, reducer: Reducer, ctx: Any
                 ) -> tuple[Tensor, TokenState, Packing]:
    """One block on packed tokens ``x`` ``[1, T, C]`` (layout ``pk``, the padded layout of
    ``state``): ``(x' [1, T', C], state', layout of x')``; see :class:`PackedRunner`."""
    counting = state.recorder is not None
    n_kv = pk.counts.float()
    attn = p.attn
    q, k, v, gate = engine._qkv(attn, p.norm1(x))  # [1, H, T, D]
    q, k = _packed_positions(engine, attn, q, k, v, state, pk)
    if k.shape[1] != q.shape[1]:  # grouped-query: K/V heads repeated after norm and rotation
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale, fused, dropout = engine._params(attn)
    # the attention on the padded layout: the method's signals and selection read it, and one
    # masked SDPA over the batch is faster on a CPU than one call per image
    q, k, v = pad_heads(q, pk), pad_heads(k, pk), pad_heads(v, pk)  # [B, H, N, D]
    extra = attention_bias(state, q.dtype)  # -inf on padding keys
    signals, q_pk = None, pk
    if reducer.needs_signals(i):
        signals = Signals(q, k, v, scale, extra)
        if reducer.selects_queries(i):
            rows, state = reducer.select_queries(i, signals, state)
            if rows is not None:
                q_pk = packing(state.valid, pk.batch, rows.shape[1], rows.device)
                src = moved_rows(pk, rows, q_pk)
                q, x = select_rows(q, rows), x.index_select(1, src)
                gate = None if gate is None else gate.index_select(1, src)
    out = attention(q, k, v, scale, bias=extra, fused=fused, dropout=dropout)  # [B, H, K, D]
    out = pack(out.transpose(1, 2), q_pk).transpose(0, 1)[None]  # [1, H, T', D]
    a = engine._output(attn, out, gate)
    del q, k, v, out, gate
    x = x + (a if p.post1 is None else p.post1(a))
    del a
    sig_macs = 0.0 if signals is None else float(signals.macs)
    del signals
    x = mlp_half(p, x)
    if counting:
        n = q_pk.counts.float()
        state.recorder.record_block(i, **engine._macs(p, n_kv, n, n, sig_macs))
    return x, state, q_pk
