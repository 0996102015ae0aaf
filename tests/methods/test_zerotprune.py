"""Zero-TPrune against a plainly written per-image reference on timm ViT and Eva: I' (one
PageRank step) -> S (prune the least important half's most redundant tokens by key
similarity) -> I (PageRank on the survivors' attention graph, prune the least important)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import leanvit
from leanvit.methods.tome import schedule
from leanvit.methods.zerotprune import default_iterations
from tests.methods import _eva_reference as eva_ref
from tests.methods._beit_reference import tiny_beit
from tests.methods._reduce_families import EVA_KINDS, check_eva, check_vit, images_for
from tests.methods._vit_reference import tiny_vit


def pagerank(a, graph, iterations, boost):
    """Importance of the tokens ``graph`` (input rows, in order) on the attention among them:
    per head, the map restricted to them with its rows renormalised, ``s <- A^T s`` from a
    uniform start (token 0, the class token, ``sqrt(n)`` times higher when ``boost``); heads
    combined by the root mean square. Returns ``{row: score}``."""
    n = len(graph)
    heads = []
    for h in range(a.shape[0]):
        sub = a[h][graph][:, graph]  # row i: what token graph[i] attends to among them
        sub = sub / sub.sum(1, keepdim=True)
        s = torch.tensor([math.sqrt(n) if (boost and g == 0) else 1.0 for g in graph],
                         dtype=a.dtype)
        s = s / s.sum()
        for _ in range(iterations):
            s = sub.T @ s  # token j collects the votes s_i A[i, j] of every token i
        heads.append(s)
    s = torch.stack(heads)
    rms = s.square().mean(0).sqrt()
    return {g: float(rms[t]) for t, g in enumerate(graph)}


def zerotprune_core(r_per_block, iterations, share=0.5, boost=True):
    def core(i, x, a, k, size, p):
        n = x.shape[0]
        r = min(r_per_block[i], (n - p) // 2)
        if r <= 0:
            return None
        r_s = int(round(share * r))
        rest = list(range(p, n))
        pre = pagerank(a, list(range(n)), 1, boost)
        by_importance = sorted(rest, key=lambda t: pre[t])  # ascending, stable
        half = (n - p) // 2
        A, B = by_importance[:half], by_importance[half:]
        metric = k.mean(0)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        best = {t: max(float(metric[t] @ metric[u]) for u in B) for t in A}
        pruned = set(sorted(A, key=lambda t: -best[t])[:r_s])
        survivors = [t for t in range(n) if t not in pruned]
        imp = pagerank(a, survivors, iterations[i], boost)
        ranked = sorted([t for t in survivors if t >= p], key=lambda t: -imp[t])
        kept = list(range(p)) + sorted(ranked[:n - p - r])
        return x[kept], size[kept], [[t] for t in kept]

    return core


@pytest.mark.parametrize("opts", [dict(r=2), dict(r=3, similarity_share=0.0),
                                  dict(r=(3, -0.5), similarity_share=1.0, iterations=4),
                                  dict(r=[4, 3, 2, 1], iterations=[2, 1, 3, 1], cls_boost=False)])
def test_vit_matches_reference(opts):
    model = tiny_vit(seed=1)
    its = opts.get("iterations")
    its = default_iterations(4) if its is None else its if isinstance(its, list) else [its] * 4
    core = zerotprune_core(schedule(opts["r"], 4), its, opts.get("similarity_share", 0.5),
                           opts.get("cls_boost", True))
    x, _ = check_vit(model, "zerotprune", opts, core)
    assert x.shape[1] == 17 - sum(schedule(opts["r"], 4))


def test_vit_with_registers_and_without_class_token():
    check_vit(tiny_vit(seed=2, reg_tokens=2), "zerotprune", dict(r=2),
              zerotprune_core([2] * 4, default_iterations(4)))
    model = tiny_vit(seed=3, class_token=False, global_pool="avg")
    check_vit(model, "zerotprune", dict(r=3), zerotprune_core([3] * 4, default_iterations(4),
                                                              boost=False))


@pytest.mark.parametrize("kind", EVA_KINDS)
def test_eva_matches_reference(kind):
    model = eva_ref.tiny_eva(kind)
    boost = model.cls_token is not None
    x, _ = check_eva(model, "zerotprune", dict(r=3),
                     zerotprune_core([3] * 3, default_iterations(3), boost=boost))
    assert x.shape[1] == 16 + model.num_prefix_tokens - 9


@pytest.mark.parametrize("variant", ["own", "shared"])
def test_beit_matches_reference(variant):
    """BEiT: the attention graph includes the relative position bias of every query row."""
    from tests.methods._reduce_families import check_beit
    from tests.methods.test_beit_methods import MODELS

    model = tiny_beit(**MODELS[variant])
    state = check_beit(model, "zerotprune", dict(r=2),
                       zerotprune_core([2] * 4, default_iterations(4), boost=True), sized=True)
    assert state.positions.shape[1] == 17 - 4 * 2


def test_default_iterations_follow_the_paper():
    assert default_iterations(12) == [30, 30, 30] + [5] * 6 + [1, 1, 1]
    assert default_iterations(4) == [30, 5, 5, 1]


def test_r_zero_is_bit_identical_and_unpatch_restores():
    model = tiny_vit(seed=5)
    images = images_for(model)
    with torch.no_grad():
        before = model(images)
        leanvit.patch(model, "zerotprune", r=0)
        assert torch.equal(model(images), before)
        leanvit.unpatch(model)
        leanvit.patch(model, "zerotprune", r=3)
        assert not torch.allclose(model(images), before)
        leanvit.unpatch(model)
        assert torch.equal(model(images), before)


@pytest.mark.parametrize("opts, error, match", [
    (dict(r=-2), ValueError, "r"), (dict(r="8"), TypeError, "r"),
    (dict(similarity_share=1.5), ValueError, "similarity_share"),
    (dict(similarity_share=None), TypeError, "similarity_share"),
    (dict(iterations=0), ValueError, "iterations"),
    (dict(iterations=[1, 2], r=2), ValueError, "iterations has 2 entries but the model has 4"),
    (dict(iterations=[1, 0, 1, 1]), ValueError, "iterations"),
    (dict(cls_boost=1), TypeError, "cls_boost"),
    (dict(keep_rate=0.5), ValueError, "unknown option"),
])
def test_bad_options_are_rejected(opts, error, match):
    model = tiny_vit()
    with pytest.raises(error, match=match):
        leanvit.patch(model, "zerotprune", **opts)
    assert not leanvit.is_patched(model)


def test_count_macs_equals_flop_counter():
    """The full map (q k^T), the PageRank steps and the S-stage's cosines are products the
    counter sees: equal."""
    model = tiny_vit(seed=1).float()
    for blk in model.blocks:
        blk.attn.fused_attn = False
    x = torch.randn(1, 3, 32, 32)
    leanvit.patch(model, "zerotprune", r=3)
    report = leanvit.count_macs(model, x)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert report.total == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)
    assert report.extra["pagerank"] > 0 and report.extra["similarity"] > 0
    # the map is the attention's own (computed explicitly once): no second q k^T
    assert sum(b.signals for b in report.per_block) == 0


@pytest.mark.parametrize("variant", ["own", "shared"])
def test_ranking_one_image_at_a_time_matches_reference(monkeypatch, variant):
    """The engine ranks each chunk of images on its own map (``Reducer.read_map``); with one
    image per chunk (three chunks, the per-image ``log(size)`` bias sliced, BEiT's bias per
    query row shared) the survivors and outputs are still the reference's."""
    import leanvit.ops.attention as attention_ops

    monkeypatch.setattr(attention_ops, "MAP_CHUNK_BYTES", 1)
    test_vit_matches_reference(dict(r=3, similarity_share=0.0))
    test_beit_matches_reference(variant)
