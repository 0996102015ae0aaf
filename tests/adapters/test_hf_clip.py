"""Hugging Face transformers' CLIP / SigLIP / SigLIP 2 image towers (``hf_clip``): keep-all
settings bit-identical, unpatch exact, output types kept, MACs against FlopCounterMode, dense
features, save/load, and the one-line errors."""
from __future__ import annotations

import pytest
import torch

import leanvit

transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)

KINDS = ("clip", "clip_proj", "siglip", "siglip2")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6)


def build(kind: str, impl: str = "sdpa", seed: int = 0, dtype=torch.float32):
    """A tiny tower (4x4 patches of 16 px on 64x64 images), eval mode; ``impl`` the
    attention implementation. Weights are spread (std 0.3) so rankings are far from ties."""
    T = transformers
    torch.manual_seed(seed)
    if kind.startswith("clip"):
        cfg = T.CLIPVisionConfig(image_size=64, projection_dim=32, **TINY)
        cls = T.CLIPVisionModelWithProjection if kind == "clip_proj" else T.CLIPVisionModel
    elif kind == "siglip":
        cfg, cls = T.SiglipVisionConfig(image_size=64, **TINY), T.SiglipVisionModel
    else:
        cfg, cls = T.Siglip2VisionConfig(num_patches=16, **TINY), T.Siglip2VisionModel
    cfg._attn_implementation = impl
    model = cls(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.to(dtype).eval()


def images(n: int = 2, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def call_args(kind: str, x: torch.Tensor) -> tuple:
    """The model's own call: SigLIP 2 takes patches, a mask and the grid (its processor's)."""
    if kind != "siglip2":
        return (x,)
    from leanvit.adapters.hf_clip import patchify

    pixels, shapes = patchify(x, 16)
    return pixels, torch.ones(pixels.shape[:2], dtype=torch.long), shapes


KEEP_ALL = [
    ("none", {}), ("tome", dict(r=0)), ("pitome", dict(r=0)), ("mctf", dict(r=0)),
    ("tofu", dict(r=0)), ("zerotprune", dict(r=0)),
    ("divprune", dict(keep_rate=1.0, locations=(1,))),
    ("evit", dict(keep_rate=1.0, locations=(1,))), ("topk", dict(keep_rate=1.0, locations=(1,))),
    ("dynamicvit", dict(keep_rate=1.0, locations=(1,))), ("diffrate", dict(schedule="full")),
    ("random", dict(keep_rate=1.0, locations=(1,))),
]
NEEDS_CLASS_TOKEN = ("evit", "topk", "ats", "diffrate")


def _options(opts: dict, n0: int) -> dict:
    return dict(schedule=([n0] * 2, [n0] * 2)) if opts.get("schedule") == "full" else opts


def _outputs_equal(a, b) -> bool:
    return type(a) is type(b) and all(
        torch.equal(a[k], b[k]) for k in a.keys()) and list(a.keys()) == list(b.keys())


def test_every_method_has_a_keep_all_setting_here():
    # ats samples its queries: no setting of it keeps the model as it is
    assert {m for m, _ in KEEP_ALL} | {"ats"} >= set(leanvit.available_methods())


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_keep_all_is_bit_identical_and_unpatch_restores(kind, impl):
    model = build(kind, impl)
    cls, sd = type(model), {k: v.clone() for k, v in model.state_dict().items()}
    args = call_args(kind, images())
    n0 = 16 + kind.startswith("clip")
    with torch.no_grad():
        want = model(*args)
        for method, opts in KEEP_ALL:
            if method in NEEDS_CLASS_TOKEN and not kind.startswith("clip"):
                with pytest.raises(ValueError, match="no class token"):
                    leanvit.patch(model, method, **opts)
                continue
            leanvit.patch(model, method, **_options(opts, n0))
            assert model.leanvit.info.family == "hf_clip"
            assert _outputs_equal(model(*args), want), method
            leanvit.unpatch(model)
            assert type(model) is cls and not hasattr(model, "leanvit")
            assert _outputs_equal(model(*args), want)
    assert model.state_dict().keys() == sd.keys()
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_outputs_keep_their_types_and_return_dict_false_gives_tuples():
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

    x = images()
    model = leanvit.patch(build("clip_proj"), "tome", r=3)
    with torch.no_grad():
        out = model(x)
        assert type(out) is CLIPVisionModelOutput and out.image_embeds.shape == (2, 32)
        assert out.last_hidden_state.shape == (2, 17 - 6, 64)
        tup = model(x, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.image_embeds)
    model = leanvit.patch(build("siglip"), "tome", r=3)
    with torch.no_grad():
        out = model(pixel_values=x)
    assert type(out) is BaseModelOutputWithPooling and out.pooler_output.shape == (2, 64)
    assert out.last_hidden_state.shape == (2, 10, 64)


def flop_counter_macs(model, *args) -> float:
    """MACs per image of ``model(*args)`` as torch's FlopCounterMode sees them (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*args)
    return counter.get_total_flops() / 2 / args[0].shape[0]


@pytest.mark.parametrize("kind,method,opts", [
    ("clip_proj", "none", {}), ("clip_proj", "tome", dict(r=3)),
    ("clip", "evit", dict(keep_rate=0.5)), ("siglip", "none", {}),
    ("siglip", "tome", dict(r=3)), ("siglip", "divprune", dict(keep_rate=0.5)),
    ("siglip2", "none", {}), ("siglip2", "tome", dict(r=3)),
])
def test_count_macs_matches_flop_counter(kind, method, opts):
    model = build(kind, "eager")
    x = images()
    dense = flop_counter_macs(model, *call_args(kind, x))  # the unpatched model's own call
    leanvit.patch(model, method, **opts)
    report = leanvit.count_macs(model, x)
    traced = flop_counter_macs(model, x)  # the patched model takes images [B, 3, H, W]
    assert abs(report.total - traced) <= 0.01 * traced, (report.total, traced)
    if method == "none":
        assert abs(report.total - dense) <= 0.01 * dense, (report.total, dense)
    if method != "none":
        leanvit.unpatch(model)
        assert report.total < leanvit.count_macs(model, x).total


@pytest.mark.parametrize("kind", ["clip", "siglip", "siglip2"])
def test_dense_features(kind):
    model = build(kind)
    x = images()
    with torch.no_grad():
        hidden = model(*call_args(kind, x)).last_hidden_state
        want = hidden[:, 1:] if kind == "clip" else hidden
        want = want.reshape(2, 4, 4, 64)
        assert torch.equal(leanvit.dense_features(model, x), want)  # unpatched
        assert type(model).__name__ == type(build(kind)).__name__  # left unpatched
        leanvit.patch(model, "tome", r=0)
        assert torch.equal(leanvit.dense_features(model, x), want)
        leanvit.unpatch(model)
        leanvit.patch(model, "tome", r=4)
        got = leanvit.dense_features(model, x)
    assert got.shape == (2, 4, 4, 64) and torch.isfinite(got).all()
    assert not torch.equal(got, want)


def test_save_load_round_trip(tmp_path):
    x = images()
    model = leanvit.patch(build("clip"), "dynamicvit", keep_rate=0.5,
                          locations=(1,))  # learned predictors
    with torch.no_grad():
        for p in model.leanvit.parameters():
            p.add_(0.1)
        want = model(x).pooler_output
    path = leanvit.save(model, tmp_path / "clip_dynamicvit.safetensors")
    fresh = leanvit.load(build("clip"), path)
    assert fresh.leanvit.method_name == "dynamicvit"
    with torch.no_grad():
        assert torch.equal(fresh(x).pooler_output, want)


def test_one_line_errors():
    x = images()
    model = leanvit.patch(build("clip"), "tome", r=2)
    with pytest.raises(ValueError, match="do not return attentions"):
        model(x, output_attentions=True)
    with pytest.raises(ValueError, match="do not return hidden_states"):
        model(x, output_hidden_states=True)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model(x, interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match="model was built for 64x64 images, got 32x32"):
        model(images()[..., :32, :32])
    T = transformers
    whole = T.CLIPModel(T.CLIPConfig(vision_config=dict(image_size=64, **TINY),
                                     text_config=dict(hidden_size=64, intermediate_size=128,
                                                      num_hidden_layers=1,
                                                      num_attention_heads=4)))
    with pytest.raises(ValueError, match=r"patch its image tower: leanvit.patch\(model.vision"):
        leanvit.patch(whole, "tome", r=2)
    sig2 = leanvit.patch(build("siglip2"), "tome", r=2)
    pixels, mask, shapes = call_args("siglip2", x)
    mask[1, -3:] = 0  # a padded NaFlex batch
    with pytest.raises(ValueError, match="fixed patch grid"):
        sig2(pixels, mask, shapes)
    with pytest.raises(ValueError, match="multiples of its patch size 16"):
        sig2(images()[..., :40, :40])


def test_whole_clip_model_vision_tower_patches_and_text_is_untouched():
    T = transformers
    whole = T.CLIPModel(T.CLIPConfig(vision_config=dict(image_size=64, **TINY),
                                     text_config=dict(hidden_size=64, intermediate_size=128,
                                                      num_hidden_layers=1,
                                                      num_attention_heads=4))).eval()
    x = images()
    with torch.no_grad():
        want = whole.get_image_features(pixel_values=x)
        text_cls = type(whole.text_model)
        leanvit.patch(whole.vision_model, "tome", r=0)
        got = whole.get_image_features(pixel_values=x)
    assert type(whole.text_model) is text_cls
    want = getattr(want, "pooler_output", want)
    got = getattr(got, "pooler_output", got)
    assert torch.equal(got, want)


def test_compare_tune_and_bench_timing_run_on_a_tower():
    """Smoke: ``run_compare``, ``tune`` and the benchmark's paired timing take the towers
    (their "logits" are the pooled output / image embeddings: no classifier here)."""
    from leanvit.bench import time_models
    from leanvit.compare import Setting, run_compare
    from leanvit.tune import tune

    loader = [(images(4), torch.arange(4))]
    rows = run_compare(build("siglip"), [Setting("tome", {"r": 2})], loader, progress=False,
                       warmup=0, repeats=1)
    assert [r["method"] for r in rows] == ["none", "tome"]
    assert rows[1]["gmacs"] < rows[0]["gmacs"]
    with pytest.warns(UserWarning, match="clamped"):  # tune's grid asks for large r
        result = tune(build("clip_proj"), loader, {"speedup": 1.1}, methods=["tome"],
                      repeats=1, progress=False, log=None)
    assert result.rows and result.rows[0]["method"] == "none"
    base = build("clip")
    timed = time_models(base, leanvit.patch(build("clip"), "tome", r=3), images(2), warmup=0,
                        repeats=1)
    assert all(len(v) == 1 and v[0] > 0 for v in timed.values())


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_training_with_a_keep_mask_backpropagates(kind):
    """DynamicViT in training keeps every token in place under a keep-mask (the blocks' masked
    softmax): gradients reach the predictors and the tower's weights."""
    model = leanvit.patch(build(kind).train(), "dynamicvit", keep_rate=0.5, locations=(1,))
    out = model(images())
    assert out.last_hidden_state.shape[1] == 16 + (kind == "clip")  # kept in place
    out.pooler_output.square().mean().backward()
    assert all(p.grad is not None for p in model.leanvit.parameters())
    assert model.encoder.layers[0].self_attn.q_proj.weight.grad is not None
