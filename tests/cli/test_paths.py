"""No command writes over one of its own inputs, and a path of the wrong kind (a file where a
folder is needed, or the reverse) is named as such before any work is done."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from leanvit.cli import main
from tests.conftest import write_brightness_folder

MODEL = "deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A headless tiny checkpoint, an ImageFolder (train/val, two classes) and an image."""
    root = tmp_path_factory.mktemp("paths")
    torch.manual_seed(0)
    m = timm.create_model(MODEL, img_size=32, num_classes=0)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, root / "w.safetensors")
    write_brightness_folder(root / "data", {"train": 4, "val": 3},
                            (("dark", 30), ("light", 220)), 32, 20, np.random.default_rng(0))
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(root / "photo.png")
    (root / "afile").write_text("not a folder")
    return root


def _snapshot(folder) -> dict:
    """Every file under ``folder``: bytes and modification time (what 'untouched' means)."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _fails(argv, capsys, *needles) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in line, line
    return line


def test_viz_refuses_to_draw_over_its_input_image(setup, capsys):
    before = _snapshot(setup)
    img = str(setup / "photo.png")
    _fails(["viz", img, "vit_tiny_patch16_224", "--img-size", "64", "--out", img], capsys,
           "--out", "is also IMAGE", "does not write over its own input")
    # the same file under another name (a hard link) is the same input
    link = setup / "link.png"
    os.link(setup / "photo.png", link)
    try:
        _fails(["viz", img, "vit_tiny_patch16_224", "--img-size", "64", "--out", str(link)],
               capsys, "is also IMAGE")
    finally:
        link.unlink()
    assert _snapshot(setup) == before


@pytest.mark.parametrize("argv,needle", [
    (["macs", MODEL, "--img-size", "32", "--checkpoint", "{w}", "--json", "{w}"],
     "--json {w} is also --checkpoint"),
    (["bench", MODEL, "--img-size", "32", "--checkpoint", "{w}", "--no-memory", "--json", "{w}"],
     "--json {w} is also --checkpoint"),
    (["eval", MODEL, "--img-size", "32", "--num-classes", "2", "--data", "{root}/data",
      "--json", "{root}/data/val/dark/0.png"], "a file inside --data"),
    (["probe", MODEL, "--img-size", "32", "--checkpoint", "{w}", "--data", "{root}/data",
      "--out", "{w}"], "is also --checkpoint"),
    (["probe", MODEL, "--img-size", "32", "--data", "{root}/data", "--out", "{root}/h.safetensors",
      "--json", "{root}/h.safetensors"], "--json and --out both write"),
    (["search", MODEL, "--img-size", "32", "--checkpoint", "{w}", "--target-gmacs", "0.01",
      "--data", "{root}/data", "--out", "{w}"], "is also --checkpoint"),
    (["compare", MODEL, "--img-size", "32", "--num-classes", "2", "--data", "{root}/data",
      "--methods", "none; tome load={root}/cmp/results.json", "--out", "{root}/cmp"],
     "which is --methods tome load"),
])
def test_outputs_never_replace_inputs(setup, capsys, argv, needle):
    root, w = str(setup), str(setup / "w.safetensors")
    (setup / "cmp").mkdir(exist_ok=True)
    (setup / "cmp" / "results.json").write_text("{}")  # a file a --methods setting reads
    before = _snapshot(setup)
    _fails([a.format(root=root, w=w) for a in argv], capsys,
           needle.format(root=root, w=w))
    assert _snapshot(setup) == before


def test_tune_refuses_an_output_folder_holding_a_setting_it_reads(setup, capsys):
    out = setup / "tuned"
    out.mkdir(exist_ok=True)
    (out / "choice.safetensors").write_bytes(b"saved method state")
    _fails(["tune", MODEL, "--img-size", "32", "--num-classes", "2", "--data",
            str(setup / "data"), "--budget-gmacs", "0.01", "--methods",
            f"none; tome load={out / 'choice.safetensors'}", "--out", str(out)], capsys,
           "would replace", "choice.safetensors")
    assert (out / "choice.safetensors").read_bytes() == b"saved method state"


@pytest.mark.parametrize("argv,needle", [
    # a file where a folder is written: used to be a bare "[Errno 17] File exists"
    (["compare", MODEL, "--num-classes", "2", "--data", "{root}/data", "--methods", "none",
      "--out", "{root}/afile"], "--out {root}/afile is a file; a folder is needed"),
    (["tune", MODEL, "--num-classes", "2", "--data", "{root}/data", "--budget-gmacs", "1",
      "--out", "{root}/afile"], "--out {root}/afile is a file; a folder is needed"),
    (["train", MODEL, "--data", "{root}/data", "--output", "{root}/afile"],
     "--output {root}/afile is a file; a folder is needed"),
    (["probe", MODEL, "--data", "{root}/data", "--out", "{root}/h.safetensors", "--cache",
      "{root}/afile"], "--cache {root}/afile is a file; a folder is needed"),
    (["macs", MODEL, "--json", "{root}/afile/m.json"], "{root}/afile is a file, not a folder"),
    # a folder where a file is expected: used to be called missing
    (["eval", MODEL, "--checkpoint", "{root}/data", "--data", "{root}/data"],
     "--checkpoint {root}/data is a folder; a file is needed"),
    (["eval", MODEL, "--head", "{root}/data", "--data", "{root}/data"],
     "--head {root}/data is a folder; a file is needed"),
    (["viz", "{root}/data", MODEL, "--out", "{root}/v.png"],
     "IMAGE {root}/data is a folder; a file is needed"),
    (["macs", MODEL, "--json", "{root}/data"], "--json {root}/data is a folder; a file is needed"),
    (["search", MODEL, "--target-gmacs", "0.01", "--data", "{root}/data", "--out",
      "{root}/data"], "--out {root}/data is a folder; a file is needed"),
    # a file given as the data folder: used to say "does not exist"
    (["eval", MODEL, "--num-classes", "2", "--data", "{root}/afile"],
     "--data {root}/afile is a file; a folder is needed"),
])
def test_paths_of_the_wrong_kind_are_named(setup, capsys, argv, needle):
    root = str(setup)
    before = _snapshot(setup)
    _fails([a.format(root=root) for a in argv], capsys, needle.format(root=root))
    assert _snapshot(setup) == before


def test_split_dir_says_a_file_is_not_a_folder(setup):
    from leanvit.data import split_dir

    with pytest.raises(ValueError, match="is a file; a folder is needed"):
        split_dir(setup / "afile", "val")
    with pytest.raises(ValueError, match="does not exist"):
        split_dir(setup / "nothing", "val")


def test_probe_refuses_to_replace_a_file_that_is_not_a_head(setup, capsys):
    """``probe --out photo.png`` replaced the image with a head file."""
    args = ["probe", MODEL, "--img-size", "32", "--checkpoint", str(setup / "w.safetensors"),
            "--data", str(setup / "data"), "--no-progress", "--batch-size", "8"]
    before = _snapshot(setup)
    _fails([*args, "--out", str(setup / "photo.png")], capsys,
           "photo.png exists and is not a probe head (not a .safetensors file)")
    # model weights are a safetensors file, but not a head
    save_file({"w": torch.zeros(2)}, setup / "weights.safetensors")
    _fails([*args, "--out", str(setup / "weights.safetensors")], capsys,
           "without a head's metadata")
    (setup / "weights.safetensors").unlink()
    assert _snapshot(setup) == before
    # a head over a head is fine
    head = setup / "head.safetensors"
    assert main([*args, "--out", str(head)]) == 0
    assert main([*args, "--out", str(head), "--json", str(setup / "p.json")]) == 0
    assert json.loads((setup / "p.json").read_text())["head"] == str(head)
