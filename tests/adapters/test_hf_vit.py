"""The Hugging Face transformers ViT adapter (ViT, DeiT, DINOv2, DINOv2 with registers):
keep-all settings of every method bit-identical to the unpatched model with eager and sdpa
attention, unpatch exact, MACs equal to PyTorch's FLOP counter, the models' own output types,
clear refusals, dense features, save/load. (Each method against references:
tests/methods/test_hf_vit_methods.py.)"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import leanvit

T = pytest.importorskip("transformers")
torch.set_num_threads(1)

SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
             image_size=64, patch_size=16)
#: name -> (model class, config class, extra config)
MODELS = {
    "vit": ("ViTModel", "ViTConfig", {}),
    "vit_cls": ("ViTForImageClassification", "ViTConfig", {"num_labels": 5}),
    "deit_cls": ("DeiTForImageClassification", "DeiTConfig", {"num_labels": 5}),
    "deit_teacher": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", {"num_labels": 5}),
    "dinov2_cls": ("Dinov2ForImageClassification", "Dinov2Config", {"num_labels": 5}),
    "dinov2_reg": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                   {"num_register_tokens": 2}),
}

KEEP_ALL = [("none", {}), ("tome", dict(r=0)), ("pitome", dict(r=0)), ("mctf", dict(r=0)),
            ("tofu", dict(r=0)), ("zerotprune", dict(r=0)),
            ("evit", dict(keep_rate=1.0, locations=(1, 2))),
            ("topk", dict(keep_rate=1.0, locations=(1, 2))),
            ("divprune", dict(keep_rate=1.0, locations=(1, 2))),
            ("random", dict(keep_rate=1.0, locations=(1, 2))),
            ("dynamicvit", dict(keep_rate=1.0, locations=(1, 2))),
            ("diffrate", None), ("ats", dict(locations=()))]


def tiny(name: str, impl: str = "sdpa", seed: int = 0, **extra) -> torch.nn.Module:
    cls, cfg_cls, kw = MODELS[name]
    cfg = getattr(T, cfg_cls)(**SMALL, **kw, **extra)
    torch.manual_seed(seed)
    model = getattr(T, cls)._from_config(cfg, attn_implementation=impl).eval()
    with torch.no_grad():  # peaked attention: a spread wider than the 0.02-std init
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 1.2 / p[0].numel() ** 0.5)
    return model


def main_out(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_all_token_methods_are_covered():
    methods = {m for m, _ in KEEP_ALL}
    assert methods == set(leanvit.available_methods()), "a method without a keep-all case"


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(MODELS))
def test_keep_all_is_bit_identical_and_unpatch_restores(name, impl):
    model = tiny(name, impl)
    x = torch.randn(2, 3, 64, 64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cls = type(model)
    with torch.no_grad():
        ref = model(x)
        for method, options in KEEP_ALL:
            if options is None:  # diffrate: every token kept in every block
                n = ref.last_hidden_state.shape[1] if hasattr(ref, "last_hidden_state") else \
                    16 + {"vit_cls": 1, "deit_cls": 2, "deit_teacher": 2, "dinov2_cls": 1}[name]
                options = {"schedule": ([n] * 3, [n] * 3)}
            leanvit.patch(model, method, **options)
            out = model(x)
            assert type(out) is type(ref), method
            assert torch.equal(main_out(out), main_out(ref)), method
            if getattr(ref, "pooler_output", None) is not None:
                assert torch.equal(out.pooler_output, ref.pooler_output), method
            leanvit.unpatch(model)
            assert type(model) is cls and not hasattr(model, "leanvit")
        assert torch.equal(main_out(model(x)), main_out(ref))
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def flop_counter_macs(model, x):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]


@pytest.mark.parametrize("name", ["vit", "vit_cls", "deit_teacher", "dinov2_cls", "dinov2_reg"])
@pytest.mark.parametrize("method,options", [("none", {}), ("tome", {"r": 3}),
                                            ("evit", {"keep_rate": 0.5})])
def test_macs_equal_the_flop_counter(name, method, options):
    """Eager attention: the counter sees the attention products (CPU fused SDPA hides them)."""
    model = tiny(name, "eager")
    x = torch.randn(2, 3, 64, 64)
    leanvit.patch(model, method, **options)
    report = leanvit.count_macs(model, x)
    assert report.total == pytest.approx(flop_counter_macs(model, x), rel=0.01)
    if method == "none":
        leanvit.unpatch(model)
        assert report.total == pytest.approx(flop_counter_macs(model, x), rel=0.01)


def test_outputs_keep_their_types_and_options():
    x = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([1, 3])
    model = tiny("vit_cls")
    with torch.no_grad():
        ref = model(x, labels=labels)
        leanvit.patch(model, "tome", r=0)
        out = model(x, labels=labels)
        assert isinstance(out, T.modeling_outputs.ImageClassifierOutput)
        assert torch.equal(out.loss, ref.loss)
        tup = model(x, return_dict=False)
        assert isinstance(tup, tuple) and torch.equal(tup[0], ref.logits)
        for kw in ({"output_attentions": True}, {"output_hidden_states": True}):
            with pytest.raises(ValueError, match="attentions or hidden states"):
                model(x, **kw)
        with pytest.raises(ValueError, match="interpolate_pos_encoding"):
            model(x, interpolate_pos_encoding=True)
        with pytest.raises(ValueError, match="bool_masked_pos"):
            model(x, bool_masked_pos=torch.zeros(2, 16, dtype=torch.bool))
        with pytest.raises(ValueError, match="model was built for 64x64"):
            model(torch.randn(1, 3, 32, 32))
    enc = tiny("vit")
    leanvit.patch(enc, "tome", r=2)
    with torch.no_grad():
        out = enc(x)
    assert isinstance(out, T.modeling_outputs.BaseModelOutputWithPooling)
    assert out.last_hidden_state.shape == (2, 17 - 6, 64)  # 3 layers of 2 merges
    assert out.pooler_output.shape == (2, 64)


def test_dinov2_takes_other_sizes_and_refuses_non_multiples():
    model = tiny("dinov2_reg")
    leanvit.patch(model, "tome", r=2)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 80))
    assert out.last_hidden_state.shape == (1, 1 + 2 + 30 - 6, 64)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 70, 64))


def test_unsupported_layer_is_refused_clearly():
    model = tiny("vit")
    model.layers[1] = torch.nn.Identity()
    with pytest.raises(ValueError, match="layer 1 is a Identity"):
        leanvit.patch(model, "tome", r=2)


@pytest.mark.parametrize("name", ["vit", "dinov2_reg", "deit_teacher"])
def test_dense_features(name):
    model = tiny(name)
    x = torch.randn(2, 3, 64, 64)
    prefix = {"vit": 1, "dinov2_reg": 3, "deit_teacher": 2}[name]
    with torch.no_grad():
        plain = leanvit.dense_features(model, x)
        base = model.base_model(x).last_hidden_state[:, prefix:]
        assert torch.equal(plain, base.reshape(2, 4, 4, 64))
        leanvit.patch(model, "tome", r=0)
        assert torch.equal(leanvit.dense_features(model, x), plain)
        leanvit.unpatch(model)
        leanvit.patch(model, "evit", keep_rate=0.5)
        dense = leanvit.dense_features(model, x)
    assert dense.shape == (2, 4, 4, 64) and torch.isfinite(dense).all()


def test_save_and_load_round_trip(tmp_path):
    model = tiny("dinov2_cls")
    x = torch.randn(2, 3, 64, 64)
    leanvit.patch(model, "dynamicvit", keep_rate=0.5, locations=(1, 2))
    with torch.no_grad():
        ref = model(x).logits
    path = leanvit.save(model, tmp_path / "dyn.safetensors")
    other = tiny("dinov2_cls")
    leanvit.load(other, path)
    with torch.no_grad():
        assert torch.equal(other(x).logits, ref)
