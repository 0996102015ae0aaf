"""MCTF against a plainly written per-image reference (timm ViT, the three Eva configs): the
three criteria, the two fusion directions and the attention-weighted pooling written out with
Python loops over one image's tokens."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import leanvit
from leanvit.adapters import vit as vit_adapter
from tests.methods import _eva_reference as eva_ref
from tests.methods._beit_reference import tiny_beit
from tests.methods._vit_reference import forward, head, tiny_vit
from tests.methods.test_eva import _check as eva_check

AUTHORS = dict(tau_sim=1.0, tau_info=20.0, tau_size=40.0, bidirection=True, pooling="attention")


def ref_groups(x, attn, size, r, p, tau_sim, tau_info, tau_size, bidirection, pooling):
    """One image's MCTF step: ``x`` ``[N, C]`` (hidden states), ``attn`` ``[H, N, N]`` (the
    block's attention map), ``size`` ``[N]`` -> groups ``(representative, members)`` in
    position order and the pooling weight of every token."""
    n = x.shape[0]
    A, B = list(range(0, n, 2)), list(range(1, n, 2))
    unit = [x[t] / x[t].norm() for t in range(n)]
    received = [float(attn[:, :, t].mean()) for t in range(n)]
    info = [(1 / v) / max(1 / u for u in received) for v in received]
    small = [(1 / float(s)) / max(1 / float(u) for u in size) for s in size]

    def score(a, b):
        if a < p or b < p:
            return -math.inf
        s = 1.0
        if tau_sim:
            s *= ((float(unit[a] @ unit[b]) + 1) / 2) ** (1 / tau_sim)
        if tau_info:
            s *= (info[a] * info[b]) ** (1 / tau_info)
        if tau_size:
            s *= (small[a] * small[b]) ** (1 / tau_size)
        return s

    def best(token, candidates):  # the first candidate with the highest score
        top = candidates[0]
        for c in candidates[1:]:
            if score(*sorted((token, c))) > score(*sorted((token, top))):
                top = c
        return score(*sorted((token, top))), top

    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    first = {a: best(a, B) for a in A}
    ranked = sorted(A, key=lambda a: -first[a][0])  # stable: ties by position
    dest = {a: first[a][1] for a in ranked[:r1]}
    remaining = sorted(ranked[r1:])
    if r2:
        second = {b: best(b, remaining) for b in B}
        ranked2 = sorted(B, key=lambda b: -second[b][0])
        dest.update({b: second[b][1] for b in ranked2[:r2]})

    def final(t):
        while t in dest:
            t = dest[t]
        return t

    groups = [(t, [u for u in range(n) if final(u) == t]) for t in range(n) if t not in dest]
    weight = [received[t] * float(size[t]) if pooling == "attention" else float(size[t])
              for t in range(n)]
    return groups, weight


def ref_plan(r, locations, depth, n, p):
    """Tokens fused per block: ``r`` (an int or a per-block list) in the fusing blocks, at most
    half the non-prefix tokens and never below 10 tokens left."""
    out = []
    for i in range(depth):
        want = r[i] if isinstance(r, list) else r
        rr = min(want, (n - p) // 2, max(n - 10, 0)) if i in locations else 0
        out.append(rr)
        n -= rr
    return out


def _fuse(x, size, groups, weight):
    rows = [sum(weight[j] * x[j] for j in g) / sum(weight[j] for j in g) for _, g in groups]
    return torch.stack(rows), torch.stack([sum(size[j] for j in g) for _, g in groups])


def vit_reduce(r_per_block, opts):
    def reduce(i, x, a, k, size, source, p):
        if r_per_block[i] <= 0:
            return x, size, source
        groups, weight = ref_groups(x, a, size, r_per_block[i], p, **opts)
        x, new_size = _fuse(x, size, groups, weight)
        return x, new_size, torch.stack([source[g].amax(0) for _, g in groups])

    return reduce


def eva_reduce(r_per_block, opts):
    def reduce(i, x, a, k, size, pos, p):
        if r_per_block[i] <= 0:
            return x, size, pos
        groups, weight = ref_groups(x, a, size, r_per_block[i], p, **opts)
        x, new_size = _fuse(x, size, groups, weight)
        return x, new_size, [pos[rep] for rep, _ in groups]  # the destination's position

    return reduce


def _images(model, batch=3, seed=3):
    return torch.randn(batch, 3, *model.patch_embed.img_size,
                       generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_vit(model, r=2, locations=None, prop_attn=True, **kw):
    opts = dict(AUTHORS, **kw)
    images = _images(model)
    depth, p = len(model.blocks), model.num_prefix_tokens
    locs = range(1, depth) if locations is None else locations
    sched = ref_plan(r, locs, depth, model.patch_embed.num_patches + p, p)
    with torch.no_grad():
        ref_x, ref_size, ref_src = forward(model, images, vit_reduce(sched, opts),
                                           prop_attn=prop_attn)
        ref_logits = head(model, ref_x, ref_size)
        leanvit.patch(model, "mctf", r=r, locations=locations, prop_attn=prop_attn,
                      trace_source=True, **opts)
        logits = model(images)
        x, state = vit_adapter.forward_features(model, images)
    assert x.shape == ref_x.shape
    assert torch.equal(state.source, ref_src)  # the same tokens fused, in the same order
    torch.testing.assert_close(state.size, ref_size)
    torch.testing.assert_close(x, ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    return x, state


def test_vit_matches_reference_with_the_authors_settings():
    with pytest.warns(UserWarning, match="at least 10 left"):
        x, state = _check_vit(tiny_vit(), r=3)
    assert x.shape[1] == 17 - 3 - 3 - 1  # the last block keeps the authors' 10 tokens
    assert state.size.sum(1).eq(17).all() and state.source.sum(1).eq(1).all()
    assert (state.size > 2).any()  # chains A -> B -> A really happen


@pytest.mark.parametrize("kw", [
    dict(bidirection=False, pooling="size"),
    dict(tau_sim=0.5, tau_info=0.0, tau_size=3.0, prop_attn=False),
    dict(tau_sim=0.0, locations=(0, 2), r=[3, 0, 2, 0]),
])
def test_vit_matches_reference_with_other_settings(kw):
    kw = dict(kw)
    _check_vit(tiny_vit(seed=1), r=kw.pop("r", 2), **kw)


def test_vit_register_tokens_and_average_pool_without_class_token():
    _check_vit(tiny_vit(reg_tokens=4, seed=2), r=2)
    _check_vit(tiny_vit(class_token=False, global_pool="avg", seed=3), r=2)


@pytest.mark.parametrize("kind", tuple(eva_ref.CONFIGS))
def test_eva_matches_reference(kind):
    model = eva_ref.tiny_eva(kind)
    p = model.num_prefix_tokens
    sched = ref_plan(3, (1, 2), 3, 16 + p, p)
    _, state = eva_check(model, "mctf", dict(r=3), prop_attn=True,
                         reduce=eva_reduce(sched, AUTHORS))
    assert state.size.sum(1).eq(16 + p).all()


@pytest.mark.parametrize("variant", ["own", "shared"])
def test_beit_matches_reference(variant):
    """BEiT: the informativeness reads the whole map, relative position bias of every row
    included (the engine passes all of it)."""
    from tests.methods._beit_reference import forward_image
    from tests.methods.test_beit_methods import MODELS, _check

    model = tiny_beit(**MODELS[variant])
    sched = ref_plan(3, range(1, 4), 4, 17, 1)
    leanvit.patch(model, "mctf", r=3)
    ref = lambda im: forward_image(model, im, eva_reduce(sched, AUTHORS),  # noqa: E731
                                   prop_attn=True)
    state = _check(model, _images(model), ref, sized=True)
    assert state.positions.shape[1] == 17 - sum(sched)


def test_r_zero_is_bit_identical_and_unpatch_restores():
    model = tiny_vit(seed=5)
    images = _images(model)
    with torch.no_grad():
        before = model(images)
        leanvit.patch(model, "mctf", r=0)
        assert torch.equal(model(images), before)
        leanvit.unpatch(model)
        leanvit.patch(model, "mctf", r=2)
        assert not torch.allclose(model(images), before)
        leanvit.unpatch(model)
        assert torch.equal(model(images), before)
    assert type(model).__name__ == "VisionTransformer"


@pytest.mark.parametrize("opts, error, match", [
    (dict(r=-1), ValueError, "r"), (dict(r="16"), TypeError, "r"),
    (dict(tau_info=-1.0), ValueError, "tau_info"), (dict(tau_sim=None), TypeError, "tau_sim"),
    (dict(tau_size=float("nan")), ValueError, "tau_size"),
    (dict(pooling="max"), ValueError, "pooling"), (dict(bidirection=1), TypeError, "bidirection"),
    (dict(locations=(0, 9)), ValueError, "locations"), (dict(locations="1"), TypeError,
                                                        "locations"),
    (dict(prop_attn=None), TypeError, "prop_attn"), (dict(one_step_ahead=1), ValueError,
                                                     "one_step_ahead"),
])
def test_bad_options_are_rejected(opts, error, match):
    with pytest.raises(error, match=match):
        leanvit.patch(tiny_vit(), "mctf", **opts)


def test_r_too_large_is_clamped_with_a_warning():
    with pytest.warns(UserWarning, match=r"mctf: .*clamped to \[0, 7, 0, 0\]"):
        leanvit.patch(tiny_vit(), "mctf", r=13)


def test_count_macs_matches_the_flop_counter():
    """Blocks at their token counts plus the A x B cosines of the hidden states, against
    PyTorch's own count (the fusing blocks' attention map is the attention's own)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=96, depth=3).eval()
    leanvit.patch(model, "mctf", r=8)
    x = torch.randn(2, 3, 96, 96)
    report = leanvit.count_macs(model, x)
    assert [b.tokens_out for b in report.per_block] == [37, 29, 21]
    # the map is the block's own attention, computed once explicitly: no second q k^T
    assert report.per_block[1].signals == 0
    assert report.extra["similarity"] == 19 * 18 * 192 + 15 * 14 * 192
    for blk in model.blocks:
        blk.attn.fused_attn = False
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert report.total == pytest.approx(counter.get_total_flops() / 2 / 2, rel=0.01)


def test_received_attention_one_query_row_at_a_time_matches_reference(monkeypatch):
    """The engine sums each chunk of the map while it is in cache (``Reducer.reads_received``,
    :func:`leanvit.ops.attention.received_attention`); with one query row of one image per
    chunk (the per-image ``log(size)`` bias sliced by image, BEiT's bias per query row by row)
    the fusions and outputs are the reference's."""
    import leanvit.ops.attention as attention_ops

    monkeypatch.setattr(attention_ops, "MAP_CHUNK_BYTES", 1)
    _check_vit(tiny_vit(seed=1), r=2)
    test_beit_matches_reference("own")
