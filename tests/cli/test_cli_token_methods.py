"""``leanvit macs`` / ``leanvit bench`` with the off-the-shelf token methods and --set options."""
from __future__ import annotations

import json

import pytest

from leanvit.cli import main


@pytest.mark.parametrize("method, sets", [("evit", ["keep_rate=0.5"]), ("topk", []),
                                          ("tome", ["r=(2, -0.5)"])])
def test_macs_with_a_token_method(method, sets, tmp_path):
    out = tmp_path / "m.json"
    args = ["macs", "deit_tiny_patch16_224", "--img-size", "96", "--method", method,
            "--json", str(out)]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert data["gmacs"] < data["baseline_gmacs"]


def test_bench_with_tome(tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "deit_tiny_patch16_224", "--img-size", "96", "--method", "tome",
                 "--set", "r=2", "--batch-size", "2", "--warmup", "1", "--repeats", "1",
                 "--no-memory", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["method"] == "tome" and data["mac_ratio"] > 1.0


def test_bad_option_is_a_one_line_error(capsys):
    assert main(["macs", "deit_tiny_patch16_224", "--img-size", "64", "--method", "evit",
                 "--set", "keep_rate=2"]) == 2
    assert "keep_rate" in capsys.readouterr().err
