"""leanvit.save / leanvit.load of compacted models (hMHSA + cFFN), patched or not.

The reference is the saved model itself: a fresh plain timm model with OTHER random weights,
given the file, must reproduce the saved model's outputs bit for bit (same structure, same
weights), in training form and after reparameterize, for ViT, PVTv2 and NextViT.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.layers import Attention

import leanvit
from leanvit.compaction.modules import HallucinatedAttention
from tests.compaction.test_compaction import images, tiny


def other_weights(model, seed=7):
    """Scramble every float tensor (parameters and buffers) so nothing comes from it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g).abs() + 0.1 if t.ndim == 1 else
                        torch.randn(t.shape, generator=g) * 0.05)
    return model


def converted(name="deit_tiny_patch16_224", deployed=False, **kw):
    model = leanvit.compact(tiny(name), images=images(), **kw)
    model.train()
    with torch.no_grad():  # BatchNorm statistics move away from the calibration
        model(images(4) * 1.5)
    model.eval()
    if deployed:
        leanvit.reparameterize(model)
    return model


def meta_of(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("name,deployed,hallucination", [
    ("deit_tiny_patch16_224", False, "mix"),
    ("deit_tiny_patch16_224", True, "dwconv"),
    ("pvt_v2_b0", True, "mix"),
    ("nextvit_small", False, "mix"),
])
def test_round_trip_recreates_the_compaction_and_its_outputs(tmp_path, name, deployed,
                                                             hallucination):
    src = converted(name, deployed, hallucination=hallucination)
    path = leanvit.save(src, tmp_path / "c.safetensors")  # not patched: allowed now
    meta = meta_of(path)
    assert meta["format_version"] == "2" and "method" not in meta
    assert json.loads(meta["compaction"]) == leanvit.compaction_spec(src)
    dst = other_weights(tiny(name))
    assert leanvit.load(dst, path) is dst
    assert leanvit.compaction_spec(dst) == leanvit.compaction_spec(src)
    assert not dst.training
    x = images()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    src_heads = [m.head_order for m in src.modules() if isinstance(m, HallucinatedAttention)]
    assert src_heads == [m.head_order for m in dst.modules()
                         if isinstance(m, HallucinatedAttention)]
    assert sum(p.numel() for p in dst.parameters()) == sum(p.numel() for p in src.parameters())


def test_training_form_still_trains_and_reparameterizes_after_loading(tmp_path):
    src = converted(deployed=False)
    dst = leanvit.load(other_weights(tiny()), leanvit.save(src, tmp_path / "c.safetensors"))
    x = images()
    with torch.no_grad():  # training mode (batch statistics) agrees too
        assert torch.equal(src.train()(x), dst.train()(x))
    src.eval(), dst.eval()
    leanvit.reparameterize(src), leanvit.reparameterize(dst)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_compacted_and_patched_round_trip(tmp_path):
    src = leanvit.patch(converted(deployed=True), "tome", r=2)
    path = leanvit.save(src, tmp_path / "ct.safetensors")
    meta = meta_of(path)
    assert meta["method"] == "tome" and json.loads(meta["options"])["r"] == 2
    dst = leanvit.load(other_weights(tiny()), path)
    assert leanvit.patched_method(dst) == leanvit.patched_method(src)
    assert leanvit.compaction_spec(dst) == leanvit.compaction_spec(src)
    x = images()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    # a learned method on a compacted model: its state comes back too
    src = leanvit.patch(converted(), "dynamicvit", keep_rate=0.7, locations=[1])
    with torch.no_grad():
        for p in src.leanvit.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    dst = leanvit.load(other_weights(tiny()), leanvit.save(src, tmp_path / "cd.safetensors"))
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_uncompacted_files_keep_version_1(tmp_path):
    path = leanvit.save(leanvit.patch(tiny(), "tome", r=2), tmp_path / "t.safetensors")
    meta = meta_of(path)
    assert meta["format_version"] == "1" and "compaction" not in meta
    assert set(load_file(str(path))) == set()  # ToMe: no learned state, no backbone


def _unchanged(model, before):
    assert leanvit.compaction_spec(model) is None and not leanvit.is_patched(model)
    assert all(isinstance(b.attn, Attention) for b in model.blocks)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_errors_name_the_problem_and_leave_the_model_as_it_was(tmp_path):
    path = leanvit.save(converted(), tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="already compacted"):
        leanvit.load(leanvit.compact(tiny()), path)
    with pytest.raises(ValueError, match="holds no token method"):
        leanvit.load(tiny(), path, keep_rate=0.5)
    wide = tiny(embed_dim=96, num_heads=4)
    with pytest.raises(ValueError, match="embed_dim=192"):
        leanvit.load(wide, path)
    pvt = leanvit.save(converted("pvt_v2_b0", deployed=True), tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="compacted pvt_v2_b0"):
        leanvit.load(tiny(), pvt)
    tensors, meta = load_file(str(path)), meta_of(path)

    def broken(name, tensors=tensors, **changes):
        """A consistent file (the checksum of its own tensors) with something wrong in it."""
        p = tmp_path / name
        save_file(tensors, str(p), metadata={**meta, **changes,
                                             "tensors_sha256": leanvit.io.tensors_sha256(tensors)})
        return p

    cases = [
        (broken("spec.safetensors", compaction="{not json"), "unreadable compaction"),
        (broken("family.safetensors", compaction=json.dumps(
            {**json.loads(meta["compaction"]), "family": "nextvit"})), "made for a nextvit"),
        (broken("version.safetensors", format_version="9"), "format_version '9'"),
        (broken("shape.safetensors", tensors={
            **tensors, "blocks.0.attn.qkv.weight": torch.zeros(5, 5)}), "wrong shape"),
        (broken("missing.safetensors", tensors={
            k: v for k, v in tensors.items() if "mlp.fc2" not in k}), "missing"),
    ]
    for bad, message in cases:
        model = tiny()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=message):
            leanvit.load(model, bad)
        _unchanged(model, before)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        leanvit.load(tiny(), tmp_path / "cut.safetensors")
