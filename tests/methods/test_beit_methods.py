"""Every token method on timm's ``Beit`` against a plainly written per-image reference
(tests/methods/_beit_reference.py: explicit attention with the relative position bias of the
tokens' ORIGINAL positions added by hand, plain loops), to 1e-5."""
from __future__ import annotations

import math

import pytest
import torch

import leanvit
from leanvit.adapters import beit as beit_adapter
from leanvit.ops.tokens import gather_tokens
from tests.methods._beit_reference import forward_image, head, tiny_beit
from tests.methods.test_ats import ref_sample
from tests.methods.test_dynamicvit import _ref_predictor

torch.set_num_threads(1)

MODELS = {
    "own": {},  # beit_base's layout: one relative bias table per block
    "shared": dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True),  # BEiT pre-training
    "token+abs": dict(global_pool="token", use_abs_pos_emb=True),
}


def _images(batch=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g, dtype=torch.float64)


def _check(model, images, ref, sized=True, atol=1e-5):
    """The patched model's logits, final tokens and their positions equal the reference's,
    image by image (``ref(image) -> (x, size, positions)``)."""
    with torch.no_grad():
        logits = model(images)
        x, state = beit_adapter.forward_features(model, images)
        for b in range(images.shape[0]):
            rx, rsize, rpos = ref(images[b])
            n = rx.shape[0]
            if state.valid is not None:  # padded batch: this image's real tokens first
                assert int(state.valid[b].sum()) == n and bool(state.valid[b, :n].all())
            torch.testing.assert_close(x[b, :n], rx, atol=atol, rtol=atol)
            assert state.positions[b, :n].tolist() == rpos
            if sized and state.size is not None:
                torch.testing.assert_close(state.size[b, :n], rsize, atol=atol, rtol=atol)
            w = rsize if sized else torch.ones_like(rsize)
            torch.testing.assert_close(logits[b], head(model, rx, w), atol=atol, rtol=atol)
    return state


# -- EViT and top-k -----------------------------------------------------------------------------

def evit_reduce(keep_rate, locations, fuse):
    """Keep the ceil(rate * n) tokens the class token attends to most (head mean); EViT fuses
    the rest into one token weighted by that attention, at the class token's position 0."""

    def reduce(i, x, a, k, size, positions, p):
        if i not in locations:
            return x, size, positions
        n = x.shape[0] - p
        left = math.ceil(keep_rate * n)
        cls = a[:, 0, p:].mean(0)
        order = sorted(range(n), key=lambda j: -float(cls[j]))
        kept, dropped = order[:left], order[left:]
        rows = [x[j] for j in range(p)] + [x[p + j] for j in kept]
        sizes = [size[j] for j in range(p)] + [size[p + j] for j in kept]
        pos = positions[:p] + [positions[p + j] for j in kept]
        if fuse and dropped:
            rows.append(sum(cls[j] * x[p + j] for j in dropped))
            sizes.append(sum(size[p + j] for j in dropped))
            pos.append(0)
        return torch.stack(rows), torch.stack(sizes), pos

    return reduce


@pytest.mark.parametrize("variant", list(MODELS))
@pytest.mark.parametrize("method,fuse", [("evit", True), ("topk", False)])
def test_evit_and_topk_match_reference(variant, method, fuse):
    model = tiny_beit(**MODELS[variant])
    images = _images()
    locs = (1, 2, 3)
    ref = lambda im: forward_image(model, im, evit_reduce(0.6, locs, fuse))  # noqa: E731
    leanvit.patch(model, method, keep_rate=0.6, locations=locs)
    state = _check(model, images, ref, sized=False)  # no sizes tracked: plain mean
    # 16 -> 10 (+1 fused) -> 7 (+1) -> 5 (+1); top-k: 16 -> 10 -> 6 -> 4
    assert state.positions.shape[1] == (1 + 5 + 1 if fuse else 1 + 4)
    if fuse:
        assert (state.positions[:, -1] == 0).all()  # the fused token sits at the class's


# -- ToMe ---------------------------------------------------------------------------------------

def tome_reduce(r):
    """Bipartite soft matching (A = even, B = odd rows; cosine of head-averaged keys); the r
    best A tokens merge into their B partner by a size-weighted mean and take ITS position."""

    def reduce(i, x, a, k, size, positions, p):
        n = x.shape[0]
        rr = min(r, (n - p) // 2)
        if rr <= 0:
            return x, size, positions
        metric = k.mean(0)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        A, B = list(range(0, n, 2)), list(range(1, n, 2))
        best = {ia: max((float(metric[ia] @ metric[jb]), jb) for jb in B if jb >= p)
                for ia in A if ia >= p}
        merged = {ia: best[ia][1] for ia in sorted(best, key=lambda ia: -best[ia][0])[:rr]}
        members = {jb: [jb] for jb in B}
        for ia, jb in merged.items():
            members[jb].append(ia)
        order = list(range(p)) + [ia for ia in A if ia >= p and ia not in merged] + \
            [jb for jb in B if jb >= p]
        rows, sizes, pos = [], [], []
        for t in order:
            group = members.get(t, [t])
            w = torch.stack([size[g] for g in group]).sum()
            rows.append(sum(size[g] * x[g] for g in group) / w)
            sizes.append(w)
            pos.append(positions[t])  # the destination's position
        return torch.stack(rows), torch.stack(sizes), pos

    return reduce


@pytest.mark.parametrize("variant", list(MODELS))
def test_tome_matches_reference(variant):
    model = tiny_beit(**MODELS[variant])
    ref = lambda im: forward_image(model, im, tome_reduce(2), prop_attn=True)  # noqa: E731
    leanvit.patch(model, "tome", r=2)
    state = _check(model, _images(), ref)
    assert state.positions.shape[1] == 17 - 4 * 2


# -- ATS ----------------------------------------------------------------------------------------

def ats_select(locations, max_tokens=None):
    """Query rows ATS keeps: inverse-transform sampling of class attention (summed over heads)
    x value norm (all heads) over the patch tokens; kept rows in their order."""

    def select(i, a, v, p):
        if i not in locations:
            return None
        n = a.shape[-1]
        scores = a[:, 0, p:].sum(0) * v.transpose(0, 1).reshape(n, -1).norm(dim=-1)[p:]
        budget = max(max_tokens or 17, 8)
        kept = ref_sample([float(s) for s in scores], budget - p)
        return list(range(p)) + sorted(j + p for j in kept)

    return select


def test_ats_matches_reference_with_per_image_counts():
    model = tiny_beit()
    images = _images(batch=4)
    ref = lambda im: forward_image(model, im, select=ats_select((1, 2, 3), 12))  # noqa: E731
    leanvit.patch(model, "ats", locations=(1, 2, 3), max_tokens=12)
    state = _check(model, images, ref, sized=False)
    assert state.valid is not None  # the images kept different counts: a padded batch


# -- DiffRate -----------------------------------------------------------------------------------

def diffrate_reduce(prune_kept, merge_kept):
    """Sort by class attention (head mean), keep the first prune_kept, merge the tail of those
    into its most similar (cosine) kept non-class token by a plain mean; size += size x cos;
    the merged token keeps its destination's position."""

    def reduce(i, x, a, k, size, positions, p):
        n = x.shape[0]
        kp, km = min(prune_kept[i], n), min(merge_kept[i], n)
        if km >= n:
            return x, size, positions
        cls = a[:, 0].mean(0)
        order = ([0] + sorted(range(1, n), key=lambda j: -float(cls[j])))[:kp]
        toks = [x[j] for j in order]
        sizes = [size[j] for j in order]
        pos = [positions[j] for j in order]
        groups = [[toks[d]] for d in range(km)]
        new_sizes = sizes[:km]
        for s in range(km, kp):
            cos = [float(toks[s] @ toks[d] / (toks[s].norm() * toks[d].norm()))
                   for d in range(1, km)]
            d = 1 + max(range(len(cos)), key=lambda j: cos[j])
            groups[d].append(toks[s])
            new_sizes[d] = new_sizes[d] + sizes[s] * max(cos[d - 1], 0.0)
        return (torch.stack([torch.stack(g).mean(0) for g in groups]), torch.stack(new_sizes),
                pos[:km])

    return reduce


@pytest.mark.parametrize("variant", ["own", "shared"])
def test_diffrate_matches_reference(variant):
    model = tiny_beit(**MODELS[variant])
    prune, merge = [17, 15, 12, 9], [17, 13, 10, 6]
    ref = lambda im: forward_image(model, im, diffrate_reduce(prune, merge),  # noqa: E731
                                   prop_attn=True)
    leanvit.patch(model, "diffrate", schedule=(prune, merge))
    state = _check(model, _images(), ref)
    assert state.positions.shape[1] == 6


# -- DynamicViT (inference: tokens removed) ----------------------------------------------------

def dynamicvit_before(model, keep_rate, locations):
    """Before each location s: score the patch tokens with prediction module s, keep the top
    int(N0 * rate^(s+1)) in their current order, with their positions."""

    def before(i, x, size, positions, p):
        if i not in locations:
            return x, size, positions
        s = sorted(locations).index(i)
        keep = int(16 * keep_rate ** (s + 1))
        score = _ref_predictor(model.leanvit.predictor[s], x[p:])[:, 0]
        idx = sorted(torch.argsort(score, descending=True)[:keep].tolist())
        rows = list(range(p)) + [j + p for j in idx]
        return x[rows], size[rows], [positions[r] for r in rows]

    return before


@pytest.mark.parametrize("variant", ["own", "token+abs"])
def test_dynamicvit_matches_reference(variant):
    model = leanvit.patch(tiny_beit(**MODELS[variant]), "dynamicvit", keep_rate=0.7,
                          locations=(1, 2, 3))
    model.leanvit.double()
    gen = torch.Generator().manual_seed(5)  # well separated scores (see test_dynamicvit.py)
    with torch.no_grad():
        for prm in model.leanvit.predictor.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen, dtype=prm.dtype)
                      * (0.5 if prm.dim() > 1 else 0.1))
    ref = lambda im: forward_image(  # noqa: E731
        model, im, before=dynamicvit_before(model, 0.7, (1, 2, 3)))
    state = _check(model, _images(), ref, sized=False)
    assert state.positions.shape[1] == 1 + int(16 * 0.7 ** 3)


def test_dynamicvit_training_mask_equals_removal():
    """Training mode keeps every token and masks dropped keys (fp32 eps-softmax): the kept
    tokens' outputs equal inference, where the dropped ones are removed (bias gathered)."""
    model = leanvit.patch(tiny_beit(), "dynamicvit", keep_rate=0.5, locations=(2,))
    model.leanvit.double()
    images = _images(batch=2)
    with torch.no_grad():
        x_inf, st_inf = beit_adapter.forward_features(model, images)
        scores = {}

        def decide(s, logp, prev, state):  # the inference decisions, as hard training ones
            top = logp[..., 0].topk(8, dim=1).indices
            hard = torch.zeros_like(prev)
            scores[s] = top
            return hard.scatter(1, top, 1.0)

        model.leanvit._decide = decide
        model.train()
        x_tr, st_tr = beit_adapter.forward_features(model, images)
    kept = st_inf.positions  # [B, 1 + 8] original indices, class first
    # the masked softmax gives a dropped key eps / N weight (the authors' 1e-6): equal up to
    # that, relative to the tokens' scale (|x| up to ~30 with these spread-out weights)
    diff = (gather_tokens(x_tr, kept) - x_inf).abs().max()
    assert diff <= 1e-4 * x_inf.abs().max()


# -- the per-image bias, looked up a few images at a time ----------------------------------------

@pytest.mark.parametrize("variant", ["own", "shared"])
def test_per_image_bias_in_groups_of_images(variant, monkeypatch):
    """Once tokens have moved, the bias differs per image and the engine looks it up for a
    few images at a time (memory): with one image per group, ToMe and ATS still give what the
    per-image reference gives, and the map methods (the explicit attention, map written group
    by group) what the whole batch at once gives."""
    from leanvit.adapters import tokens
    from leanvit.ops import attention as attention_ops

    calls = []
    whole_attention = tokens.attention

    def spy(q, *args, **kw):
        calls.append(q.shape[0])
        return whole_attention(q, *args, **kw)

    images = _images(batch=3)
    whole = {}
    for method, opts in [("zerotprune", {"r": 2}), ("mctf", {"r": 2})]:
        with torch.no_grad():
            whole[method] = leanvit.patch(tiny_beit(**MODELS[variant]), method, **opts)(images)
    monkeypatch.setattr(attention_ops, "MAP_CHUNK_BYTES", 1)
    monkeypatch.setattr(tokens, "attention", spy)
    for method, opts in [("zerotprune", {"r": 2}), ("mctf", {"r": 2})]:
        with torch.no_grad():
            out = leanvit.patch(tiny_beit(**MODELS[variant]), method, **opts)(images)
        torch.testing.assert_close(out, whole[method], atol=1e-12, rtol=1e-12)
    model = tiny_beit(**MODELS[variant])
    leanvit.patch(model, "tome", r=2)
    _check(model, images, lambda im: forward_image(model, im, tome_reduce(2), prop_attn=True))
    # ATS's first block (no token moved yet): the selected query rows of the shared bias are
    # gathered one group of images at a time too (tokens.SelectedRowsBias)
    groups = []
    whole_rows = tokens.SelectedRowsBias.__call__
    monkeypatch.setattr(tokens.SelectedRowsBias, "__call__", lambda self, images=slice(None): (
        groups.append(images), whole_rows(self, images))[1])
    model = tiny_beit(**MODELS[variant])
    leanvit.patch(model, "ats", locations=(1, 2, 3), max_tokens=12)
    _check(model, images, lambda im: forward_image(model, im, select=ats_select((1, 2, 3), 12)),
           sized=False)
    assert calls.count(1) > calls.count(3)  # one image at a time once tokens have moved
    assert groups and all(g.stop - g.start == 1 for g in groups)
