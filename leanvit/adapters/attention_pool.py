"""Attention-pool heads (``global_pool='map'``): their MACs and their forward on reduced tokens.

timm's :class:`~timm.layers.AttentionPoolLatent` (SigLIP ``vit_*_siglip_*``, Perception
Encoder ``vit_pe_core_*`` in the ``Eva`` family, ``global_pool='map'`` ViTs) is a one-layer
cross-attention: ``latent_len`` learned queries attend to the ``N`` tokens it is given, then
an output projection and an MLP on the ``latent_len`` outputs. Shared by every adapter whose
models can carry one (vit, eva), so an attention pool is counted the same way everywhere.
Nothing here knows a backbone family; the adapter decides which tokens reach the pool.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

Count = Union[Tensor, float, int]


def _linear(module: Optional[nn.Module]) -> int:
    """MACs per row of every ``nn.Linear`` inside ``module`` (0 for ``None``/``Identity``)."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules()
               if isinstance(m, nn.Linear))


def is_attention_pool(pool: Optional[nn.Module]) -> bool:
    """Whether ``pool`` is timm's latent-query attention pool (``AttentionPoolLatent``)."""
    from timm.layers import AttentionPoolLatent

    return isinstance(pool, AttentionPoolLatent)


def attention_pool_macs(pool: nn.Module, n_tokens: Count) -> Count:
    """MACs per image of an attention pool given the number of tokens it attends to.

    Same convention as :mod:`leanvit.macs` (one multiply-accumulate = 1 MAC; matrix products
    only). With ``L`` latent queries, ``N = n_tokens`` keys/values, width ``E`` (heads x head
    dim):

    - ``q``: ``L * latent_dim * E`` (a linear on the learned latent; 0 when ``q_proj=False``),
    - ``kv``: ``N * E * 2E`` (keys and values of every token: the term token reduction shrinks),
    - scores and weighted values: ``2 * L * N * E``,
    - ``proj`` and the MLP: ``L`` rows each.

    Args:
        pool: the pool module (``model.attn_pool``). timm's ``AttentionPoolLatent`` is counted
            by the formula above; a module with ``leanvit_macs(n_tokens)`` counts itself; a
            module without parameters (e.g. :class:`leanvit.heads.ClassMeanPool`, a weighted
            mean) costs 0.
        n_tokens: tokens the pool sees per image, a number or a ``[B]`` tensor (padding not
            counted).

    Returns:
        MACs per image, the same type as ``n_tokens``.

    Raises:
        ValueError: an unknown pool module with parameters (it would be miscounted silently).
    """
    if is_attention_pool(pool):
        latent = pool.latent_len
        width = pool.num_heads * pool.head_dim
        fixed = latent * (_linear(pool.q) + _linear(pool.proj) + _linear(pool.mlp))
        per_token = _linear(pool.kv) + 2 * latent * width
        return n_tokens * per_token + fixed
    count = getattr(pool, "leanvit_macs", None)
    if callable(count):
        return count(n_tokens)
    if next(pool.parameters(), None) is None:
        return n_tokens * 0
    raise ValueError(f"cannot count the MACs of the pooling module {type(pool).__name__}; "
                     "leanvit counts timm's AttentionPoolLatent, parameter-free pools and "
                     "modules with a leanvit_macs(n_tokens) method")


def attention_pool_forward(pool: nn.Module, x: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Run an ``AttentionPoolLatent`` on ``x`` ``[B, N, C]`` with an additive key bias.

    ``bias`` ``[B, 1, 1, N]`` (or ``None``) is what the blocks' attention adds to each key:
    ``log(size)`` for merged tokens under proportional attention and ``-inf`` at padding
    (:func:`leanvit.state.attention_bias`), so the pool weighs a merged token like the tokens
    it stands for and never attends to padding. timm's module takes it as ``attn_mask``
    (broadcast over heads and latent queries); ``None`` is timm's own call, bit for bit.
    """
    if bias is None:
        return pool(x)
    return pool(x, attn_mask=bias.to(x.dtype))


def pool_token_count(valid: Optional[Tensor], n_tokens: int, batch: int) -> Tensor:
    """Real tokens per image among the ``n_tokens`` the pool is given, ``[B]`` float:
    ``valid`` ``[B, n_tokens]`` bool (``False`` = padding) summed, or ``n_tokens``."""
    if valid is None:
        return torch.full((batch,), float(n_tokens))
    return valid.sum(1).float()
