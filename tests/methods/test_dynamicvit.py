"""DynamicViT: token counts, MACs, the inference path against a plain per-image reference,
training masks against inference removal, hierarchy, and isolation of dropped tokens."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import leanvit
from leanvit.methods import dynamicvit as dv


def _tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(depth=4, img_size=64, patch_size=8, embed_dim=64, num_heads=4, num_classes=10)
    cfg.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **cfg).eval()


def _spread(model):
    """Predictors with large random weights: freshly initialised ones (std 0.02) give nearly
    equal scores whose order rounding could flip; these make the selection well separated."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.leanvit.predictor.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() > 1 else 0.1))
    return model


def _images(b=3, size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g)


def _ref_predictor(p, x):
    """Plain restatement of the prediction module on ALL given tokens ``[N, C]`` (one image)."""
    h = F.layer_norm(x, (x.shape[-1],), p.norm.weight, p.norm.bias, p.norm.eps)
    h = F.gelu(h @ p.proj.weight.T + p.proj.bias)
    half = h.shape[-1] // 2
    glob = h[:, half:].mean(0, keepdim=True).expand(h.shape[0], -1)
    h = torch.cat([h[:, :half], glob], -1)
    h = F.gelu(h @ p.fc1.weight.T + p.fc1.bias)
    h = F.gelu(h @ p.fc2.weight.T + p.fc2.bias)
    h = h @ p.fc3.weight.T + p.fc3.bias
    return torch.log_softmax(h, -1)


def _reference_eval(model, images, keep_rate, locations):
    """Per-image loop through timm's own blocks; before each location score the patch tokens
    and keep the top int(N0 * rho^(s+1)) by descending keep score (authors' argsort)."""
    outs = []
    for b in range(images.shape[0]):
        x = model.patch_embed(images[b:b + 1])
        x = model._pos_embed(x)
        P = model.num_prefix_tokens
        n0 = x.shape[1] - P
        s = 0
        for i, blk in enumerate(model.blocks):
            if i in locations:
                k = int(n0 * keep_rate ** (s + 1))
                score = _ref_predictor(model.leanvit.predictor[s], x[0, P:])[:, 0]
                order = torch.argsort(score, descending=True)[:k]
                x = torch.cat([x[:, :P], x[:, P:][:, order]], dim=1)
                s += 1
            x = blk(x)
        x = model.norm(x)
        outs.append(model.head(x[:, 0]))
    return torch.cat(outs)


def test_options_are_validated():
    with pytest.raises(ValueError, match="keep_rate"):
        dv.DynamicViTOptions(keep_rate=0.0)
    with pytest.raises(TypeError, match="keep_rate"):
        dv.DynamicViTOptions(keep_rate="0.7")
    with pytest.raises(ValueError, match="outside"):
        leanvit.patch(_tiny(), "dynamicvit", locations=(3, 6, 9))
    with pytest.raises(ValueError, match="tau"):
        dv.DynamicViTOptions(tau=0)


def test_predictors_are_registered_modules_with_authors_shapes():
    m = leanvit.patch(_tiny(), "dynamicvit", locations=(1, 2, 3))
    names = [n for n, _ in m.named_parameters() if "predictor" in n]
    assert len(names) == 3 * 10  # LayerNorm (2) + 4 Linear (2 each) per stage
    p = m.leanvit.predictor[0]
    C = 64
    assert p.macs_per_token() == C * C + C * (C // 2) + (C // 2) * (C // 4) + (C // 4) * 2


def test_deit_small_token_counts_and_macs():
    model = timm.create_model("deit_small_patch16_224").eval()
    leanvit.patch(model, "dynamicvit", keep_rate=0.7, locations=(3, 6, 9))
    rep = leanvit.count_macs(model, torch.randn(2, 3, 224, 224))
    tokens = [b.tokens_in - 1 for b in rep.per_block]  # patch tokens (class token excluded)
    assert tokens == [196] * 3 + [137] * 3 + [96] * 3 + [67] * 3
    pred = rep.extra["predictor"]
    assert pred == pytest.approx((196 + 137 + 96) * (1.625 * 384**2 + 384 / 2))
    assert pred / 1e9 == pytest.approx(0.10, rel=0.05)
    assert (rep.total - pred) / 1e9 == pytest.approx(2.88, rel=0.02)
    assert rep.gmacs == pytest.approx(2.98, rel=0.02)


def test_eval_matches_plain_per_image_reference():
    model = _spread(leanvit.patch(_tiny(), "dynamicvit", keep_rate=0.7, locations=(1, 2, 3)))
    x = _images()
    with torch.no_grad():
        got = model(x)
        ref = _reference_eval(model, x, 0.7, (1, 2, 3))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_eval_keeps_exact_counts_and_reports_original_indices():
    model = leanvit.patch(_tiny(), "dynamicvit", keep_rate=0.5, locations=(1, 3))
    adapter = leanvit.adapters.find_adapter(model)
    with torch.no_grad():
        x, state = adapter.forward_features(model, _images())
    kept = state.aux_values(dv.KEPT)
    assert [k.shape[1] for k in kept] == [32, 16]  # int(64 * 0.5), int(64 * 0.25)
    assert x.shape[1] == 1 + 16
    # later survivors are a subset of earlier ones, in spatial order
    for b in range(3):
        assert set(kept[1][b].tolist()) <= set(kept[0][b].tolist())
        assert kept[1][b].tolist() == sorted(kept[1][b].tolist())


def test_keep_rate_one_is_bit_identical_to_unpatched():
    base = _tiny()
    x = _images()
    with torch.no_grad():
        ref = base(x)
        got = leanvit.patch(base, "dynamicvit", keep_rate=1.0, locations=(1, 2))(x)
    assert torch.equal(got, ref)


def _force_topk(model, keep_rate):
    """Replace the Gumbel sample by the inference rule: top-k keep scores among the kept."""
    reducer = model.leanvit

    def decide(s, logp, prev, state):
        k = dv.keep_counts(state.n0 - state.prefix, keep_rate, s + 1)[s]
        score = logp[..., 0].masked_fill(prev == 0, -math.inf)
        idx = score.topk(k, dim=1).indices
        return torch.zeros_like(prev).scatter(1, idx, 1.0)

    reducer._decide = decide


def test_forced_training_masks_equal_inference_removal():
    model = _spread(leanvit.patch(_tiny(), "dynamicvit", keep_rate=0.7, locations=(1, 2, 3)))
    adapter = leanvit.adapters.find_adapter(model)
    x = _images()
    with torch.no_grad():
        model.eval()
        feats_eval, st_eval = adapter.forward_features(model, x)
        model.train()
        _force_topk(model, 0.7)
        feats_train, st_train = adapter.forward_features(model, x)
        logits_train = adapter.forward_head(model, feats_train, st_train)
        model.eval()
        logits_eval = model(x)
    decisions = st_train.aux_values(dv.DECISION)
    kept = st_eval.aux_values(dv.KEPT)
    for d, k in zip(decisions, kept):  # the same tokens at every stage
        for b in range(x.shape[0]):
            assert d[b].nonzero().flatten().tolist() == k[b].tolist()
    torch.testing.assert_close(feats_train[:, 0], feats_eval[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits_train, logits_eval, atol=1e-4, rtol=0)
    # the finally kept tokens match too (training keeps them in place)
    final = decisions[-1].bool()
    for b in range(x.shape[0]):
        torch.testing.assert_close(feats_train[b, 1:][final[b]], feats_eval[b, 1:],
                                   atol=1e-4, rtol=0)


def test_training_decisions_are_hard_hierarchical_and_differentiable():
    model = leanvit.patch(_tiny(), "dynamicvit", keep_rate=0.5, locations=(1, 2, 3)).train()
    adapter = leanvit.adapters.find_adapter(model)
    torch.manual_seed(0)
    feats, state = adapter.forward_features(model, _images())
    ds = state.aux_values(dv.DECISION)
    assert len(ds) == 3 and all(d.shape == (3, 64) for d in ds)
    for d in ds:
        assert set(d.unique().tolist()) <= {0.0, 1.0}
    for a, b in zip(ds, ds[1:]):
        assert bool((b <= a).all())  # a dropped token stays dropped
    assert torch.equal(state.mask[:, 1:], ds[-1]) and bool((state.mask[:, 0] == 1).all())
    sum(d.sum() for d in ds).backward()  # straight-through: predictors get gradients
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.leanvit.predictor[0].fc3.parameters())


def test_dropped_tokens_never_influence_kept_ones():
    """Perturb the dropped tokens' features right after each decision: the class token and
    every kept token end up the same (up to the authors' eps/N smoothing, ~1e-6)."""
    model = leanvit.patch(_tiny(), "dynamicvit", keep_rate=0.6, locations=(1, 2)).train()
    reducer = model.leanvit
    adapter = leanvit.adapters.find_adapter(model)
    gen = torch.Generator().manual_seed(0)
    fixed = [(torch.rand(3, 64, generator=gen) < 0.6).float(),
             (torch.rand(3, 64, generator=gen) < 0.6).float()]
    reducer._decide = lambda s, logp, prev, state: fixed[s]
    original = reducer._train_stage
    noise = {}

    def noisy_stage(s, x, state):
        x, state = original(s, x, state)
        dropped = (1 - state.mask).unsqueeze(-1)
        return x + noise["scale"] * dropped * torch.randn(x.shape, generator=noise["gen"]), state

    reducer._train_stage = noisy_stage
    x = _images()
    outs = []
    with torch.no_grad():
        for scale, seed in ((0.0, 0), (3.0, 1), (3.0, 2)):
            noise.update(scale=scale, gen=torch.Generator().manual_seed(seed))
            feats, state = adapter.forward_features(model, x)
            outs.append((feats, state.mask.bool()))
    keep = outs[0][1]
    assert (~keep).any() and keep[:, 1:].any()
    for feats, _ in outs[1:]:
        torch.testing.assert_close(feats[keep], outs[0][0][keep], atol=1e-5, rtol=0)
        assert not torch.allclose(feats[~keep], outs[0][0][~keep])  # they did change


def test_avg_pool_training_ignores_dropped_tokens():
    model = leanvit.patch(_tiny(global_pool="avg", class_token=False), "dynamicvit",
                          keep_rate=0.5, locations=(1,)).train()
    model.leanvit._decide = lambda s, logp, prev, state: torch.zeros_like(prev).index_fill(
        1, torch.arange(0, 64, 2), 1.0)
    adapter = leanvit.adapters.find_adapter(model)
    with torch.no_grad():
        feats, state = adapter.forward_features(model, _images())
        pooled = adapter.forward_head(model, feats, state, pre_logits=True)
    torch.testing.assert_close(pooled, model.fc_norm(feats[:, 0::2].mean(1)))


def test_prefix_tokens_are_never_scored_or_pruned():
    """Class + 2 register tokens: eval keeps all three in front, training never masks them."""
    model = _spread(leanvit.patch(_tiny(reg_tokens=2), "dynamicvit", keep_rate=0.5,
                                  locations=(1, 2)))
    adapter = leanvit.adapters.find_adapter(model)
    x = _images()
    with torch.no_grad():
        feats, state = adapter.forward_features(model, x)
        assert feats.shape[1] == 3 + 16 and state.prefix == 3  # int(64 * 0.25) patches
        ref = _reference_eval(model, x, 0.5, (1, 2))
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
        model.train()
        _, st = adapter.forward_features(model, x)
    assert bool((st.mask[:, :3] == 1).all()) and st.aux_values(dv.DECISION)[0].shape == (3, 64)


def test_negative_locations_say_block_indices_start_at_0_and_others_name_the_depth():
    """Checked before the model is known, a negative block was 'outside blocks 0..999999999'."""
    from tests._hier_models import tiny_convnext

    for make in (lambda: dv.DynamicViTOptions(locations=(-1,)),
                 lambda: leanvit.patch(_tiny(), "dynamicvit", locations=(-1,)),
                 lambda: leanvit.patch(tiny_convnext(), "dynamicvit", locations=(-1,))):
        with pytest.raises(ValueError, match=r"locations \[-1\]: block indices must be >= 0") \
                as e:
            make()
        assert "999" not in str(e.value)
    with pytest.raises(ValueError, match=r"locations \[3\] outside the model's blocks 0\.\.1 "
                                         r"\(it has 2 blocks\)"):
        leanvit.patch(timm.create_model("deit_tiny_patch16_224", depth=2, img_size=64),
                      "dynamicvit", locations=(1, 3))
