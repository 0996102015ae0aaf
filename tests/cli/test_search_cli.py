"""``leanvit search`` and ``leanvit bench --method diffrate --set schedule=FILE``."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from leanvit.cli import main
from leanvit.methods.diffrate.schedule import load_schedule


def _folder(root, n=4):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                root / cls / f"{i}.png")
    return root


def test_search_cli_writes_a_schedule_that_bench_deploys(tmp_path, capsys):
    data = _folder(tmp_path / "data" / "train")
    out = tmp_path / "s.json"
    # deit_tiny at 32 px: 4 patches + cls, 12 blocks (dense ~0.0123 GMACs)
    rc = main(["search", "deit_tiny_patch16_224", "--img-size", "32", "--target-gmacs", "0.01",
               "--data", str(tmp_path / "data"), "--images", "6", "--epochs", "1",
               "--batch-size", "3", "--granularity", "1", "--out", str(out)])
    assert rc == 0
    s = load_schedule(out)
    assert s.depth == 12 and s.num_tokens == 5 and s.img_size == (32, 32)
    assert s.obtained["how"] == "search" and s.obtained["images"] == 6
    # the default start, best-handset, holds out half of the 6 images to score the hand-set
    # schedules: 3 left, one step of 3
    assert s.obtained["init"] == "best-handset" and s.obtained["holdout"] == 3
    assert s.obtained["steps"] == 1 and s.gmacs is not None
    assert f"started from hand-set {s.obtained['start']}" in capsys.readouterr().out
    rc = main(["bench", "deit_tiny_patch16_224", "--img-size", "32", "--method", "diffrate",
               "--set", f"schedule={out}", "--batch-size", "2", "--repeats", "1", "--warmup",
               "1", "--no-memory", "--json", str(tmp_path / "b.json")])
    assert rc == 0
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["patched"]["gmacs"] == s.gmacs or abs(r["patched"]["gmacs"] - s.gmacs) < 1e-6


def test_search_cli_bad_inputs(tmp_path, capsys):
    rc = main(["search", "deit_tiny_patch16_224", "--img-size", "32", "--target-gmacs", "0.01",
               "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "s.json")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    data = _folder(tmp_path / "d")
    rc = main(["search", "deit_tiny_patch16_224", "--img-size", "32", "--target-gmacs", "5",
               "--data", str(data), "--out", str(tmp_path / "s.json")])
    assert rc == 2 and "not below the dense model" in capsys.readouterr().err


def test_search_cli_merge_only(tmp_path, capsys):
    """``--ops merge`` searches merging only: no block prunes beyond what is left."""
    _folder(tmp_path / "data" / "train")
    out = tmp_path / "s.json"
    rc = main(["search", "deit_tiny_patch16_224", "--img-size", "32", "--target-gmacs", "0.01",
               "--data", str(tmp_path / "data"), "--images", "6", "--steps", "1",
               "--batch-size", "3", "--granularity", "1", "--ops", "merge", "--select-every",
               "1", "--holdout", "2", "--out", str(out)])
    assert rc == 0
    s = load_schedule(out)
    assert s.obtained["ops"] == "merge" and s.obtained["holdout"] == 2
    assert [r["step"] for r in s.obtained["snapshots"]][0] == 0
    assert list(s.prune_kept[1:]) == list(s.merge_kept[:-1])  # pruning removes nothing
    assert min(s.merge_kept) < 5
