"""Merges given as an assignment (leanvit.ops.assign) against plain loops."""
from __future__ import annotations

import torch

from leanvit.ops.assign import assignment, merge_sum, merge_weighted, merge_where_assigned


def test_assignment_keeps_representatives_in_order_and_maps_every_token():
    rep = torch.tensor([[0, 3, 2, 3, 0, 5], [0, 1, 1, 5, 4, 5]])  # 2 merges per image
    a = assignment(rep, 4)
    assert a.keep.tolist() == [[0, 2, 3, 5], [0, 1, 4, 5]]
    assert a.group.tolist() == [[0, 2, 1, 2, 0, 3], [0, 1, 1, 3, 2, 3]]


def test_weighted_merge_sizes_sources_and_index_map_match_loops():
    g = torch.Generator().manual_seed(0)
    rep = torch.tensor([[0, 1, 1, 5, 4, 5, 4]])
    x = torch.randn(1, 7, 3, generator=g, dtype=torch.float64)
    w = torch.rand(1, 7, generator=g, dtype=torch.float64) + 0.5
    a = assignment(rep, 4)
    out = merge_weighted(a, x, w)
    for row, r in enumerate(a.keep[0].tolist()):
        members = [j for j in range(7) if rep[0, j] == r]
        expected = sum(w[0, j] * x[0, j] for j in members) / sum(w[0, j] for j in members)
        torch.testing.assert_close(out[0, row], expected)
    assert merge_sum(a, torch.ones(1, 7)).tolist() == [[1.0, 2.0, 2.0, 2.0]]
    source = merge_sum(a, torch.eye(7).unsqueeze(0))
    assert source.sum(1).eq(1).all() and source[0, 3, 3] == 1 and source[0, 3, 5] == 1
    where = merge_where_assigned(a, torch.tensor([[0, 1, 2, 3, 4, 5, -1]]))
    assert where.tolist() == [[0, 1, 1, 3, 2, 3, -1]]
