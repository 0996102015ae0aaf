"""Routing ops against explicit loops."""
from __future__ import annotations

import pytest
import torch

from leanvit.ops.route import mix, route, scatter_tokens, split_by_score


def test_split_by_score_ranks_descending_and_partitions():
    g = torch.Generator().manual_seed(0)
    score = torch.randn(3, 10, generator=g)
    kept, rest = split_by_score(score, 4)
    assert kept.shape == (3, 4) and rest.shape == (3, 6)
    for b in range(3):
        order = sorted(range(10), key=lambda n: -float(score[b, n]))
        assert kept[b].tolist() == order[:4] and rest[b].tolist() == order[4:]
    k0, r0 = split_by_score(score, 0)
    assert k0.shape == (3, 0) and r0.shape == (3, 10)
    k_all, r_none = split_by_score(score, 99)
    assert k_all.shape == (3, 10) and r_none.shape == (3, 0)


@pytest.mark.parametrize("keep", [0, 3, 7])
def test_route_runs_each_path_on_its_tokens_and_scatters_back(keep):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 7, 5, generator=g)
    kept, rest = split_by_score(torch.randn(2, 7, generator=g), keep)
    w_slow, w_fast = torch.randn(5, 5, generator=g), torch.randn(5, 5, generator=g)
    seen = []

    def slow(t):
        seen.append(("slow", t.shape[1]))
        return t @ w_slow

    def fast(t):
        seen.append(("fast", t.shape[1]))
        return t @ w_fast

    out = route(h, kept, rest, slow, fast)
    assert seen == [("slow", keep), ("fast", 7 - keep)]
    for b in range(2):
        slow_set = set(kept[b].tolist())
        for n in range(7):
            ref = h[b, n] @ (w_slow if n in slow_set else w_fast)
            torch.testing.assert_close(out[b, n], ref)


def test_scatter_tokens_places_rows():
    kept = torch.tensor([[2, 0]])
    rest = torch.tensor([[1]])
    out = scatter_tokens(kept, torch.tensor([[[1.0], [2.0]]]), rest, torch.tensor([[[3.0]]]))
    assert out.flatten().tolist() == [2.0, 3.0, 1.0]


def test_mix():
    a, b = torch.full((2, 3), 5.0), torch.full((2, 3), -1.0)
    m = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    assert mix(a, b, m).tolist() == [[5.0, -1.0, 5.0], [-1.0, -1.0, 5.0]]
