"""The open_clip family: open_clip's own ``VisionTransformer`` (``model.visual``), a whole CLIP
model (its image tower found and patched, the text tower untouched) and the timm-trunk towers
(``TimmModel``: the timm families run the trunk). Tiny configs, random weights, offline."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import leanvit
from leanvit import adapters

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP  # noqa: E402
from open_clip.transformer import VisionTransformer  # noqa: E402

torch.set_num_threads(1)

#: head variants of open_clip's VisionTransformer (keyword arguments)
HEADS = {
    "tok": {},
    "avg": dict(pool_type="avg"),
    "avg_ln_after_pool_ls": dict(pool_type="avg", final_ln_after_pool=True, ls_init_value=0.5),
    "attn_pool": dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2),
    # open_clip's "parallel"/"cascade" pools norm the width-C tokens with an output_dim norm:
    # they run only where output_dim == width
    "parallel": dict(attentional_pool="parallel", attn_pooler_queries=4, attn_pooler_heads=2,
                     output_dim=32),
    "cascade": dict(attentional_pool="cascade", attn_pooler_queries=4, attn_pooler_heads=2,
                    output_dim=32),
    "output_tokens": dict(output_tokens=True),
}

KEEP_ALL = [
    ("none", {}), ("tome", dict(r=0)), ("pitome", dict(r=0)), ("mctf", dict(r=0)),
    ("tofu", dict(r=0)), ("zerotprune", dict(r=0)), ("evit", dict(keep_rate=1.0)),
    ("topk", dict(keep_rate=1.0)), ("random", dict(keep_rate=1.0)),
    ("divprune", dict(keep_rate=1.0, locations=(1, 2))),
    ("dynamicvit", dict(keep_rate=1.0, locations=(1, 2))),
    ("diffrate", dict(schedule=([17] * 3, [17] * 3))),
]


def tiny(**kw) -> VisionTransformer:
    """open_clip ViT: 32x32 images, 8x8 patches (17 tokens), width 32, 3 blocks."""
    torch.manual_seed(0)
    cfg = dict(image_size=32, patch_size=8, width=32, layers=3, heads=2, mlp_ratio=2,
               output_dim=16)
    return VisionTransformer(**{**cfg, **kw}).eval()


def images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def tiny_clip(**vision) -> CLIP:
    torch.manual_seed(0)
    vis = {**dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=2),
           **vision}
    txt = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
    return CLIP(embed_dim=16, vision_cfg=vis, text_cfg=txt).eval()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, sd) -> bool:
    now = model.state_dict()
    return set(now) == set(sd) and all(torch.equal(now[k], v) for k, v in sd.items())


def _equal(a, b) -> bool:
    if isinstance(a, tuple):
        return all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def test_family_is_found_and_described():
    model = tiny(pool_type="avg")
    assert adapters.find_family(model).name == "open_clip"
    info = adapters.find_adapter(model).describe(model)
    assert (info.depth, info.embed_dim, info.num_heads, info.num_patches, info.img_size,
            info.global_pool) == (3, 32, 2, 16, (32, 32), "avg")


@pytest.mark.parametrize("head", list(HEADS))
def test_keep_all_is_bit_identical_and_unpatch_restores(head):
    model = tiny(**HEADS[head])
    x, sd = images(), _state(tiny(**HEADS[head]))
    with torch.no_grad():
        want = model(x)
        for method, opts in KEEP_ALL:
            leanvit.patch(model, method, **opts)
            assert _equal(model(x), want), method
            leanvit.unpatch(model)
            assert type(model) is VisionTransformer and not hasattr(model, "leanvit")
            assert _same_state(model, sd) and _equal(model(x), want)


@pytest.mark.parametrize("head", ["tok", "avg_ln_after_pool_ls", "attn_pool", "parallel"])
@pytest.mark.parametrize("method,opts", [("none", {}), ("tome", dict(r=3)),
                                         ("evit", dict(keep_rate=0.5))])
def test_count_macs_equals_flop_counter(head, method, opts):
    """FlopCounterMode sees nn.MultiheadAttention's products on its slow path (parameters
    requiring grad) and SDPA's as the math kernel's matrix products."""
    model, x = tiny(**HEADS[head]), images()
    if method != "none":
        leanvit.patch(model, method, **opts)
    report = leanvit.count_macs(model, x)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    assert report.total == pytest.approx(counter.get_total_flops() / 2 / len(x), rel=0.01)
    if method != "none":
        assert report.per_block[-1].tokens_out < 17


def test_reduced_avg_pool_weights_merged_tokens_by_size():
    """``avg``: the patch tokens' mean weighted by how many patches each stands for."""
    model, x = tiny(pool_type="avg"), images()
    leanvit.patch(model, "tome", r=4)
    with torch.no_grad():
        feats, state = adapters.open_clip.forward_features(model, x)
        pooled = model(x)
    w = state.size[:, 1:, 0] if state.size.dim() == 3 else state.size[:, 1:]
    mean = (feats[:, 1:] * w[..., None]).sum(1) / w.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, mean @ model.proj)


def test_unsupported_variants_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="block 0 is a CustomResidualAttentionBlock"):
        leanvit.patch(tiny(qk_norm=True), "tome", r=2)
    model = leanvit.patch(tiny(), "tome", r=2)
    with pytest.raises(ValueError, match="built for 32x32 images, got 64x64.*image_size=64"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        model([1])
    resnet = tiny_clip()
    resnet.visual = open_clip.model.ModifiedResNet([1, 1, 1, 1], 16, 2, 64, 8)
    with pytest.raises(ValueError, match="unsupported model type ModifiedResNet"):
        leanvit.patch(resnet, "tome", r=2)


@pytest.mark.parametrize("via", ["clip", "visual"])
def test_clip_model_patches_its_image_tower_only(via):
    clip = tiny_clip()
    x, text = images(), torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(2))
    sd = _state(clip)
    with torch.no_grad():
        want_img, want_txt = clip.encode_image(x), clip.encode_text(text)
        want = clip(x, text)
        assert leanvit.patch(clip, "tome", r=3) is clip
        assert type(clip) is CLIP
        assert type(clip.visual).__name__ == "LeanVitOpenClipVisionTransformer"
        assert leanvit.is_patched(clip) and leanvit.patched_method(clip)[0] == "tome"
        reduced = clip.encode_image(x)
        torch.testing.assert_close(reduced, clip.visual(x))  # forward runs the patched tower
        assert not torch.allclose(reduced, want_img)
        out = clip(x, text)
        assert type(out) is type(want) and torch.equal(out[1], want[1])  # text features
        assert torch.equal(clip.encode_text(text), want_txt)
        assert leanvit.count_macs(clip, x).total == leanvit.count_macs(clip.visual, x).total
        leanvit.unpatch(clip if via == "clip" else clip.visual)
        assert not leanvit.is_patched(clip) and type(clip.visual) is VisionTransformer
        assert _same_state(clip, sd) and torch.equal(clip.encode_image(x), want_img)
        assert all(_equal(a, b) for a, b in zip(clip(x, text), want))


def test_clip_patched_through_its_tower_unpatches_through_the_model():
    clip, x = tiny_clip(), images()
    with torch.no_grad():
        want = clip.encode_image(x)
        leanvit.patch(clip.visual, "evit", keep_rate=0.5)
        assert leanvit.is_patched(clip)
        with pytest.raises(ValueError, match="already patched"):
            leanvit.patch(clip, "tome", r=2)
        leanvit.unpatch(clip)
        assert torch.equal(clip.encode_image(x), want)
    with pytest.raises(ValueError, match="not patched"):
        leanvit.unpatch(clip)


def test_timm_trunk_tower_runs_through_the_timm_vit_family():
    """open_clip's TimmModel (``timm_model_name``) builds its timm trunk at timm's default
    size (no image size passed), so the smallest ViT at 224."""
    clip = tiny_clip(image_size=224, timm_model_name="vit_tiny_patch16_224", timm_pool="token",
                     timm_proj="linear")
    trunk = clip.visual.trunk
    x = images(1, 224)
    sd = _state(clip)
    with torch.no_grad():
        want = clip.encode_image(x)
        leanvit.patch(clip, "tome", r=0)
        assert trunk.leanvit.info.family == "vit" and torch.equal(clip.encode_image(x), want)
        leanvit.unpatch(clip)
        leanvit.patch(clip.visual, "tome", r=8)  # the TimmModel itself: its trunk
        assert type(clip.visual).__name__ == "TimmModel" and leanvit.is_patched(clip.visual)
        assert leanvit.count_macs(clip, x).per_block[-1].tokens_out == 197 - 8 * 12
        leanvit.unpatch(clip.visual)
    assert _same_state(clip, sd) and type(trunk).__name__ == "VisionTransformer"


def test_dense_features_save_and_load(tmp_path):
    model, x = tiny(), images()
    with torch.no_grad():
        want = model.transformer(model._embeds(x))
        plain = leanvit.dense_features(model, x)
        torch.testing.assert_close(plain, model.ln_post(want)[:, 1:].reshape(2, 4, 4, 32),
                                   rtol=0, atol=0)
        leanvit.patch(model, "tome", r=4)
        reduced = leanvit.dense_features(model, x)
        out = model(x)
    assert reduced.shape == (2, 4, 4, 32) and torch.isfinite(reduced).all()
    path = leanvit.save(model, tmp_path / "tome.safetensors")
    fresh = tiny()
    leanvit.load(fresh, path)
    with torch.no_grad():
        assert leanvit.patched_method(fresh)[0] == "tome" and torch.equal(fresh(x), out)
    clip = tiny_clip()
    leanvit.load(clip, leanvit.save(leanvit.patch(tiny_clip(), "evit", keep_rate=0.5),
                                    tmp_path / "evit.safetensors"))
    assert leanvit.patched_method(clip.visual)[0] == "evit"
    assert leanvit.dense_features(clip, x).shape == (2, 4, 4, 32)


def test_compare_tune_and_bench_run_on_the_tower():
    """Smoke: the tower's embeddings scored as 16-way logits (random labels)."""
    import copy

    from leanvit.bench import time_models
    from leanvit.compare import parse_methods, run_compare
    from leanvit.tune import tune

    model, x = tiny(), images(4)
    loader = [(x, torch.arange(4))]
    rows = run_compare(model, parse_methods("tome r=2"), loader, progress=False, repeats=1)
    assert [r["method"] for r in rows] == ["none", "tome"] and rows[1]["gmacs"] < rows[0]["gmacs"]
    result = tune(model, loader, {"gmacs": 0.9 * rows[0]["gmacs"]}, methods=["tome"],
                  fractions=(1.0,), repeats=1, progress=False, log=None)
    assert result.choice is not None and result.choice["gmacs"] <= 0.9 * rows[0]["gmacs"]
    assert type(model) is VisionTransformer  # tune leaves the model as it was
    times = time_models(model, leanvit.patch(copy.deepcopy(model), "tome", r=2), x,
                        warmup=1, repeats=2)
    assert len(times["baseline"]) == len(times["candidate"]) == 2


def test_patched_tower_pickles_next_to_a_patched_timm_vit():
    """timm's and open_clip's VisionTransformer are patched as two classes of two names."""
    import copy
    import io

    from tests.conftest import tiny_vit

    timm_vit, model, x = leanvit.patch(tiny_vit(), "tome", r=1), tiny(), images()
    leanvit.patch(model, "tome", r=2)
    assert type(model).__name__ != type(timm_vit).__name__
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(x), model(x)) and torch.equal(copy.deepcopy(model)(x), model(x))
