"""Fixed-rate token methods keep static shapes: ``torch.compile`` traces a patched model in ONE
graph (``fullgraph=True``: no graph break, no data-dependent shape) and gives the same outputs.

The default backend (inductor) needs a C++ toolchain and about a minute per model on a small
CPU; the tracing that decides "static shapes, no graph break" is the same, so the test runs
the ``eager`` backend. ``LEANVIT_TEST_INDUCTOR=1`` runs the inductor backend too.
"""
from __future__ import annotations

import os

import pytest
import torch

import leanvit
from tests.methods._vit_reference import tiny_vit

CASES = [("evit", dict(keep_rate=0.7)), ("topk", dict(keep_rate=0.5)),
         ("tome", dict(r=2)), ("tome", dict(r=(2, -0.5), trace_source=True, prop_attn=False))]
BACKENDS = ["eager"] + (["inductor"] if os.environ.get("LEANVIT_TEST_INDUCTOR") else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method, options", CASES)
def test_compiles_in_one_graph_with_the_same_outputs(method, options, backend):
    torch._dynamo.reset()
    model = leanvit.patch(tiny_vit(seed=1).float(), method, **options)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        torch.testing.assert_close(compiled(images), expected, atol=1e-5, rtol=1e-5)
