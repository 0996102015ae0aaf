"""Run one plainly written per-image token method against leanvit on the three flat-token
families (timm ViT, Eva, BEiT), through each family's own reference forward
(``_vit_reference``, ``_eva_reference``, ``_beit_reference``).

A method's reference is written once, as a ``core``: ``core(i, x [N, C], attn [H, N, N],
keys [H, N, D], size [N], prefix)`` for ONE image after block ``i``'s attention residual,
returning ``None`` (nothing changes) or ``(x' [N', C], size' [N'], groups)``, where
``groups[t]`` lists the input rows output token ``t`` holds, its first entry the token whose
position it keeps (itself for a kept token; the destination of a merge).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

import leanvit
from leanvit.adapters import vit as vit_adapter
from tests.methods import _eva_reference as eva_ref
from tests.methods._beit_reference import forward_image
from tests.methods._vit_reference import forward, head

Core = Callable[[int, Tensor, Tensor, Tensor, Tensor, int],
                Optional[tuple[Tensor, Tensor, list]]]


def vit_reduce(core: Core):
    """The ``_vit_reference`` form: sources are the union of the group's sources."""

    def reduce(i, x, a, k, size, source, p):
        out = core(i, x, a, k, size, p)
        if out is None:
            return x, size, source
        rows, sizes, groups = out
        src = torch.stack([torch.stack([source[g] for g in grp]).amax(0) for grp in groups])
        return rows, sizes, src

    return reduce


def pos_reduce(core: Core):
    """The ``_eva_reference`` / ``_beit_reference`` form: each output token takes the position
    of its group's first token."""

    def reduce(i, x, a, k, size, pos, p):
        out = core(i, x, a, k, size, p)
        if out is None:
            return x, size, pos
        rows, sizes, groups = out
        return rows, sizes, [pos[grp[0]] for grp in groups]

    return reduce


def images_for(model, batch: int = 3, seed: int = 3) -> Tensor:
    return torch.randn(batch, 3, *model.patch_embed.img_size, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))


def check_vit(model, method: str, opts: dict, core: Core, prop_attn: bool = False,
              sources: bool = False):
    """Patch a tiny timm ViT and compare final tokens and logits (and sizes and sources when
    ``sources``: the method traces them) with the reference, to 1e-5."""
    images = images_for(model)
    with torch.no_grad():
        ref_x, ref_size, ref_src = forward(model, images, vit_reduce(core), prop_attn=prop_attn)
        ref_logits = head(model, ref_x, ref_size)
        leanvit.patch(model, method, **opts)
        logits = model(images)
        x, state = vit_adapter.forward_features(model, images)
    assert x.shape == ref_x.shape
    torch.testing.assert_close(x, ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    if sources:
        assert torch.equal(state.source, ref_src)
        if state.size is None:  # nothing merged: every token stands for one patch
            assert ref_size.eq(1).all()
        else:
            torch.testing.assert_close(state.size, ref_size)
    return x, state


def check_eva(model, method: str, opts: dict, core: Core, prop_attn: bool = False,
              sizes: bool = False):
    """Patch a tiny timm Eva and compare tokens, rotary rows, sizes and logits per image."""
    from tests.methods.test_eva import _check

    return _check(model, method, opts, reduce=pos_reduce(core), prop_attn=prop_attn,
                  sizes=sizes)


def check_beit(model, method: str, opts: dict, core: Core, prop_attn: bool = False,
               sized: bool = False):
    """Patch a tiny timm Beit and compare tokens, positions, sizes and logits per image."""
    from tests.methods.test_beit_methods import _check, _images

    leanvit.patch(model, method, **opts)
    ref = lambda im: forward_image(model, im, pos_reduce(core), prop_attn=prop_attn)  # noqa: E731
    return _check(model, _images(), ref, sized=sized)


EVA_KINDS = tuple(eva_ref.CONFIGS)
