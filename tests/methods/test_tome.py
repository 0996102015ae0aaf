"""ToMe against a plainly written reference (materialised attention, per-image loops)."""
from __future__ import annotations

import warnings

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled

import leanvit
from leanvit.adapters import vit as vit_adapter
from leanvit.methods.tome import schedule

from tests.methods._vit_reference import forward, head, tiny_vit


def tome_reference(r_per_block):
    """ToMe's bipartite soft matching for one image, written from the paper and methods.md:
    A = even positions, B = odd; prefix tokens never merge; the r A tokens with the most
    similar B partner (cosine of head-averaged keys) merge into it by a size-weighted mean."""

    def reduce(i, x, a, k, size, source, p):
        n = x.shape[0]
        r = min(r_per_block[i], (n - p) // 2)
        if r <= 0:
            return x, size, source
        metric = k.mean(0)  # [N, D] keys averaged over heads
        metric = metric / metric.norm(dim=-1, keepdim=True)
        A = list(range(0, n, 2))
        B = list(range(1, n, 2))
        best = {}
        for ia in A:
            if ia < p:
                continue  # protected
            sims = [(float(metric[ia] @ metric[jb]), jb) for jb in B if jb >= p]
            best[ia] = max(sims)
        ranked = sorted(best, key=lambda ia: -best[ia][0])
        merged = {ia: best[ia][1] for ia in ranked[:r]}
        members = {jb: [jb] for jb in B}
        for ia, jb in merged.items():
            members[jb].append(ia)
        order = list(range(p)) + [ia for ia in A if ia >= p and ia not in merged] + \
            [jb for jb in B if jb >= p]
        rows, sizes, srcs = [], [], []
        for t in order:
            group = members.get(t, [t])
            w = torch.stack([size[g] for g in group])
            rows.append(sum(size[g] * x[g] for g in group) / w.sum())
            sizes.append(w.sum())
            srcs.append(torch.stack([source[g] for g in group]).amax(0))
        return torch.stack(rows), torch.stack(sizes), torch.stack(srcs)

    return reduce


def _images(model, batch=3, seed=3):
    return torch.randn(batch, 3, *model.patch_embed.img_size,
                       generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_against_reference(model, r, prop_attn=True):
    images = _images(model)
    depth = len(model.blocks)
    with torch.no_grad():
        ref_x, ref_size, ref_src = forward(model, images, tome_reference(schedule(r, depth)),
                                           prop_attn=prop_attn)
        ref_logits = head(model, ref_x, ref_size)
        leanvit.patch(model, "tome", r=r, prop_attn=prop_attn, trace_source=True)
        logits = model(images)
        x, state = vit_adapter.forward_features(model, images)
    assert x.shape == ref_x.shape
    assert torch.equal(state.source, ref_src)  # the same tokens merged, in the same order
    torch.testing.assert_close(state.size, ref_size)
    torch.testing.assert_close(x, ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    return x, state


def test_matches_reference_with_proportional_attention():
    x, state = _check_against_reference(tiny_vit(), 2)
    assert x.shape[1] == 17 - 4 * 2
    assert state.size.sum(1).eq(17).all()  # every original token is held exactly once
    assert state.source.sum(1).eq(1).all()


def test_matches_reference_without_proportional_attention():
    _check_against_reference(tiny_vit(seed=1), 3, prop_attn=False)


def test_matches_reference_with_schedule_and_list():
    _check_against_reference(tiny_vit(seed=2), (2, -1.0))
    _check_against_reference(tiny_vit(seed=3), [3, 0, 2])


def test_distilled_model_keeps_both_prefix_tokens_in_front():
    model = tiny_vit(cls=VisionTransformerDistilled)
    x, state = _check_against_reference(model, 2)
    # the distillation head reads x[:, 1]: it is still the distillation token, unmerged
    assert torch.equal(state.source[:, :2, :2], torch.eye(2, dtype=torch.float64).expand(3, 2, 2))
    assert state.size[:, :2].eq(1).all()


def test_register_tokens_stay_in_front_unmerged():
    model = tiny_vit(reg_tokens=4)  # 5 prefix tokens: 3 on the A side, 2 on the B side
    x, state = _check_against_reference(model, 3)
    assert torch.equal(state.source[:, :5, :5], torch.eye(5, dtype=torch.float64).expand(3, 5, 5))
    assert state.source[:, :5, 5:].eq(0).all()


def test_average_pooling_weights_merged_tokens_by_size():
    model = tiny_vit(global_pool="avg", seed=6)
    _check_against_reference(model, 3)


def test_model_without_class_token():
    _check_against_reference(tiny_vit(class_token=False, global_pool="avg", seed=7), 3)


def test_r_zero_is_bit_identical():
    model = tiny_vit(seed=5)
    images = _images(model)
    with torch.no_grad():
        before = model(images)
        leanvit.patch(model, "tome", r=0)
        after = model(images)
    assert torch.equal(before, after)


def test_trace_source_does_not_change_outputs():
    model = tiny_vit(seed=8)
    images = _images(model)
    with torch.no_grad():
        leanvit.patch(model, "tome", r=3)
        plain = model(images)
        leanvit.unpatch(model)
        leanvit.patch(model, "tome", r=3, trace_source=True)
        traced = model(images)
    assert torch.equal(plain, traced)


@pytest.mark.parametrize("r, depth", [(13, 12), ((13, -1.0), 12), ((8, 0.5), 12), ((5, 1.0), 7),
                                      ((4, -0.3), 4)])
def test_schedule_follows_the_formula(r, depth):
    base, inflect = (r, 0.0) if isinstance(r, int) else r
    m = int(base * (1 - inflect))
    expected = [int(m + i * (2 * base - 2 * m) / (depth - 1)) for i in range(depth)]
    assert schedule(r, depth) == expected
    assert expected[0] == m and expected[-1] == 2 * base - m


def test_list_schedule_is_padded_with_zeros():
    assert schedule([5, 4], 4) == [5, 4, 0, 0]
    with pytest.raises(ValueError, match="4 blocks"):
        leanvit.patch(tiny_vit(), "tome", r=[1, 1, 1, 1, 1])


def test_r_too_large_is_clamped_with_a_warning():
    model = tiny_vit()
    with pytest.warns(UserWarning, match="clamped to \\[8, 4, 2, 1\\]"):
        leanvit.patch(model, "tome", r=13)
    with torch.no_grad():
        x, _ = vit_adapter.forward_features(model, _images(model))
    assert x.shape[1] == 17 - 8 - 4 - 2 - 1


def test_r_that_fits_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        leanvit.patch(tiny_vit(), "tome", r=2)


@pytest.mark.parametrize("r, error", [(-1, ValueError), (1.5, TypeError), ((3, 2.0), ValueError),
                                      ((3,), TypeError), ([1, -1], ValueError), ("13", TypeError),
                                      (True, TypeError)])
def test_bad_r_is_rejected(r, error):
    with pytest.raises(error, match="r"):
        leanvit.patch(tiny_vit(), "tome", r=r)


def test_bad_flags_are_rejected():
    with pytest.raises(TypeError, match="prop_attn"):
        leanvit.patch(tiny_vit(), "tome", prop_attn="yes")
    with pytest.raises(TypeError, match="trace_source"):
        leanvit.patch(tiny_vit(), "tome", trace_source=None)


def test_wrong_input_size_is_a_clear_error():
    model = leanvit.patch(tiny_vit(), "tome", r=2)
    with pytest.raises(ValueError, match="built for 32x32"):
        model(torch.randn(1, 3, 40, 40, dtype=torch.float64))


def test_macs_on_deit_small():
    import timm

    model = timm.create_model("deit_small_patch16_224", depth=12).eval()
    leanvit.patch(model, "tome", r=13)
    report = leanvit.count_macs(model, torch.randn(1, 3, 224, 224))
    tokens = [b.tokens_out for b in report.per_block]
    assert tokens == [197 - 13 * (i + 1) for i in range(12)]
    # 4NC^2 + 2N^2C + 8NC^2 per block at its token counts (queries/keys before the merge,
    # MLP after); the class attention is not read by ToMe. Checked against the formula.
    C = 384
    n_in = [197] + tokens[:-1]
    blocks = sum(4 * a * C * C + 2 * a * a * C + 8 * b * C * C for a, b in zip(n_in, tokens))
    # the cosines of the A tokens but the class token (A's first) with every B token
    matching = sum(((a + 1) // 2 - 1) * (a // 2) * 64 for a in n_in)
    stem = 196 * 16 * 16 * 3 * C
    head_macs = C * 1000
    assert report.total == pytest.approx(stem + blocks + matching + head_macs, rel=1e-9)
    assert 2.6 < report.gmacs < 2.8


def test_dynamic_image_size_model_clamps_at_run_time():
    # planned for 32x32 (17 tokens); a 24x24 input has 10 tokens: r is clamped per block
    model = tiny_vit(dynamic_img_size=True, seed=9)
    images = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        ref_x, ref_size, _ = forward(model, images, tome_reference([3] * 4), prop_attn=True)
        leanvit.patch(model, "tome", r=3)
        with pytest.warns(UserWarning, match="this input gives 10 tokens, not the 17"):
            x, state = vit_adapter.forward_features(model, images)
    assert x.shape[1] == 10 - 3 - 3 - 1 - 1 == ref_x.shape[1]  # caps (N - 1) // 2: 4, 3, 1, 1
    torch.testing.assert_close(x, ref_x, atol=1e-5, rtol=1e-5)


def test_fewer_tokens_than_planned_on_a_dynamic_size_model_is_warned_once():
    """A dynamic_img_size model given smaller images has too few tokens for the planned r:
    the merges are clamped (the authors' rule) as at build time, but now with a warning."""
    from tests.conftest import tiny_vit as conftest_tiny_vit

    model = leanvit.patch(conftest_tiny_vit(dynamic_img_size=True), "tome", r=4)  # 17 tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(1, 3, 64, 64))  # the planned size
        model(torch.randn(1, 3, 96, 96))  # 37 tokens: r=4 fits, nothing to say
    with pytest.warns(UserWarning, match=r"this input gives 5 tokens, not the 17 r=4 was "
                                         r"planned for; .* blocks \[0, 1\], which merge \[2, 1\] "
                                         r"instead of \[4, 4\]"):
        report = leanvit.count_macs(model, torch.randn(1, 3, 32, 32))
    assert [(b.tokens_in, b.tokens_out) for b in report.per_block] == [(5, 3), (3, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(1, 3, 32, 32))  # once per token count
