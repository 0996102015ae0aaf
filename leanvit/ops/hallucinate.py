"""Pure tensor functions of attention-map hallucination (hMHSA) and FFN compaction (cFFN).

Xu et al., "Vision Transformer with Attention Map Hallucination and FFN Compaction" (arXiv
2306.10875; no public code). What the paper leaves open is decided here and documented:

- Hallucination acts on the **pre-softmax logits** ``q k^T * scale`` of the computed heads,
  before any attention bias (proportional attention, padding) is added; every head then goes
  through its own softmax. So hallucinated maps are proper distributions, biases act on all
  heads alike, and a shift of a row's logits (to which softmax is blind) changes nothing.
- The computed heads are the first ``ceil(H / 2)``, the hallucinated ones the last
  ``floor(H / 2)`` (a converted model reorders its heads so that this holds). One head: nothing
  is hallucinated (plain attention); odd ``H``: one more computed than hallucinated head.

Shapes: ``B`` batch, ``Hc`` computed heads, ``Hh`` hallucinated heads, ``H = Hc + Hh``,
``Nq`` queries, ``Nk`` keys (``Nq != Nk`` with spatial-reduction attention), ``D`` head dim.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from leanvit.ops.attention import attention_logits, masked_softmax, select_rows


def split_heads(num_heads: int) -> tuple[int, int]:
    """``(computed, hallucinated)`` head counts: ``(ceil(H/2), floor(H/2))``.

    The paper computes half of the maps; with an odd count one more is computed (rounding the
    saving down, never hallucinating from fewer maps than are generated); one head computes.
    """
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    return (num_heads + 1) // 2, num_heads // 2


def mix_logits(logits: Tensor, weight: Tensor) -> Tensor:
    """Hallucinated logits as learned linear mixtures of the computed heads' logits.

    Args:
        logits: ``[B, Hc, Nq, Nk]`` computed heads' logits.
        weight: ``[Hh, Hc]`` mixing weights (no bias: a constant would not change a softmax).

    Returns:
        ``[B, Hh, Nq, Nk]``. Cost: ``Hh * Hc * Nq * Nk`` MACs per image.
    """
    B, _, nq, nk = logits.shape
    # one broadcast matmul over the flattened maps (einsum takes a slower path on CPU)
    return (weight @ logits.reshape(B, logits.shape[1], nq * nk)).view(B, -1, nq, nk)


def dwconv_logits(logits: Tensor, weight: Tensor) -> Tensor:
    """Hallucinated logits by a depthwise ``k x k`` convolution over the computed maps.

    GhostNet's cheap operation, applied to attention maps seen as ``Nq x Nk`` images:
    hallucinated head ``j`` is a convolution of computed head ``j``'s map (zero padding, same
    size; no bias for the reason given in :func:`mix_logits`).

    Args:
        logits: ``[B, Hc, Nq, Nk]``.
        weight: ``[Hh, 1, k, k]`` (odd ``k``), ``Hh <= Hc``.

    Returns:
        ``[B, Hh, Nq, Nk]``. Cost: ``Hh * k^2 * Nq * Nk`` MACs per image.
    """
    hh, k = weight.shape[0], weight.shape[-1]
    return F.conv2d(logits[:, :hh], weight, padding=k // 2, groups=hh)


def hallucinated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    hallucinate: Optional[Callable[[Tensor], Tensor]],
    bias: Optional[Tensor] = None,
    keep: Optional[Tensor] = None,
    dropout: Optional[Callable[[Tensor], Tensor]] = None,
    rows: Optional[Tensor] = None,
    row_wise: bool = False,
) -> Tensor:
    """Attention of all ``H`` heads, half of whose maps are hallucinated; ``[B, H, Nq', D]``.

    The maps are materialised (fused SDPA cannot take generated maps): computed logits
    ``q k^T * scale`` ``[B, Hc, Nq, Nk]``, hallucinated logits ``hallucinate(logits)``
    ``[B, Hh, Nq, Nk]``, bias added to all heads, softmax (or the eps-softmax with a training
    keep-mask), dropout, then every head weights its OWN values.

    Args:
        q: ``[B, Hc, Nq, D]`` queries of the computed heads (after q-norm).
        k: ``[B, Hc, Nk, D]`` keys of the computed heads.
        v: ``[B, H, Nk, D]`` values of all heads, computed heads first.
        scale: softmax scale (``D ** -0.5``).
        hallucinate: maps ``[B, Hc, Nq, Nk]`` logits to ``[B, Hh, Nq, Nk]``; ``None`` when
            nothing is hallucinated (``H == Hc``).
        bias: additive attention bias broadcastable to ``[B, H, Nq, Nk]`` or ``None``.
        keep: ``[B, Nk]`` soft keep-mask (training; :func:`masked_softmax`) or ``None``.
        dropout: attention dropout applied to the maps, or ``None``.
        rows: ``[B, K]`` query rows to return (query selection), or ``None`` for all.
        row_wise: whether ``hallucinate`` maps each row on its own (mixing): then only the
            selected rows' logits are computed; otherwise (the depthwise convolution looks at
            neighbouring rows) all rows are computed and hallucinated, then selected, so the
            maps are the same as without selection.
    """
    if rows is not None and row_wise:
        q = select_rows(q, rows)
        rows = None
    logits = attention_logits(q, k, scale)
    # computed and hallucinated heads go through softmax and values separately: the same
    # result as one [B, H, Nq, Nk] map, without copying the maps into one tensor
    parts = [logits] if hallucinate is None else [logits, hallucinate(logits)]
    outs, h0 = [], 0
    for part in parts:
        nh = part.shape[1]
        if rows is not None:
            part = part.gather(2, rows[:, None, :, None].expand(-1, nh, -1, part.shape[3]))
        if bias is not None:
            part = part + bias
        if keep is not None:
            attn = masked_softmax(part, keep).to(q.dtype)
        else:
            attn = part.softmax(dim=-1)
        if dropout is not None:
            attn = dropout(attn)
        outs.append(attn @ v[:, h0:h0 + nh])
        h0 += nh
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


# --------------------------------------------------------------------------------------------
# Fitting the hallucination to a pretrained model's maps (least squares on centred logits)


def center_rows(logits: Tensor) -> Tensor:
    """Subtract each row's mean over keys: the part of the logits a softmax sees."""
    return logits - logits.mean(dim=-1, keepdim=True)


def fit_mix(computed: Tensor, target: Tensor, ridge: float = 1e-4) -> Tensor:
    """Least-squares mixing weights ``[Hh, Hc]`` with ``mix_logits(computed) ~ target``.

    Fitted on row-centred logits (softmax ignores per-row shifts), with a small ridge term
    relative to the mean feature energy for conditioning.

    Args:
        computed: ``[B, Hc, Nq, Nk]`` logits of the heads that stay computed.
        target: ``[B, Hh, Nq, Nk]`` logits of the heads to hallucinate.
    """
    x = center_rows(computed.double()).transpose(0, 1).reshape(computed.shape[1], -1)  # [Hc, P]
    y = center_rows(target.double()).transpose(0, 1).reshape(target.shape[1], -1)  # [Hh, P]
    gram = x @ x.T
    gram = gram + ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, x @ y.T).T.to(computed.dtype)


def fit_dwconv(computed: Tensor, target: Tensor, kernel_size: int, ridge: float = 1e-4
               ) -> Tensor:
    """Least-squares depthwise kernels ``[Hh, 1, k, k]``: ``dwconv_logits(computed) ~ target``.

    Head ``j`` of ``target`` is fitted from head ``j`` of ``computed`` (row-centred logits,
    zero padding as in :func:`dwconv_logits`).
    """
    hh, k = target.shape[1], kernel_size
    x = computed[:, :hh].double()
    y = center_rows(target.double())
    nq, nk = x.shape[-2:]
    # the k*k shifted copies of each map, each row-centred (centring is linear, so the
    # centred prediction is the same combination of centred copies): [B, Hh, k*k, Nq*Nk]
    cols = F.unfold(x.reshape(-1, 1, nq, nk), k, padding=k // 2)
    cols = center_rows(cols.reshape(x.shape[0], hh, k * k, nq, nk)).flatten(3)
    feats = cols.transpose(0, 1).transpose(1, 2).reshape(hh, k * k, -1)  # [Hh, k*k, P]
    tgt = y.transpose(0, 1).reshape(hh, -1, 1)  # [Hh, P, 1]
    gram = feats @ feats.transpose(1, 2)
    eye = torch.eye(k * k, dtype=gram.dtype)
    gram = gram + ridge * gram.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * eye
    w = torch.linalg.solve(gram, feats @ tgt)  # [Hh, k*k, 1]
    return w.reshape(hh, 1, k, k).to(computed.dtype)


def choose_computed_heads(logits: Tensor, num_computed: int) -> list[int]:
    """Which heads of a pretrained block to keep computing (the rest get hallucinated).

    Greedy forward selection: repeatedly add the head that most lowers the least-squares error
    of predicting every other head's row-centred logits from the chosen ones (a linear mix), so
    the heads dropped are those best explained by the heads kept.

    Args:
        logits: ``[B, H, Nq, Nk]`` logits of all heads on calibration images.
    Returns:
        Sorted indices of the ``num_computed`` heads to keep.
    """
    H = logits.shape[1]
    x = center_rows(logits.double()).transpose(0, 1).reshape(H, -1)
    gram = x @ x.T  # [H, H]; everything below works on the Gram matrix alone
    energy = gram.diagonal()
    chosen: list[int] = []
    for _ in range(num_computed):
        best, best_err = None, math.inf
        for h in range(H):
            if h in chosen:
                continue
            s = chosen + [h]
            g = gram[s][:, s] + 1e-9 * energy.mean() * torch.eye(len(s), dtype=gram.dtype)
            proj = gram[s]  # [|s|, H]
            explained = (proj * torch.linalg.solve(g, proj)).sum(0)  # per head, energy explained
            err = float((energy - explained).clamp_min(0).sum())
            if err < best_err:
                best, best_err = h, err
        chosen.append(best)
    return sorted(chosen)


# --------------------------------------------------------------------------------------------
# cFFN: re-parameterisable factor branches and the truncated-SVD initialisation


def fuse_linear_bn(weight: Tensor, bn_mean: Tensor, bn_var: Tensor, bn_weight: Tensor,
                   bn_bias: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``BN(W x)`` in eval mode as one affine map ``(W', b')``: ``W' = g W``, ``b' = beta - g mu``
    with ``g = gamma / sqrt(var + eps)``. ``weight`` ``[out, in]``; BN statistics ``[out]``."""
    g = bn_weight / torch.sqrt(bn_var + eps)
    return weight * g[:, None], bn_bias - g * bn_mean


def truncated_svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``weight`` ``[out, in]`` ~ ``second @ first`` with ``first`` ``[rank, in]`` and
    ``second`` ``[out, rank]`` (the best rank-``rank`` approximation, Eckart-Young), the
    singular values split evenly (``sqrt(S)`` on each side) so both factors are balanced."""
    # through the eigendecomposition of the smaller Gram matrix (in float64): the same factors
    # as an SVD, and cheaper for the wide FFN matrices of large models
    w = weight.double()
    out, inp = w.shape
    r = min(rank, out, inp)
    gram = w @ w.T if out <= inp else w.T @ w
    threads = torch.get_num_threads()
    try:  # LAPACK's eigh on ~1k matrices: one thread is fast and immune to the thread
        torch.set_num_threads(1)  # oversubscription that stalls it on shared CPUs
        evals, evecs = torch.linalg.eigh(gram)  # ascending
    finally:
        torch.set_num_threads(threads)
    evals, evecs = evals.flip(0)[:r].clamp_min(0), evecs.flip(1)[:, :r]
    root = evals.sqrt().sqrt()  # sqrt(singular value)
    inv = torch.where(root > 0, 1 / root.clamp_min(1e-30), torch.zeros_like(root))
    if out <= inp:  # evecs = left singular vectors U_r
        second = evecs * root[None, :]
        first = (evecs.T @ w) * inv[:, None]
    else:  # evecs = right singular vectors V_r
        first = evecs.T * root[:, None]
        second = (w @ evecs) * inv[None, :]
    if r < rank:  # rank above the matrix rank: pad with zero directions
        first = torch.cat([first, first.new_zeros(rank - r, first.shape[1])])
        second = torch.cat([second, second.new_zeros(second.shape[0], rank - r)], dim=1)
    return first.to(weight.dtype), second.to(weight.dtype)


def refine_kl(apply: Callable[[Tensor, Tensor], Tensor], weight: Tensor, computed: Tensor,
              target: Tensor, steps: int = 50, lr: float = 1e-2) -> Tensor:
    """A few Adam steps on the cheap operation's ``weight`` minimising the mean KL divergence
    from the pretrained heads' maps ``softmax(target)`` to the hallucinated ones
    ``softmax(apply(computed, weight))`` (what attention uses, unlike the least-squares fit
    on logits, which weighs every logit alike). Starts from ``weight`` (the least-squares
    solution); returns the refined weight (the better of start and end by the same loss).

    Args:
        apply: ``mix_logits`` or ``dwconv_logits``.
        computed: ``[B, Hc, Nq, Nk]``; target: ``[B, Hh, Nq, Nk]`` logits.
    """
    log_p = target.float().log_softmax(-1)
    p = log_p.exp()
    comp = computed.float()

    def loss_of(w: Tensor) -> Tensor:
        log_q = apply(comp, w).log_softmax(-1)
        return (p * (log_p - log_q)).sum(-1).mean()

    w = weight.detach().float().clone().requires_grad_(True)
    with torch.no_grad():
        start = float(loss_of(w))
    opt = torch.optim.Adam([w], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_of(w)
            loss.backward()
            opt.step()
    with torch.no_grad():
        end = float(loss_of(w))
    return (w.detach() if end < start else weight.float()).to(weight.dtype)
