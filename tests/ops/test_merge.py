"""``leanvit.ops.merge`` against per-image loops."""
from __future__ import annotations

import math

import pytest
import torch

from leanvit.ops.merge import (bipartite_soft_matching, max_merges, merge_source, merge_tokens,
                               merge_wavg)


def _reference(metric, x, size, r, prefix):
    """Per image: which A token merges into which B token, and the merged tokens in order
    [prefix in order, unmerged A by position, B by position]."""
    outs, sizes, groups_all = [], [], []
    for b in range(metric.shape[0]):
        n = metric.shape[1]
        m = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        best = {}
        for ia in range(prefix + (prefix % 2), n, 2):  # unprotected A (even) positions
            cands = [(float(m[ia] @ m[jb]), jb) for jb in range(1, n, 2) if jb >= prefix]
            best[ia] = max(cands, key=lambda c: (c[0], -c[1]))  # ties: first B token
        ranked = sorted(best, key=lambda ia: -best[ia][0])[:r]
        into = {ia: best[ia][1] for ia in ranked}
        order = list(range(prefix)) + [ia for ia in range(0, n, 2) if ia >= prefix and ia not in into] \
            + [jb for jb in range(1, n, 2) if jb >= prefix]
        groups = [[t] + [ia for ia, jb in into.items() if jb == t] for t in order]
        w = [sum(size[b, g] for g in grp) for grp in groups]
        outs.append(torch.stack([sum(size[b, g] * x[b, g] for g in grp) / wi
                                 for grp, wi in zip(groups, w)]))
        sizes.append(torch.stack(w))
        groups_all.append(groups)
    return torch.stack(outs), torch.stack(sizes), groups_all


@pytest.mark.parametrize("n, prefix, r", [(17, 1, 5), (18, 2, 8), (21, 5, 8), (16, 0, 8),
                                          (9, 3, 3), (12, 1, 1)])
def test_matching_and_weighted_merge_match_loops(n, prefix, r):
    g = torch.Generator().manual_seed(n + prefix)
    metric = torch.randn(2, n, 4, generator=g, dtype=torch.float64)
    x = torch.randn(2, n, 3, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (2, n), generator=g).double()
    m = bipartite_soft_matching(metric, r, prefix)
    out, out_size = merge_wavg(m, x, size)
    ref, ref_size, groups = _reference(metric, x, size, r, prefix)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(out_size, ref_size, atol=0, rtol=0)
    # source: one-hot rows of the originals, merged with max -> exactly the groups
    src = merge_source(m, torch.eye(n, dtype=torch.float64).expand(2, n, n))
    for b in range(2):
        for t, grp in enumerate(groups[b]):
            assert src[b, t].nonzero().flatten().tolist() == sorted(grp)


def test_unit_sizes_by_default():
    g = torch.Generator().manual_seed(0)
    metric, x = torch.randn(1, 9, 4, generator=g), torch.randn(1, 9, 3, generator=g)
    m = bipartite_soft_matching(metric, 3, 1)
    out, size = merge_wavg(m, x)
    out2, size2 = merge_wavg(m, x, torch.ones(1, 9))
    assert torch.equal(size, size2) and size.sum() == 9
    torch.testing.assert_close(out, out2)


def test_merge_modes():
    metric = torch.randn(1, 8, 4)
    m = bipartite_soft_matching(metric, 3, 1)
    x = torch.rand(1, 8, 2)
    assert merge_tokens(m, x, "amax").shape == (1, 5, 2)
    assert merge_tokens(m, x, "sum").sum().item() == pytest.approx(x.sum().item(), rel=1e-6)


def test_r_bounds():
    assert max_merges(197, 1) == 98
    assert max_merges(198, 2) == 98
    assert max_merges(2, 1) == 0
    with pytest.raises(ValueError, match="r must be in"):
        bipartite_soft_matching(torch.randn(1, 9, 4), 5, 1)
    with pytest.raises(ValueError, match="r must be in"):
        bipartite_soft_matching(torch.randn(1, 9, 4), 0, 1)


def _stable_order(score, r):
    """Plain reference of the selection order: per image, the r highest scores (ties by
    position, NaN highest) best first, then the other positions in order."""
    out = []
    for row in score.tolist():
        key = [(0 if v != v else 1, -v if v == v else 0.0, i) for i, v in enumerate(row)]
        ranked = [i for *_, i in sorted(key)]
        out.append(ranked[:r] + sorted(ranked[r:]))
    return torch.tensor(out)


def _tied_scores(g):
    v = torch.randint(0, 4, (3, 23), generator=g).float()  # many ties
    v[0, 5] = v[1, ::4] = float("nan")
    v[2, :7] = -math.inf
    return v


@pytest.mark.parametrize("r", [1, 5, 11, 23])
def test_select_by_rank_is_a_stable_descending_sort(r):
    """The sort-free selection used under torch.compile against a plain stable sort, on
    scores with ties, NaN and -inf."""
    from leanvit.ops.merge import _select_by_rank
    v = _tied_scores(torch.Generator().manual_seed(r))
    assert torch.equal(_select_by_rank(v, r), _stable_order(v, r))


@pytest.mark.parametrize("n, prefix, r", [(17, 1, 5), (21, 5, 8), (16, 0, 8), (33, 2, 15)])
def test_compiled_matching_equals_eager_with_repeated_tokens(n, prefix, r):
    """Under torch.compile the matching takes the comparison path, in eager code the sort
    path; both must pick the same tokens, also when tokens repeat (equal best scores, as
    from identical patches) or are all zero (NaN after normalisation)."""
    g = torch.Generator().manual_seed(n)
    metric = torch.randn(2, n, 4, generator=g)
    metric[0, 1::3] = metric[0, 1]  # repeated tokens: tied similarities
    metric[1, 4:9] = 0.0  # zero keys -> NaN scores
    x = torch.randn(2, n, 3, generator=g)
    size = torch.randint(1, 4, (2, n), generator=g).float()

    def run(metric, x, size):
        m = bipartite_soft_matching(metric, r, prefix)
        return (*m, *merge_wavg(m, x, size))

    eager = run(metric, x, size)
    torch._dynamo.reset()
    compiled = torch.compile(run, backend="eager", fullgraph=True)(metric, x, size)
    for e, c in zip(eager[:3], compiled[:3]):
        assert torch.equal(e, c)
    torch.testing.assert_close(compiled[3], eager[3], equal_nan=True)
    assert torch.equal(compiled[4], eager[4])
    # and on the repeated tokens, the plain per-image reference (ties by position), eager and
    # compiled: there several A tokens merge into one B token, which the compiled merge sums
    # before writing the row (no scatter-add)
    args = metric[:1].double(), x[:1].double(), size[:1].double()
    ref = _reference(*args, r, prefix)
    dst = run(*args)[2]
    assert dst.unique().numel() < dst.numel()  # the case is exercised
    torch._dynamo.reset()
    compiled = torch.compile(run, backend="eager", fullgraph=True)(*args)
    for out in (run(*args), compiled):
        torch.testing.assert_close(out[3], ref[0], atol=1e-12, rtol=0)
        torch.testing.assert_close(out[4], ref[1], atol=0, rtol=0)


def test_first_best_is_torch_max_on_exact_ties():
    """Ties, NaN and -inf: the first maximal index, as ``torch.max``."""
    from leanvit.ops.merge import first_best
    v = _tied_scores(torch.Generator().manual_seed(0)).reshape(3, 1, 23).expand(3, 4, 23).clone()
    v[:, 1:] = torch.randint(0, 3, (3, 3, 23), generator=torch.Generator().manual_seed(1)).float()
    v[1, 2, [3, 9]] = float("nan")
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        assert torch.equal(first_best(v.to(dtype)), v.to(dtype).max(dim=-1).indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_first_best_ties_within_rounding_go_to_the_first(dtype):
    """Scores a few units of rounding apart tie (the first wins); a real gap does not."""
    from leanvit.ops.merge import TIE_ULPS, first_best
    eps = torch.finfo(dtype).eps
    base = torch.tensor([0.25, 0.7, 0.7, 0.7, -0.3], dtype=dtype)
    up = torch.nextafter(base, torch.tensor(2.0, dtype=dtype))
    noisy = torch.stack([base, torch.where(torch.arange(5) == 3, up, base),
                         torch.where(torch.arange(5) == 2, base + 4 * eps, base)])
    assert first_best(noisy).tolist() == [1, 1, 1]
    gap = base.clone()
    gap[3] += 4 * TIE_ULPS * eps
    assert first_best(gap).item() == 3
    # scale: the tolerance grows with a bound on the terms (un-normalised dot products)
    big = base * 1000
    big[3] = torch.nextafter(big[3], torch.tensor(1e4, dtype=dtype))
    assert first_best(big).item() == 3
    assert first_best(big, torch.tensor(1000.0, dtype=dtype)).item() == 1


def _repeated_tokens(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(2, n, 8, generator=g, dtype=torch.float64)
    metric[0, 1::3] = metric[0, 1]  # copies on both sides: ties for partner and rank
    metric[1, ::4] = metric[1, 2]
    metric[1, 5::7] = metric[1, 3]
    return metric.to(dtype), torch.randn(2, n, 3, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, prefix, r", [(33, 2, 15), (40, 1, 19), (97, 1, 30), (65, 0, 32)])
def test_matching_of_copies_ignores_last_bit_noise(monkeypatch, dtype, n, prefix, r):
    """Which copy a token merges into, and which copies merge first, must not depend on the
    last bits of the matrix product (they differ with the CPU, the BLAS and the torch
    version): the matching equals the plain per-image reference (each dot product alone,
    ties by position), with the product as computed here and perturbed by a few units of
    rounding in every entry."""
    import leanvit.ops.merge as merge_mod
    metric, x = _repeated_tokens(n, dtype, n + prefix)
    size = torch.ones(2, n, dtype=torch.float64)
    ref_out, ref_size, groups = _reference(metric.double(), x, size, r, prefix)
    exact = merge_mod._similarity
    g = torch.Generator().manual_seed(7)

    def noisy(a, b):
        s = exact(a, b)
        eps = torch.finfo(s.dtype).eps
        steps = torch.randint(-3, 4, s.shape, generator=g).to(s.dtype)
        return s + steps * eps * s.abs().clamp_min(1.0)

    for similarity in (exact, noisy, noisy):
        monkeypatch.setattr(merge_mod, "_similarity", similarity)
        m = bipartite_soft_matching(metric, r, prefix)
        out, out_size = merge_wavg(m, x, size)
        assert torch.equal(out_size, ref_size)
        torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
        src = merge_source(m, torch.eye(n, dtype=torch.float64).expand(2, n, n))
        for b in range(2):
            for t, grp in enumerate(groups[b]):
                assert src[b, t].nonzero().flatten().tolist() == sorted(grp)


def test_first_best_under_inductor_on_long_rows():
    """``first_best`` compiled by inductor (the default backend, not ``eager``) on rows of
    300 scores, longer than one vector register and than 255: the same indices as eager.
    Its argmin over a uint8 mask came out all 0 (and, at 685 scores, out of range) in
    inductor's vectorised CPU code, so compiled ToMe matched every token to the first B
    token; the mask is int32 now."""
    from leanvit.ops.merge import first_best

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 7, 300, generator=g)
    scores[0, 0, 250] = scores[0, 0, 251] = 9.0  # a tie late in a row: the first wins
    torch._dynamo.reset()
    compiled = torch.compile(first_best)(scores)
    assert torch.equal(compiled, first_best(scores))
    assert int(compiled[0, 0]) == 250
