"""``random``: DynamicViT's counts, survivors drawn at random; checked against a plain loop
over the timm blocks that drops the same rows."""
from __future__ import annotations

import pytest
import timm
import torch

import leanvit
from tests.conftest import tiny_vit


def _reference(model, x, locations, keep_rate, seed):
    """timm's own modules, written out: before block ``locations[s]`` keep the prefix and
    int(L0 * rho^(s+1)) patch rows chosen as torch.rand(...).topk from a generator seeded
    ``seed``, in increasing order; then the final norm and timm's head."""
    g = torch.Generator().manual_seed(seed)
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    prefix = model.num_prefix_tokens
    l0 = t.shape[1] - prefix
    for i, blk in enumerate(model.blocks):
        if i in locations:
            s = locations.index(i)
            k = max(1, int(l0 * keep_rate ** (s + 1)))
            r = torch.rand(t.shape[0], t.shape[1] - prefix, generator=g)
            rows = r.topk(k, dim=1).indices.sort(dim=1).values + prefix
            keep = torch.cat([torch.arange(prefix).expand(t.shape[0], -1), rows], 1)
            t = torch.stack([t[b, keep[b]] for b in range(t.shape[0])])
        t = blk(t)
    return model.forward_head(model.norm(t))


@pytest.mark.parametrize("name,kw", [("deit_tiny_patch16_224", {}),
                                     ("vit_small_patch14_reg4_dinov2", dict(patch_size=8))])
def test_random_matches_the_written_out_reference(name, kw):
    model = tiny_vit(name, depth=4, **kw)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = _reference(model, x, [1, 2], 0.6, seed=5)
        leanvit.patch(model, "random", keep_rate=0.6, locations=(1, 2), seed=5)
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_random_keeps_dynamicvits_counts_and_counts_their_macs():
    model = tiny_vit(depth=4)  # 64 px / 16: 16 patches + cls
    leanvit.patch(model, "random", keep_rate=0.5, locations=(1, 3))
    report = leanvit.count_macs(model, torch.randn(2, 3, 64, 64))
    assert [b.tokens_in for b in report.per_block] == [17, 9, 9, 5]
    leanvit.unpatch(model)
    assert leanvit.count_macs(model, torch.randn(2, 3, 64, 64)).gmacs > report.gmacs


def test_random_at_keep_rate_1_is_the_unpatched_model():
    model = tiny_vit()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        leanvit.patch(model, "random", keep_rate=1.0)
        torch.testing.assert_close(model(x), ref)


def test_random_draws_differ_per_image_and_repeat_per_seed():
    def kept_sources(seed):
        model = tiny_vit(depth=2)
        leanvit.patch(model, "random", keep_rate=0.5, locations=(1,), seed=seed)
        seen = []  # the tokens entering block 1's first norm: the survivors
        model.blocks[1].norm1.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64).expand(4, -1, -1, -1).contiguous())
        return seen

    a, b, c = kept_sources(0), kept_sources(0), kept_sources(1)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert not torch.equal(a[0][0], a[0][1])  # same image, other survivors


def test_random_options_are_checked():
    model = tiny_vit()
    for bad in (dict(keep_rate=0.0), dict(keep_rate=float("nan")), dict(locations=(5,)),
                dict(seed=-1)):
        with pytest.raises(ValueError):
            leanvit.patch(model, "random", **bad)
        assert not leanvit.is_patched(model)
    assert "random" in leanvit.available_methods()


def test_random_seed_out_of_range_names_seed_and_the_range():
    """torch's generator takes an unsigned 64-bit seed; a larger one was an 'Overflow when
    unpacking long long' that named neither the option nor the range."""
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"seed must be in \[0, 18446744073709551615\], got "
                                         r"1180591620717411303424"):
        leanvit.patch(model, "random", seed=2**70)
    assert not leanvit.is_patched(model)
    leanvit.patch(model, "random", seed=2**64 - 1, locations=(1,))  # the largest is taken
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
