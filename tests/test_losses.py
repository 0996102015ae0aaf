"""Each loss term against a plain loop-based restatement; the weighted total."""
from __future__ import annotations

import math

import pytest
import torch

from leanvit import losses as L


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_cross_entropy_soft_and_hard_targets():
    logits = torch.randn(4, 5, generator=_gen())
    soft = torch.softmax(torch.randn(4, 5, generator=_gen(1)), -1)
    ref = 0.0
    for b in range(4):
        z = logits[b]
        lse = math.log(sum(math.exp(v) for v in z.tolist()))
        ref += -sum(soft[b, k].item() * (z[k].item() - lse) for k in range(5))
    assert L.soft_target_cross_entropy(logits, soft).item() == pytest.approx(ref / 4, rel=1e-5)
    labels = torch.tensor([0, 3, 1, 4])
    one_hot = torch.nn.functional.one_hot(labels, 5).float()
    assert L.soft_target_cross_entropy(logits, labels).item() == pytest.approx(
        L.soft_target_cross_entropy(logits, one_hot).item(), rel=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        L.soft_target_cross_entropy(logits, soft[:, :3])


def test_ratio_loss():
    d = [(torch.rand(3, 10, generator=_gen(s)) < 0.6).float() for s in range(3)]
    targets = [0.7, 0.49, 0.343]
    ref = 0.0
    for s in range(3):
        ref += sum((sum(d[s][b].tolist()) / 10 - targets[s]) ** 2 for b in range(3)) / 3
    assert L.ratio_loss(d, targets).item() == pytest.approx(ref / 3, rel=1e-5)
    with pytest.raises(ValueError, match="targets"):
        L.ratio_loss(d, targets[:2])


def test_kl_to_teacher():
    s = torch.randn(3, 6, generator=_gen(2))
    t = torch.randn(3, 6, generator=_gen(3))
    ref = 0.0
    for b in range(3):
        ps = torch.softmax(s[b], 0).tolist()
        pt = torch.softmax(t[b], 0).tolist()
        ref += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    assert L.kl_to_teacher(s, t).item() == pytest.approx(ref / 3, rel=1e-5)
    assert L.kl_to_teacher(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_token_distillation_over_kept_tokens_only():
    a = torch.randn(2, 5, 4, generator=_gen(4))
    b = torch.randn(2, 5, 4, generator=_gen(5))
    keep = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1.0]])
    pairs = [(i, n) for i in range(2) for n in range(5) if keep[i, n] > 0.5]
    ref = sum(((a[i, n] - b[i, n]) ** 2).sum().item() for i, n in pairs) / (len(pairs) * 4)
    assert L.token_distillation(a, b, keep).item() == pytest.approx(ref, rel=1e-5)
    b2 = b.clone()
    b2[keep < 0.5] += 100.0  # dropped tokens do not count
    assert L.token_distillation(a, b2, keep).item() == pytest.approx(ref, rel=1e-5)
    assert L.token_distillation(a, b, torch.zeros(2, 5)).item() == 0.0


def test_total_loss_weights_and_applicable_terms():
    g = _gen(6)
    logits, t_logits = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    tok, t_tok = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    d1 = torch.tensor([[1, 1, 0, 1.0], [1, 0, 0, 1.0]])
    d2 = torch.tensor([[1, 0, 0, 1.0], [0, 0, 0, 1.0]])
    keep = torch.cat([torch.ones(2, 1), d2], 1)
    y = torch.tensor([0, 2])
    student = L.Output(logits, tok, keep, (d1, d2))
    teacher = L.Output(t_logits, t_tok)
    w = L.LossWeights(cls=1.0, ratio=2.0, distill=0.5, token=0.5)
    loss, parts = L.total_loss(student, y, teacher, w, keep_targets=(0.7, 0.49))
    ref = (L.soft_target_cross_entropy(logits, y) + 2.0 * L.ratio_loss([d1, d2], [0.7, 0.49])
           + 0.5 * L.kl_to_teacher(logits, t_logits)
           + 0.5 * L.token_distillation(tok[:, 1:], t_tok[:, 1:], d2))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert set(parts) == {"cls", "ratio", "distill", "token"}
    # no decisions, no keep-mask, no teacher: cross-entropy only
    loss2, parts2 = L.total_loss(L.Output(logits, tok), y)
    assert set(parts2) == {"cls"} and loss2.item() == pytest.approx(parts["cls"], rel=1e-6)
    with pytest.raises(ValueError, match="weight"):
        L.LossWeights(ratio=-1)


def test_hierarchical_loss_is_the_authors_convnext_swin_objective():
    """DynamicSwin / DynamicConvNeXt (authors' ConvNextDistillDiffPruningLoss with clf_weight 1,
    ratio_weight 10, distill_weight 0.5, mse_token): CE + 10 * mean over decisions of the
    batch-mean squared ratio error + 0.5 * KL + 0.5 * MSE over ALL positions, written out."""
    assert L.HIERARCHICAL_WEIGHTS == L.LossWeights(cls=1.0, ratio=10.0, distill=0.5, token=0.5)
    g = torch.Generator().manual_seed(0)
    B, N, C, K = 3, 16, 8, 5
    logits, t_logits = torch.randn(B, K, generator=g), torch.randn(B, K, generator=g)
    tokens, t_tokens = torch.randn(B, N, C, generator=g), torch.randn(B, N, C, generator=g)
    decisions = tuple((torch.rand(B, N, generator=g) > 0.4).float() for _ in range(3))
    targets = torch.tensor([1, 0, 4])
    ratios = [0.7, 0.5, 0.3]
    loss, parts = L.total_loss(L.Output(logits, tokens, torch.ones(B, N), decisions), targets,
                               L.Output(t_logits, t_tokens), L.HIERARCHICAL_WEIGHTS, ratios,
                               prefix=0)
    ce = sum(-torch.log_softmax(logits[b], -1)[targets[b]] for b in range(B)) / B
    ratio = 0.0
    for d, r in zip(decisions, ratios):
        ratio += sum((float(d[b].sum()) / N - r) ** 2 for b in range(B)) / B
    ratio /= 3
    kl = 0.0
    for b in range(B):
        p_t = torch.softmax(t_logits[b], -1)
        kl += float((p_t * (p_t.log() - torch.log_softmax(logits[b], -1))).sum())
    kl /= B
    mse = float(((tokens - t_tokens) ** 2).sum()) / (B * N * C)
    ref = float(ce) + 10 * ratio + 0.5 * kl + 0.5 * mse
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    assert parts["token"] == pytest.approx(mse, rel=1e-5)


def test_feature_term_is_the_all_token_mse_when_tokens_stay_in_place():
    g = _gen(7)
    logits, t_logits = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    tok, t_tok = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    y = torch.tensor([0, 2])
    w = L.LossWeights(cls=0.0, distill=1.0, token=0.5, feature=2.0)
    loss, parts = L.total_loss(L.Output(logits, tok), y, L.Output(t_logits, t_tok), w)
    mse = sum((tok[i, n, c] - t_tok[i, n, c]).item() ** 2 for i in range(2) for n in range(5)
              for c in range(4)) / 40
    assert parts["feature"] == pytest.approx(mse, rel=1e-5)
    assert "token" not in parts  # no keep-mask: the DynamicViT token term does not apply
    assert loss.item() == pytest.approx(L.kl_to_teacher(logits, t_logits).item() + 2 * mse,
                                        rel=1e-5)
    # fewer student tokens (a token method removed some): not comparable, left out
    _, parts = L.total_loss(L.Output(logits, tok[:, :3]), y, L.Output(t_logits, t_tok), w)
    assert "feature" not in parts
    # default weight 0: existing recipes unchanged
    _, parts = L.total_loss(L.Output(logits, tok), y, L.Output(t_logits, t_tok))
    assert "feature" not in parts
