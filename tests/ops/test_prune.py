"""``leanvit.ops.prune`` against per-image loops."""
from __future__ import annotations

import pytest
import torch

from leanvit.ops.prune import num_kept, topk_prune


def _reference(x, scores, prefix, keep, fuse):
    outs, idxs = [], []
    for b in range(x.shape[0]):
        n = x.shape[1]
        order = sorted(range(prefix, n), key=lambda j: -float(scores[b, j]))
        kept = list(range(prefix)) + order[:keep]
        rows = [x[b, j] for j in kept]
        if fuse:
            rows.append(sum(scores[b, j] * x[b, j] for j in order[keep:]))
        outs.append(torch.stack(rows))
        idxs.append(kept)
    return torch.stack(outs), torch.tensor(idxs)


@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("fuse", [False, True])
def test_topk_prune_matches_loop(prefix, fuse):
    g = torch.Generator().manual_seed(prefix)
    x = torch.randn(3, 20, 6, generator=g, dtype=torch.float64)
    scores = torch.rand(3, 20, generator=g, dtype=torch.float64)
    keep = 7
    res = topk_prune(x, scores, prefix, keep, fuse=fuse)
    ref_x, ref_idx = _reference(x, scores, prefix, keep, fuse)
    assert torch.equal(res.index, ref_idx)
    torch.testing.assert_close(res.x, ref_x, atol=1e-12, rtol=0)
    dropped = torch.ones(3, 20, dtype=torch.bool)
    for b in range(3):
        dropped[b, ref_idx[b]] = False
    assert torch.equal(res.dropped, dropped)
    assert (res.weights is not None) == fuse


def test_prefix_scores_are_ignored():
    x = torch.randn(1, 6, 2)
    scores = torch.tensor([[9.0, 9.0, 0.1, 0.4, 0.3, 0.2]])
    res = topk_prune(x, scores, 2, 2)
    assert res.index.tolist() == [[0, 1, 3, 4]]


def test_keep_everything_and_bad_keep():
    x = torch.randn(2, 5, 3)
    res = topk_prune(x, torch.rand(2, 5), 1, 4, fuse=True)
    assert res.x.shape == (2, 6, 3)
    assert res.x[:, -1].eq(0).all()  # nothing dropped: the fused token is zero
    with pytest.raises(ValueError, match="keep"):
        topk_prune(x, torch.rand(2, 5), 1, 5)


def test_num_kept_is_the_float_ceil():
    assert num_kept(0.7, 197, 1) == 138  # ceil(137.2)
    assert num_kept(0.56, 26, 1) == 15  # 0.56 * 25 = 14.000000000000002 in floating point
    assert num_kept(1.0, 17, 1) == 16
    assert num_kept(0.01, 5, 1) == 1
    assert num_kept(0.7, 1, 1) == 0
