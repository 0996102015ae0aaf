"""The backbone contract (leanvit.adapters.base) and the one family registry."""
from __future__ import annotations

import dataclasses
import types

import pytest
import timm
import torch

import leanvit
from leanvit import adapters
from leanvit.adapters import base
from leanvit.registry import get_method


def test_every_family_implements_its_contract():
    assert set(adapters.FAMILIES) >= {"vit", "convnext", "swin", "pvt_v2", "nextvit"}
    for fam in adapters.FAMILIES.values():
        assert fam.kind in base.KINDS
        if fam.adapter is not None:
            proto = base.TokenBackbone if fam.kind == "tokens" else base.Backbone
            assert isinstance(fam.adapter, proto), fam.name
            for name in base._members(proto):
                assert hasattr(fam.adapter, name), (fam.name, name)
    # the token contract lists what callers outside the adapters use
    members = base._members(base.TokenBackbone)
    for name in ("describe", "check_input", "embed", "run_blocks", "forward_head",
                 "token_weights", "loss_tokens", "block_macs", "forward_features"):
        assert name in members


def test_one_registry_for_methods_and_compaction():
    vit = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=64)
    fam = adapters.find_family(vit)
    assert fam.name == "vit" and fam.adapter is adapters.vit and fam.compaction is not None
    pvt = timm.create_model("pvt_v2_b0")
    assert adapters.find_family(pvt, compaction=True).name == "pvt_v2"
    with pytest.raises(ValueError, match="unsupported model type PyramidVisionTransformerV2"):
        adapters.find_adapter(pvt)  # compaction only: no token adapter
    convnext = timm.create_model("convnext_atto")
    with pytest.raises(ValueError, match="leanvit.compact supports timm VisionTransformer.*pvt_v2_.*, not ConvNeXt"):
        leanvit.compact(convnext)


def test_adapter_file_missing_a_contract_function_is_refused():
    mod = types.ModuleType("fake_adapter")
    mod.FAMILY, mod.KIND, mod.DESCRIPTION = "fake", "tokens", "fake (none)"
    mod.matches = lambda cls: False
    mod.forward_features = lambda *a, **k: None
    with pytest.raises(TypeError, match="fake_adapter lacks .*embed.* TokenBackbone"):
        base.Family.from_module(mod)
    mod.KIND = "pyramid"
    with pytest.raises(ValueError, match="KIND must be one of"):
        base.Family.from_module(mod)
    with pytest.raises(ValueError, match="already registered"):
        adapters.register_family(adapters.vit)


def test_a_new_token_family_is_served_by_the_token_methods_without_edits(monkeypatch):
    """A family registered with KIND "tokens" gets every token method: here the vit adapter
    registered a second time under another name, for a subclass of timm's ViT."""
    from timm.models.vision_transformer import VisionTransformer

    class OtherViT(VisionTransformer):
        pass

    mod = types.ModuleType("other_adapter")
    for name in base._members(base.TokenBackbone):
        setattr(mod, name, getattr(adapters.vit, name))
    mod.FAMILY, mod.DESCRIPTION = "other", "other (test)"
    mod.describe = lambda m: dataclasses.replace(adapters.vit.describe(m), family="other")
    mod.matches = lambda cls: issubclass(cls, OtherViT)
    fams = {"other": base.Family.from_module(mod), **adapters.FAMILIES}  # first match wins
    monkeypatch.setattr(adapters, "FAMILIES", fams)
    model = OtherViT(img_size=64, patch_size=16, embed_dim=48, depth=12, num_heads=3).eval()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    for method, opts in [("tome", {"r": 2}), ("evit", {"keep_rate": 0.5}),
                         ("topk", {"keep_rate": 0.5}), ("ats", {}), ("dynamicvit", {})]:
        assert get_method(method).serves("other", "tokens")
        leanvit.patch(model, method, **opts)
        assert model.leanvit.info.family == "other"
        assert model(x).shape == ref.shape
        leanvit.unpatch(model)
    assert not get_method("tome").serves("convnext", "hierarchical")
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_readme_layout_names_the_contract():
    """README's layout section says where a new family goes and lists every contract function."""
    from pathlib import Path

    text = Path(__file__).resolve().parents[2].joinpath("README.md").read_text()
    layout = text[text.index("## Layout"):]
    layout = layout[: layout.find("\n## ", 1) if "\n## " in layout[1:] else None]
    assert "leanvit/adapters/<family>.py" in layout and "register_family" in layout
    for name in base._members(base.TokenBackbone) + ["COMPACTION"]:
        assert f"`{name}`" in layout, name
