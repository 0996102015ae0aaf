"""MCTF's token-reduction-consistency fine-tuning loss (Lee et al., CVPR 2024, sec. 3.4;
authors' ``models/deit.py`` and ``engine.py``) as an option of ``leanvit train``
(``consistency_weight``), on a tiny ViT (depth 2, 64 px, fusing in both blocks: a fusion
after the last attention would not reach the class token): the milder view is the same model
with fewer fusions, the term is computed against an independently patched copy, it is zero
when both views agree, and it changes the gradients (only through the reduced view)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

import leanvit
from leanvit.losses import LossWeights, consistency_loss, label_confidence
from leanvit.models import create_model
from leanvit.train import TrainConfig, _consistency_terms, _TrainStep, train

KW = dict(depth=2, embed_dim=32, num_heads=2, num_classes=3)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with pytest.warns(UserWarning, match="random weights"):
        return create_model("vit_tiny_patch16_224", img_size=64, **KW)


def _images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_consistency_loss_equals_a_plain_reference():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    conf = torch.tensor([0.9, 0.1, 0.5, 0.41, 0.39])
    got = consistency_loss(a, b, conf, 0.4)
    rows = [sum((b[i, c] - a[i, c]) ** 2 for c in range(8)) / 8 for i in range(5)
            if conf[i] > 0.4]
    assert torch.allclose(got, sum(rows) / len(rows))
    assert consistency_loss(a, b, conf, 0.95) == 0  # no image confident enough


def test_label_confidence_adds_the_mixed_in_label():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    p = torch.softmax(logits, -1)
    assert torch.allclose(label_confidence(logits, labels), torch.stack([p[0, 0], p[1, 2]]))
    mixed = label_confidence(logits, labels, mixed=True)  # partner: the flipped batch
    assert torch.allclose(mixed, torch.stack([p[0, 0] + p[0, 2], p[1, 2] + p[1, 0]]))


def test_mctf_offers_a_milder_view_drawn_below_consistency_r():
    model = leanvit.patch(_model(), "mctf", r=4, consistency_r=3)
    drawn = set()
    for seed in range(40):
        view = model.leanvit.consistency_view(torch.Generator().manual_seed(seed))
        assert view.options.r in (0, 1, 2)
        assert view.options.locations == model.leanvit.options.locations
        drawn.add(view.options.r)
    assert drawn == {0, 1, 2}
    none = leanvit.patch(_model(), "mctf", r=4, consistency_r=0)
    assert none.leanvit.consistency_view(torch.Generator()).options.r == 0
    evit = leanvit.patch(_model(), "evit", keep_rate=0.7)
    assert evit.leanvit.consistency_view(torch.Generator()) is None


def _views(model, view):
    """The training forward of both views (the trainer's step module)."""
    logits, tokens, _, _, v_logits, v_tokens = _TrainStep(model)(_images(), view)
    return logits, tokens, v_logits, v_tokens


def test_term_is_computed_against_an_independent_milder_model():
    base = _model()
    model = leanvit.patch(copy.deepcopy(base), "mctf", r=3, locations=(0, 1),
                          consistency_r=3).train()
    view = model.leanvit.consistency_view(torch.Generator().manual_seed(3))
    logits, tokens, v_logits, v_tokens = _views(model, view)
    assert tokens.shape[1] == 17 - 2 * 3  # the reduced view fused r=3 tokens in each block
    # the milder view equals the same weights patched with the drawn r on their own
    milder = leanvit.patch(copy.deepcopy(base), "mctf", r=view.options.r,
                           locations=(0, 1)).train()
    ref_logits, ref_tokens, _, _ = _TrainStep(milder)(_images())
    assert torch.equal(v_logits, ref_logits) and torch.equal(v_tokens, ref_tokens)
    labels = torch.tensor([0, 1, 2, 0])
    cfg = TrainConfig(consistency_weight=3.0, consistency_threshold=0.0)
    loss, parts = _consistency_terms(cfg, LossWeights(), logits, tokens, v_logits, v_tokens,
                                     labels, labels, False, None)
    want = ((ref_tokens[:, 0] - tokens[:, 0]) ** 2).mean(1).mean().detach()
    assert parts["consistency"] == pytest.approx(float(want)) and parts["consistency"] > 0
    ce = torch.nn.functional.cross_entropy(ref_logits, labels).detach()
    assert float(loss.detach()) == pytest.approx(float(ce + 3.0 * want), rel=1e-5)


def _grads(model, view, weight):
    model.zero_grad(set_to_none=True)
    logits, tokens, v_logits, v_tokens = _views(model, view)
    labels = torch.tensor([0, 1, 2, 0])
    cfg = TrainConfig(consistency_weight=weight, consistency_threshold=0.0)
    loss, parts = _consistency_terms(cfg, LossWeights(), logits, tokens, v_logits, v_tokens,
                                     labels, labels, False, None)
    (loss + torch.nn.functional.cross_entropy(logits, labels)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, parts


def test_term_is_zero_when_the_views_agree_and_changes_gradients_otherwise():
    model = leanvit.patch(_model(), "mctf", r=3, locations=(0, 1)).train()
    same = type(model.leanvit)(model.leanvit.options, model.leanvit.info)  # r' = r
    off, _ = _grads(model, same, 0.0)
    on, parts = _grads(model, same, 3.0)
    assert parts["consistency"] == 0.0
    assert all(torch.equal(off[n], on[n]) for n in off)  # a zero term adds no gradient
    milder = model.leanvit.consistency_view(torch.Generator().manual_seed(3))
    assert milder.options.r < 3
    off, _ = _grads(model, milder, 0.0)
    on, parts = _grads(model, milder, 3.0)
    assert parts["consistency"] > 0
    changed = [n for n in off if not torch.allclose(off[n], on[n])]
    assert "blocks.1.mlp.fc1.weight" in changed and "head.weight" not in changed


def test_the_milder_view_is_the_target_only():
    """Gradients of the term flow through the reduced view alone (the authors detach the
    milder view): they equal those of the MSE to a constant copy of its class token."""
    model = leanvit.patch(_model(), "mctf", r=3, locations=(0, 1)).train()
    milder = model.leanvit.consistency_view(torch.Generator().manual_seed(3))
    logits, tokens, _, v_tokens = _views(model, milder)
    conf = torch.ones(tokens.shape[0])
    got = torch.autograd.grad(consistency_loss(tokens[:, 0], v_tokens[:, 0], conf, 0.4),
                              model.blocks[1].mlp.fc2.weight, retain_graph=True)[0]
    target = v_tokens[:, 0].detach().clone()
    want = torch.autograd.grad(((target - tokens[:, 0]) ** 2).mean(1).mean(),
                               model.blocks[1].mlp.fc2.weight)[0]
    assert torch.allclose(got, want)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c, name in enumerate(("ants", "bees", "wasps")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (64, 64, 3)).astype(np.uint8)).save(
                    d / f"{i}.png")
    return root


def _cfg(folder, out, **kw):
    base = dict(model="vit_tiny_patch16_224", img_size=64,
                model_kwargs={k: v for k, v in KW.items() if k != "num_classes"},
                data=str(folder), output=str(out), method="mctf",
                options={"r": 3, "locations": (0, 1)},
                epochs=1, batch_size=4, workers=0, progress=False, log_every=1, lr=1e-3,
                consistency_weight=3.0, consistency_threshold=0.0, max_steps=2, eval_every=0)
    base.update(kw)
    return TrainConfig(**base)


def test_train_logs_the_consistency_terms(folder, tmp_path):
    torch.set_num_threads(1)
    with pytest.warns(UserWarning, match="random weights"):
        train(_cfg(folder, tmp_path / "run"))
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    steps = [s for s in map(json.loads, log) if s["event"] == "step"]
    assert len(steps) == 2
    for s in steps:
        assert s["loss_consistency"] >= 0 and s["loss_view_cls"] > 0 and "loss_view_distill" in s
    assert any(s["loss_consistency"] > 0 for s in steps)


def test_a_method_without_a_milder_view_is_refused(folder, tmp_path):
    with pytest.warns(UserWarning, match="random weights"):
        with pytest.raises(ValueError, match="consistency_weight needs a method with a token-"
                                             "reduction-consistency view.*'evit' offers none"):
            train(_cfg(folder, tmp_path / "run", method="evit", options={"keep_rate": 0.7}))
    with pytest.raises(ValueError, match="consistency_threshold must be a number in"):
        TrainConfig(consistency_threshold=1.5)


def test_cli_flags_fill_the_config():
    from leanvit.cli import build_parser
    from leanvit.cli.train import config_from_args

    args = build_parser().parse_args(["train", "deit_small_patch16_224", "--data", "d",
                                      "--method", "mctf", "--consistency-weight", "3",
                                      "--consistency-threshold", "0.5"])
    cfg = config_from_args(args)
    assert (cfg.consistency_weight, cfg.consistency_threshold) == (3.0, 0.5)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "m", "--data", "d", "--consistency-weight", "-1"])


def test_a_checkpoint_from_before_the_option_resumes():
    """Its config lacks the consistency fields: their defaults (off) are what it ran with."""
    import dataclasses

    from leanvit.train import _check_resumed_config

    old = {k: v for k, v in dataclasses.asdict(TrainConfig()).items()
           if not k.startswith("consistency")}
    _check_resumed_config(TrainConfig(), old, "last.pt")
    with pytest.raises(ValueError, match="consistency_weight None -> 3.0"):
        _check_resumed_config(TrainConfig(consistency_weight=3.0), old, "last.pt")
