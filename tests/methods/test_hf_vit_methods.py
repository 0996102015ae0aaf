"""Token methods on Hugging Face transformers ViT / DeiT / DINOv2 models against references:
the same method on the timm model holding the same weights (every registered method), and
a plainly written per-image forward over the HF modules themselves (ToMe, EViT), including
DINOv2's ``[cls, mean(patches)]`` classifier input weighted by merged tokens' sizes."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from torch import Tensor

import leanvit
from leanvit.adapters import hf_vit
from leanvit.adapters import vit as vit_adapter
from leanvit.methods.tome import schedule
from tests.methods._vit_reference import tiny_vit
from tests.methods.test_evit import evit_reference
from tests.methods.test_tome import tome_reference

T = pytest.importorskip("transformers")
torch.set_num_threads(1)

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "hf_dinov2.py"


def _converter():
    import sys

    sys.path.insert(0, str(_SCRIPT.parent))  # the script imports _common beside it
    try:
        spec = importlib.util.spec_from_file_location("leanvit_benchmarks_hf_dinov2", _SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(_SCRIPT.parent))
    return mod.load_timm_into_hf


COMMON = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
              image_size=32, patch_size=8, layer_norm_eps=1e-6)


def pair(kind: str, impl: str = "sdpa"):
    """A tiny float64 timm model (wide-spread weights, ``tiny_vit``) and the transformers model
    of ``kind`` holding the same weights."""
    if kind == "vit":
        tm = tiny_vit()
        hf = T.ViTForImageClassification._from_config(T.ViTConfig(**COMMON, num_labels=5),
                                                      attn_implementation=impl)
    elif kind == "deit":
        tm = tiny_vit(cls=VisionTransformerDistilled)
        hf = T.DeiTForImageClassificationWithTeacher._from_config(
            T.DeiTConfig(**COMMON, num_labels=5), attn_implementation=impl)
    else:  # dinov2: layer scale, the encoder alone
        tm = tiny_vit(init_values=0.5, num_classes=0)
        hf = T.Dinov2Model._from_config(T.Dinov2Config(**COMMON, mlp_ratio=4), attn_implementation=impl)
    _converter()(hf, tm.state_dict())
    return tm, hf.double().eval()


def images(batch: int = 3, seed: int = 3) -> Tensor:
    return torch.randn(batch, 3, 32, 32, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))


SETTINGS = [("none", {}), ("tome", dict(r=3)), ("pitome", dict(r=3)), ("mctf", dict(r=3)),
            ("tofu", dict(r=3)), ("zerotprune", dict(r=3)),
            ("evit", dict(keep_rate=0.6, locations=(1, 2))),
            ("topk", dict(keep_rate=0.6, locations=(1, 2))),
            ("divprune", dict(keep_rate=0.6, locations=(1, 2))),
            ("random", dict(keep_rate=0.6, locations=(1, 2))),
            ("dynamicvit", dict(keep_rate=0.6, locations=(1, 2))),
            ("diffrate", None), ("ats", dict(locations=(1, 2)))]


def test_every_method_is_compared():
    assert {m for m, _ in SETTINGS} == set(leanvit.available_methods())


# DINOv2 eager: its eager softmax runs in the input dtype (ViT/DeiT: in float32, not float64)
@pytest.mark.filterwarnings("ignore:mctf. r=3 asks for more fusions")  # clamped the same
@pytest.mark.parametrize("kind,impl", [("vit", "sdpa"), ("deit", "sdpa"), ("dinov2", "eager")])
def test_unpatched_and_every_method_equal_timm(kind, impl):
    tm, hf = pair(kind, impl)
    x = images()
    with torch.no_grad():
        out = hf(x)
        ref = tm.forward_features(x)
        torch.testing.assert_close(hf.base_model(x).last_hidden_state, ref, rtol=1e-10,
                                   atol=1e-10)
        if kind != "dinov2":
            torch.testing.assert_close(out.logits, tm(x), rtol=1e-10, atol=1e-10)
    prefix = 2 if kind == "deit" else 1
    for method, options in SETTINGS:
        if options is None:  # diffrate: prune 2 then merge 2 per block
            n = 16 + prefix
            options = {"schedule": ([n, n - 2, n - 4, n - 6], [n - 2, n - 4, n - 6, n - 8])}
        leanvit.patch(tm, method, **options)
        leanvit.patch(hf, method, **options)
        hf.leanvit.load_state_dict(tm.leanvit.state_dict())  # DynamicViT's predictors
        with torch.no_grad():
            torch.manual_seed(5)
            a, sa = vit_adapter.forward_features(tm, x)
            torch.manual_seed(5)
            b, sb = hf_vit.forward_features(hf, x)
            assert b.shape == a.shape, method
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, msg=method)
            if sa.size is not None:
                torch.testing.assert_close(sb.size, sa.size, msg=method)
            if kind != "dinov2":
                torch.manual_seed(5)
                la = tm(x)
                torch.manual_seed(5)
                torch.testing.assert_close(hf(x).logits, la, rtol=1e-9, atol=1e-9, msg=method)
        leanvit.unpatch(tm), leanvit.unpatch(hf)


# --------------------------------------------------------------------------------------------
# A per-image forward over the HF modules, written out (materialised attention)


def hf_forward(model, x: Tensor, reduce, prop_attn: bool = False):
    """Final tokens ``[B, N', C]``, sizes and sources of a transformers ViT/DINOv2 encoder with
    ``reduce(i, x [N, C], attn [H, N, N], keys [H, N, D], size, source, prefix)`` per image
    after each layer's attention residual."""
    base = model.base_model
    emb = base.embeddings
    x = emb(x)
    p = 1 + getattr(emb, "register_tokens", torch.zeros(1, 0)).shape[1] + int(
        hasattr(emb, "distillation_token"))
    B, N0, C = x.shape
    size, source = x.new_ones(B, N0), torch.eye(N0, dtype=x.dtype).repeat(B, 1, 1)
    layers = base.layers if hasattr(base, "layers") else base.encoder.layer
    for i, blk in enumerate(layers):
        dinov2 = hasattr(blk, "norm1")
        y = blk.norm1(x) if dinov2 else blk.layernorm_before(x)
        at = blk.attention
        H = at.num_attention_heads
        q, k, v = (proj(y).reshape(B, -1, H, C // H).transpose(1, 2)
                   for proj in (at.q_proj, at.k_proj, at.v_proj))
        logits = q @ k.transpose(-1, -2) / math.sqrt(C // H)
        if prop_attn:
            logits = logits + size.log()[:, None, None, :]
        a = logits.softmax(-1)
        out = at.o_proj((a @ v).transpose(1, 2).reshape(B, -1, C))
        x = x + (blk.layer_scale1(out) if dinov2 else out)
        rows = [reduce(i, x[b], a[b], k[b], size[b], source[b], p) for b in range(B)]
        x, size, source = (torch.stack([r[j] for r in rows]) for j in range(3))
        m = blk.mlp(blk.norm2(x) if dinov2 else blk.layernorm_after(x))
        x = x + (blk.layer_scale2(m) if dinov2 else m)
    return base.layernorm(x), size, source


def _registers_model():
    cfg = T.Dinov2WithRegistersConfig(**COMMON, num_register_tokens=2, num_labels=5)
    torch.manual_seed(1)
    model = T.Dinov2WithRegistersForImageClassification._from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1.5 / p[0].numel() ** 0.5 if p.dim() >= 2 else 0.5)
    return model.double().eval()


@pytest.mark.parametrize("kind", ["vit", "deit", "registers"])
def test_tome_matches_the_per_image_reference(kind):
    model = _registers_model() if kind == "registers" else pair(kind)[1]
    x = images()
    with torch.no_grad():
        ref_x, ref_size, ref_src = hf_forward(model, x, tome_reference(schedule(3, 4)),
                                              prop_attn=True)
        leanvit.patch(model, "tome", r=3, trace_source=True)
        out = model(x)
        tokens, state = hf_vit.forward_features(model, x)
    assert torch.equal(state.source, ref_src)
    torch.testing.assert_close(state.size, ref_size)
    torch.testing.assert_close(tokens, ref_x, rtol=1e-9, atol=1e-9)
    if kind == "registers":  # [cls, mean of patches weighted by size], registers in neither
        w = ref_size[:, 3:, None]
        pooled = torch.cat([ref_x[:, 0], (ref_x[:, 3:] * w).sum(1) / w.sum(1)], -1)
        torch.testing.assert_close(out.logits, model.classifier(pooled), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["vit", "registers"])
def test_evit_matches_the_per_image_reference(kind):
    model = _registers_model() if kind == "registers" else pair(kind)[1]
    x = images()
    with torch.no_grad():
        ref_x, _, _ = hf_forward(model, x, evit_reference(0.5, (1, 2)))
        leanvit.patch(model, "evit", keep_rate=0.5, locations=(1, 2))
        tokens, _ = hf_vit.forward_features(model, x)
    torch.testing.assert_close(tokens, ref_x, rtol=1e-9, atol=1e-9)



def test_real_dinov2_converts_and_equals_timm(dinov2):
    """The real DINOv2 ViT-S/14 (skipped without the shared weights): the converted HF model's
    tokens equal timm's, unpatched and under ToMe r=13 (benchmarks/hf_dinov2.py: every
    method, real photos and Fashion-MNIST)."""
    from safetensors.torch import load_file

    from tests.conftest import DINOV2_WEIGHTS

    sd = load_file(str(DINOV2_WEIGHTS))
    hf = T.Dinov2Model._from_config(T.Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=224,
        patch_size=14, layer_norm_eps=1e-6), attn_implementation="sdpa").eval()
    _converter()(hf, sd)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).last_hidden_state, dinov2.forward_features(x),
                                   rtol=1e-4, atol=1e-4)
        leanvit.patch(hf, "tome", r=13)
        leanvit.patch(dinov2, "tome", r=13)
        try:
            a, _ = hf_vit.forward_features(hf, x)
            b, _ = vit_adapter.forward_features(dinov2, x)
        finally:
            leanvit.unpatch(dinov2)
    assert a.shape == b.shape == (1, 257 - 12 * 13, 384)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
