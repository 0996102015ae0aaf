"""Pure hMHSA / cFFN tensor functions against plainly written references (explicit loops)."""
from __future__ import annotations

import pytest
import torch

from leanvit.ops.hallucinate import (choose_computed_heads, dwconv_logits, fit_dwconv, fit_mix,
                                     fuse_linear_bn, hallucinated_attention, mix_logits,
                                     split_heads, truncated_svd_factors)


def test_split_heads_rounds_the_saving_down():
    assert [split_heads(h) for h in (1, 2, 5, 6, 8)] == [(1, 0), (1, 1), (3, 2), (3, 3), (4, 4)]
    with pytest.raises(ValueError, match="positive int"):
        split_heads(0)


def _ref_dwconv(logits, weight):
    """Explicit loops: out[b, j, q, k] = sum_{u,v} w[j, u, v] * logits[b, j, q+u-p, k+v-p]."""
    B, _, Nq, Nk = logits.shape
    hh, ks = weight.shape[0], weight.shape[-1]
    p = ks // 2
    out = torch.zeros(B, hh, Nq, Nk, dtype=logits.dtype)
    for j in range(hh):
        for u in range(ks):
            for v in range(ks):
                for q in range(Nq):
                    qq = q + u - p
                    if not 0 <= qq < Nq:
                        continue
                    for k in range(Nk):
                        kk = k + v - p
                        if 0 <= kk < Nk:
                            out[:, j, q, k] += weight[j, 0, u, v] * logits[:, j, qq, kk]
    return out


def test_dwconv_logits_matches_explicit_loops_on_a_non_square_map():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(dwconv_logits(logits, w), _ref_dwconv(logits, w))


def test_mix_logits_is_a_per_element_linear_combination_of_heads():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    w = torch.randn(2, 3, dtype=torch.float64)
    ref = torch.stack([sum(w[j, c] * logits[:, c] for c in range(3)) for j in range(2)], 1)
    torch.testing.assert_close(mix_logits(logits, w), ref)


def test_hallucinated_attention_matches_per_head_reference_with_bias_and_rows():
    torch.manual_seed(0)
    B, Hc, Hh, N, D = 2, 3, 2, 7, 4
    q, k = torch.randn(B, Hc, N, D), torch.randn(B, Hc, N, D)
    v = torch.randn(B, Hc + Hh, N, D)
    w = torch.randn(Hh, Hc)
    bias = torch.randn(B, 1, 1, N)
    scale = D ** -0.5
    out = hallucinated_attention(q, k, v, scale, lambda l: mix_logits(l, w), bias=bias)
    for b in range(B):
        logit = [scale * q[b, h] @ k[b, h].T for h in range(Hc)]
        logit += [sum(w[j, c] * logit[c] for c in range(Hc)) for j in range(Hh)]
        for h in range(Hc + Hh):
            a = torch.softmax(logit[h] + bias[b, 0], dim=-1)
            torch.testing.assert_close(out[b, h], a @ v[b, h], atol=1e-5, rtol=1e-5)
    rows = torch.tensor([[0, 3], [6, 1]])
    sel = hallucinated_attention(q, k, v, scale, lambda l: mix_logits(l, w), bias=bias, rows=rows)
    ref = out.gather(2, rows[:, None, :, None].expand(-1, Hc + Hh, -1, D))
    torch.testing.assert_close(sel, ref, atol=1e-6, rtol=1e-6)
    sel = hallucinated_attention(q, k, v, scale, lambda l: mix_logits(l, w), bias=bias, rows=rows,
                                 row_wise=True)  # mixing is row by row: only the rows needed
    torch.testing.assert_close(sel, ref, atol=1e-6, rtol=1e-6)


def test_fit_mix_recovers_an_exact_mixture_up_to_row_shifts():
    torch.manual_seed(0)
    comp = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    w = torch.randn(2, 4, dtype=torch.float64)
    target = mix_logits(comp, w) + torch.randn(3, 2, 6, 1, dtype=torch.float64)  # row shifts
    torch.testing.assert_close(fit_mix(comp, target, ridge=0.0), w)


def test_fit_dwconv_recovers_an_exact_kernel():
    torch.manual_seed(0)
    comp = torch.randn(2, 3, 8, 5, dtype=torch.float64)
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    target = dwconv_logits(comp, w)
    w_fit = fit_dwconv(comp, target, 3, ridge=0.0)
    # row-centring removes what a softmax cannot see: compare the centred predictions
    pred, ref = dwconv_logits(comp, w_fit), target
    torch.testing.assert_close(pred - pred.mean(-1, keepdim=True), ref - ref.mean(-1, keepdim=True))


def test_choose_computed_heads_keeps_the_heads_that_explain_the_others():
    torch.manual_seed(0)
    base = torch.randn(2, 2, 6, 6)
    # heads 1 and 3 are independent; 0 and 2 are mixtures of them
    logits = torch.stack([base[:, 0] + base[:, 1], base[:, 0], 2 * base[:, 1] - base[:, 0],
                          base[:, 1]], 1)
    chosen = choose_computed_heads(logits, 2)
    err = fit_mix(logits[:, chosen], logits[:, [h for h in range(4) if h not in chosen]])
    assert len(chosen) == 2
    pred = mix_logits(logits[:, chosen], err)
    rest = logits[:, [h for h in range(4) if h not in chosen]]
    torch.testing.assert_close(pred - pred.mean(-1, keepdim=True),
                               rest - rest.mean(-1, keepdim=True), atol=1e-3, rtol=1e-3)


def test_fuse_linear_bn_equals_batchnorm_after_linear_in_eval():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3, bias=False)
    bn = torch.nn.BatchNorm1d(3).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    w, b = fuse_linear_bn(lin.weight, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    x = torch.randn(4, 5)
    torch.testing.assert_close(x @ w.T + b, bn(lin(x)))


def test_truncated_svd_factors_give_the_best_low_rank_approximation():
    torch.manual_seed(0)
    w = torch.randn(6, 10, dtype=torch.float64)
    first, second = truncated_svd_factors(w, 4)
    assert first.shape == (4, 10) and second.shape == (6, 4)
    s = torch.linalg.svdvals(w)
    err = torch.linalg.matrix_norm(w - second @ first)
    torch.testing.assert_close(err, s[4:].square().sum().sqrt())  # Eckart-Young
    first, second = truncated_svd_factors(w, 6)  # full rank: exact
    torch.testing.assert_close(second @ first, w)
