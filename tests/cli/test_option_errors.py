"""Options that gave a silently wrong result or an unclear error: each is now a one-line error
naming the option and what it must be (argparse's exit status 2)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from leanvit.cli import main
from tests.conftest import write_brightness_folder

MODEL = "deit_tiny_patch16_224"


def _argparse_error(argv, capsys) -> str:
    """The error line of an argparse refusal (exit status 2)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv,message", [
    # printed "baseline nan GMACs" and wrote NaN into the JSON
    (["macs", MODEL, "--batch-size", "0"],
     "argument --batch-size: must be an integer >= 1, got 0"),
    # a traceback (negative tensor dimension)
    (["macs", MODEL, "--batch-size", "-3"],
     "argument --batch-size: must be an integer >= 1, got -3"),
    # meant a headless model without a word
    (["macs", MODEL, "--num-classes", "-1"],
     "argument --num-classes: must be an integer >= 0, got -1"),
    # skipped the warm-up
    (["bench", MODEL, "--warmup", "-1"], "argument --warmup: must be an integer >= 0, got -1"),
    # "no median for empty data"
    (["eval", MODEL, "--data", "d", "--repeats", "0"],
     "argument --repeats: must be an integer >= 1, got 0"),
    (["bench", MODEL, "--batch-size", "abc"],
     "argument --batch-size: must be an integer >= 1, got 'abc'"),
    (["probe", MODEL, "--data", "d", "--out", "h.safetensors", "--dense", "--threshold", "1.5"],
     "argument --threshold: must be a number in [0, 1), got 1.5"),
    (["train", MODEL, "--data", "d", "--lr", "nan"],
     "argument --lr: must be a number > 0, got nan"),
])
def test_numeric_options_name_their_range(argv, message, capsys):
    assert _argparse_error(argv, capsys).endswith(message)


def test_macs_of_a_token_method_on_convnext_names_the_method_not_a_variant(capsys):
    """The plain model is counted first; the method's family check must come before it (it
    used to fail on a ConvNeXt variant detail, conv_mlp=True)."""
    assert main(["macs", "convnext_atto", "--img-size", "64", "--method", "tome"]) == 2
    err = capsys.readouterr().err
    assert "needs a flat-token model" in err and "conv_mlp" not in err


def test_a_misspelled_model_gets_a_suggestion(capsys):
    assert main(["macs", "deit_smal_patch16_224"]) == 2
    err = capsys.readouterr().err
    assert "unknown timm model 'deit_smal_patch16_224'; did you mean deit_small_patch16_224" in err
    img = os.devnull  # viz: the other positional is a path
    assert main(["viz", img, "vit_tiny_patch16_224x", "--out", "/nonexistent/v.png"]) == 2
    assert "did you mean vit_tiny_patch16_224" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- train --cfg

@pytest.mark.parametrize("cfg,message", [
    ("mixup=-1", "--cfg mixup must be a number >= 0, got -1"),  # turned mixup off silently
    ("mixup=abc", "--cfg mixup='abc': must be of type float"),  # TypeError about '>'
    ("smoothing=1.5", "--cfg smoothing must be a number in [0, 1), got 1.5"),
    ("ema_decay=2", "--cfg ema_decay must be a number in [0, 1], got 2"),
    ("eval_every=-1", "--cfg eval_every must be an integer >= 0, got -1"),
    ("epochs=2.5", "--cfg epochs=2.5: must be of type int"),
    ("distill=1", "--cfg distill=1: must be of type bool"),
    ("crop_scale=0.5", "--cfg crop_scale=0.5: must be of type Optional[tuple]"),
    ("output=elsewhere", "--cfg output: give it as --output"),
])
def test_train_cfg_values_are_checked_by_type_and_range(cfg, message, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    assert main(["train", MODEL, "--data", str(tmp_path / "d"), "--output",
                 str(tmp_path / "o"), "--cfg", cfg]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(message) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ probe

@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe-w")
    torch.manual_seed(0)
    m = timm.create_model(MODEL, img_size=32, num_classes=0)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, root / "w.safetensors")
    return root / "w.safetensors"


def _probe(weights, data, out, *extra):
    return ["probe", MODEL, "--img-size", "32", "--checkpoint", str(weights), "--data",
            str(data), "--out", str(out), "--batch-size", "8", "--no-progress", *extra]


def test_probe_threshold_needs_dense(weights, tmp_path, capsys):
    """--threshold without --dense was ignored."""
    write_brightness_folder(tmp_path / "d", {"train": 3, "val": 1}, (("a", 30), ("b", 220)),
                            32, 20, np.random.default_rng(0))
    assert main(_probe(weights, tmp_path / "d", tmp_path / "h.safetensors",
                       "--threshold", "0.3")) == 2
    assert "--threshold is the foreground threshold of a dense probe: add --dense" in \
        capsys.readouterr().err
    assert not (tmp_path / "h.safetensors").exists()


def test_probe_needs_enough_images_of_each_class(weights, tmp_path, capsys):
    """--limit 1 chose the weight decay from NaN held-out accuracies and exited 0."""
    write_brightness_folder(tmp_path / "d", {"train": 4, "val": 1}, (("a", 30), ("b", 220)),
                            32, 20, np.random.default_rng(0))
    assert main(_probe(weights, tmp_path / "d", tmp_path / "h.safetensors", "--limit", "1")) == 2
    err = capsys.readouterr().err
    assert "too few images for a probe" in err and "at least 3 of every class" in err
    assert "--limit" in err and not (tmp_path / "h.safetensors").exists()


def test_probe_needs_two_classes(weights, tmp_path, capsys):
    """One class reported 100 %."""
    write_brightness_folder(tmp_path / "d", {"train": 4, "val": 2}, (("only", 30),), 32, 20,
                            np.random.default_rng(0))
    assert main(_probe(weights, tmp_path / "d", tmp_path / "h.safetensors")) == 2
    assert "a probe needs at least 2 classes" in capsys.readouterr().err


def test_fit_probe_refuses_one_class_and_too_few_features():
    from leanvit.probe import fit_probe, min_per_class

    assert min_per_class(0.2) == 3  # round(0.2 * 3) = 1 held out, 2 fitted
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match="at least 2 classes"):
        fit_probe(x, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"at least 3 feature\(s\) of every class.*class 1: 1"):
        fit_probe(x, torch.tensor([0, 0, 0, 0, 0, 1]))
    with pytest.raises(ValueError, match=r"class 2: 0"):  # a class with no features at all
        fit_probe(x, torch.tensor([0, 0, 0, 1, 1, 1]), num_classes=3)
    # one decay: nothing is held out, one feature per class is enough
    head = fit_probe(x[:2], torch.tensor([0, 1]), weight_decays=(1e-3,))
    assert head.out_features == 2


def test_probe_cache_sees_a_replaced_image_with_the_same_size_and_time(weights, tmp_path,
                                                                       capsys):
    """The cache was keyed on size and modification time: an image replaced by one of the same
    size with its time kept (cp -p, rsync -t) gave the old features (100 % instead of 0 %)."""
    rng = np.random.default_rng(0)
    data = tmp_path / "d"
    for split, n in (("train", 4), ("val", 2)):
        for c, level in (("dark", 30), ("light", 220)):
            (data / split / c).mkdir(parents=True)
            for i in range(n):  # BMP: every 32x32 image has the same number of bytes
                img = np.clip(level + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(data / split / c / f"{i}.bmp")
    args = _probe(weights, data, tmp_path / "h.safetensors", "--cache", str(tmp_path / "c"),
                  "--json", str(tmp_path / "p.json"))
    assert main(args) == 0
    assert json.loads((tmp_path / "p.json").read_text())["val_accuracy"] == 100.0
    val = data / "val"
    stats = {p: os.stat(p) for p in val.rglob("*.bmp")}
    for i in range(2):  # swap the two classes' pictures; sizes equal, times restored
        a, b = val / "dark" / f"{i}.bmp", val / "light" / f"{i}.bmp"
        shutil.copyfile(a, tmp_path / "t.bmp")
        shutil.copyfile(b, a)
        shutil.copyfile(tmp_path / "t.bmp", b)
    for p, st in stats.items():
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(p).st_size == st.st_size and os.stat(p).st_mtime_ns == st.st_mtime_ns
    assert main(args) == 0
    assert json.loads((tmp_path / "p.json").read_text())["val_accuracy"] == 0.0


# ------------------------------------------------------------------------------------- tune

@pytest.mark.parametrize("search,message", [
    # a typo dropped the DiffRate search and exited 0
    ("epoch=2", "--search: unknown DiffRate search option 'epoch' (did you mean epochs?); valid:"),
    # blamed the budget
    ("epochs=abc", "--search: epochs='abc' is not of the option's type int"),
])
def test_tune_search_options_are_checked(search, message, tmp_path, capsys):
    assert main(["tune", MODEL, "--img-size", "32", "--data", str(tmp_path), "--budget-gmacs",
                 "0.01", "--out", str(tmp_path / "o"), "--search", search]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_tune_search_option_errors_in_the_library():
    from leanvit.tune import check_search_options, search_option_types

    assert "epochs" in search_option_types() and "progress" not in search_option_types()
    assert check_search_options({"epochs": 2, "lr": None, "tolerance": 1}) == \
        {"epochs": 2, "lr": None, "tolerance": 1}
    with pytest.raises(ValueError, match="search_options: unknown DiffRate search option 'epocs'"):
        check_search_options({"epocs": 2})
    with pytest.raises(ValueError, match="unknown DiffRate search option 'progress'"):
        check_search_options({"progress": False})  # tune sets it itself


def test_tune_blames_an_out_of_range_search_option_not_the_budget():
    """A search option the search refuses (epochs=0) was recorded as a failed search, and
    tune then said no setting was within the budget."""
    from leanvit.tune import tune
    from tests.conftest import tiny_vit

    model = tiny_vit(img_size=32, num_classes=2)
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))]
    with pytest.raises(ValueError, match=r"search_options epochs=0: epochs must be"):
        tune(model, batches, 0.005, methods=["diffrate"], search_options={"epochs": 0},
             progress=False, log=None)
