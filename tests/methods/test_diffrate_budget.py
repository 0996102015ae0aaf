"""DiffRate search in a budget: exact sort order, warm start on the target, off-target warning,
hand-set schedules of DiffRate's space."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import timm
import torch

import leanvit
from leanvit.methods.diffrate.ops import sort_order
from leanvit.methods.diffrate.budget import HANDSET_KINDS, handset_counts, schedule_macs
from leanvit.methods.diffrate.schedule import effective_counts
from leanvit.search.diffrate import handset_schedule, mac_model, search


def _reference_order(attn: torch.Tensor, prefix: int, alive=None) -> list[list[int]]:
    """Plain Python: prefix first, then alive before masked, each by descending attention in
    float64, ties by token index."""
    out = []
    for b in range(attn.shape[0]):
        vals = attn[b].double().tolist()
        keep = [True] * len(vals) if alive is None else alive[b].tolist()
        rest = sorted(range(prefix, len(vals)), key=lambda j: (not keep[j], -vals[j], j))
        out.append(list(range(prefix)) + rest)
    return out


def _tied_attention(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class attention with exact ties and values 1 float32 ulp apart (below the 2.4e-7 that
    ``attn + 2.0`` keeps), plus an alive mask."""
    g = torch.Generator().manual_seed(seed)
    B, N = 3, 40
    a = torch.rand(B, N, generator=g) * 1e-3
    a[:, 5:9] = 3e-4  # exact ties
    base = torch.tensor(1e-4, dtype=torch.float32)
    a[:, 10] = base
    a[:, 11] = torch.nextafter(base, torch.tensor(1.0))  # 1 ulp above
    a[:, 12] = torch.nextafter(a[:, 11], torch.tensor(1.0))
    a[:, 13] = 0.0
    a[:, 14] = 0.0
    alive = torch.rand(B, N, generator=g) > 0.3
    alive[:, 11] = True
    alive[:, 10] = True
    return a, alive


@pytest.mark.parametrize("prefix", [1, 3])
def test_sort_order_is_exact_with_ties(prefix):
    a, alive = _tied_attention()
    N = a.shape[1]
    got = sort_order(a, prefix, N, alive=alive)
    assert got.tolist() == _reference_order(a, prefix, alive)
    got = sort_order(a, prefix, N)
    assert got.tolist() == _reference_order(a, prefix)
    # the first k of the same order
    assert sort_order(a, prefix, 20, alive=alive).tolist() == [
        r[:20] for r in _reference_order(a, prefix, alive)]
    # the old key attn + 2 * alive (float32) loses the 1-ulp differences: the test data tells
    old = (a + 2.0 * alive.float())[:, prefix:].sort(dim=1, descending=True, stable=True).indices
    old = [list(range(prefix)) + [int(j) + prefix for j in row] for row in old]
    assert old != _reference_order(a, prefix, alive)


def _tiny():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", depth=4, img_size=64, num_classes=10).eval()


@pytest.mark.parametrize("kind", HANDSET_KINDS)
def test_handset_schedules_fit_their_target(kind):
    m = _tiny()
    c = mac_model(m)
    dense = schedule_macs([17] * 4, [17] * 4, 17, c)
    target = 0.75 * dense
    s = handset_schedule(m, kind, target)
    # plain recount of the counts: the kind's shape
    p, mm = effective_counts(s.prune_kept, s.merge_kept, 17)
    assert list(s.prune_kept) == p and list(s.merge_kept) == mm
    assert s.prune_kept[0] == 17 and s.merge_kept[0] == 17 or kind.endswith("3stage")
    if kind.startswith("merge"):  # merging only: each block prunes nothing
        assert all(pk == prev for pk, prev in zip(s.prune_kept[1:], s.merge_kept[:-1]))
    else:
        assert s.prune_kept == s.merge_kept
    # its deployed MACs are near the target (integer counts: within a token's worth)
    assert abs(s.gmacs - target) / target < 0.05
    # no schedule of the same kind is closer (scan of the strength)
    grid = np.linspace(0, 17 if kind.endswith("uniform") else 1, 400)
    best = min(abs(schedule_macs(*handset_counts(kind, float(v), 17, 1, 4), 17, c) - target)
               for v in grid)
    assert abs(s.obtained["estimated_gmacs"] - target) <= best + 1e-12


def test_warm_start_meets_the_target_at_step_0():
    torch.manual_seed(0)  # 128 px: 64 patches, fine enough steps of MACs for a 2% target
    m = timm.create_model("deit_tiny_patch16_224", depth=4, img_size=128, num_classes=10).eval()
    x = torch.randn(4, 3, 128, 128)
    dense = schedule_macs([65] * 4, [65] * 4, 65, mac_model(m))
    for target in (0.7 * dense, 0.85 * dense):
        recs = []
        r = search(m, target, x, steps=1, batch_size=4, progress=False, log=recs.append)
        assert abs(recs[0]["gmacs"] - target) / target < 0.02  # before any step
        start = handset_schedule(m, "merge-uniform", target)
        assert r.schedule.obtained["init"] == "warm"
        assert recs[0]["gmacs"] == pytest.approx(start.obtained["estimated_gmacs"], rel=1e-6)
        assert abs(start.gmacs - target) / target < 0.02  # deployed, measured by count_macs
    # the authors' zero start is far from it at step 0 (every block at the middle count)
    recs = []
    search(m, 0.8 * dense, x, steps=1, batch_size=4, progress=False, log=recs.append,
           init="zero")
    assert abs(recs[0]["gmacs"] - 0.8 * dense) / (0.8 * dense) > 0.05


def test_warm_start_counts_are_the_schedule():
    from leanvit.methods.diffrate.search_mode import DiffRateSearchOptions, DiffRateSearchReducer
    from leanvit.adapters import find_adapter

    m = _tiny()
    info = find_adapter(m).describe(m)
    red = DiffRateSearchReducer(DiffRateSearchOptions(granularity=2), info)
    prune, merge = [17, 17, 14, 9], [17, 15, 10, 4]
    red.warm_start(prune, merge, spread=1.5)
    p, mm = red.kept_counts()
    assert [int(v) for v in p[1:]] == prune[1:] and [int(v) for v in mm[1:]] == merge[1:]


def test_off_target_warning_and_search_cli_exit_0(tmp_path, capsys):
    m = _tiny()
    x = torch.randn(8, 3, 64, 64)
    dense = schedule_macs([17] * 4, [17] * 4, 17, mac_model(m))
    with pytest.warns(UserWarning, match="off the target"):
        r = search(m, 0.7 * dense, x, steps=1, batch_size=8, progress=False, init="zero",
                   mac_weight=0.0)
    assert "warning" in r.schedule.obtained and abs(r.schedule.obtained["off_target"]) > 0.02
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on target: no warning
        r = search(m, 0.7 * dense, x, steps=1, batch_size=8, progress=False)
    assert "warning" not in r.schedule.obtained

    from PIL import Image

    from leanvit.cli import main

    d = tmp_path / "data" / "a"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"{i}.png")
    out = tmp_path / "s.json"
    code = main(["search", "deit_tiny_patch16_224", "--img-size", "64", "--data",
                 str(tmp_path / "data"), "--target-gmacs", f"{0.7 * dense:.5f}", "--steps", "1",
                 "--batch-size", "4", "--init", "zero", "--mac-weight", "0", "--out", str(out)])
    assert code == 0
    assert "warning" in capsys.readouterr().err
    assert "off the target" in json.loads(out.read_text())["obtained"]["warning"]


@pytest.mark.parametrize("bad", [{"init": "nope"}, {"steps": -1}, {"max_seconds": -1},
                                 {"init_spread": 0}])
def test_bad_search_options(bad):
    with pytest.raises((ValueError, TypeError)):
        search(_tiny(), 0.01, torch.randn(2, 3, 64, 64), progress=False, **bad)


def test_max_seconds_caps_the_caching_of_the_search_images():
    """With ``max_seconds``, caching the frozen prefix and teacher outputs of more images than
    :data:`CACHE_SHARE` of it allows searches on fewer images, with a warning (the limit holds
    even when caching alone would overrun it)."""
    from leanvit.search import diffrate as dr

    m = _tiny()
    x = torch.randn(12, 3, 64, 64)
    dense = leanvit.count_macs(m, x[:1]).gmacs
    with pytest.warns(UserWarning, match="searching on the first 2"):
        r = search(m, 0.8 * dense, x, steps=3, batch_size=2, max_seconds=1e-6, progress=False)
    assert r.schedule.obtained["images"] == 2
    assert dr.CACHE_SHARE == 0.25
    # a generous limit caches everything
    r = search(m, 0.8 * dense, x, steps=1, batch_size=2, max_seconds=1e4, progress=False)
    assert r.schedule.obtained["images"] == 12


@pytest.mark.parametrize("ops", ["merge", "prune"])
def test_search_of_one_operation_leaves_the_other_alone(ops):
    """``ops='merge'``: nothing is ever pruned (every prune count is the full count), and the
    warm start is the merge-only hand-set schedule; likewise for ``'prune'``."""
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", depth=4, img_size=128, num_classes=10).eval()
    x = torch.randn(4, 3, 128, 128)
    dense = leanvit.count_macs(m, x[:1]).gmacs
    recs = []
    r = search(m, 0.8 * dense, x, steps=2, batch_size=4, ops=ops, progress=False,
               log=recs.append)
    s = r.schedule
    mine = s.merge_kept if ops == "merge" else s.prune_kept
    # effective counts: the frozen operation removes nothing beyond what the other left
    if ops == "merge":
        assert list(s.prune_kept[1:]) == [65] + list(s.merge_kept[1:-1])
    else:
        assert list(s.merge_kept) == list(s.prune_kept)
    assert min(mine) < 65 and s.obtained["ops"] == ops
    start = handset_schedule(m, f"{ops}-uniform", 0.8 * dense)
    assert recs[0]["gmacs"] == pytest.approx(start.obtained["estimated_gmacs"], rel=1e-6)
    with pytest.raises(ValueError, match="does not search"):
        search(m, 0.8 * dense, x, steps=1, ops=ops, progress=False,
               init="prune-3stage" if ops == "merge" else "merge-3stage")
    with pytest.raises(ValueError, match="ops must be"):
        search(m, 0.8 * dense, x, steps=1, ops="neither", progress=False)


def test_select_every_returns_the_best_deployed_snapshot():
    """With ``select_every``, snapshots (step 0, every k steps, the end) are deployed and scored
    on held-out images; the returned schedule is the snapshot with the lowest held-out loss
    among those within the MAC tolerance, and its loss is what a plain deployed evaluation
    gives."""
    import copy

    import torch.nn.functional as F

    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", depth=4, img_size=128, num_classes=10).eval()
    x = torch.randn(12, 3, 128, 128)
    dense = leanvit.count_macs(m, x[:1]).gmacs
    target = 0.8 * dense
    r = search(m, target, x, steps=4, batch_size=4, lr=0.5, select_every=2, holdout=4,
               tolerance=0.05, progress=False)
    o = r.schedule.obtained
    snaps = o["snapshots"]
    assert o["holdout"] == 4 and o["images"] == 12 and snaps[0]["step"] == 0
    ok = [s for s in snaps if abs(s["estimated_gmacs"] - target) <= 0.05 * target]
    best = min(ok, key=lambda s: s["holdout_loss"])
    assert o["selected_step"] == best["step"]
    # the held-out loss of the returned schedule, recomputed plainly: KL of the deployed model's
    # logits to the unpatched model's on the last 4 images
    with torch.no_grad():
        teacher = m(x[-4:])
        student = leanvit.patch(copy.deepcopy(m), "diffrate", schedule=r.schedule)(x[-4:])
    kl = F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), reduction="batchmean",
                  log_target=True)
    assert float(kl) == pytest.approx(best["holdout_loss"], rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError):
        search(m, target, x, steps=1, select_every=0, progress=False)
