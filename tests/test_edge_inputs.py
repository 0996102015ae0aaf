"""Edge inputs that crashed or misled (issue 13): empty batches, NaN or wrongly sized images,
NaN targets, models viz cannot draw, and the first-contact details of the command line."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

import leanvit
from leanvit.cli import build_parser, main
from tests.conftest import tiny_vit


def test_ats_on_an_empty_batch_gives_an_empty_output():
    model = tiny_vit()
    expected = model(torch.randn(0, 3, 64, 64)).shape
    leanvit.patch(model, "ats")
    assert model(torch.randn(0, 3, 64, 64)).shape == expected == (0, 1000)


@pytest.mark.parametrize("images,match", [
    (torch.randn(2, 3, 32, 32), r"calibration images \[2, 3, 32, 32\] do not fit the model"),
    (torch.full((2, 3, 64, 64), float("nan")), "NaN"),
    (torch.randn(0, 3, 64, 64), "empty"),
])
def test_compact_refuses_bad_calibration_images(images, match):
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match) as e:
        leanvit.compact(model, images=images)
    assert "\n" not in str(e.value)
    assert leanvit.compaction_spec(model) is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _folder(root, n=3):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                root / cls / f"{i}.png")
    return root


def test_search_refuses_nan_target_no_images_and_nan_images(tmp_path, capsys):
    data = _folder(tmp_path / "d")
    base = ["search", "deit_tiny_patch16_224", "--img-size", "32", "--data", str(data),
            "--epochs", "1", "--batch-size", "3", "--out", str(tmp_path / "s.json")]
    assert main([*base, "--target-gmacs", "nan"]) == 2
    assert "target_gmacs must be a finite number" in capsys.readouterr().err
    assert main([*base, "--target-gmacs", "0.01", "--images", "0"]) == 2
    assert "num_images must be in [1" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()
    from leanvit.search.diffrate import search

    model = tiny_vit(img_size=32)
    with pytest.raises(ValueError, match="NaN"):
        search(model, 0.001, torch.full((4, 3, 32, 32), float("nan")), progress=False)
    with pytest.raises(ValueError, match="empty"):
        search(model, 0.001, torch.randn(0, 3, 32, 32), progress=False)


def _besides_random_weights(err: str) -> list[str]:
    """stderr lines but the notice that a model without --checkpoint has (seeded) random
    weights."""
    return [ln for ln in err.strip().splitlines() if "has random weights" not in ln]


def test_viz_refuses_hierarchical_models_clearly(tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(img)
    rc = main(["viz", str(img), "--model", "convnext_tiny", "--img-size", "64",
               "--method", "dynamicvit", "--out", str(tmp_path / "v.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "nothing to draw" in err and len(_besides_random_weights(err)) == 1
    assert not (tmp_path / "v.png").exists()


def test_viz_takes_the_model_as_a_positional_argument_in_either_order(tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(img)
    for argv in ([str(img), "vit_tiny_patch16_224"], ["vit_tiny_patch16_224", str(img)],
                 [str(img), "--model", "vit_tiny_patch16_224"]):
        out = tmp_path / "v.png"
        assert main(["viz", *argv, "--img-size", "64", "--out", str(out)]) == 0
        assert out.read_bytes()[:4] == b"\x89PNG"
        out.unlink()
    assert main(["viz", str(img), "--img-size", "64", "--out", str(tmp_path / "v.png")]) == 2
    assert "needs a model" in capsys.readouterr().err


def test_one_panel_title_is_wrapped_to_the_figure(tmp_path):
    """A one-panel figure is 2 inches wide: a long title is wrapped, not clipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanvit import viz

    captured = {}
    real = plt.Figure.suptitle

    def spy(self, t, *a, **k):
        captured["title"] = t
        return real(self, t, *a, **k)

    plt.Figure.suptitle = spy
    try:
        viz.render(np.zeros((32, 32, 3)), [], (2, 2), tmp_path / "r.png",
                   title="vit_small_patch14_dinov2 (weights dinov2_vits14_224.safetensors) / none")
    finally:
        plt.Figure.suptitle = real
    assert max(len(line) for line in captured["title"].splitlines()) <= 22


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", ["eval", "probe"])
def test_help_shows_percent_signs_once(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "%%" not in out and "%" in out


def test_every_search_option_has_help():
    p = _subparser("search")
    missing = [a.option_strings or a.dest for a in p._actions if not a.help]
    assert not missing


def test_macs_states_its_batch_size_default():
    p = _subparser("macs")
    action = next(a for a in p._actions if "--batch-size" in a.option_strings)
    assert "default 1" in action.help


def test_methods_hides_the_internal_search_mode(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "diffrate-search" not in out and "\ndiffrate:" in out
    assert "diffrate-search" not in leanvit.available_methods()
    leanvit.patch(tiny_vit(), "diffrate-search")  # still there for leanvit search


def test_bench_prints_the_resolved_options_with_tuples_as_tuples(tmp_path, capsys):
    import json

    assert main(["bench", "deit_tiny_patch16_224", "--img-size", "32", "--method", "evit",
                 "--set", "locations=(1, 2)", "--batch-size", "2", "--repeats", "1",
                 "--warmup", "1", "--no-memory", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "method=evit keep_rate=0.7, locations=(1, 2), fuse=True batch 2" in out
    cfg = json.loads((tmp_path / "b.json").read_text())["config"]
    assert cfg["options"] == {"locations": [1, 2]}
    assert cfg["resolved_options"] == {"keep_rate": 0.7, "locations": [1, 2], "fuse": True}


def test_untrained_dynamicvit_is_warned_about(tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(img)
    assert main(["viz", str(img), "vit_tiny_patch16_224", "--img-size", "64", "--method",
                 "dynamicvit", "--set", "locations=(1,)", "--out", str(tmp_path / "v.png")]) == 0
    err = capsys.readouterr().err
    assert "warning: dynamicvit's" in err and "freshly initialised" in err
    assert len(_besides_random_weights(err)) == 1
    assert main(["bench", "deit_tiny_patch16_224", "--img-size", "32", "--method", "dynamicvit",
                 "--set", "locations=(1,)", "--batch-size", "2", "--repeats", "1", "--warmup",
                 "1", "--no-memory"]) == 0
    assert "freshly initialised" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="freshly initialised"):
        from leanvit.compare import Setting, apply_setting

        apply_setting(tiny_vit(), Setting("dynamicvit", {"locations": (1,)}))


def test_bench_warns_when_the_rounds_spread_more_than_20_percent(monkeypatch):
    """A benchmark that shared the cores with another process: rounds 1.0, 1.5, 1.0 s."""
    from leanvit import bench

    def fake_rounds(baseline, candidate, x, **kw):
        return {"baseline": [1.0, 1.5, 1.0], "candidate": [0.5, 0.52, 0.5]}

    monkeypatch.setattr(bench, "time_models", fake_rounds)
    with pytest.warns(UserWarning, match=r"baseline model's timing rounds spread by 50%"):
        r = bench.run_benchmark("deit_tiny_patch16_224", "none", img_size=32, batch_size=2,
                                repeats=3, warmup=0, memory=False, progress=False)
    assert r["baseline"]["spread"] == pytest.approx(0.5)
    assert bench.round_spread([1.0, 1.1, 1.05]) == pytest.approx(0.1 / 1.05)


def test_resolved_default_locations_are_in_block_order():
    """EViT keeps its blocks as a frozenset; what bench prints is sorted: (3, 6, 9), not a
    hash order such as (9, 3, 6)."""
    import timm

    import leanvit
    from leanvit.bench import resolved_options

    m = leanvit.patch(timm.create_model("deit_tiny_patch16_224", img_size=32), "evit")
    assert resolved_options(m)["locations"] == (3, 6, 9)
