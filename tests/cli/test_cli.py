"""The command line: help is complete, options parse, bench and macs run and write JSON."""
from __future__ import annotations

import json

import pytest

from leanvit.cli import COMMANDS, main
from leanvit.cli.common import parse_set


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: leanvit " + command in capsys.readouterr().out


def test_parse_set_takes_python_literals_and_paths():
    assert parse_set(["r=13", "r2=(16, -1.0)", "locations=(3,6,9)", "fuse=False",
                      "schedule=runs/s.json", "name='x'"]) == {
        "r": 13, "r2": (16, -1.0), "locations": (3, 6, 9), "fuse": False,
        "schedule": "runs/s.json", "name": "x"}
    with pytest.raises(ValueError, match="key=value"):
        parse_set(["oops"])


def test_macs_command_writes_json(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["macs", "deit_tiny_patch16_224", "--img-size", "64", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["gmacs"] == pytest.approx(data["baseline_gmacs"])
    assert len(data["per_block"]) == 12
    assert "GMACs per image" in capsys.readouterr().out


def test_bench_command_reports_both_models(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "deit_tiny_patch16_224", "--img-size", "32", "--batch-size", "2",
                 "--warmup", "1", "--repeats", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    for key in ("baseline", "patched"):
        assert data[key]["images_per_s"] > 0 and data[key]["gmacs"] > 0
        assert data[key]["peak_mem_mb"] is not None  # CPU: measured in a child process
        assert len(data[key]["round_ms"]) == 2
    assert data["mac_ratio"] == pytest.approx(1.0)
    assert data["speedup"] == pytest.approx(
        data["patched"]["images_per_s"] / data["baseline"]["images_per_s"])
    env = data["environment"]
    assert env["threads"] >= 1 and env["torch"] and env["timm"] and env["device_name"]
    assert "speedup" in capsys.readouterr().out


def test_errors_are_one_line_messages_with_status_2(capsys):
    assert main(["macs", "resnet18"]) == 2
    assert "unsupported model type ResNet" in capsys.readouterr().err
    assert main(["macs", "not_a_model_xyz"]) == 2
    assert "unknown timm model" in capsys.readouterr().err
    assert main(["bench", "deit_tiny_patch16_224", "--img-size", "32", "--method", "nope",
                 "--no-memory"]) == 2
    assert "available methods" in capsys.readouterr().err
    assert main(["bench", "deit_tiny_patch16_224", "--img-size", "32", "--device", "tpu"]) == 2
