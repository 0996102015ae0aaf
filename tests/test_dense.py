"""leanvit.dense_features: the full patch grid from a reduced model.

References are plain loops, independent of the index map the library keeps: ToMe/DiffRate
groups from the methods' own ``[B, N, N0]`` source maps, pruned tokens from a recording of the
tokens each hook received and returned (a token left where its row is not copied out).
"""
from __future__ import annotations

import pytest
import timm
import torch

import leanvit
from leanvit import adapters
from tests.conftest import tiny_vit

KEEP_ALL = [
    ("none", {}),
    ("tome", dict(r=0)),
    ("pitome", dict(r=0)),
    ("mctf", dict(r=0)),
    ("evit", dict(keep_rate=1.0, locations=(1, 2))),
    ("topk", dict(keep_rate=1.0, locations=(1, 2))),
    ("dynamicvit", dict(keep_rate=1.0, locations=(1, 2))),
    ("diffrate", dict(schedule="full")),
    ("tofu", dict(r=0)),
    ("zerotprune", dict(r=0)),
    ("divprune", dict(keep_rate=1.0, locations=(1, 2))),
]


def _beit(depth=4):
    """A tiny timm Beit (relative position bias), random bias tables."""
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", depth=depth, img_size=64, embed_dim=64,
                              num_heads=4, num_classes=7).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_()
    return model


def _eva(kind):
    """A tiny timm Eva of a real config (EVA02: rotary, 1 prefix; DINOv3: rotary, 4 registers),
    width 64, 4x4 patches."""
    from tests.methods._eva_reference import CONFIGS

    name, cfg = CONFIGS[kind]
    torch.manual_seed(0)
    return timm.create_model(name, **dict(cfg, embed_dim=64, num_heads=4, depth=4)).eval()


BUILDERS = {"vit": lambda: _model(), "beit": lambda: _beit(), "eva02": lambda: _eva("eva02"),
            "dinov3": lambda: _eva("dinov3")}


def _inputs(model, n=2):
    h, w = model.patch_embed.img_size
    return _images(n, h, w)


def _model(**kw):
    kw.setdefault("depth", 4)
    model = tiny_vit(**kw)
    # spread the weights a little so attention rankings are far from ties
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _images(n=2, h=64, w=64, seed=0):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", BUILDERS)
@pytest.mark.parametrize("method,opts", KEEP_ALL, ids=[m for m, _ in KEEP_ALL])
def test_keep_all_equals_unpatched_patch_tokens(method, opts, family):
    model = BUILDERS[family]()
    x = _inputs(model)
    with torch.no_grad():
        ref = model.forward_features(x)[:, model.num_prefix_tokens:].reshape(2, 4, 4, -1)
        assert torch.equal(leanvit.dense_features(model, x), ref)  # unpatched
        if opts.get("schedule") == "full":
            n0 = 16 + model.num_prefix_tokens
            opts = dict(schedule=([n0] * 4, [n0] * 4))
        leanvit.patch(model, method, **opts)
        got = leanvit.dense_features(model, x)
    assert got.shape == (2, 4, 4, model.embed_dim)
    assert torch.equal(got, ref)


def test_keep_all_real_dinov2(dinov2):
    x = _images(2, 224, 224)
    with torch.no_grad():
        ref = dinov2.forward_features(x)[:, 1:].reshape(2, 16, 16, -1)
        leanvit.patch(dinov2, "tome", r=0)
        got = leanvit.dense_features(dinov2, x)
    assert torch.equal(got, ref)


def _source_groups_check(model, x, prefix):
    """Every patch a final token holds (its source row) gets that token's features."""
    adapter = adapters.find_adapter(model)
    with torch.no_grad():
        dense = leanvit.dense_features(model, x).flatten(1, 2)
        final, state = adapter.forward_features(model, x)
    src = state.source
    covered = torch.zeros(dense.shape[:2], dtype=torch.bool)
    for b in range(src.shape[0]):
        for t in range(src.shape[1]):
            for p in range(prefix, src.shape[2]):
                if src[b, t, p] > 0:
                    assert not covered[b, p - prefix]
                    covered[b, p - prefix] = True
                    assert torch.equal(dense[b, p - prefix], final[b, t]), (b, t, p)
    return covered


@pytest.mark.parametrize("method", ["tome", "pitome", "mctf"])
@pytest.mark.parametrize("family", BUILDERS)
def test_merging_every_patch_of_a_group_gets_the_group_features(family, method):
    model = BUILDERS[family]()
    x = _inputs(model)
    leanvit.patch(model, method, r=2, trace_source=True)
    covered = _source_groups_check(model, x, prefix=model.num_prefix_tokens)
    assert covered.all()  # merging only: every patch is in exactly one group
    with torch.no_grad():  # and groups of several patches really exist
        _, state = adapters.find_adapter(model).forward_features(model, x)
    assert (state.source.sum(-1) > 1).any()


@pytest.mark.parametrize("family", BUILDERS)
def test_tofu_merged_patches_follow_their_destination(family):
    """ToFu: patches of a merged group get its final features; patches it pruned (block 0)
    their features when they left."""
    model = BUILDERS[family]()
    x = _inputs(model)
    leanvit.patch(model, "tofu", r=2, prune_blocks=1, trace_source=True)
    covered = _source_groups_check(model, x, prefix=model.num_prefix_tokens)
    assert covered.any() and not covered.all()  # 2 pruned in block 0, the rest in groups
    with torch.no_grad():
        dense = leanvit.dense_features(model, x).flatten(1, 2)
        _, state = adapters.find_adapter(model).forward_features(model, x, trace_where=True)
    assert (state.source.sum(-1) > 1).any() and len(state.left) == 1
    flat, feats = state.left[0]
    b, p = flat // state.n0, flat % state.n0 - model.num_prefix_tokens
    torch.testing.assert_close(dense[b, p], model.norm(feats), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", BUILDERS)
def test_diffrate_merged_patches_follow_their_destination(family):
    model = BUILDERS[family]()
    x, p = _inputs(model), model.num_prefix_tokens
    # prune one token per block, then merge one or two more
    sched = ([15 + p, 12 + p, 10 + p, 8 + p], [14 + p, 11 + p, 9 + p, 7 + p])
    leanvit.patch(model, "diffrate", schedule=sched, trace_source=True)
    covered = _source_groups_check(model, x, prefix=p)
    assert covered.any() and not covered.all()  # the pruned ones are checked below


class _Recorder:
    """Records the tokens each reduction hook received and returned (a manual trace)."""

    def __init__(self, model):
        self.events = []
        red = model.leanvit
        self.block_in = None
        for blk in model.blocks:
            blk.norm1.register_forward_pre_hook(self._block_input)
        for name in ("before_block", "after_attention"):
            orig = getattr(red, name)
            setattr(red, name, self._wrap_x(orig))
        orig_sel = red.select_queries

        def select(i, signals, state):
            rows, new = orig_sel(i, signals, state)
            if rows is not None:
                self.events.append(("rows", self.block_in, rows, new.valid))
            return rows, new

        red.select_queries = select

    def _block_input(self, module, args):
        self.block_in = args[0]

    def _wrap_x(self, orig):
        def hook(i, x, *rest):
            out = orig(i, x, *rest)
            self.events.append(("copy", x, out[0], out[1].valid))
            return out
        return hook


def _expected_by_hand(model, x):
    """Follow every patch through the recorded hooks with plain loops: ``[B, P, C]``."""
    adapter = adapters.find_adapter(model)
    rec = _Recorder(model)
    with torch.no_grad():
        final, _ = adapter.forward_features(model, x)
    prefix = model.num_prefix_tokens
    B, P = x.shape[0], model.patch_embed.num_patches
    holder = {(b, p): prefix + p for b in range(B) for p in range(P)}
    left = {}
    assert rec.events, "the method reduced nothing"
    for kind, x_in, out, valid in rec.events:
        for (b, p), t in list(holder.items()):
            u = None
            if kind == "copy":  # a kept token is copied out bit for bit
                for j in range(out.shape[1]):
                    if (valid is None or valid[b, j]) and torch.equal(out[b, j], x_in[b, t]):
                        u = j
                        break
            else:  # "rows": query selection; out = row indices into x_in
                for j in range(out.shape[1]):
                    if int(out[b, j]) == t and (valid is None or valid[b, j]):
                        u = j
                        break
            if u is None:
                left[(b, p)] = x_in[b, t]
                del holder[(b, p)]
            else:
                holder[(b, p)] = u
    expected = torch.empty(B, P, final.shape[-1])
    with torch.no_grad():
        for (b, p), t in holder.items():
            expected[b, p] = final[b, t]
        for (b, p), f in left.items():
            expected[b, p] = model.norm(f[None])[0]
    return expected, len(left)


PRUNING = [
    ("evit", dict(keep_rate=0.5, locations=(1, 2))),
    ("topk", dict(keep_rate=0.6, locations=(1, 3))),
    ("ats", dict(locations=(1, 2), max_tokens=10)),
    ("dynamicvit", dict(keep_rate=0.6, locations=(1, 3))),
    ("diffrate", dict(schedule=([17, 13, 9, 9], [17, 13, 9, 9]))),
    ("tofu", dict(r=2, prune_blocks=4)),
    ("zerotprune", dict(r=2)),
    ("divprune", dict(keep_rate=0.6, locations=(1, 3))),
]


@pytest.mark.parametrize("family", BUILDERS)
@pytest.mark.parametrize("method,opts", PRUNING, ids=[m for m, _ in PRUNING])
def test_pruned_patch_keeps_its_features_from_where_it_left(method, opts, family):
    model = BUILDERS[family]()
    x = _inputs(model, 3)
    if method == "diffrate":  # the schedule counts the prefix tokens
        p = model.num_prefix_tokens
        opts = dict(schedule=([16 + p, 12 + p, 8 + p, 8 + p], [16 + p, 12 + p, 8 + p, 8 + p]))
    if method == "ats" and model.num_prefix_tokens > 1:
        opts = dict(opts, max_tokens=14)
    if method == "ats":  # the hand trace reads each block's padded input (norm1's argument);
        opts = dict(opts, packed=False)  # dense tracing itself always runs the padded blocks
    leanvit.patch(model, method, **opts).eval()
    with torch.no_grad():
        got = leanvit.dense_features(model, x).flatten(1, 2)
    expected, n_left = _expected_by_hand(model, x)
    assert n_left > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_evit_fused_token_gives_its_features_to_no_patch():
    model, x = _model(), _images()
    leanvit.patch(model, "evit", keep_rate=0.5, locations=(1,))
    with torch.no_grad():
        final, _ = adapters.find_adapter(model).forward_features(model, x)
        dense = leanvit.dense_features(model, x).flatten(1, 2)
    fused = final[:, -1:]  # EViT appends the fused token last
    assert not (dense == fused).all(-1).any()


def test_non_square_grid_and_register_tokens():
    model = _model(img_size=(48, 80), reg_tokens=4)
    assert model.num_prefix_tokens == 5
    x = _images(2, 48, 80)
    with torch.no_grad():
        ref = model.forward_features(x)[:, 5:].reshape(2, 3, 5, -1)
        leanvit.patch(model, "none")
        assert torch.equal(leanvit.dense_features(model, x), ref)
        leanvit.unpatch(model)
        for method, opts in [("tome", dict(r=3)), ("evit", dict(keep_rate=0.5)),
                             ("ats", dict(max_tokens=12))]:
            leanvit.patch(model, method, **opts)
            got = leanvit.dense_features(model, x)
            assert got.shape == (2, 3, 5, model.embed_dim), method
            assert torch.isfinite(got).all()
            leanvit.unpatch(model)


def test_distilled_two_prefix_tokens_and_dynamic_size():
    model = tiny_vit("deit_tiny_distilled_patch16_224", depth=2, img_size=64,
                     dynamic_img_size=True)
    x = _images(1, 32, 96)
    with torch.no_grad():
        ref = model.forward_features(x)[:, 2:].reshape(1, 2, 6, -1)
        leanvit.patch(model, "tome", r=0)
        assert torch.equal(leanvit.dense_features(model, x), ref)


def test_bad_input_errors():
    model = _model()
    with pytest.raises(TypeError, match="torch.Tensor"):
        leanvit.dense_features(model, [1, 2])
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        leanvit.dense_features(model, torch.zeros(3, 64, 64))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        leanvit.dense_features("vit", torch.zeros(1, 3, 64, 64))
    convnext = timm.create_model("convnext_atto", num_classes=0, conv_mlp=False)
    with pytest.raises(ValueError, match="token families"):
        leanvit.dense_features(convnext, torch.zeros(1, 3, 64, 64))
