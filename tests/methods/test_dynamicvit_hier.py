"""``dynamicvit`` on ConvNeXt and Swin (DynamicConvNeXt / DynamicSwin): options per family,
the authors' positions, identity at keep ratio 1, eval routing against a plain per-token
reference running both paths, the two-stream training against the authors' equations written
out, gradients, save/load."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import leanvit
from leanvit.adapters import find_adapter
from leanvit.methods.dynamicvit import hierarchical as hier
from leanvit.methods.dynamicvit import DECISION, KEPT
from leanvit.registry import ModelInfo, get_method
from tests._hier_models import images, tiny_convnext, tiny_swin

FAMILIES = {"convnext": tiny_convnext, "swin": tiny_swin}


def _spread(model):
    """Predictors and fast paths with large random weights: well separated keep scores (no
    rounding-close ties) and fast paths that matter in every comparison."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.leanvit.parameters():
            scale = 1.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.3  # O(1) activations
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def _info(family, depths, dims):
    return ModelInfo(family=family, depth=sum(depths), embed_dim=dims[-1], num_heads=0,
                     num_prefix_tokens=0, has_class_token=False, num_patches=3136,
                     global_pool="avg", stage_depths=depths, stage_dims=dims)


# -- the registry: one method, per-family options ---------------------------------------------

def test_one_method_name_for_every_family():
    assert list(leanvit.available_methods()).count("dynamicvit") == 1
    m = get_method("dynamicvit")
    assert m.families == ("tokens", "convnext", "swin")
    assert m.options_for("convnext") is hier.ConvNeXtOptions
    assert m.options_for("swin") is hier.HierarchicalOptions
    assert m.options_for("vit") is m.options


@pytest.mark.parametrize("bad, err", [(0.4, ValueError), (0.3, ValueError), (1.01, ValueError),
                                      ("0.7", TypeError)])
def test_keep_rate_valid_above_0_4(bad, err):
    with pytest.raises(err, match="keep_rate"):
        leanvit.patch(tiny_convnext(), "dynamicvit", keep_rate=bad)


def test_options_of_another_family_are_clear_errors():
    with pytest.raises(ValueError, match="'fast_layer_scale' applies to the convnext family"):
        leanvit.patch(tiny_swin(), "dynamicvit", fast_layer_scale=1e-6)
    from tests.conftest import tiny_vit

    with pytest.raises(ValueError, match="'ratio_step' applies to the convnext, swin family"):
        leanvit.patch(tiny_vit(), "dynamicvit", ratio_step=0.2)
    model = tiny_convnext()
    with pytest.raises(ValueError, match="within stage 3, which has 5 blocks"):
        leanvit.patch(model, "dynamicvit", locations=(1, 5))
    with pytest.raises(ValueError, match="last decision would keep nothing"):
        leanvit.patch(model, "dynamicvit", keep_rate=0.9, ratio_step=0.45)
    assert not leanvit.is_patched(model)


@pytest.mark.parametrize("family, depths, dims, locs", [
    ("convnext", (3, 3, 9, 3), (96, 192, 384, 768), (1, 2, 3)),      # ConvNeXt-T
    ("swin", (2, 2, 6, 2), (96, 192, 384, 768), (1, 2, 3)),          # Swin-T
    ("convnext", (3, 3, 27, 3), (96, 192, 384, 768), (3, 6, 9)),     # ConvNeXt-S
    ("swin", (2, 2, 18, 2), (96, 192, 384, 768), (2, 4, 6))])        # Swin-S
def test_authors_positions_and_ratios(family, depths, dims, locs):
    opts = get_method("dynamicvit").make_options(family, keep_rate=0.7)
    r = hier.build(opts, _info(family, depths, dims))
    assert r.locations == locs
    assert r.keep_targets() == pytest.approx([0.7, 0.5, 0.3])  # independent, not 0.7^s
    assert len(r.fast) == depths[2] - locs[0]  # every block from the first location is routed
    has_scale = [f.gamma is not None for f in r.fast]
    assert all(has_scale) if family == "convnext" else not any(has_scale)
    if family == "convnext":
        assert all(torch.all(f.gamma == 1e-6) for f in r.fast)
        assert r.predictor[0].norm.eps == 1e-6 and r.fast[0].norm.eps == 1e-6


# -- inference ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_keep_ratio_one_equals_the_unpatched_model(family):
    model = FAMILIES[family]()
    x = images(model)
    with torch.no_grad():
        ref = model(x)
        leanvit.patch(model, "dynamicvit", keep_rate=1.0)
        assert model.leanvit.ratios() == [1.0] * len(model.leanvit.locations)
        assert torch.equal(model(x), ref)


def test_ratio_step_defaults_to_the_authors_below_one_and_can_be_forced_at_one():
    model = FAMILIES["convnext"]()
    leanvit.patch(model, "dynamicvit", keep_rate=0.7)
    assert model.leanvit.ratios() == [0.7, 0.5, 0.3]
    leanvit.unpatch(model)
    leanvit.patch(model, "dynamicvit", keep_rate=1.0, ratio_step=0.2)  # the authors' formula
    assert model.leanvit.ratios() == [1.0, 0.8, 0.6]


def _ref_predictor(p, t):
    """The prediction module restated on one image's tokens ``[N, C]`` (plain mean)."""
    h = F.layer_norm(t, (t.shape[-1],), p.norm.weight, p.norm.bias, p.norm.eps)
    h = F.gelu(h @ p.proj.weight.T + p.proj.bias)
    half = h.shape[-1] // 2
    h = torch.cat([h[:, :half], h[:, half:].mean(0, keepdim=True).expand(h.shape[0], -1)], -1)
    h = F.gelu(h @ p.fc1.weight.T + p.fc1.bias)
    h = F.gelu(h @ p.fc2.weight.T + p.fc2.bias)
    return torch.log_softmax(h @ p.fc3.weight.T + p.fc3.bias, -1)


def _ref_fast(f, t):
    y = F.layer_norm(t, (t.shape[-1],), f.norm.weight, f.norm.bias, f.norm.eps)
    y = y @ f.proj.weight.T + f.proj.bias
    return y if f.gamma is None else y * f.gamma


def _stem_to_stage3(model, family, x):
    if family == "convnext":
        h = model.stem(x)
        for s in (0, 1):
            h = model.stages[s](h)
        return model.stages[2].downsample(h), model.stages[2].blocks
    h = model.patch_embed(x)
    for s in (0, 1):
        h = model.layers[s](h)
    return model.layers[2].downsample(h), model.layers[2].blocks


def _stage3_to_logits(model, family, h):
    if family == "convnext":
        return model.forward_head(model.norm_pre(model.stages[3](h)))
    return model.forward_head(model.norm(model.layers[3](h)))


def _reference_eval(model, family, x, ratios, locations):
    """One image at a time; in routed blocks BOTH paths on every position, one by one, and the
    path picked per position: the top int(N * ratio) by keep score take the slow one."""
    red = model.leanvit
    outs = []
    for b in range(x.shape[0]):
        h, blocks = _stem_to_stage3(model, family, x[b:b + 1])
        slow_set = None
        for j, blk in enumerate(blocks):
            grid = (h.shape[2], h.shape[3]) if family == "convnext" else (h.shape[1], h.shape[2])
            positions = [(i, k) for i in range(grid[0]) for k in range(grid[1])]
            tok = (lambda t, i, k: t[0, :, i, k]) if family == "convnext" else \
                (lambda t, i, k: t[0, i, k])
            if j in locations:
                d = locations.index(j)
                tokens = torch.stack([tok(h, i, k) for i, k in positions])
                score = _ref_predictor(red.predictor[d], tokens)[:, 0].tolist()
                ranking = sorted(range(len(positions)), key=lambda n: -score[n])
                k = int(len(positions) * ratios[d])
                assert score[ranking[k - 1]] - score[ranking[k]] > 1e-5  # a clear cut, no tie
                slow_set = set(ranking[:k])
            if j < locations[0]:
                h = blk(h)
                continue
            fast = red.fast[j - locations[0]]
            if family == "convnext":
                src, new = blk.conv_dw(h), h.clone()
            else:
                src = h + blk._attn(blk.norm1(h))
                new = src.clone()
            for n, (i, k) in enumerate(positions):
                t = tok(src, i, k)
                if family == "convnext":
                    slow = blk.mlp(blk.norm(t)) * blk.gamma
                else:
                    slow = blk.mlp(blk.norm2(t))
                fast_y = _ref_fast(fast, t)
                y = slow if n in slow_set else fast_y
                if family == "convnext":
                    new[0, :, i, k] = h[0, :, i, k] + y
                else:
                    new[0, i, k] = src[0, i, k] + y
            h = new
        outs.append(_stage3_to_logits(model, family, h))
    return torch.cat(outs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("keep_rate, locations", [(0.7, None), (0.9, (2, 3))])
def test_eval_routing_equals_a_per_token_reference(family, keep_rate, locations):
    model = FAMILIES[family]()
    leanvit.patch(model, "dynamicvit", keep_rate=keep_rate, locations=locations)
    _spread(model)
    x = images(model)
    red = model.leanvit
    with torch.no_grad():
        out = model(x)
        ref = _reference_eval(model, family, x, red.ratios(), list(red.locations))
        dense = leanvit.unpatch(model)(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, dense, atol=1e-3)  # the routing changed something


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_keeps_exactly_int_n_ratio_tokens(family):
    model = _spread(leanvit.patch(FAMILIES[family](), "dynamicvit", keep_rate=0.7))
    x = images(model, b=3)
    with torch.no_grad():
        _, state = find_adapter(model).forward_features(model, x)
    n = 16 if family == "convnext" else 64
    kept = state.aux_values(KEPT)
    assert [tuple(k.shape) for k in kept] == [(3, int(n * r)) for r in (0.7, 0.5, 0.3)]
    for k in kept:  # distinct positions per image
        assert all(len(set(row.tolist())) == k.shape[1] for row in k)


# -- training -----------------------------------------------------------------------------

def _reference_train(model, family, x, tau):
    """The authors' two-stream forward (dyconvnext.py / dyswin.py AdaBlock) written out in
    the native layout; the Gumbel draws are made in the same order."""
    red = model.leanvit
    locations = list(red.locations)
    h, blocks = _stem_to_stage3(model, family, x)
    x1 = x2 = mask = None
    for j, blk in enumerate(blocks):
        if family == "convnext":
            B, C, H, W = h.shape
            to_tok = lambda t: t.permute(0, 2, 3, 1).reshape(B, H * W, C)  # noqa: E731
            from_tok = lambda t: t.reshape(B, H, W, C).permute(0, 3, 1, 2)  # noqa: E731
            shape = (B, 1, H, W)
        else:
            B, H, W, C = h.shape
            to_tok = lambda t: t.reshape(B, H * W, C)  # noqa: E731
            from_tok = lambda t: t.reshape(B, H, W, C)  # noqa: E731
            shape = (B, H, W, 1)
        if j in locations:
            inp = h if mask is None else x1 * mask + x2 * (1 - mask)
            logp = torch.stack([_ref_predictor(red.predictor[locations.index(j)], t)
                                for t in to_tok(inp)])
            dec = F.gumbel_softmax(logp.float(), tau=tau, hard=True)[..., 0]
            if mask is None:
                x1 = x2 = h
            mask = dec.reshape(shape)
        if j < locations[0]:
            h = blk(h)
            continue
        fast = red.fast[j - locations[0]]
        x0 = x1 * mask + x2 * (1 - mask)
        if family == "convnext":
            d = blk.conv_dw(x0)
            a = d * mask + x1 * (1 - mask)
            c = d * (1 - mask) + x2 * mask
            a = from_tok(blk.mlp(blk.norm(to_tok(a))) * blk.gamma)
            c = from_tok(_ref_fast(fast, to_tok(c)))
            x1, x2 = x1 + a, x2 + c
        else:
            base = x0 + blk._attn(blk.norm1(x0))
            a = base * mask + x1 * (1 - mask)
            c = base * (1 - mask) + x2 * mask
            x1 = base + blk.mlp(blk.norm2(a))
            x2 = base + _ref_fast(fast, c)
    h = x1 * mask + x2 * (1 - mask)
    return _stage3_to_logits(model, family, h)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_streams_equal_the_authors_equations(family):
    model = _spread(leanvit.patch(FAMILIES[family](), "dynamicvit", keep_rate=0.7))
    model.train()
    x = images(model)
    torch.manual_seed(11)
    out = model(x)
    torch.manual_seed(11)
    with torch.no_grad():
        ref = _reference_train(model, family, x, 1.0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_records_hard_decisions_and_trains_predictors_and_fast_paths(family):
    model = _spread(leanvit.patch(FAMILIES[family](), "dynamicvit", keep_rate=0.7)).train()
    x = images(model)
    adapter = find_adapter(model)
    feats, state = adapter.forward_features(model, x)
    logits = adapter.forward_head(model, feats, state)
    decisions = state.aux_values(DECISION)
    n = 16 if family == "convnext" else 64
    assert [tuple(d.shape) for d in decisions] == [(2, n)] * 3
    assert all(bool(((d == 0) | (d == 1)).all()) for d in decisions)
    assert model.leanvit.keep_targets() == pytest.approx([0.7, 0.5, 0.3])
    logits.square().sum().backward()
    red = model.leanvit
    for name, p in red.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_save_and_load_round_trip(tmp_path):
    model = _spread(leanvit.patch(tiny_convnext(), "dynamicvit", keep_rate=0.8,
                                  locations=(1, 3)))
    x = images(model)
    with torch.no_grad():
        out = model(x)
    path = leanvit.save(model, tmp_path / "dyconvnext.safetensors")
    fresh = leanvit.load(tiny_convnext(), path)
    assert dataclasses.asdict(fresh.leanvit.options) == dataclasses.asdict(model.leanvit.options)
    assert isinstance(fresh.leanvit.options, hier.ConvNeXtOptions)
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    with pytest.raises(ValueError, match="shape|saved from"):
        leanvit.load(tiny_convnext(dims=(16, 32, 48, 128)), path)


def test_empty_locations_are_refused_clearly():
    """locations=() was an IndexError from inside the reducer."""
    with pytest.raises(ValueError, match=r"locations is empty; on convnext models dynamicvit "
                                         r"needs at least one block of stage 3 \(0\.\.4\)"):
        leanvit.patch(tiny_convnext(), "dynamicvit", locations=())
