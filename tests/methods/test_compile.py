"""Fixed-rate token methods keep static shapes and never synchronise with the host in the
forward: ``torch.compile`` traces a patched model in ONE graph (``fullgraph=True``: no graph
break, no data-dependent shape, no ``.item()``) and gives the same outputs. This is what lets
``torch.compile(mode="reduce-overhead")`` capture the whole forward in one CUDA graph.

Covered (issue 16): none, evit, topk, tome, diffrate, and dynamicvit in eval mode on ViT,
ConvNeXt and Swin; fp32 and bf16; pitome, mctf, tofu, zerotprune and divprune on ViT. ``ats``
keeps a per-image token count (data-dependent shapes by design) and is not a fixed-rate method.

The default backend (inductor) needs a C++ toolchain and about a minute per model on a small
CPU; the tracing that decides "static shapes, no graph break" is the same, so the test runs
the ``eager`` backend. ``LEANVIT_TEST_INDUCTOR=1`` runs the inductor backend too.
"""
from __future__ import annotations

import os

import pytest
import torch

import leanvit
from tests._hier_models import images, tiny_convnext, tiny_swin
from tests.methods._vit_reference import tiny_vit


def _vit():
    return tiny_vit(seed=1).float()


CASES = [
    ("none", {}, _vit),
    ("evit", dict(keep_rate=0.7), _vit),
    ("topk", dict(keep_rate=0.5), _vit),
    ("tome", dict(r=2), _vit),
    ("tome", dict(r=(2, -0.5), trace_source=True, prop_attn=False), _vit),
    ("diffrate", dict(schedule=([17, 15, 13, 11], [15, 13, 11, 9])), _vit),
    ("diffrate", dict(schedule=([17, 13, 13, 9], [15, 13, 11, 9]), trace_source=True), _vit),
    ("dynamicvit", dict(locations=(1, 2), keep_rate=0.7), _vit),
    ("dynamicvit", {}, tiny_convnext),
    ("dynamicvit", {}, tiny_swin),
    ("pitome", dict(r=2), _vit),
    ("pitome", dict(r=(2, -0.5), trace_source=True, prop_attn=False), _vit),
    ("mctf", dict(r=2), _vit),
    ("mctf", dict(r=[2, 2, 1, 0], locations=(0, 1, 2), bidirection=False, pooling="size",
                  trace_source=True), _vit),
    ("tofu", dict(r=2), _vit),
    ("tofu", dict(r=(2, -0.5), prune_blocks=2, trace_source=True), _vit),
    ("zerotprune", dict(r=2), _vit),
    ("divprune", dict(keep_rate=0.6, locations=(1, 2)), _vit),
]
IDS = [f"{m}-{i}-{f.__name__.strip('_')}" for i, (m, _, f) in enumerate(CASES)]
BACKENDS = ["eager"] + (["inductor"] if os.environ.get("LEANVIT_TEST_INDUCTOR") else [])


def _inputs(model, dtype=torch.float32):
    x = torch.randn(2, 3, 32, 32) if hasattr(model, "blocks") else images(model)
    return x.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method, options, make", CASES, ids=IDS)
def test_compiles_in_one_graph_with_the_same_outputs(method, options, make, backend):
    """``torch._dynamo.explain`` counts the graphs and breaks of one forward (one and none,
    naming the reason otherwise); ``fullgraph=True`` raises on any break; same outputs."""
    torch._dynamo.reset()
    model = leanvit.patch(make(), method, **options).eval()
    x = _inputs(model)
    with torch.no_grad():
        expected = model(x)
        report = torch._dynamo.explain(model)(x)
        reasons = [str(b.reason).splitlines()[0] for b in report.break_reasons]
        assert (report.graph_count, report.graph_break_count) == (1, 0), reasons
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)


BF16 = [CASES[3], CASES[7]]  # tome, dynamicvit on ViT


@pytest.mark.parametrize("method, options, make", BF16, ids=[IDS[3], IDS[7]])
def test_bf16_model_compiles_in_one_graph(method, options, make):
    """Same outputs as eager bf16: bit for bit for DynamicViT; for ToMe within bf16's own
    error, since its compiled merge sums the merges into one row in another order
    (``leanvit.ops.merge._merge_wavg_by_rows``): the compiled and eager bf16 outputs differ
    by at most what eager bf16 differs from the float32 model (measured 0-0.016 against
    0.019-0.033 on logits of about 2.5)."""
    torch._dynamo.reset()
    model = leanvit.patch(make().bfloat16(), method, **options).eval()
    x = _inputs(model, torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
        out = torch.compile(model, backend="eager", fullgraph=True)(x)
        fp32 = leanvit.patch(make(), method, **options).eval()(x.float())
    assert out.dtype == torch.bfloat16
    if method == "tome":
        bf16_error = (expected.float() - fp32).abs().max()
        assert 0 < bf16_error < 0.1 * fp32.abs().max()
        assert (out.float() - expected.float()).abs().max() <= bf16_error
    else:
        torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_ats_is_not_fixed_rate():
    """The counter-case, so the check above can fail: ATS reads its per-image token counts
    on the host (``pack_kept``), which breaks the graph."""
    torch._dynamo.reset()
    model = leanvit.patch(_vit(), "ats", locations=(3,)).eval()
    with torch.no_grad():
        report = torch._dynamo.explain(model)(_inputs(model))
    assert report.graph_break_count > 0
