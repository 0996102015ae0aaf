"""``gather_tokens`` / ``add_tokens_`` (rows by ``index_select`` / ``index_add_``) against a
plain per-image loop, for contiguous and non-contiguous inputs and repeated indices."""
from __future__ import annotations

import torch

from leanvit.ops.tokens import add_tokens_, gather_tokens


def test_gather_tokens_equals_indexing_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, generator=g)
    index = torch.randint(0, 7, (3, 4), generator=g)
    expected = torch.stack([x[b, index[b]] for b in range(3)])
    assert torch.equal(gather_tokens(x, index), expected)
    # non-contiguous (expanded, transposed) and 2-D / 4-D inputs take the same values
    eye = torch.eye(7).expand(3, 7, 7)
    assert torch.equal(gather_tokens(eye, index), torch.stack([eye[b, index[b]] for b in range(3)]))
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(gather_tokens(xt, index), expected)
    s = torch.randn(3, 7, generator=g)
    assert torch.equal(gather_tokens(s, index), torch.stack([s[b, index[b]] for b in range(3)]))
    y = torch.randn(3, 7, 2, 2, generator=g)
    assert torch.equal(gather_tokens(y, index), torch.stack([y[b, index[b]] for b in range(3)]))


def test_gather_tokens_backward_matches_gather():
    x = torch.randn(2, 6, 4, requires_grad=True)
    index = torch.tensor([[0, 0, 5], [2, 3, 2]])
    gather_tokens(x, index).square().sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    ref.gather(1, index[..., None].expand(-1, -1, 4)).square().sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)


def test_add_tokens_accumulates_repeated_indices():
    g = torch.Generator().manual_seed(1)
    out = torch.randn(2, 5, 3, generator=g)
    src = torch.randn(2, 4, 3, generator=g)
    index = torch.tensor([[1, 1, 4, 0], [3, 3, 3, 2]])
    expected = out.clone()
    for b in range(2):
        for k in range(4):
            expected[b, index[b, k]] += src[b, k]
    res = add_tokens_(out, index, src)
    assert res is out
    torch.testing.assert_close(out, expected)
