"""Dense outputs of a reduced model: final patch features on the full patch grid.

Token reduction leaves fewer tokens than patches at the end of the network, so a dense head
(segmentation, depth, matching) cannot read the output as it is. :func:`dense_features` puts
one feature vector back on every patch:

- a token that still holds patches at the end gives its final features to each of them; a
  merged token (ToMe, DiffRate's merging) goes back to every patch of its group;
- a token that left the sequence (pruned, or fused away into EViT's fused token) keeps the
  features it had at the moment it left, passed through the final norm.

What each method does with it (and why):

==================  =========================================================================
``none``            every patch keeps its own token: the unpatched model's patch tokens,
                    bit for bit.
``tome``            merges only: each patch gets its group's final features (a merged token
                    is the size-weighted mean of the patches it holds, so it stands for all).
``evit``            kept tokens: their final features. Inattentive tokens leave in block
                    ``i`` after the attention residual, before the MLP: they keep those
                    features (the fused token is a class-attention-weighted sum of many
                    unrelated patches, mostly background, so it describes none of them; the
                    fused token itself gives its features to no patch).
``topk``            as ``evit``: a dropped token keeps its features after the attention of the
                    block that dropped it.
``ats``             tokens not sampled as queries in block ``i`` leave before its attention
                    updates them: they keep the block's input (block ``i - 1``'s output);
                    they served as keys in block ``i`` but got no new features there.
``dynamicvit``      (inference) the predictor drops tokens before block ``i``: they keep block
                    ``i - 1``'s output.
``diffrate``        pruned tokens keep their features after the attention of the pruning
                    block; merged tokens follow their destination (as ToMe).
==================  =========================================================================

How: the forward pass traces an index map ``state.where`` ``[B, N0]`` (the current row of the
token that holds each original token, ``-1`` once it left), updated on every gather and merge
at ``O(B * N0)``, and copies only the rows that leave; no ``[B, N, N0]`` source matrix is
carried. The MACs are the patched model's own (:func:`leanvit.count_macs`): the scatter does
no multiply-accumulates.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from leanvit import adapters
from leanvit.state import present

#: families whose tokens are patches on a grid (hierarchical families output a map already)
TOKEN_FAMILIES = ("vit",)


def dense_features(model: nn.Module, images: Tensor) -> Tensor:
    """Final patch features of ``model`` (patched or not) on the full patch grid.

    Args:
        model: a timm model of a token family (:data:`TOKEN_FAMILIES`), patched with any
            method or unpatched (then exactly ``model.forward_features(images)`` without the
            prefix tokens). Run in the mode it is in (call ``model.eval()`` for inference:
            in training mode the keep-mask methods keep every token in place).
        images: ``[B, 3, H, W]`` preprocessed as the model expects.

    Returns:
        ``[B, H_p, W_p, C]``: ``H_p = H / patch``, ``W_p = W / patch`` (the model's patch
        grid), ``C`` the width; the final norm applied as timm's ``forward_features`` does;
        class, distillation and register tokens left out. See the module docstring for what
        a pruned, fused or merged token gives its patches.

    Raises:
        TypeError / ValueError: not a model, a hierarchical family, or images the model
            cannot take (the adapter's one-line errors).
    """
    adapter = adapters.find_adapter(model)
    if adapter.FAMILY not in TOKEN_FAMILIES:
        raise ValueError(
            f"dense_features supports the token families {', '.join(TOKEN_FAMILIES)}; a "
            f"{adapter.FAMILY} model's forward_features is a feature map already")
    adapter.check_input(model, images)
    gh, gw = _grid(model, images)
    prefix = model.num_prefix_tokens
    if not adapters.is_patched(model):
        x = model.forward_features(images)[:, prefix:]
        return x.reshape(x.shape[0], gh, gw, x.shape[-1])
    x, state = adapter.forward_features(model, images, trace_where=True)
    out = _scatter(model, x, state)[:, prefix:]
    if out.shape[1] != gh * gw:
        raise ValueError(f"the model has {out.shape[1]} patch tokens, not the {gh}x{gw} grid "
                         "of its patch embedding")
    return out.reshape(x.shape[0], gh, gw, x.shape[-1])


def _scatter(model: nn.Module, x: Tensor, state) -> Tensor:
    """``[B, N0, C]``: each original token's features from the token that holds it at the end
    (``x`` ``[B, N, C]``, normed), or its features when it left (normed here)."""
    B, C = x.shape[0], x.shape[-1]
    out = x.gather(1, state.where.clamp_min(0)[..., None].expand(-1, -1, C))
    missing = ~present(state)
    if state.left:
        flat = torch.cat([i for i, _ in state.left])
        feats = model.norm(torch.cat([f for _, f in state.left]))
        out = out.reshape(B * state.n0, C).index_put((flat,), feats.to(out.dtype))
        out = out.reshape(B, state.n0, C)
        missing = missing.reshape(-1).index_put((flat,), torch.tensor(False)).reshape(B, -1)
    if bool(missing.any()):  # pragma: no cover - guards method authors
        raise RuntimeError("dense_features: some tokens neither stayed nor left (a method "
                           "changed the tokens without updating state.where)")
    return out


def _grid(model: nn.Module, images: Tensor) -> tuple[int, int]:
    """Patch grid ``(rows, cols)`` of ``images`` for ``model``'s patch embedding."""
    pe = model.patch_embed
    if getattr(model, "dynamic_img_size", False):
        return tuple(pe.dynamic_feat_size(tuple(images.shape[-2:])))
    return tuple(pe.grid_size)
