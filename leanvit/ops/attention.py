"""The one attention function every caller uses (adapters, compaction's hMHSA, signals,
DiffRate), and the fp32 masked softmax used while training token methods.

Three forms, one entry point (:func:`attention`):

- fused: ``torch.nn.functional.scaled_dot_product_attention`` when nothing needs the map and
  no training keep-mask is set (timm's own fused path, so unchanged models stay bit-identical),
  except in compiled CPU code with a small map (:data:`EXPLICIT_MAX_BYTES`), where the explicit
  form below is faster;
- explicit: ``softmax((q * scale) @ k^T + bias)`` then ``@ v`` in timm's op order (timm's
  ``fused_attn=False`` path, and whenever the caller asks for the map);
- masked: the same logits through :func:`masked_softmax` in float32 (training keep-masks of
  DynamicViT and the DiffRate search).

A per-key bias (ToMe's ``log(size)``, ``-inf`` on padding) reaches the fused path as SDPA's
float mask ``[B, 1, 1, N]``, which the kernel adds to its tiles without leaving the kernel.
FlexAttention can do the same with a ``score_mod`` (:func:`flex_key_bias_attention`); the rule
(:func:`use_flex`) takes it only where it measured faster, and on the CPU it did not: compiled,
fp32, the attention op with such a bias took as long or longer under FlexAttention at every
shape measured, so the float mask stays (numbers in ``docs/token_reduction.md``).
:data:`KEY_BIAS_KERNEL` forces either.

Query-row selection (``rows``, ATS) gathers the queries first; all keys and values stay.
Shapes: ``B`` batch, ``H`` heads, ``Nq`` queries, ``N`` keys, ``D`` head width.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor


def select_rows(q: Tensor, rows: Optional[Tensor]) -> Tensor:
    """Query rows ``rows`` ``[B, K]`` of ``q`` ``[B, H, Nq, D]`` -> ``[B, H, K, D]`` (all rows
    when ``rows`` is ``None``)."""
    if rows is None:
        return q
    return q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))


Bias = Union[Tensor, Sequence[Tensor], None]


def _biases(bias: Bias) -> list[Tensor]:
    if bias is None:
        return []
    if isinstance(bias, Tensor):
        return [bias]
    return [b for b in bias if b is not None]


def attention_logits(q: Tensor, k: Tensor, scale: float, bias: Bias = None) -> Tensor:
    """``(q * scale) @ k^T + bias``: ``[B, H, Nq, D]``, ``[B, H, N, D]`` -> ``[B, H, Nq, N]``
    (timm's op order; ``bias`` broadcastable, e.g. ``[B, 1, 1, N]``, or several biases added
    one after the other, in the order given: e.g. BEiT's relative position bias, then the
    shared one, then ``log(size)``)."""
    a = (q * scale) @ k.transpose(-2, -1)
    for b in _biases(bias):
        if b.dtype == a.dtype and b.dim() <= a.dim() and all(
                n == m or n == 1 for n, m in zip(b.shape[::-1], a.shape[::-1])):
            a = a.add_(b)  # in place: one pass over the logits instead of a second tensor
        else:
            a = a + b
    return a


def masked_softmax(logits: Tensor, keep: Tensor, eps: float = 1e-6,
                   rows: Optional[Tensor] = None) -> Tensor:
    """Softmax over keys where dropped keys (``keep`` = 0) get no weight, in float32.

    The authors' ``softmax_with_policy`` (DynamicViT, Rao et al. 2021; reused by DiffRate):
    ``a = exp(l - max) * M; a = (a + eps / N) / (sum(a) + eps)`` with ``M`` the keep mask of the
    keys and the diagonal always kept, so a dropped token still attends to itself and its row
    stays finite. Gradients flow into ``keep`` (straight-through masks stay differentiable).

    Args:
        logits: ``[B, H, Nq, N]`` attention logits (scaled, bias added).
        keep: ``[B, N]`` mask in [0, 1].
        eps: 1e-6, the authors' value.
        rows: the key index of each query (its "diagonal"), ``[B, Nq]`` long or a ``[Nq]``
            tensor; ``None`` requires ``Nq == N`` (self-attention, query ``i`` is key ``i``).

    Returns:
        ``[B, H, Nq, N]`` float32 attention weights.
    """
    B, H, Nq, N = logits.shape
    logits = logits.float()
    if rows is None:
        if Nq != N:
            raise ValueError(f"masked_softmax needs square attention, got {Nq} queries x {N} "
                             "keys (pass rows= for selected queries)")
        m = keep.float().reshape(B, 1, 1, N)
        eye = torch.eye(N, dtype=m.dtype, device=m.device).reshape(1, 1, N, N)
        m = m + (1.0 - m) * eye
    else:  # each query's own key set to exactly 1
        idx = rows.reshape(-1, 1, Nq, 1).expand(B, 1, Nq, 1).to(torch.long)
        m = keep.float().reshape(B, 1, 1, N).expand(B, 1, Nq, N).clone()
        m.scatter_(-1, idx, 1.0)
    a = (logits - logits.amax(dim=-1, keepdim=True)).exp() * m
    return (a + eps / N) / (a.sum(dim=-1, keepdim=True) + eps)


#: Largest attention map, in bytes (``B * H * Nq * N`` elements), that compiled CPU code
#: computes explicitly instead of with the fused SDPA kernel. At this size the map
#: stays in a core's L2 cache, so writing it costs little, and inductor fuses the scale, bias and
#: softmax into one pass between two batched matrix products; the CPU flash kernel instead pays
#: a fixed cost per block of 32 queries that dominates at short sequences. One image of
#: DeiT-S (6 x 197^2 floats) fits; batch 8 and 64 maps do not and use the kernel. Timings in
#: ``docs/gpu.md``.
EXPLICIT_MAX_BYTES = 1 << 20


def _small_compiled_cpu(q: Tensor, k: Tensor) -> bool:
    """True when compiled float32 code on the CPU should use the explicit form (see
    :data:`EXPLICIT_MAX_BYTES`); shapes are static there, so this is a trace-time choice.
    Half precision keeps the kernel, which computes the softmax in float32."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or not torch.compiler.is_compiling():
        return False
    B, H, Nq, _ = q.shape
    return B * H * Nq * k.shape[-2] * q.element_size() <= EXPLICIT_MAX_BYTES


#: Which kernel serves a per-key bias (``log(size)``, ``-inf`` padding) in compiled CPU code
#: above :data:`EXPLICIT_MAX_BYTES`: ``"auto"`` (the rule of :func:`use_flex`), ``"flex"``
#: (FlexAttention wherever it can serve: compiled code, per-key biases) or ``"sdpa"`` (the
#: fused SDPA kernel with a float mask). A switch for measuring both ways; read at trace time.
KEY_BIAS_KERNEL = "auto"


def key_bias(bias: Bias, q: Tensor, k: Tensor) -> Optional[Tensor]:
    """The biases as one ``[B', N]`` vector (``B'`` 1 or ``B``) when every one is a per-key
    bias (``[B|1, 1, 1, N]``: ``log(size)``, ``-inf`` padding), summed in order; ``None`` when
    there is none or one varies over heads or query rows (relative position)."""
    out = None
    for b in _biases(bias):
        if b.dim() != 4 or b.shape[1] != 1 or b.shape[2] != 1 or b.shape[0] not in (
                1, q.shape[0]) or b.shape[3] != k.shape[-2]:
            return None
        out = b if out is None else out + b
    return None if out is None else out[:, 0, 0, :]


def use_flex(q: Tensor, k: Tensor, bias: Bias, p: float) -> bool:
    """Whether :func:`flex_key_bias_attention` serves this call instead of SDPA with a float
    mask, if the biases are per-key (:func:`key_bias`): only while ``torch.compile`` traces
    (FlexAttention runs unfused in eager code), with a bias, no dropout, float32 or bfloat16
    (``p``: the dropout probability), and where it measured faster. The rule (``"auto"``): never on the CPU, where FlexAttention was as fast or slower
    at every shape measured (``docs/token_reduction.md``, "Proportional attention and padding
    in the fused kernel"); not yet on CUDA either, where it is unmeasured (SDPA there takes a
    float mask in its memory-efficient kernel). ``KEY_BIAS_KERNEL = "flex"`` takes it wherever
    these conditions hold."""
    if KEY_BIAS_KERNEL != "flex" or not _biases(bias) or p > 0 or not (
            torch.compiler.is_compiling()):
        return False
    return q.dtype in (torch.float32, torch.bfloat16) and q.shape[-1] == k.shape[-1]


def flex_key_bias_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor
                            ) -> Tensor:
    """``softmax(q k^T * scale + bias[b, key]) v`` by FlexAttention, the bias added inside the
    kernel by a ``score_mod`` (no ``[B, 1, Nq, N]`` mask is built): ``q`` ``[B, H, Nq, D]``,
    ``k`` / ``v`` ``[B, H, N, D]``, ``bias`` ``[B', N]`` (``B'`` 1 or ``B``; ``-inf`` entries
    drop keys). For compiled code (:func:`use_flex`); in eager code it works but is slow."""
    from torch.nn.attention.flex_attention import flex_attention

    one = bias.shape[0] == 1

    def add_bias(score, b, h, q_idx, kv_idx):
        return score + bias[0 if one else b, kv_idx]

    return flex_attention(q, k, v, score_mod=add_bias, scale=scale)


def attention(
    q: Tensor,
    k: Tensor,
    v: Optional[Tensor],
    scale: float,
    *,
    bias: Bias = None,
    keep: Optional[Tensor] = None,
    rows: Optional[Tensor] = None,
    fused: bool = True,
    dropout: Union[float, Callable[[Tensor], Tensor], None] = None,
    return_weights: bool = False,
) -> Union[Tensor, tuple[Optional[Tensor], Tensor]]:
    """Scaled dot-product attention in the form the call needs.

    Args:
        q: ``[B, H, Nq, D]`` queries (after any q-norm), ``k`` ``[B, H, N, D]``, ``v``
            ``[B, H, N, Dv]`` (``None`` with ``return_weights``: only the map is wanted).
        scale: softmax scale (timm: ``D ** -0.5``).
        bias: additive bias broadcastable to ``[B, H, Nq', N]`` (``log(size)`` of merged
            tokens, ``-inf`` on padding), a sequence of such biases (added to the logits one
            after the other; summed in order into one mask on the fused path), or ``None``.
        keep: ``[B, N]`` training keep-mask in [0, 1]: the explicit fp32 :func:`masked_softmax`
            (the map is cast back to ``q``'s dtype before ``@ v``). Not with ``rows``.
        rows: ``[B, K]`` query rows to compute (query selection); ``None`` = all.
        fused: allow the fused SDPA kernel when neither ``keep`` nor ``return_weights`` asks
            for the map (pass the module's ``fused_attn``; timm's default is fused).
        dropout: attention dropout: the module's ``nn.Dropout`` (applied to the map; on the
            fused path its ``p`` while training) or a probability for the fused kernel; ``None``
            = none.
        return_weights: also return the post-softmax map ``[B, H, Nq', N]``.

    Returns:
        ``[B, H, Nq', Dv]`` (``Nq'`` = ``K`` under selection), or ``(out, weights)`` with
        ``return_weights`` (``out`` is ``None`` when ``v`` is).
    """
    if keep is not None and rows is not None:
        raise ValueError("query selection and a training keep-mask cannot be combined")
    q = select_rows(q, rows)
    if fused and keep is None and not return_weights:
        if dropout is None or isinstance(dropout, float):
            p = dropout or 0.0
        else:  # an nn.Dropout: active only while training, as timm
            p = dropout.p if getattr(dropout, "training", False) else 0.0
        if p > 0 or not _small_compiled_cpu(q, k):
            # the rule first, so that the traced graph has no unused bias sum when SDPA serves
            kb = key_bias(bias, q, k) if use_flex(q, k, bias, p) else None
            if kb is not None:
                return flex_key_bias_attention(q, k, v, scale, kb.to(q.dtype))
            mask = None
            for b in _biases(bias):  # several biases: summed in order, one mask for the kernel
                mask = b if mask is None else mask + b
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    a = attention_logits(q, k, scale, bias)
    a = masked_softmax(a, keep).to(q.dtype) if keep is not None else a.softmax(dim=-1)
    weights = a
    if callable(dropout):
        a = dropout(a)
    elif isinstance(dropout, float) and dropout > 0:
        a = F.dropout(a, dropout)
    out = None if v is None else a @ v
    return (out, weights) if return_weights else out


#: Bytes of post-softmax map (``b * H * Nq * N`` elements) per chunk of images in
#: :func:`map_attention`: a few DeiT-S images at 224, so the chunk's logits, map and the
#: method's reads of it stay in cache instead of streaming the whole batch's map through memory
#: once per pass (the bias add, the softmax, each statistic a method takes). The same limit
#: holds every other per-image map or map-sized bias formed a group of images at a time (the
#: token engine's per-image biases and explicit attention, Zero-TPrune's PageRank).
MAP_CHUNK_BYTES = 1 << 22


def image_bias(t: Optional[Tensor], images: slice) -> Optional[Tensor]:
    """``t[images]`` for a per-image bias ``[B, ...]`` (4 dimensions, ``B > 1``), ``t`` itself
    when it is one for all images (batch dimension 1, or ``[H, N, N]`` as timm passes BEiT's)
    or ``None``."""
    return t if t is None or t.dim() < 4 or t.shape[0] == 1 else t[images]


def image_groups(batch: int, image_bytes: int) -> list[slice]:
    """Groups of images whose maps (``image_bytes`` each) fit :data:`MAP_CHUNK_BYTES` together
    (at least one image per group); one group in compiled code (static shapes, one graph)."""
    if torch.compiler.is_compiling():
        return [slice(0, batch)]
    per = max(1, MAP_CHUNK_BYTES // max(1, image_bytes))
    return [slice(b, b + per) for b in range(0, batch, per)]


def _chunk_bias(bias: Union[Bias, Callable[[slice], Bias]], images: slice,
                queries: slice = slice(None), n_queries: int = 0) -> list[Tensor]:
    """The biases of the images ``images`` and query rows ``queries``: a per-image bias is
    sliced (:func:`image_bias`); a callable is asked for the chunk's biases (built per chunk,
    never for the whole batch); a bias per query row (``[..., n_queries, N]``) is sliced to
    ``queries``."""
    out = [image_bias(b, images) for b in _biases(bias(images) if callable(bias) else bias)]
    if queries != slice(None):
        out = [b[..., queries, :] if b.dim() >= 2 and b.shape[-2] == n_queries > 1 else b
               for b in out]
    return out


def _chunks(B: int, row_bytes: int, n_queries: int) -> list[tuple[slice, slice]]:
    """``(images, query rows)`` of each chunk of at most :data:`MAP_CHUNK_BYTES` of map
    (``row_bytes``: one query row of one image, all heads): whole images while one fits
    (:func:`image_groups`), else one image at a time in groups of rows."""
    rows = max(1, MAP_CHUNK_BYTES // max(1, row_bytes))
    if rows >= n_queries or torch.compiler.is_compiling():
        return [(g, slice(None)) for g in image_groups(B, row_bytes * n_queries)]
    return [(slice(b, b + 1), slice(r, r + rows)) for b in range(B)
            for r in range(0, n_queries, rows)]


def _output_buffer(q: Tensor, k: Tensor, v: Tensor) -> Optional[Tensor]:
    """Where the chunks' outputs go: a ``[B, H, Nq, Dv]`` view of a ``[B, Nq, H, Dv]`` buffer,
    the layout the output projection reads (the adapters' ``transpose(1, 2).reshape`` is then
    a view, as after the fused kernel), each chunk copied in while it is in cache instead of
    a concatenation and a transposing copy of the whole output. ``None`` (concatenate) while
    autograd records or ``torch.compile`` traces."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad)):
        return None
    B, H, Nq, _ = q.shape
    return v.new_empty(B, Nq, H, v.shape[-1]).permute(0, 2, 1, 3)


def map_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, read: Callable[[Tensor, slice],
                  Tensor], *, bias: Union[Bias, Callable[[slice], Bias]] = None,
                  dropout: Union[float, Callable[[Tensor], Tensor], None] = None
                  ) -> tuple[Tensor, Tensor]:
    """The explicit attention (:func:`attention` with ``fused=False``), one chunk of images at a
    time, each chunk's post-softmax map handed to ``read`` while it is in cache.

    Same products as the whole-batch explicit form (per image, the same MACs as the fused
    kernel); only the order in which memory is touched changes. In compiled code the whole
    batch is one chunk (static shapes, one graph).

    Args:
        q, k, v: ``[B, H, Nq, D]``, ``[B, H, N, D]``, ``[B, H, N, Dv]``.
        read: ``(weights [b, H, Nq, N], images: slice of the batch) -> [b, ...]``: what the
            caller keeps of a chunk's map (e.g. its mean over heads and queries).
        bias, dropout: as :func:`attention`; ``bias`` may also be a callable ``images ->
            bias`` giving the biases of one chunk of images.

    Returns:
        ``(out [B, H, Nq, Dv], reads)``: ``read``'s results concatenated over the batch.
    """
    B, H, Nq, _ = q.shape
    buf = _output_buffer(q, k, v)
    outs, reads = [], []
    for images in image_groups(B, H * Nq * k.shape[-2] * q.element_size()):
        out, weights = attention(q[images], k[images], v[images], scale,
                                 bias=_chunk_bias(bias, images), fused=False,
                                 dropout=dropout, return_weights=True)
        if buf is None:
            outs.append(out)
        else:
            buf[images].copy_(out)
        reads.append(read(weights, images))
        del weights
    kept = reads[0] if len(reads) == 1 else torch.cat(reads)
    if buf is not None:
        return buf, kept
    return (outs[0] if len(outs) == 1 else torch.cat(outs)), kept


def received_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, *,
                       bias: Union[Bias, Callable[[slice], Bias]] = None,
                       dropout: Union[float, Callable[[Tensor], Tensor], None] = None
                       ) -> tuple[Tensor, Tensor]:
    """The explicit attention and the attention each key receives, ``mean`` of the
    post-softmax map over heads and query rows, without keeping the map: one chunk of at
    most :data:`MAP_CHUNK_BYTES` at a time, whole images while one image's map fits, else
    groups of query rows of one image (a sum over rows needs no more of the map than its
    rows). At 1370 tokens (DINOv2 at 518 px) one image's map is 45 MB; in row chunks the
    logits, softmax and reads stay in cache, 2.7x faster than one image at a time (and the
    same output, bit for bit).

    Args:
        q, k, v, bias, dropout: as :func:`map_attention` (dropout applies to the map after it
            is read, as there).

    Returns:
        ``(out [B, H, Nq, Dv], received [B, N])``: ``received`` equals ``weights.mean(dim=(1,
        2))`` of the whole map up to the order of the sum (MCTF's informativeness,
        :attr:`leanvit.signals.Signals.attn_received`).
    """
    B, H, Nq, _ = q.shape
    buf = _output_buffer(q, k, v)
    outs, sums = [], []
    for images, queries in _chunks(B, H * k.shape[-2] * q.element_size(), Nq):
        out, weights = attention(q[images, :, queries], k[images], v[images], scale,
                                 bias=_chunk_bias(bias, images, queries, Nq), fused=False,
                                 dropout=dropout, return_weights=True)
        part = weights.sum(dim=(1, 2))
        del weights
        more = bool(queries.start)  # another group of rows of the same image
        if more:
            sums[-1] = sums[-1] + part
        else:
            sums.append(part)
        if buf is not None:
            buf[images, :, queries].copy_(out)
        elif more:
            outs[-1].append(out)
        else:
            outs.append([out])
    received = sums[0] if len(sums) == 1 else torch.cat(sums)
    if buf is not None:
        return buf, received / (H * Nq)
    outs = [o[0] if len(o) == 1 else torch.cat(o, dim=2) for o in outs]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out, received / (H * Nq)
