"""``leanvit.tune`` / ``leanvit tune``: the choice within a budget, the grid, the choice file."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import timm
import torch

import leanvit
from leanvit.compare import Setting, apply_setting
from leanvit.registry import get_method
from leanvit.tune import Budget, knob_setting, tune
from tests.conftest import write_brightness_folder

# explicit settings of the constructed cases (depth-4 DeiT-T at 64 px: 16 patches + class)
GRID = [Setting("tome", {"r": 1}), Setting("tome", {"r": 2}), Setting("tome", {"r": 3}),
        Setting("topk", {"keep_rate": 0.5, "locations": (1,)})]


def _images(n: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 64, 64, generator=g) * 2.0


def _model() -> torch.nn.Module:
    """A random depth-4 DeiT-T with a 50-class head centred on the test images' mean feature
    (a random model's logits are otherwise dominated by one direction, and every setting
    predicts the same class)."""
    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_patch16_224", depth=4, img_size=64, num_classes=50).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        f = m.forward_head(m.forward_features(_images()), pre_logits=True)
        w = torch.randn(50, f.shape[1], generator=g)
        m.head.weight.copy_(w)
        m.head.bias.copy_(-(w @ f.mean(0)))
    return m


def _reference(model, setting, x):
    """Plain: the patched model's predictions and its GMACs per image on ``x``."""
    m = apply_setting(copy.deepcopy(model), setting).eval()
    with torch.no_grad():
        pred = m(x).argmax(-1)
    return pred, leanvit.count_macs(m, x).gmacs


def _batches(x, y, b=8):
    return [(x[i:i + b], y[i:i + b]) for i in range(0, len(x), b)]


@pytest.fixture(scope="module")
def case():
    """Labels that one setting (tome r=2) predicts exactly, and each setting's reference
    accuracy and GMACs."""
    model, x = _model(), _images()
    star = GRID[1]
    labels, _ = _reference(model, star, x)
    ref = {}
    for s in [Setting("none")] + GRID:
        pred, gm = _reference(model, s, x)
        ref[s.label] = (100.0 * float((pred == labels).float().mean()), gm)
    # the construction must make a difference: star is right everywhere, the others are not
    assert ref[star.label][0] == 100.0
    assert all(acc < 100.0 for lab, (acc, _) in ref.items() if lab != star.label)
    return model, x, labels, ref


def _expected(ref, budget_gmacs):
    within = {lab: v for lab, v in ref.items() if v[1] <= budget_gmacs}
    return max(within, key=lambda lab: (within[lab][0], -within[lab][1]))


def test_tune_picks_the_constructed_best(case):
    model, x, labels, ref = case
    budget = ref["tome r=2"][1] * 1.001  # the unmodified model and tome r=1 are over it
    assert ref["none"][1] > budget and ref["tome r=1"][1] > budget
    r = leanvit.tune(model, _batches(x, labels), budget=budget, methods=GRID, progress=False,
                     log=None, repeats=1)
    assert isinstance(r, leanvit.TuneResult)
    assert _expected(ref, budget) == "tome r=2"
    assert r.choice["label"] == "tome r=2" and r.choice["top1"] == 100.0
    for row in r.rows:  # tune's numbers are the plain reference's
        acc, gm = ref[row["label"]]
        assert row["top1"] == pytest.approx(acc) and row["gmacs"] == pytest.approx(gm)
        assert row["within_budget"] == (gm <= budget)
    assert model.training is False and not leanvit.is_patched(model)


def test_tune_ignores_the_best_when_it_is_over_budget(case):
    model, x, labels, ref = case
    budget = (ref["tome r=2"][1] + ref["tome r=3"][1]) / 2  # tome r=2 (100%) is over it
    r = tune(model, _batches(x, labels), {"gmacs": budget}, methods=GRID, progress=False,
             log=None, repeats=1)
    want = _expected(ref, budget)
    assert want != "tome r=2" and r.choice["label"] == want
    assert r.choice["gmacs"] <= budget
    # the front holds the choice and nothing on it is dominated
    labels_front = [f["label"] for f in r.front]
    assert want in labels_front
    for f in r.front:
        assert not any(o["gmacs"] <= f["gmacs"] and o["top1"] > f["top1"] for o in r.rows)


def test_speedup_budget_and_nothing_within(case):
    model, x, labels, _ = case
    r = tune(model, _batches(x, labels), {"speedup": 1000.0}, methods=GRID[:2],
             progress=False, log=None, repeats=1)
    assert r.choice is None and all(not row["within_budget"] for row in r.rows)
    with pytest.raises(ValueError, match="within the budget"):
        r.apply(copy.deepcopy(model))


@pytest.mark.parametrize("budget", [0, -1.0, float("nan"), {"gmacs": 1, "speedup": 2}, {}])
def test_bad_budgets(budget):
    with pytest.raises(ValueError, match="budget"):
        Budget.of(budget)


def test_knob_setting_is_the_mildest_within_the_target():
    model, x = _model(), _images()[:4]
    dense = leanvit.count_macs(model, x).gmacs
    target = 0.8 * dense
    s, g = knob_setting(model, "tome", target, x)
    r = s.options["r"]
    assert g <= target and _reference(model, s, x)[1] == pytest.approx(g)
    assert _reference(model, Setting("tome", {"r": r - 1}), x)[1] > target
    s, g = knob_setting(model, "evit", target, x)
    assert g <= target and 0 < s.options["keep_rate"] < 1


def test_knob_inflections_are_bisected_as_schedules():
    """ToMe's knob declares the decreasing schedule (r, -1) beside the constant r: grid places
    both at each target, the schedule as the mildest (r, -1) within the target."""
    from leanvit.methods.tome import schedule
    from leanvit.tune import grid

    assert get_method("tome").knob.inflections == (-1.0,)
    model, x = _model(), _images()[:4]
    dense = leanvit.count_macs(model, x).gmacs
    target = 0.8 * dense
    s, g = knob_setting(model, "tome", target, x, inflect=-1.0)
    r, inflect = s.options["r"]
    assert inflect == -1.0 and g <= target and _reference(model, s, x)[1] == pytest.approx(g)
    assert _reference(model, Setting("tome", {"r": (r - 1, -1.0)}), x)[1] > target
    per_block = schedule((r, -1.0), 4)
    assert per_block == sorted(per_block, reverse=True) and per_block[0] > per_block[-1]
    settings, est, _ = grid(model, [target], x, methods=["tome", "evit"])
    labels = [t.label for t in settings]
    assert s.label in labels and knob_setting(model, "tome", target, x)[0].label in labels
    assert sum(t.method == "evit" for t in settings) == 1  # no inflections declared


def test_choice_file_round_trips_through_load(case, tmp_path):
    model, x, labels, _ = case
    sched = ([17, 17, 13, 11], [17, 15, 11, 9])  # an explicit DiffRate schedule
    grid = [Setting("diffrate", {"schedule": sched}), GRID[2]]
    r = tune(model, _batches(x, labels), 1.0, methods=grid, progress=False, log=None,
             repeats=1)
    for s in grid:  # each evaluated setting, saved as the choice, loads back the same
        r.choice = r.rows[[row["label"] for row in r.rows].index(s.label)]
        path = r.save_choice(model, tmp_path / "choice.safetensors")
        loaded = leanvit.load(copy.deepcopy(model), path)
        direct = apply_setting(copy.deepcopy(model), s)
        with torch.no_grad():
            assert torch.equal(loaded(x), direct(x))
        assert leanvit.patched_method(loaded)[0] == s.method


def test_tune_searches_diffrate(case, tmp_path):
    model, x, labels, ref = case
    budget = 0.7 * ref["none"][1]
    r = tune(model, _batches(x, labels), budget, methods=["diffrate"], progress=False,
             log=None, repeats=1, out=tmp_path,
             search_options={"steps": 2, "batch_size": 8})
    searched = [row for row in r.rows if row["method"] == "diffrate"]
    assert len(searched) == 1 and len(r.schedules) == 1
    (label, schedule), = r.schedules.items()
    assert searched[0]["label"] == label
    assert searched[0]["gmacs"] == pytest.approx(schedule.gmacs, rel=1e-4)  # file: 6 digits
    # aimed under the budget by the search's tolerance (2%), so a result within it stays within
    assert schedule.obtained["target_gmacs"] == pytest.approx(budget / 1.02)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageFolder (train/, val/) of two classes told apart by brightness."""
    root = tmp_path_factory.mktemp("tune")
    write_brightness_folder(root / "data", {"train": 8, "val": 6},
                            (("dark", 40), ("light", 210)), 64, 25, np.random.default_rng(0))
    return root


def test_cli_tune_writes_front_and_choice(folder, capsys):
    from leanvit.cli import main

    out = folder / "out"
    args = ["tune", "deit_tiny_patch16_224", "--img-size", "64", "--num-classes", "2",
            "--data", str(folder / "data"), "--budget-gmacs", "0.07", "--batch-size", "6",
            "--methods", "tome; topk keep_rate=0.5", "--limit", "8", "--out", str(out),
            "--repeats", "1", "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "chosen:" in text and "about" in text  # progress shows what is left
    for name in ("results.md", "results.png", "results.json", "front.md", "choice.json",
                 "choice.safetensors", "tune.json"):
        assert (out / name).is_file(), name
    info = json.loads((out / "choice.json").read_text())["choice"]
    rows = json.loads((out / "tune.json").read_text())["rows"]
    within = [r for r in rows if r["gmacs"] <= 0.07]  # the unmodified model: 0.094
    assert info["top1"] == max(r["top1"] for r in within)
    assert len(rows) >= 3 and {r["method"] for r in rows} == {"none", "tome", "topk"}
    # the choice file works where settings are taken: bench, macs (--set load=FILE)
    bench = folder / "bench.json"
    assert main(["bench", "deit_tiny_patch16_224", "--img-size", "64", "--num-classes", "2",
                 "--set", f"load={out / 'choice.safetensors'}", "--batch-size", "2",
                 "--warmup", "0", "--repeats", "1", "--no-memory", "--json", str(bench)]) == 0
    b = json.loads(bench.read_text())
    assert b["config"]["method"] == info["method"]
    assert b["patched"]["gmacs"] < b["baseline"]["gmacs"] or info["method"] == "none"
    assert main(["macs", "deit_tiny_patch16_224", "--img-size", "64", "--num-classes", "2",
                 "--set", f"load={out / 'choice.safetensors'}"]) == 0


def test_cli_tune_bad_input_is_one_line(folder, capsys):
    from leanvit.cli import main

    base = ["tune", "deit_tiny_patch16_224", "--img-size", "64", "--num-classes", "2",
            "--data", str(folder / "data"), "--out", str(folder / "bad")]
    assert main(base + ["--budget-gmacs", "-1"]) == 2
    assert "budget" in capsys.readouterr().err
    assert main(base + ["--budget-gmacs", "1", "--methods", "nosuch"]) == 2
    assert "unknown method" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # both budgets: argparse refuses
        main(base + ["--budget-gmacs", "1", "--budget-speedup", "2"])


def test_grid_covers_every_training_free_method_and_names_what_it_leaves_out():
    """``random`` (a keep_rate knob) is in the grid; ``dynamicvit`` is left out with the reason
    (trained predictors) and how to pass them."""
    from leanvit.tune import grid

    model, x = _model(), _images()[:4]
    target = 0.8 * leanvit.count_macs(model, x).gmacs
    settings, est, skipped = grid(model, [target], x)
    methods = {s.method for s in settings}
    training_free = {n for n, m in leanvit.registry.registered().items() if m.knob is not None}
    assert {"tome", "evit", "ats", "random"} <= training_free  # the registry declares them
    assert training_free <= methods
    s = next(s for s in settings if s.method == "random")
    assert 0 < s.options["keep_rate"] < 1 and est[s.label] <= target
    reasons = dict(skipped)
    assert "random" not in reasons
    assert "trained predictors" in reasons["dynamicvit"] and "load=" in reasons["dynamicvit"]
