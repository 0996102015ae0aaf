"""The trainer's hard edges (issue 13): a resumed run must be the same run, checkpoints that are
not training checkpoints, disk full, a read-only output folder, stale temporary files."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from leanvit.train import RESUME_MAY_CHANGE, TrainConfig, default_workers, train

MODEL_KW = {"depth": 2, "patch_size": 8, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for c in ("ants", "bees"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                    d / f"{i}.png")
    return root


def _cfg(folder, out, **kw):
    base = dict(model="vit_tiny_patch16_224", img_size=32, model_kwargs=MODEL_KW,
                data=str(folder), output=str(out), method="none", epochs=2, batch_size=4,
                workers=0, progress=False, lr=1e-3, distill=False, mixup=0.0, cutmix=0.0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def stopped_run(folder, tmp_path_factory):
    """A run stopped after 1 step: OUTPUT/last.pt to resume from."""
    out = tmp_path_factory.mktemp("run")
    s = train(_cfg(folder, out, max_steps=1))
    assert s["stopped_early"]
    return out


@pytest.mark.parametrize("change,shown", [
    (dict(batch_size=2), "batch_size 4 -> 2"),
    (dict(lr=2e-3), "lr 0.001 -> 0.002"),
    (dict(seed=1), "seed 0 -> 1"),
    (dict(method="topk", options={"keep_rate": 0.5}), "method 'none' -> 'topk'"),
    (dict(model_kwargs={**MODEL_KW, "embed_dim": 64}), "model_kwargs"),
])
def test_resume_refuses_a_changed_config_listing_the_differences(folder, stopped_run, change,
                                                                 shown):
    """Issue 13.3: batch 8 -> 4 on resume trained some images of an epoch twice, silently."""
    with pytest.raises(ValueError, match="config differs") as e:
        train(_cfg(folder, stopped_run, resume="auto", **change))
    assert shown in str(e.value) and "\n" not in str(e.value)


def test_resume_allows_harmless_changes_only_when_asked(folder, stopped_run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(stopped_run, out)
    with pytest.raises(ValueError, match="--allow-change workers"):
        train(_cfg(folder, out, resume="auto", workers=1))
    s = train(_cfg(folder, out, resume="auto", workers=1, allow_changes=("workers",)))
    assert not s["stopped_early"] and s["global_step"] == 8
    with pytest.raises(ValueError, match="cannot change in a resumed run"):
        _cfg(folder, out, allow_changes=("lr",))


def test_resume_with_another_model_is_a_one_line_error(folder, stopped_run):
    import timm

    other = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=2,
                              **{**MODEL_KW, "embed_dim": 64})
    with pytest.raises(ValueError, match="model differs") as e:
        train(_cfg(folder, stopped_run, resume="auto"), model=other)
    assert "\n" not in str(e.value)


def test_resume_from_final_weights_says_what_to_do(folder, tmp_path):
    out = tmp_path / "done"
    s = train(_cfg(folder, out, epochs=1))
    with pytest.raises(ValueError, match="not a training checkpoint.*--checkpoint"):
        train(_cfg(folder, out, epochs=1, resume=s["weights"]))
    torch.save({"weights": 1}, out / "other.pt")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        train(_cfg(folder, out, epochs=1, resume=str(out / "other.pt")))


def test_stale_temporary_checkpoint_files_are_removed_at_start(folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".last.pt.abc123.tmp", out / ".final.safetensors.x.tmp"]
    for f in stale:
        f.write_bytes(b"half a checkpoint")
    train(_cfg(folder, out, epochs=1, max_steps=1))  # stale files alone: still an empty folder
    assert not any(f.exists() for f in stale)
    for f in stale:
        f.write_bytes(b"half a checkpoint")
    keep = out / "notes.tmp"
    keep.write_text("mine")
    train(_cfg(folder, out, epochs=1, max_steps=1, overwrite=True))
    assert not any(f.exists() for f in stale) and keep.exists()


def _files(folder) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_a_new_run_into_a_used_output_folder_is_refused_without_touching_it(folder, tmp_path):
    """A second run into the same output replaced the first run's last.pt and
    final.safetensors and mixed both runs in one log.jsonl."""
    out = tmp_path / "run"
    train(_cfg(folder, out, epochs=1))
    before = _files(out)
    with pytest.raises(ValueError, match=r"output folder .*run is not empty \(final\.safetensors, "
                                         r"last\.pt, log\.jsonl\): continue its run with "
                                         r"--resume auto, start over with --overwrite") as e:
        train(_cfg(folder, out, epochs=1, seed=1))
    assert "\n" not in str(e.value) and _files(out) == before
    # a folder holding anything else is refused too (it is not this run's to fill)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"is not empty \(notes\.txt\)"):
        train(_cfg(folder, other, epochs=1))
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_overwrite_removes_the_previous_runs_files_only(folder, tmp_path):
    out = tmp_path / "run"
    train(_cfg(folder, out, epochs=1))
    first = load_file(str(out / "final.safetensors"))
    (out / "notes.txt").write_text("mine")
    s = train(_cfg(folder, out, epochs=1, seed=1, overwrite=True))
    assert s["weights"] == str(out / "final.safetensors")
    second = load_file(str(out / "final.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)  # another run's weights
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and events.count("end") == 1  # one run's log
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_resume_and_removing_its_own_inputs(folder, tmp_path):
    out = tmp_path / "run"
    train(_cfg(folder, out, epochs=1))
    before = _files(out)
    with pytest.raises(ValueError, match="overwrite and resume exclude each other"):
        train(_cfg(folder, out, epochs=1, overwrite=True, resume="auto"))
    with pytest.raises(ValueError, match=r"overwrite would remove .*final\.safetensors, which "
                                         r"this run reads as its checkpoint"):
        train(_cfg(folder, out, epochs=1, overwrite=True,
                   checkpoint=str(out / "final.safetensors")))
    assert _files(out) == before


def test_cli_train_refuses_a_used_output_unless_told_to_start_over(folder, tmp_path, capsys):
    from leanvit.cli import main

    args = ["train", "vit_tiny_patch16_224", "--img-size", "32", "--data", str(folder),
            "--output", str(tmp_path / "o"), "--method", "none", "--epochs", "1",
            "--batch-size", "4", "--workers", "0", "--no-progress", "--no-distill",
            "--cfg", "mixup=0", "--cfg", "cutmix=0", "--cfg", f"model_kwargs={MODEL_KW}"]
    assert main(args) == 0
    before = _files(tmp_path / "o")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not empty" in err and "--overwrite" in err
    assert _files(tmp_path / "o") == before
    assert main([*args, "--overwrite"]) == 0
    assert capsys.readouterr().out.startswith("finished 1 epoch(s)")
    # the weights of a run are not removed by the run that starts from them
    assert main([*args, "--overwrite", "--checkpoint",
                 str(tmp_path / "o" / "final.safetensors")]) == 2
    assert "does not write over its own input" in capsys.readouterr().err


def test_disk_full_is_a_one_line_error_naming_the_checkpoint(folder, tmp_path, monkeypatch):
    real_save = torch.save

    def save_to_full_disk(obj, f, *a, **k):  # what a full disk does to torch.save
        return real_save(obj, "/dev/full", *a, **k)

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    monkeypatch.setattr(torch, "save", save_to_full_disk)
    with pytest.raises(ValueError, match=r"could not write checkpoint .*last\.pt") as e:
        train(_cfg(folder, tmp_path / "full", epochs=1, max_steps=1))
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "full").glob(".last.pt.*.tmp"))


def test_an_unwritable_output_folder_is_a_one_line_error(folder):
    if os.access("/sys/kernel", os.W_OK) and os.geteuid() != 0:
        pytest.skip("/sys/kernel is writable here")
    with pytest.raises(ValueError, match="output folder /sys/kernel is not writable"):
        train(_cfg(folder, "/sys/kernel", epochs=1))


def test_default_workers_fit_the_machine():
    assert TrainConfig().workers == default_workers() <= len(os.sched_getaffinity(0))


def test_cli_help_and_summary(folder, tmp_path, capsys):
    from leanvit.cli import main
    from leanvit.cli import train as cli_train

    assert cli_train.RESUME_MAY_CHANGE == RESUME_MAY_CHANGE
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default: dynamicvit" in help_text and "default: none" not in help_text
    rc = main(["train", "vit_tiny_patch16_224", "--img-size", "32", "--data", str(folder),
               "--output", str(tmp_path / "o"), "--method", "none", "--epochs", "1",
               "--batch-size", "4", "--workers", "0", "--no-progress", "--no-distill",
               "--cfg", "mixup=0", "--cfg", "cutmix=0", "--cfg", f"model_kwargs={MODEL_KW}"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("finished 1 epoch(s), 4 steps") and "val top-1: last" in out
    assert f"weights: {tmp_path / 'o' / 'final.safetensors'}" in out and "{" not in out


def test_a_bad_data_folder_leaves_no_output_folder(tmp_path, monkeypatch, capsys):
    """The suite left runs/leanvit/ in the checkout: train made its default output folder
    before finding that --data was wrong."""
    from leanvit.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    assert main(["train", "vit_tiny_patch16_224", "--data", "d"]) == 2
    assert "no train/ folder" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_gitignore_covers_the_default_outputs():
    from pathlib import Path

    ignored = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().split()
    assert {"/runs/", "/data/", "/cache/", "/results/"} <= set(ignored)
    assert TrainConfig().output.startswith("runs/")


def test_training_from_a_checkpoint_missing_backbone_tensors_is_refused(folder, tmp_path):
    """Issue 13.1 on the train path: train passes the number of class folders (2), so timm
    loaded non-strictly and trained random blocks with exit 0."""
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("vit_tiny_patch16_224", img_size=32, **MODEL_KW)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("blocks.1.")}
    save_file(sd, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor\(s\): blocks\.1\."):
        train(_cfg(folder, tmp_path / "out", checkpoint=str(tmp_path / "partial.safetensors")))
