"""masked_softmax against the authors' formula written out element by element."""
from __future__ import annotations

import math

import torch

from leanvit.ops.attention import masked_softmax


def _reference(logits, keep, eps=1e-6):
    B, H, N, _ = logits.shape
    out = torch.empty_like(logits, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                row = logits[b, h, i].double()
                m = row.max()
                w = [math.exp(row[j] - m) * (1.0 if j == i else float(keep[b, j]))
                     for j in range(N)]
                s = sum(w)
                for j in range(N):
                    out[b, h, i, j] = (w[j] + eps / N) / (s + eps)
    return out


def test_masked_softmax_matches_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5)
    keep = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 0, 1]], dtype=torch.float32)
    got = masked_softmax(logits, keep)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _reference(logits, keep), atol=1e-6, rtol=1e-5)


def test_all_kept_is_plain_softmax_and_gradient_reaches_mask():
    logits = torch.randn(1, 2, 4, 4)
    keep = torch.ones(1, 4, requires_grad=True)
    got = masked_softmax(logits, keep)
    torch.testing.assert_close(got, logits.softmax(-1), atol=1e-5, rtol=1e-5)
    (got[..., 1] * torch.arange(4.0)).sum().backward()
    assert keep.grad is not None and keep.grad.abs().sum() > 0
