"""The Beit adapter: keep-all settings bit-identical to timm, unpatch exact, MACs equal to
PyTorch's FLOP counter, clear errors. (Each method against a per-image reference:
tests/methods/test_beit_methods.py.)"""
from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import leanvit
from leanvit.adapters import beit as beit_adapter
from leanvit.adapters import find_adapter

torch.set_num_threads(1)

SHARED = dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True)


def tiny(fused: bool = True, **kw) -> torch.nn.Module:
    """timm's own init (float32), with random relative bias tables (timm zeroes them)."""
    cfg = dict(depth=3, img_size=64, embed_dim=64, num_heads=4, num_classes=7)
    cfg.update(kw)
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", **cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or name.endswith(("q_bias", "v_bias")):
                p.normal_()
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    return model


KEEP_ALL = [("none", {}), ("tome", {"r": 0}), ("evit", {"keep_rate": 1.0}),
            ("topk", {"keep_rate": 1.0}), ("dynamicvit", {"keep_rate": 1.0, "locations": (1, 2)}),
            ("diffrate", {"schedule": ([17] * 3, [17] * 3)})]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kw", [{}, SHARED, {"global_pool": "token", "use_abs_pos_emb": True}])
@pytest.mark.parametrize("method,options", KEEP_ALL)
def test_keep_all_is_bit_identical_and_unpatch_restores(method, options, kw, fused):
    model = tiny(fused, **kw)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        feats = model.forward_features(x)
        leanvit.patch(model, method, **options)
        assert torch.equal(model(x), ref)
        assert torch.equal(model.forward_features(x), feats)
        leanvit.unpatch(model)
        assert type(model) is timm.models.beit.Beit and not hasattr(model, "leanvit")
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("kw", [{}, SHARED])
def test_exposed_attention_path_is_bit_identical(kw):
    """A method that reads the attention (signals) but keeps every token runs leanvit's own
    attention: same operations in timm's order, so still bit-identical."""
    for fused in (True, False):
        model = tiny(fused, **kw)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            ref = model(x)
            leanvit.patch(model, "evit", keep_rate=1.0)
            model.leanvit.locations = frozenset({0, 1, 2})  # force the hook, keep all tokens
            assert torch.equal(model(x), ref)


def flop_counter_macs(model, x):
    for blk in model.blocks:
        blk.attn.fused_attn = False  # the counter does not see CPU fused SDPA
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]


@pytest.mark.parametrize("kw", [{}, SHARED, {"global_pool": "token"}])
@pytest.mark.parametrize("method,options", [("none", {}), ("tome", {"r": 3}),
                                            ("evit", {"keep_rate": 0.5}),
                                            ("diffrate", {"schedule": ([17, 13, 9], [17, 11, 7])}),
                                            ("tofu", {"r": 3, "prune_blocks": 1}),
                                            ("divprune", {"keep_rate": 0.5})])
def test_count_macs_equals_flop_counter(method, options, kw):
    model = tiny(False, **kw)
    x = torch.randn(1, 3, 64, 64)
    leanvit.patch(model, method, **options)
    report = leanvit.count_macs(model, x)
    if method == "tofu":  # MLERP's norms, (N + r) C per merging block, the counter does not see
        assert report.total == pytest.approx(flop_counter_macs(model, x), rel=1e-2)
    elif method == "diffrate":  # the counter also sees the merge's one-hot matmul (a sum done
        # as a matmul, km (kp - km) C) and skips the class column of the cosines ((kp - km) C)
        assert report.total == pytest.approx(flop_counter_macs(model, x), rel=1e-3)
    else:
        assert report.total == flop_counter_macs(model, x)
    if method != "none":
        assert report.total < 0.9 * leanvit.count_macs(leanvit.unpatch(model), x).total


def test_dense_macs_formula():
    """Per block: qkv 3NC^2, q k^T and attn @ v 2N^2C, proj NC^2, MLP 8NC^2 (ratio 4)."""
    model = tiny()
    report = leanvit.count_macs(model, torch.randn(1, 3, 64, 64))
    n, c = 17, 64
    assert [b.macs for b in report.per_block] == [12 * n * c * c + 2 * n * n * c] * 3
    assert report.stem == 16 * 3 * 16 * 16 * c and report.head == c * 7


def test_describe_and_family():
    model = tiny()
    assert find_adapter(model) is beit_adapter
    info = beit_adapter.describe(model)
    assert (info.family, info.depth, info.embed_dim, info.num_heads, info.num_prefix_tokens,
            info.has_class_token, info.num_patches, info.global_pool, info.img_size) == \
        ("beit", 3, 64, 4, 1, True, 16, "avg", (64, 64))


def test_run_blocks_after_embed_equals_forward_features():
    model = leanvit.patch(tiny(), "tome", r=2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, sa = beit_adapter.forward_features(model, x)
        h, st = beit_adapter.embed(model, x)
        h, st = beit_adapter.run_blocks(model, h, st, 0, 2)
        b, sb = beit_adapter.run_blocks(model, h, st, 2)
    assert torch.equal(a, b) and torch.equal(sa.positions, sb.positions)


def test_pre_logits_and_headless():
    model = leanvit.patch(tiny(num_classes=0), "tome", r=2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats, state = beit_adapter.forward_features(model, x)
        out = beit_adapter.forward_head(model, feats, state, pre_logits=True)
    assert out.shape == (2, 64)
    assert model(x).shape == (2, 64)


def test_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="built for 64x64 images, got 32x32"):
        leanvit.count_macs(model, torch.randn(1, 3, 32, 32))
    leanvit.patch(model, "tome", r=2)
    with pytest.raises(ValueError, match="already patched"):
        leanvit.patch(model, "evit")


@pytest.mark.parametrize("method,options", [("evit", {"keep_rate": 0.5}), ("tome", {"r": 2}),
                                            ("diffrate",
                                             {"schedule": ([17, 13, 9], [17, 11, 7])})])
def test_compiles_in_one_graph(method, options):
    """Fixed-rate methods keep static shapes on BEiT too: one graph (``fullgraph=True``,
    eager backend as in tests/methods/test_compile.py), same outputs."""
    torch._dynamo.reset()
    model = leanvit.patch(tiny(), method, **options)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)


def test_diffrate_search_runs_on_beit():
    """The rate search (masked tokens, cached frozen blocks via embed / run_blocks) on BEiT:
    reaches its MAC target and leaves the model as it was."""
    from leanvit.search.diffrate import search

    model = tiny(num_classes=0)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    dense = leanvit.count_macs(model, images[:1]).gmacs
    target = 0.75 * dense  # ~3 MMACs: (1e-4 G off)^2 x 1e8 = 1, as large as the task loss
    result = search(model, target, images, epochs=30, batch_size=4, progress=False,
                    granularity=1, mac_weight=1e8, lr=0.3, min_lr=0.03)
    assert abs(result.schedule.gmacs - target) / target < 0.03  # 1.2% for images seeds 0-2
    assert not leanvit.is_patched(model)
