"""patch / unpatch: the identity method is exact, the model is restored exactly, bad input is
rejected with a clear message and leaves the model unchanged."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import timm
import torch

import leanvit
from leanvit.registry import Method, Reducer, check_number
from tests.conftest import tiny_vit

# The models the foundation issue names, with their real widths and prefix tokens; depth is
# cut to 2 to keep the test fast (block count does not change what is tested).
MODELS = [
    ("deit_tiny_patch16_224", {}),
    ("deit_small_distilled_patch16_224", {}),
    ("vit_base_patch16_224", {"global_pool": "avg"}),
    ("vit_small_patch14_reg4_dinov2", {}),
]


@pytest.mark.parametrize("name,kw", MODELS, ids=[m[0] for m in MODELS])
def test_none_is_bit_identical_and_unpatch_restores(name, kw):
    model = tiny_vit(name, img_size=98 if "dinov2" in name else 64, **kw)
    x = torch.randn(3, 3, *model.patch_embed.img_size)
    cls = type(model)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        leanvit.patch(model, "none")
        assert leanvit.is_patched(model) and isinstance(model, cls)
        assert list(model.state_dict()) == keys  # weights untouched, nothing added
        out = model(x)
        feats = model.forward_features(x)
        leanvit.unpatch(model)
        assert type(model) is cls and not hasattr(model, "leanvit")
        again = model(x)
    assert torch.equal(out, ref)
    assert torch.equal(again, ref)
    unpatched_feats = model.forward_features(x)
    assert torch.equal(feats, unpatched_feats)


def test_none_is_bit_identical_on_real_dinov2(dinov2):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = dinov2(x)
        leanvit.patch(dinov2, "none")
        out = dinov2(x)
        leanvit.unpatch(dinov2)
        again = dinov2(x)
    assert torch.equal(out, ref) and torch.equal(again, ref)


def test_patch_returns_same_object_and_keeps_training_mode():
    model = tiny_vit().train()
    assert leanvit.patch(model, "none") is model
    assert model.training
    assert leanvit.patched_method(model)[0] == "none"
    assert leanvit.unpatch(model) is model


def test_patched_model_deepcopies_and_pickles(tmp_path):
    model = leanvit.patch(tiny_vit(), "none")
    x = torch.randn(1, 3, 64, 64)
    clone = copy.deepcopy(model)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x)) and torch.equal(loaded(x), model(x))


def test_double_patch_is_an_error_and_changes_nothing():
    model = leanvit.patch(tiny_vit(), "none")
    reducer = model.leanvit
    with pytest.raises(ValueError, match="already patched.*unpatch"):
        leanvit.patch(model, "none")
    assert model.leanvit is reducer


def test_unpatch_of_unpatched_model_is_an_error():
    with pytest.raises(ValueError, match="not patched"):
        leanvit.unpatch(tiny_vit())


def test_unsupported_family_names_the_supported_ones():
    model = timm.create_model("resnet18")
    with pytest.raises(ValueError, match="unsupported model type ResNet.*supported families: vit"):
        leanvit.patch(model, "none")
    assert type(model).__name__ == "ResNet" and not hasattr(model, "leanvit")
    with pytest.raises(TypeError, match="nn.Module"):
        leanvit.patch("deit_small_patch16_224", "none")


def test_unsupported_vit_variant_is_rejected_clearly():
    model = timm.create_model("vit_small_patch16_224", depth=2, img_size=64, class_token=True,
                              block_fn=timm.models.vision_transformer.ResPostBlock)
    with pytest.raises(ValueError, match="ResPostBlock"):
        leanvit.patch(model, "none")


def test_unknown_method_lists_the_methods():
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"unknown method 'nope'; available methods: .*none"):
        leanvit.patch(model, "nope")
    with pytest.raises(TypeError):
        leanvit.patch(model, 3)
    assert not leanvit.is_patched(model)


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown option.*'r'.*valid options: .*none"):
        leanvit.patch(tiny_vit(), "none", r=3)


@dataclass(frozen=True)
class _RateOptions:
    rate: float = 0.5

    def __post_init__(self):
        check_number("rate", self.rate, lo=0, hi=1, lo_open=True)


def test_out_of_range_and_wrong_type_options(temp_method):
    temp_method(Method("_rate_test", _RateOptions, lambda o, i: Reducer(o, i)))
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"rate must be in \(0, 1\], got 1.5"):
        leanvit.patch(model, "_rate_test", rate=1.5)
    with pytest.raises(TypeError, match="rate must be a number"):
        leanvit.patch(model, "_rate_test", rate="0.5")
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'rte'.*rate \(default 0.5\)"):
        leanvit.patch(model, "_rate_test", rte=0.5)
    assert not leanvit.is_patched(model)
    assert "_rate_test" in leanvit.available_methods()


def test_available_methods_maps_names_to_options_dataclasses():
    methods = leanvit.available_methods()
    assert "none" in methods
    import dataclasses
    assert all(dataclasses.is_dataclass(t) for t in methods.values())


def test_wrong_image_size_gets_a_clear_error():
    model = leanvit.patch(tiny_vit(), "none")
    with pytest.raises(ValueError, match="built for 64x64 images, got 96x96.*img_size=96"):
        model(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model(torch.randn(3, 64, 64))


def test_method_rejecting_a_family_is_an_error(temp_method):
    temp_method(Method("_swin_only", _RateOptions, lambda o, i: Reducer(o, i),
                       families=("swin",)))
    with pytest.raises(ValueError, match="needs a swin model; this is a vit model"):
        leanvit.patch(tiny_vit(), "_swin_only")


def test_unknown_method_error_leaves_internal_modes_out():
    """diffrate-search is a mode of 'leanvit search', not a method to offer a user."""
    with pytest.raises(ValueError, match="unknown method 'nope'") as e:
        leanvit.patch(tiny_vit(), "nope")
    offered = str(e.value).split("available methods: ")[1].split(";")[0].split(", ")
    assert offered == list(leanvit.available_methods())
    assert "diffrate-search" not in offered and "tome" in offered
    with pytest.raises(ValueError, match=r"unknown method 'tomee'; .*; did you mean 'tome'\?$"):
        leanvit.patch(tiny_vit(), "tomee")
    with pytest.raises(ValueError, match=r"unknown method 'diffrate-serch'; .*; did you mean "
                                         r"'diffrate'\?$"):  # never the internal mode
        leanvit.patch(tiny_vit(), "diffrate-serch")


@pytest.mark.parametrize("family", ["convnext_atto", "convnext", "swin"])
@pytest.mark.parametrize("method", ["tome", "evit", "diffrate"])
def test_token_method_on_a_hierarchical_model_says_it_needs_a_flat_token_model(family, method):
    """convnext_atto builds conv_mlp=True, which the convnext adapter cannot run; a token method
    on it was refused for that detail instead of for being a token method."""
    from tests._hier_models import tiny_convnext, tiny_swin

    model = {"convnext_atto": lambda: timm.create_model("convnext_atto", depths=(1, 1, 1, 1)),
             "convnext": tiny_convnext, "swin": tiny_swin}[family]()
    name = "swin" if family == "swin" else "convnext"
    with pytest.raises(ValueError) as e:
        leanvit.patch(model, method)
    msg = str(e.value)
    flat = ", ".join(leanvit.adapters.family_names("tokens"))  # vit, eva, beit, hf_vit, ...
    assert msg == (f"method {method!r} needs a flat-token model (the ViT families: {flat}); "
                   f"this is a {name} model (hierarchical: stages of 2-D maps), on which "
                   "leanvit runs dynamicvit, none")
    assert "conv_mlp" not in msg
    assert not leanvit.is_patched(model)
