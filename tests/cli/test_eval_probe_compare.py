"""``leanvit data / probe / eval / compare`` end to end on tiny models and generated images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from leanvit.cli import main
from leanvit.probe import head_metadata, load_head
from tests.conftest import write_brightness_folder

MODEL = "deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A headless tiny checkpoint (random weights, saved so every command sees the same
    backbone) and an ImageFolder with train/ and val/ of two easily told apart classes."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    m = timm.create_model(MODEL, img_size=32, num_classes=0)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, root / "backbone.safetensors")
    write_brightness_folder(root / "data", {"train": 12, "val": 6},
                            (("dark", 30), ("light", 220)), 32, 20, np.random.default_rng(0))
    return root


def _args(setup):
    return [MODEL, "--img-size", "32", "--checkpoint", str(setup / "backbone.safetensors")]


def test_probe_then_eval_with_head(setup, capsys):
    head = setup / "head.safetensors"
    assert main(["probe", *_args(setup), "--data", str(setup / "data"), "--out", str(head),
                 "--batch-size", "8", "--no-progress", "--cache", str(setup / "cache"),
                 "--json", str(setup / "probe.json")]) == 0
    probe = json.loads((setup / "probe.json").read_text())
    assert probe["val_accuracy"] == 100.0 and probe["classes"] == ["dark", "light"]
    assert head_metadata(head)["model"] == MODEL and load_head(head).in_features == 2 * 192
    assert any((setup / "cache").iterdir())
    out = setup / "eval.json"
    assert main(["eval", *_args(setup), "--head", str(head), "--data", str(setup / "data"),
                 "--no-progress", "--repeats", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["top1"] == probe["val_accuracy"] and r["images"] == 12 and r["gmacs"] > 0
    assert "top-1 100.00%" in capsys.readouterr().out


def test_compare_writes_table_plot_json(setup):
    head = setup / "head.safetensors"
    if not head.exists():
        pytest.skip("needs the head of test_probe_then_eval_with_head")
    out = setup / "cmp"
    assert main(["compare", *_args(setup), "--head", str(head), "--data", str(setup / "data"),
                 "--methods", "none", "--out", str(out), "--no-progress", "--repeats", "1",
                 "--limit", "4"]) == 0
    assert "| none |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "results.json").read_text())["meta"]["images"] == 4


def test_bad_inputs_are_clear_errors(setup, tmp_path, capsys):
    # a headless model without --head
    assert main(["eval", *_args(setup), "--data", str(setup / "data"), "--no-progress"]) == 2
    assert "headless" in capsys.readouterr().err
    # not an ImageFolder
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "x.png").write_bytes(b"")
    assert main(["eval", MODEL, "--img-size", "32", "--data", str(tmp_path)]) == 2
    assert "not an ImageFolder" in capsys.readouterr().err
    # a checkpoint for another model
    assert main(["eval", "vit_small_patch16_224", "--img-size", "32", "--checkpoint",
                 str(setup / "backbone.safetensors"), "--data", str(setup / "data")]) == 2
    assert "could not load checkpoint" in capsys.readouterr().err
    # a head for another width / another model
    from leanvit.probe import save_head
    save_head(torch.nn.Linear(10, 2), tmp_path / "w.safetensors", model=MODEL)
    assert main(["eval", *_args(setup), "--head", str(tmp_path / "w.safetensors"),
                 "--data", str(setup / "data")]) == 2
    assert "width" in capsys.readouterr().err
    save_head(torch.nn.Linear(384, 2), tmp_path / "o.safetensors", model="vit_small_patch16_224")
    assert main(["eval", *_args(setup), "--head", str(tmp_path / "o.safetensors"),
                 "--data", str(setup / "data")]) == 2
    assert "fitted on vit_small_patch16_224" in capsys.readouterr().err
    # unknown method in compare
    assert main(["compare", MODEL, "--img-size", "32", "--num-classes", "2", "--data",
                 str(setup / "data"), "--methods", "none; nosuch k=1", "--out",
                 str(tmp_path / "c")]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_data_command_exports_fashion_mnist(tmp_path, capsys):
    from leanvit.data import FASHION_MNIST_DIR
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    assert main(["data", "fashion-mnist", "--out", str(tmp_path / "f"), "--train", "20",
                 "--val", "10"]) == 0
    assert len(list((tmp_path / "f" / "train").rglob("*.png"))) == 20
    assert len(list((tmp_path / "f" / "val").rglob("*.png"))) == 10


def test_probe_cache_sees_images_replaced_under_the_same_names(tmp_path, capsys):
    """Issue 13.2: the cache keyed on file names and labels reported the old accuracy (100%
    where the truth is 0%) after the images were replaced."""
    torch.manual_seed(0)
    m = timm.create_model(MODEL, img_size=32, num_classes=0)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, tmp_path / "w.safetensors")
    rng = np.random.default_rng(0)

    def write(split, n, levels):
        write_brightness_folder(tmp_path / "data", {split: n},
                                tuple(zip(("dark", "light"), levels)), 32, 20, rng)

    write("train", 12, (30, 220))
    write("val", 6, (30, 220))
    args = ["probe", MODEL, "--img-size", "32", "--checkpoint", str(tmp_path / "w.safetensors"),
            "--data", str(tmp_path / "data"), "--out", str(tmp_path / "head.safetensors"),
            "--batch-size", "8", "--no-progress", "--cache", str(tmp_path / "cache"),
            "--json", str(tmp_path / "p.json")]
    assert main(args) == 0
    assert json.loads((tmp_path / "p.json").read_text())["val_accuracy"] == 100.0
    write("val", 6, (220, 30))  # the same names, the classes' pictures swapped
    assert main(args) == 0
    assert json.loads((tmp_path / "p.json").read_text())["val_accuracy"] == 0.0
