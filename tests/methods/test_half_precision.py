"""Half precision (issue 16): every method runs on a model cast with ``.bfloat16()`` /
``.half()`` and under ``torch.autocast``, and gives the fp32 result up to the rounding of the
half-precision type.

Tolerance, stated: per image, the relative error ``max |out - out_fp32| / max |out_fp32|``
over the logits; its MEDIAN over 16 images must be <= 4% for bf16 (8 significant bits) and
<= 1% for fp16 (11 bits), and every output finite. The unpatched model's own median error is
about 1% (bf16) and 0.1% (fp16) on these 4-block random models, the methods' 1-2% and
0.1-0.2%. Why the median and not every image: the methods make discrete choices (which tokens
to keep, merge or sample), and where two candidates score within the rounding of bf16 the
half-precision model may pick the other one. On these random models that happens to 0-5 of the
16 images (relative errors of 5-60% on those images; ATS, whose sampling picks the nearest CDF
point, most often); a dtype bug (wrong casts, overflow, a method module left in fp32) moves
every image and fails the median.
"""
from __future__ import annotations

import math

import pytest
import torch

import leanvit
from tests._hier_models import images, tiny_convnext, tiny_swin
from tests.methods._vit_reference import tiny_vit

TOL = {torch.bfloat16: 0.04, torch.float16: 0.01}


def _cpu_fp16() -> bool:
    try:
        a = torch.ones(4, 4, dtype=torch.float16)
        return bool(torch.isfinite(torch.nn.functional.linear(a, a)).all())
    except RuntimeError:  # pragma: no cover - CPUs without fp16 kernels
        return False


DTYPES = [torch.bfloat16] + ([torch.float16] if _cpu_fp16() else [])
VIT_CASES = [
    ("none", {}),
    ("evit", dict(keep_rate=0.7)),
    ("topk", dict(keep_rate=0.5)),
    ("tome", dict(r=2)),
    ("pitome", dict(r=2)),
    ("mctf", dict(r=2)),
    ("ats", {}),
    ("diffrate", dict(schedule=([17, 15, 13, 11], [15, 13, 11, 9]))),
    ("dynamicvit", dict(locations=(1, 2), keep_rate=0.7)),
    ("tofu", dict(r=2)),
    ("zerotprune", dict(r=2)),
    ("divprune", dict(keep_rate=0.6, locations=(1, 2))),
]


def spread_weights(module: torch.nn.Module, seed: int = 5) -> None:
    """Redraw the matrices of a method's modules with a spread that separates their scores
    (a fresh predictor's 0.02-std weights score every token almost the same: ties)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / math.sqrt(p.shape[1]))


def _check_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    rel = (out.float() - ref).abs().flatten(1).amax(1) / ref.abs().flatten(1).amax(1)
    med = rel.median().item()
    assert med <= TOL[dtype], f"median relative error {med:.4g} > {TOL[dtype]} ({rel.tolist()})"


def _vit(method: str, options: dict) -> torch.nn.Module:
    model = leanvit.patch(tiny_vit(seed=1).float(), method, **options)
    spread_weights(model.leanvit)
    return model


@pytest.mark.parametrize("mode", ["cast", "autocast"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method, options", VIT_CASES, ids=[c[0] for c in VIT_CASES])
def test_vit_method_in_half_precision_matches_fp32(method, options, dtype, mode):
    """On a model cast with ``.to(dtype)`` (images cast too), and under ``torch.autocast``."""
    model = _vit(method, options)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        if mode == "cast":
            out = model.to(dtype)(x.to(dtype))
        else:
            with torch.autocast("cpu", dtype=dtype):
                out = model(x)
    _check_close(out, ref, dtype)


@pytest.mark.parametrize("autocast", [False, True], ids=["cast", "autocast"])
@pytest.mark.parametrize("make, options", [(tiny_convnext, {}), (tiny_swin, dict(locations=(1,)))],
                         ids=["convnext", "swin"])
def test_dynamicvit_hierarchical_in_bf16_matches_fp32(make, options, autocast):
    """ConvNeXt: the authors' three decisions; Swin: one (its three decisions on 64 positions
    flip a near-tied position in half the images in bf16, see the module docstring)."""
    model = leanvit.patch(make(), "dynamicvit", **options)
    spread_weights(model.leanvit)
    x = images(model, b=16)
    with torch.no_grad():
        ref = model(x)
        if autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
        else:
            out = model.bfloat16()(x.bfloat16())
    _check_close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("make", [lambda: tiny_vit(seed=1).float(), tiny_convnext, tiny_swin],
                         ids=["vit", "convnext", "swin"])
def test_patch_puts_the_method_modules_in_the_models_dtype(make, dtype):
    """Patching a model that is already half precision: predictors (and fast paths) follow
    its dtype, so the forward runs (it failed with a dtype mismatch before issue 16)."""
    model = make().to(dtype)
    opts = dict(locations=(1, 2)) if hasattr(model, "blocks") else {}
    leanvit.patch(model, "dynamicvit", **opts)
    params = list(model.leanvit.parameters())
    assert params and all(p.dtype == dtype for p in params)
    x = images(model) if not hasattr(model, "blocks") else torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_dynamicvit_trains_on_a_bf16_model_with_the_masked_attention_in_fp32():
    """Training mode (Gumbel decisions, masked attention): the authors' eps-softmax runs in
    float32 whatever the model's dtype, so the bf16 forward and backward stay finite."""
    from leanvit.ops.attention import masked_softmax

    logits = torch.randn(2, 3, 5, 5, dtype=torch.bfloat16)
    assert masked_softmax(logits, torch.ones(2, 5, dtype=torch.bfloat16)).dtype == torch.float32
    model = leanvit.patch(tiny_vit(seed=1).float().bfloat16(), "dynamicvit", locations=(1, 2))
    model.train()
    out = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    grads = [p.grad for p in model.leanvit.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("make", [lambda: tiny_vit(seed=1).float(), tiny_convnext, tiny_swin],
                         ids=["vit", "convnext", "swin"])
def test_images_of_another_dtype_get_a_clear_error(make):
    model = leanvit.patch(make().bfloat16(), "none")
    x = images(model) if not hasattr(model, "blocks") else torch.randn(2, 3, 32, 32)
    with pytest.raises(TypeError, match=r"images are float32 but the model's weights are "
                                        r"bfloat16: pass images.to\(torch.bfloat16\)"):
        model(x)
    with pytest.raises(TypeError, match="floating-point"):
        model((x * 100).to(torch.uint8))
    # autocast casts the images itself: no error
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(x).float()).all()
