"""ToFu against a plainly written per-image reference on timm ViT, Eva and BEiT: ToMe's matching,
the matched tokens pruned in the first blocks and MLERP-merged (size-weighted mean rescaled to
the group's largest norm) in the others."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import leanvit
from leanvit.methods.tome import schedule
from tests.methods import _eva_reference as eva_ref
from tests.methods._beit_reference import tiny_beit
from tests.methods._reduce_families import (EVA_KINDS, check_beit, check_eva, check_vit,
                                            images_for)
from tests.methods._vit_reference import tiny_vit


def tofu_core(r_per_block, prune_blocks):
    """One image: A = even rows, B = odd rows; each unprotected A token's most similar
    unprotected B token (cosine of head-averaged keys); the r A tokens with the highest
    similarity leave. Pruning blocks drop them; merging blocks fold each into its partner:
    size-weighted mean, rescaled to the largest norm of the tokens it holds. Output: prefix,
    the A tokens left, then B."""

    def core(i, x, a, k, size, p):
        n = x.shape[0]
        r = min(r_per_block[i], (n - p) // 2)
        if r <= 0:
            return None
        metric = k.mean(0)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        A = [t for t in range(0, n, 2) if t >= p]
        B = [t for t in range(1, n, 2) if t >= p]
        best = {}
        for ia in A:
            sims = [float(metric[ia] @ metric[jb]) for jb in B]
            j = max(range(len(B)), key=lambda q: sims[q])  # first of equal maxima
            best[ia] = (sims[j], B[j])
        ranked = sorted(A, key=lambda ia: -best[ia][0])
        leaving = {ia: best[ia][1] for ia in ranked[:r]}
        order = list(range(p)) + [ia for ia in A if ia not in leaving] + B
        groups = [[t] + ([s for s in ranked[:r] if leaving[s] == t] if i >= prune_blocks
                         else []) for t in order]
        rows, sizes = [], []
        for grp in groups:
            w = sum(size[g] for g in grp)
            mean = sum(size[g] * x[g] for g in grp) / w
            if len(grp) > 1:
                mean = mean / mean.norm() * max(x[g].norm() for g in grp)
            rows.append(mean)
            sizes.append(w)
        return torch.stack(rows), torch.stack(sizes), groups

    return core


@pytest.mark.parametrize("r, prune_blocks", [(2, None), (3, 2), ((2, -0.5), 0), ([3, 2, 2, 1], 4)])
def test_vit_matches_reference(r, prune_blocks):
    model = tiny_vit(seed=1)
    pb = 1 if prune_blocks is None else prune_blocks  # default: depth // 4
    x, state = check_vit(model, "tofu", dict(r=r, prune_blocks=prune_blocks, trace_source=True),
                         tofu_core(schedule(r, 4), pb), prop_attn=True, sources=True)
    assert x.shape[1] == 17 - sum(schedule(r, 4))


def test_vit_without_proportional_attention_and_with_registers_and_avg_pool():
    model = tiny_vit(seed=2, reg_tokens=2, global_pool="avg")
    check_vit(model, "tofu", dict(r=3, prop_attn=False, trace_source=True),
              tofu_core([3] * 4, 1), prop_attn=False, sources=True)


@pytest.mark.parametrize("kind", EVA_KINDS)
def test_eva_matches_reference(kind):
    model = eva_ref.tiny_eva(kind)
    p = model.num_prefix_tokens
    _, state = check_eva(model, "tofu", dict(r=3, prune_blocks=1), tofu_core([3] * 3, 1),
                         prop_attn=True, sizes=True)
    assert state.size.shape[1] == 16 + p - 9


@pytest.mark.parametrize("variant", ["own", "shared"])
def test_beit_matches_reference(variant):
    from tests.methods.test_beit_methods import MODELS

    model = tiny_beit(**MODELS[variant])
    state = check_beit(model, "tofu", dict(r=2, prune_blocks=2), tofu_core([2] * 4, 2),
                       prop_attn=True, sized=True)
    assert state.positions.shape[1] == 17 - 4 * 2


def test_mlerp_keeps_the_largest_norm_and_the_mean_direction():
    from leanvit.methods.tofu import mlerp_merge
    from leanvit.ops.merge import bipartite_soft_matching

    x = torch.randn(2, 9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    m = bipartite_soft_matching(x, 3, prefix=1)
    out, size = mlerp_merge(m, x)
    for b in range(2):
        for d in set(m.dst[b].tolist()):
            grp = [int(m.keep[b, d])] + [int(s) for s, t in zip(m.src[b], m.dst[b]) if t == d]
            mean = x[b, grp].mean(0)
            torch.testing.assert_close(out[b, d].norm(), x[b, grp].norm(dim=-1).max())
            torch.testing.assert_close(out[b, d] / out[b, d].norm(), mean / mean.norm())
            assert size[b, d] == len(grp)


def test_r_zero_is_bit_identical_and_unpatch_restores():
    model = tiny_vit(seed=5)
    images = images_for(model)
    with torch.no_grad():
        before = model(images)
        leanvit.patch(model, "tofu", r=0)
        assert torch.equal(model(images), before)
        leanvit.unpatch(model)
        leanvit.patch(model, "tofu", r=3)
        assert not torch.allclose(model(images), before)
        leanvit.unpatch(model)
        assert torch.equal(model(images), before)


@pytest.mark.parametrize("opts, error, match", [
    (dict(r=-1), ValueError, "r"), (dict(r=1.5), TypeError, "r"),
    (dict(prune_blocks=-1), ValueError, "prune_blocks"),
    (dict(prune_blocks=1.0), TypeError, "prune_blocks"),
    (dict(prune_blocks=5, r=2), ValueError, "prune_blocks=5 exceeds the model's 4 blocks"),
    (dict(prop_attn="yes"), TypeError, "prop_attn"),
    (dict(keep_rate=0.5), ValueError, "unknown option"),
])
def test_bad_options_are_rejected(opts, error, match):
    model = tiny_vit()
    with pytest.raises(error, match=match):
        leanvit.patch(model, "tofu", **opts)
    assert not leanvit.is_patched(model)


def test_too_large_r_is_clamped_with_a_warning():
    with pytest.warns(UserWarning, match=r"tofu: .*clamped to \[8, 4, 2, 1\]"):
        leanvit.patch(tiny_vit(), "tofu", r=13)


def test_count_macs_equals_flop_counter():
    """The matching's cosines are a product the counter sees; MLERP's norms ((N + r) C per
    merging block) it does not: within 1%."""
    model = tiny_vit(seed=1).float()
    for blk in model.blocks:
        blk.attn.fused_attn = False
    x = torch.randn(1, 3, 32, 32)
    leanvit.patch(model, "tofu", r=3)
    report = leanvit.count_macs(model, x)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    traced = counter.get_total_flops() / 2
    assert report.total == pytest.approx(traced, rel=1e-2)
    assert report.extra["matching"] > 0 and report.extra["mlerp"] > 0
    dense = leanvit.count_macs(leanvit.unpatch(model), x).total
    assert report.total < 0.8 * dense
