"""Every token method on tiny versions of the three timm ``Eva`` configs (EVA02, DINOv3,
PE-Core) against a plainly written per-image reference with the rotary positions applied by
hand (tests/methods/_eva_reference.py): the same tokens, values to 1e-5, and each token's
rotary table row the one of the position the method's rule gives it."""
from __future__ import annotations

import pytest
import torch

import leanvit
from leanvit.adapters import eva as eva_adapter
from leanvit.methods.dynamicvit import DECISION
from leanvit.methods.tome import schedule as tome_schedule
from tests.methods import _eva_reference as ref

KINDS = tuple(ref.CONFIGS)


def _images(model, batch=2, seed=3):
    return torch.randn(batch, 3, *model.patch_embed.img_size, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))


def _table(model, images):
    """timm's rotary table of the patch tokens ``[N_patches, 2D]``."""
    return model._pos_embed(model.patch_embed(images))[1].to(images.dtype)


def _expected_rope(table, pos):
    """Rows of the table at ``pos``; the identity rotation (sin 0 | cos 1) where ``pos`` < 0."""
    D = table.shape[1] // 2
    ident = torch.cat([torch.zeros(D), torch.ones(D)]).to(table.dtype)
    return torch.stack([table[j] if j >= 0 else ident for j in pos])


def _check(model, method, opts, *, reduce=None, before=None, select=None, prop_attn=False,
           sizes=True, patched=False):
    """Patch ``model`` with ``method`` and compare it, image by image, with the reference."""
    images = _images(model)
    with torch.no_grad():
        if not patched:
            leanvit.patch(model, method, **opts)
        logits = model(images)
        x, state = eva_adapter.forward_features(model, images)
        expected = ref.forward(model, images, reduce, before, select, prop_attn)
        table = _table(model, images)
        for b, (xr, sr, pr) in enumerate(expected):
            real = slice(None) if state.valid is None else state.valid[b]
            assert x[b][real].shape == xr.shape
            torch.testing.assert_close(x[b][real], xr, atol=1e-5, rtol=1e-5)
            # each token carries the rotation of the position the method's rule gives it
            rope = eva_adapter.token_rope(state)
            torch.testing.assert_close(rope[b][real].to(xr.dtype), _expected_rope(table, pr),
                                       atol=0, rtol=0)
            if sizes:
                torch.testing.assert_close(state.size[b][real].to(xr.dtype), sr)
            w = sr if sizes else torch.ones_like(sr)
            torch.testing.assert_close(logits[b], ref.head(model, xr, w, prop_attn), atol=1e-5,
                                       rtol=1e-5)
    return x, state


@pytest.mark.parametrize("kind", KINDS)
def test_reference_without_method_is_timm(kind):
    """The reference itself: with no method it reproduces timm's model."""
    model = ref.tiny_eva(kind)
    images = _images(model)
    with torch.no_grad():
        out = ref.forward(model, images)
        want = model(images)
    got = torch.stack([ref.head(model, x, s) for x, s, _ in out])
    torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("kind", KINDS)
def test_tome_matches_reference(kind):
    model = ref.tiny_eva(kind)
    r = 3
    _, state = _check(model, "tome", dict(r=r), reduce=ref.tome(tome_schedule(r, 3)),
                      prop_attn=True)
    assert state.size.sum(1).eq(16 + model.num_prefix_tokens).all()


@pytest.mark.parametrize("kind", KINDS)
def test_tome_without_proportional_attention(kind):
    model = ref.tiny_eva(kind, seed=1)
    _check(model, "tome", dict(r=[2, 4, 3], prop_attn=False), reduce=ref.tome([2, 4, 3]))


@pytest.mark.parametrize("kind", KINDS)
def test_evit_matches_reference_and_fused_token_is_unrotated(kind):
    model = ref.tiny_eva(kind)
    x, state = _check(model, "evit", dict(keep_rate=0.6, locations=(1, 2)),
                      reduce=ref.evit(0.6, (1, 2)), sizes=False)
    rope = eva_adapter.token_rope(state)
    D = rope.shape[-1] // 2
    fused = rope[:, -1].double()
    assert torch.equal(fused, torch.cat([torch.zeros(D), torch.ones(D)]).double().expand(2, -1))


@pytest.mark.parametrize("kind", KINDS)
def test_topk_matches_reference(kind):
    model = ref.tiny_eva(kind, seed=2)
    _check(model, "topk", dict(keep_rate=0.5, locations=(1,)),
           reduce=ref.evit(0.5, (1,), fuse=False), sizes=False)


@pytest.mark.parametrize("kind", KINDS)
def test_diffrate_deploy_matches_reference(kind):
    model = ref.tiny_eva(kind)
    n0 = 16 + model.num_prefix_tokens
    prune, merge = [n0, n0 - 2, n0 - 5], [n0, n0 - 4, n0 - 8]
    _, state = _check(model, "diffrate", dict(schedule=(prune, merge)),
                      reduce=ref.diffrate(prune, merge), prop_attn=True)
    assert eva_adapter.token_rope(state).shape[1] == n0 - 8


@pytest.mark.parametrize("kind", KINDS)
def test_ats_matches_reference_with_per_image_counts(kind):
    model = ref.tiny_eva(kind)
    budget = 8 + model.num_prefix_tokens
    _check(model, "ats", dict(locations=(1, 2), max_tokens=budget),
           select=ref.ats((1, 2), budget), sizes=False)


def _spread_predictors(model):
    """Large random predictor weights (float64): well separated keep scores."""
    gen = torch.Generator().manual_seed(5)
    model.leanvit.double()
    with torch.no_grad():
        for p in model.leanvit.predictor.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) *
                    (0.5 if p.dim() > 1 else 0.1))


@pytest.mark.parametrize("kind", KINDS)
def test_dynamicvit_inference_matches_reference(kind):
    model = ref.tiny_eva(kind)
    leanvit.patch(model, "dynamicvit", keep_rate=0.7, locations=(1, 2))
    _spread_predictors(model)
    before = ref.dynamicvit(model.leanvit.predictor, 0.7, (1, 2), 16)
    x, _ = _check(model, "dynamicvit", {}, before=before, sizes=False, patched=True)
    assert x.shape[1] == model.num_prefix_tokens + int(16 * 0.7 ** 2)


@pytest.mark.parametrize("kind", KINDS)
def test_dynamicvit_training_keep_mask_matches_reference(kind):
    """Training: tokens stay in place with their rotations; the sampled keep-masks (read from
    the state) give the same masked attention as the reference's eps-softmax."""
    model = ref.tiny_eva(kind)
    leanvit.patch(model, "dynamicvit", keep_rate=0.5, locations=(1, 2))
    _spread_predictors(model)
    model.train()
    images = _images(model)
    torch.manual_seed(0)
    with torch.no_grad():
        x, state = eva_adapter.forward_features(model, images)
        decisions = state.aux_values(DECISION)
        p = model.num_prefix_tokens
        ones = torch.ones(images.shape[0], p, dtype=torch.float64)
        keeps = {1: torch.cat([ones, decisions[0].double()], 1),
                 2: torch.cat([ones, decisions[1].double()], 1)}
        expected = ref.forward(model, images, keeps=keeps)
    assert 0 < float(decisions[1].sum()) < decisions[1].numel()  # some tokens are dropped
    for b, (xr, _, pr) in enumerate(expected):
        torch.testing.assert_close(x[b], xr, atol=1e-5, rtol=1e-5)
        assert pr == [-1] * p + list(range(16))


@pytest.mark.parametrize("kind", ["eva02", "dinov3"])
def test_diffrate_search_masked_equals_deploy_removed(kind):
    """DiffRate's search mode (tokens masked, merged sources kept in place) gives the class
    token that the deployed schedule (tokens removed) gives, rotations included."""
    from tests.methods.test_diffrate import _set_hard

    model = ref.tiny_eva(kind).float()
    n0 = 16 + model.num_prefix_tokens
    prune, merge = [n0, n0 - 2, n0 - 6], [n0, n0 - 5, n0 - 12]
    images = _images(model).float()
    with torch.no_grad():
        leanvit.patch(model, "diffrate", schedule=(prune, merge))
        deployed = eva_adapter.forward_features(model, images)[0][:, 0]
        leanvit.unpatch(model)
        leanvit.patch(model, "diffrate-search", granularity=1)
        _set_hard(model.leanvit, prune, merge)
        x, state = eva_adapter.forward_features(model, images)
    assert x.shape[1] == n0 and state.mask.sum(1).eq(n0 - 12).all()
    torch.testing.assert_close(x[:, 0], deployed, atol=1e-4, rtol=1e-4)


def test_diffrate_search_runs_on_eva_and_deploys():
    from leanvit.search.diffrate import search

    model = ref.tiny_eva("pe_core").float()
    images = _images(model, batch=8).float()
    dense = leanvit.count_macs(model, images[:1]).gmacs
    result = search(model, 0.8 * dense, images, epochs=2, batch_size=4, progress=False)
    assert not leanvit.is_patched(model)
    assert result.schedule.gmacs < dense
    leanvit.patch(model, "diffrate", schedule=result.schedule)
    assert model(images).shape == (8, 5)
