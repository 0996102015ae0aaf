"""The search's ``init="best-handset"`` start (the default of ``leanvit search`` and ``leanvit
tune``): every hand-set schedule of DiffRate's space is fitted to the target and scored deployed
on held-out search images, the search starts from the best one, and the best deployed snapshot
(the start among them) is returned, so the search never returns worse than its start there.

Checked against plainly written references: the deployed model's KL to the unpatched model on
the held-out images (the last ``holdout`` images of a tensor), computed here with
``leanvit.patch`` and a plain forward."""
from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

import leanvit
from leanvit.adapters import find_adapter
from leanvit.methods.diffrate.budget import HANDSET_KINDS
from leanvit.methods.diffrate.search_mode import DiffRateSearchOptions, DiffRateSearchReducer
from leanvit.search.diffrate import handset_kinds, handset_schedule, search
from leanvit.tune import SEARCH_DEFAULTS

HOLD = 4


def _model() -> torch.nn.Module:
    """A tiny DeiT (4 blocks, 128 px: 64 patches, fine enough steps of MACs for a 2% target)
    whose head is scaled up so that the KL between schedules is far above rounding."""
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", depth=4, img_size=128, num_classes=10).eval()
    with torch.no_grad():
        m.head.weight.mul_(30.0)
    return m


def _images(n: int = 12) -> torch.Tensor:
    return torch.randn(n, 3, 128, 128, generator=torch.Generator().manual_seed(1))


def _heldout_kl(m: torch.nn.Module, schedule, x: torch.Tensor) -> float:
    """KL (batch mean) of ``schedule`` deployed on ``m`` to the unpatched ``m`` on ``x``."""
    with torch.no_grad():
        teacher = m(x)
        student = leanvit.patch(copy.deepcopy(m), "diffrate", schedule=schedule)(x)
    return float(F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1),
                          reduction="batchmean", log_target=True))


def _search(m, target, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # off-target warnings of so short a search
        return search(m, target, x, batch_size=4, holdout=HOLD, progress=False,
                      init="best-handset", **kw)


def test_the_start_is_the_best_handset_schedule_on_target_and_zero_steps_return_it():
    m, x = _model(), _images()
    dense = leanvit.count_macs(m, x[:1]).gmacs
    target = 0.7 * dense
    r = _search(m, target, x, steps=0)
    o = r.schedule.obtained
    assert r.steps == 0 and o["init"] == "best-handset" and o["selected_step"] == 0
    assert [h["kind"] for h in o["handset"]] == list(HANDSET_KINDS)
    # reference: every kind deployed and scored plainly on the held-out images
    refs = {k: handset_schedule(m, k, target) for k in HANDSET_KINDS}
    losses = {k: _heldout_kl(m, s, x[-HOLD:]) for k, s in refs.items()}
    for h in o["handset"]:
        assert h["holdout_loss"] == pytest.approx(losses[h["kind"]], rel=1e-4, abs=1e-7)
    on_target = [k for k, s in refs.items()
                 if abs(s.obtained["estimated_gmacs"] - target) <= 0.02 * target]
    assert on_target, "the case needs hand-set schedules within the tolerance"
    best = min(on_target, key=lambda k: losses[k])
    assert o["start"] == best and o["selected_start"] is True
    # zero steps: the schedule returned is that start, deployed on its target
    start = refs[best]
    assert (r.schedule.prune_kept, r.schedule.merge_kept) == (start.prune_kept,
                                                             start.merge_kept)
    assert abs(r.schedule.gmacs - target) / target <= 0.02  # count_macs of the deployed model
    assert r.schedule.gmacs == pytest.approx(start.gmacs, rel=1e-9)
    # representable: the search's logits warm-started from it give back exactly its counts
    red = DiffRateSearchReducer(DiffRateSearchOptions(), find_adapter(m).describe(m))
    red.warm_start(start.prune_kept, start.merge_kept)
    back = red.to_schedule()
    assert (back.prune_kept, back.merge_kept) == (start.prune_kept, start.merge_kept)


def test_search_never_returns_worse_than_its_start():
    """A search pushed off its start by a large learning rate: its last step scores worse on
    the held-out images than the start, and the start is what it returns; in every case the
    returned schedule scores at least as well as the start."""
    m, x = _model(), _images()
    target = 0.7 * leanvit.count_macs(m, x[:1]).gmacs
    r = _search(m, target, x, steps=6, lr=3.0, mac_weight=0.0)
    o = r.schedule.obtained
    snaps = o["snapshots"]
    start = handset_schedule(m, o["start"], target)
    start_loss = _heldout_kl(m, start, x[-HOLD:])
    assert snaps[0]["step"] == 0 and snaps[0]["holdout_loss"] == pytest.approx(start_loss,
                                                                               rel=1e-4)
    assert snaps[-1]["step"] == 6 and snaps[-1]["holdout_loss"] > start_loss  # got worse
    assert o["selected_step"] == 0
    assert _heldout_kl(m, r.schedule, x[-HOLD:]) <= start_loss * (1 + 1e-6)
    # with snapshots along the way as well
    r = _search(m, target, x, steps=6, lr=0.5, select_every=2)
    got = _heldout_kl(m, r.schedule, x[-HOLD:])
    assert got <= _heldout_kl(m, handset_schedule(m, r.schedule.obtained["start"], target),
                              x[-HOLD:]) * (1 + 1e-6)


def test_one_operation_starts_from_its_own_handset_kinds():
    m, x = _model(), _images(8)
    target = 0.8 * leanvit.count_macs(m, x[:1]).gmacs
    assert handset_kinds("merge") == ("merge-uniform", "merge-3stage")
    assert handset_kinds("prune") == ("prune-uniform", "prune-3stage")
    assert handset_kinds("both") == HANDSET_KINDS
    r = _search(m, target, x, steps=0, ops="merge")
    assert [h["kind"] for h in r.schedule.obtained["handset"]] == ["merge-uniform",
                                                                  "merge-3stage"]
    assert list(r.schedule.prune_kept[1:]) == list(r.schedule.merge_kept[:-1])  # no pruning


def test_best_handset_is_tunes_default_and_needs_held_out_images():
    assert SEARCH_DEFAULTS["init"] == "best-handset" and SEARCH_DEFAULTS["select_every"] == 50
    m = _model()
    with pytest.raises(ValueError, match="init='best-handset' needs at least 2 search images"):
        search(m, 0.01, _images(1), progress=False, init="best-handset")
    with pytest.raises(ValueError, match="holdout"):
        search(m, 0.01, _images(2), progress=False, init="best-handset", holdout=0)
