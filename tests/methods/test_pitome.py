"""PiToMe against a plainly written per-image reference (timm ViT, the three Eva configs,
BEiT): energy scores with Python loops, the mergeable/protected split, the alternating A/B
split and the size-weighted merge written out one image at a time."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import leanvit
from leanvit.adapters import vit as vit_adapter
from leanvit.methods.pitome import energy_scores, pitome_assignment
from tests.methods import _eva_reference as eva_ref
from tests.methods._beit_reference import forward_image, tiny_beit
from tests.methods._vit_reference import forward, head, tiny_vit
from tests.methods.test_beit_methods import MODELS as BEIT_MODELS
from tests.methods.test_beit_methods import _check as beit_check
from tests.methods.test_beit_methods import _images as beit_images
from tests.methods.test_eva import _check as eva_check


def ref_margin(i, depth):
    """The authors' per-block margin: 0.9 at the first block, 0.8 lower at depth."""
    return 0.9 - 0.8 * i / depth


def ref_groups(keys, r, p, margin, alpha=1.0):
    """One image's PiToMe step: ``keys`` ``[H, N, D]`` -> output groups in position order, each
    ``(representative, members)`` (input positions). Plain loops."""
    n = keys.shape[1]
    metric = keys.mean(0)
    unit = [metric[t] / metric[t].norm() for t in range(p, n)]
    T = len(unit)
    cos = [[float(unit[a] @ unit[b]) for b in range(T)] for a in range(T)]

    def f(c):  # the ELU around the margin
        return c - margin if c >= margin else alpha * (math.exp(c - margin) - 1.0)

    energy = [sum(f(c) for c in row) / T for row in cos]
    order = sorted(range(T), key=lambda t: -energy[t])  # highest energy first, ties by position
    mergeable = order[:2 * r]
    A, B = mergeable[0::2], mergeable[1::2]
    dest = {}
    for a in A:
        best = B[0]
        for b in B[1:]:
            if cos[a][b] > cos[a][best]:
                best = b
        dest[a] = best
    groups = [(j, [j]) for j in range(p)]
    for t in range(T):
        if t in dest:
            continue
        groups.append((p + t, [p + t] + [p + a for a in A if dest[a] == t]))
    return groups


def ref_schedule(r, depth, n, p):
    out = []
    for _ in range(depth):
        rr = min(r, (n - p) // 2)
        out.append(rr)
        n -= rr
    return out


def _merge(groups, x, size):
    rows = [sum(size[j] * x[j] for j in g) / sum(size[j] for j in g) for _, g in groups]
    return torch.stack(rows), torch.stack([sum(size[j] for j in g) for _, g in groups])


def vit_reduce(r_per_block, depth, margin=None):
    def reduce(i, x, a, k, size, source, p):
        r = min(r_per_block[i], (x.shape[0] - p) // 2)
        if r <= 0:
            return x, size, source
        m = ref_margin(i, depth) if margin is None else margin
        groups = ref_groups(k, r, p, m)
        x, new_size = _merge(groups, x, size)
        src = torch.stack([source[g].amax(0) for _, g in groups])
        return x, new_size, src

    return reduce


def positional_reduce(r_per_block, depth):
    """Eva / BEiT form: the third value is each token's position list; a merged token takes
    its destination's (the group's representative's) position."""

    def reduce(i, x, a, k, size, pos, p):
        r = min(r_per_block[i], (x.shape[0] - p) // 2)
        if r <= 0:
            return x, size, pos
        groups = ref_groups(k, r, p, ref_margin(i, depth))
        x, new_size = _merge(groups, x, size)
        return x, new_size, [pos[rep] for rep, _ in groups]

    return reduce


def _images(model, batch=3, seed=3):
    return torch.randn(batch, 3, *model.patch_embed.img_size,
                       generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_vit(model, r, prop_attn=True, margin=None):
    images = _images(model)
    depth = len(model.blocks)
    sched = r if isinstance(r, list) else [r] * depth
    with torch.no_grad():
        ref_x, ref_size, ref_src = forward(model, images, vit_reduce(sched, depth, margin),
                                           prop_attn=prop_attn)
        ref_logits = head(model, ref_x, ref_size)
        leanvit.patch(model, "pitome", r=r, prop_attn=prop_attn, trace_source=True,
                      margin=margin)
        logits = model(images)
        x, state = vit_adapter.forward_features(model, images)
    assert x.shape == ref_x.shape
    assert torch.equal(state.source, ref_src)  # the same tokens merged, in the same order
    torch.testing.assert_close(state.size, ref_size)
    torch.testing.assert_close(x, ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    return x, state


def test_vit_matches_reference():
    x, state = _check_vit(tiny_vit(), 3)
    assert x.shape[1] == 17 - 4 * 3
    assert state.size.sum(1).eq(17).all() and state.source.sum(1).eq(1).all()


def test_vit_fixed_margin_schedule_list_and_no_proportional_attention():
    _check_vit(tiny_vit(seed=1), [4, 2, 0, 3], prop_attn=False, margin=0.3)


def test_vit_register_tokens_average_pool_and_no_class_token():
    _check_vit(tiny_vit(reg_tokens=4, seed=2), 3)
    _check_vit(tiny_vit(class_token=False, global_pool="avg", seed=3), 3)


@pytest.mark.parametrize("kind", tuple(eva_ref.CONFIGS))
def test_eva_matches_reference(kind):
    model = eva_ref.tiny_eva(kind)
    p = model.num_prefix_tokens
    _, state = eva_check(model, "pitome", dict(r=3), prop_attn=True,
                         reduce=positional_reduce(ref_schedule(3, 3, 16 + p, p), 3))
    assert state.size.sum(1).eq(16 + p).all()


@pytest.mark.parametrize("variant", list(BEIT_MODELS))
def test_beit_matches_reference(variant):
    model = tiny_beit(**BEIT_MODELS[variant])
    reduce = positional_reduce([3, 3, 3, 3], 4)
    leanvit.patch(model, "pitome", r=3)
    state = beit_check(model, beit_images(),
                       lambda im: forward_image(model, im, reduce, prop_attn=True))
    assert state.positions.shape[1] == 17 - 4 * 3


def test_isolated_token_is_protected():
    """Ten near-identical tokens and one far from all: the far one has the lowest energy
    and never merges, even where it is the best partner's nearest alternative."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1, 8, generator=g)
    metric = torch.cat([torch.zeros(1, 1, 8),  # prefix
                        base + 0.01 * torch.randn(1, 10, 8, generator=g),
                        -base], dim=1)  # token 11: opposite direction, isolated
    a = pitome_assignment(metric, r=5, prefix=1, margin=0.5)
    assert a.keep.shape == (1, 7)
    assert 11 in a.keep[0].tolist() and a.keep[0, 0] == 0
    assert (a.group[0] == a.group[0, 11]).sum() == 1  # alone in its group


def test_r_zero_is_bit_identical_and_unpatch_restores():
    model = tiny_vit(seed=5)
    images = _images(model)
    with torch.no_grad():
        before = model(images)
        leanvit.patch(model, "pitome", r=0)
        assert torch.equal(model(images), before)
        leanvit.unpatch(model)
        leanvit.patch(model, "pitome", r=3)
        assert not torch.allclose(model(images), before)
        leanvit.unpatch(model)
        assert torch.equal(model(images), before)
    assert type(model).__name__ == "VisionTransformer"


@pytest.mark.parametrize("opts, error, match", [
    (dict(r=-1), ValueError, "r"), (dict(r=1.5), TypeError, "r"),
    (dict(margin=2.0), ValueError, "margin"), (dict(margin="0.5"), TypeError, "margin"),
    (dict(alpha=0.0), ValueError, "alpha"), (dict(prop_attn=1), TypeError, "prop_attn"),
    (dict(trace_source=None), TypeError, "trace_source"), (dict(ratio=0.9), ValueError, "ratio"),
])
def test_bad_options_are_rejected(opts, error, match):
    with pytest.raises(error, match=match):
        leanvit.patch(tiny_vit(), "pitome", **opts)


def test_r_too_large_is_clamped_with_a_warning():
    with pytest.warns(UserWarning, match=r"pitome: .*clamped to \[8, 4, 2, 1\]"):
        leanvit.patch(tiny_vit(), "pitome", r=13)


def test_count_macs_matches_the_flop_counter():
    """Blocks at their token counts plus the energy's cosines ((N - prefix)^2 D per block),
    against PyTorch's own count with the attention materialised."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=3).eval()
    leanvit.patch(model, "pitome", r=4)
    x = torch.randn(2, 3, 64, 64)
    report = leanvit.count_macs(model, x)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert report.total == pytest.approx(counter.get_total_flops() / 2 / 2, rel=0.01)
    assert report.extra["energy"] == sum((n - 1) ** 2 * 64 for n in (17, 13, 9))


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 7 * 8, 1 << 30])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_energy_in_row_blocks_is_the_elu_mean(monkeypatch, chunk_bytes, alpha):
    """Blocks of one row, of three rows (3 + 3 + 1) and all seven: the energies equal the mean
    ELU of the cosines written plainly (F.elu on the whole matrix), for either ELU scale."""
    import leanvit.methods.pitome as pitome

    monkeypatch.setattr(pitome, "ENERGY_CHUNK_BYTES", chunk_bytes)
    metric = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    cos = unit @ unit.transpose(1, 2)
    ref = torch.nn.functional.elu(cos - 0.3, alpha=alpha).mean(dim=-1)
    torch.testing.assert_close(energy_scores(metric, 0.3, alpha), ref, rtol=1e-12, atol=1e-12)
