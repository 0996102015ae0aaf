"""DivPrune against a plainly written per-image reference on timm ViT, Eva and BEiT: greedy
max-min selection on the cosine distances of the tokens' features, kept in their order."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import leanvit
from leanvit.methods.divprune import num_diverse
from tests.methods import _eva_reference as eva_ref
from tests.methods._beit_reference import tiny_beit
from tests.methods._reduce_families import (EVA_KINDS, check_beit, check_eva, check_vit,
                                            images_for)
from tests.methods._vit_reference import tiny_vit


def first_max(values):
    """Index of the first largest value."""
    best = 0
    for j, v in enumerate(values):
        if v > values[best]:
            best = j
    return best


def divprune_core(keep_rate, locations):
    def core(i, x, a, k, size, p):
        if i not in locations:
            return None
        n = x.shape[0] - p
        keep = int(round(keep_rate * n))
        if keep >= n:
            return None
        f = [x[p + j] / x[p + j].norm() for j in range(n)]
        d = [[1.0 - float(f[u] @ f[v]) for v in range(n)] for u in range(n)]
        # first: the token whose nearest other token (second smallest of its column) is farthest
        chosen = [first_max([sorted(d[u][v] for u in range(n))[1] for v in range(n)])]
        while len(chosen) < keep:
            score = [min(d[c][v] for c in chosen) if v not in chosen else -1.0
                     for v in range(n)]
            chosen.append(first_max(score))
        kept = list(range(p)) + sorted(p + j for j in chosen)
        return x[kept], size[kept], [[t] for t in kept]

    return core


@pytest.mark.parametrize("rate, locs", [(0.6, (1, 2)), (0.5, (0, 1, 3)), (0.3, (2,))])
def test_vit_matches_reference(rate, locs):
    x, _ = check_vit(tiny_vit(seed=1), "divprune", dict(keep_rate=rate, locations=locs),
                     divprune_core(rate, locs))
    n = 16
    for _ in locs:
        n = num_diverse(rate, n)
    assert x.shape[1] == 1 + n


def test_vit_default_locations_registers_and_avg_pool():
    model = tiny_vit(seed=2, reg_tokens=2, global_pool="avg")
    check_vit(model, "divprune", {}, divprune_core(0.7, (1, 2, 3)))  # (d//4, d//2, 3d//4)


@pytest.mark.parametrize("kind", EVA_KINDS)
def test_eva_matches_reference(kind):
    model = eva_ref.tiny_eva(kind)
    check_eva(model, "divprune", dict(keep_rate=0.5, locations=(0, 1)),
              divprune_core(0.5, (0, 1)))


@pytest.mark.parametrize("variant", ["own", "shared"])
def test_beit_matches_reference(variant):
    from tests.methods.test_beit_methods import MODELS

    model = tiny_beit(**MODELS[variant])
    state = check_beit(model, "divprune", dict(keep_rate=0.6, locations=(1, 2)),
                       divprune_core(0.6, (1, 2)))
    assert state.positions.shape[1] == 1 + num_diverse(0.6, num_diverse(0.6, 16))


def test_kept_count_is_the_authors_rounding():
    assert num_diverse(0.5, 5) == 2  # round half to even: int(round(2.5))
    assert num_diverse(0.7, 16) == 11 and num_diverse(0.01, 16) == 1 and num_diverse(1.0, 7) == 7


def test_identical_tokens_are_never_chosen_twice():
    from leanvit.methods.divprune import cosine_distances, diverse_subset

    x = torch.ones(1, 6, 4)  # every distance 0: the choice falls back to the first indices
    assert diverse_subset(cosine_distances(x), 4).sort().values.tolist() == [[0, 1, 2, 3]]


def test_keep_all_is_bit_identical_and_unpatch_restores():
    model = tiny_vit(seed=5)
    images = images_for(model)
    with torch.no_grad():
        before = model(images)
        leanvit.patch(model, "divprune", keep_rate=1.0)
        assert torch.equal(model(images), before)
        leanvit.unpatch(model)
        leanvit.patch(model, "divprune", keep_rate=0.5)
        assert not torch.allclose(model(images), before)
        leanvit.unpatch(model)
        assert torch.equal(model(images), before)


@pytest.mark.parametrize("opts, error, match", [
    (dict(keep_rate=0.0), ValueError, "keep_rate"), (dict(keep_rate=1.2), ValueError, "keep_rate"),
    (dict(keep_rate="0.5"), TypeError, "keep_rate"),
    (dict(locations=(4,)), ValueError, "outside the model's blocks"),
    (dict(locations="3"), TypeError, "locations"),
    (dict(r=3), ValueError, "unknown option"),
])
def test_bad_options_are_rejected(opts, error, match):
    model = tiny_vit()
    with pytest.raises(error, match=match):
        leanvit.patch(model, "divprune", **opts)
    assert not leanvit.is_patched(model)


def test_count_macs_equals_flop_counter():
    """The cosines of all pairs of non-prefix tokens are a product the counter sees: equal."""
    model = tiny_vit(seed=1).float()
    for blk in model.blocks:
        blk.attn.fused_attn = False
    x = torch.randn(1, 3, 32, 32)
    leanvit.patch(model, "divprune", keep_rate=0.5)
    report = leanvit.count_macs(model, x)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert report.total == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)
    # blocks 1, 2, 3 (the default) on 16, 8 and 4 patch tokens of width 32
    assert report.extra["diversity"] == (16 * 16 + 8 * 8 + 4 * 4) * 32
