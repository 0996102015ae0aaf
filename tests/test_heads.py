"""Probe heads know the backbone they were fitted to (a fingerprint of its weights) and refuse
another; random-weight models in the CLI are seeded, so probe then eval in another process
sees the same backbone."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import timm
import torch
from torch import nn

import leanvit
from leanvit.heads import (attach_head, backbone_fingerprint, head_metadata, load_head,
                           save_head)
from leanvit.models import create_model
from tests.conftest import write_brightness_folder

MODEL = "deit_tiny_patch16_224"


def _vit(seed=0, depth=2, **kw):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", depth=depth, img_size=32, **kw).eval()


def _reference_fingerprint(model) -> str:
    """Written out: sha256 over (header length, [name, dtype, shape] JSON, bytes) of every
    state-dict tensor outside the classifier and the method, in name order."""
    h = hashlib.sha256()
    for name in sorted(model.state_dict()):
        if name.split(".")[0] in ("head", "head_dist", "fc_norm", "attn_pool", "leanvit"):
            continue
        t = model.state_dict()[name]
        header = json.dumps([name, str(t.dtype)[len("torch."):], list(t.shape)]).encode()
        h.update(len(header).to_bytes(8, "little") + header)
        h.update(t.contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def test_the_fingerprint_depends_on_the_backbone_weights_only():
    a = _vit(num_classes=0)
    fp = backbone_fingerprint(a)
    assert fp == _reference_fingerprint(a) and len(fp) == len("sha256:") + 64
    assert backbone_fingerprint(_vit(num_classes=0)) == fp  # same weights, another object
    other_classifier = _vit(num_classes=0)
    other_classifier.reset_classifier(7)
    assert backbone_fingerprint(other_classifier) == fp
    assert backbone_fingerprint(leanvit.patch(_vit(num_classes=0), "tome", r=1)) == fp
    assert backbone_fingerprint(_vit(seed=1, num_classes=0)) != fp
    b = _vit(num_classes=0)
    with torch.no_grad():
        b.blocks[1].mlp.fc2.weight[0, 0] += 1e-6  # one weight, one ulp-sized change
    assert backbone_fingerprint(b) != fp


def _fitted_head(model, path, **meta):
    head = nn.Linear(2 * model.embed_dim, 3)
    return save_head(head, path, backbone=model, model="vit_tiny_patch16_224", **meta)


def test_a_head_refuses_a_backbone_it_was_not_fitted_to(tmp_path):
    fitted = _vit(num_classes=0)
    path = _fitted_head(fitted, tmp_path / "head.safetensors")
    assert head_metadata(path)["backbone_fingerprint"] == backbone_fingerprint(fitted)
    assert attach_head(_vit(num_classes=0), path).head.out_features == 3  # the same weights
    other = _vit(seed=1)
    short_fitted, short_other = backbone_fingerprint(fitted)[:19], backbone_fingerprint(other)[:19]
    for head in (path, load_head(path)):
        with pytest.raises(ValueError) as e:
            attach_head(other, head)
        msg = str(e.value)
        assert f"was fitted to backbone {short_fitted}, this model is {short_other}" in msg
        assert "check_backbone=False" in msg and "\n" not in msg
    assert isinstance(other.head, nn.Linear) and other.head.out_features == 1000  # unchanged
    assert attach_head(other, path, check_backbone=False).head.out_features == 3
    # creating a model with --head checks it too (the CLI's eval and compare)
    with pytest.raises(ValueError, match="was fitted to backbone"):
        create_model("vit_tiny_patch16_224", depth=2, img_size=32, head=path,
                     checkpoint=_weights(_vit(seed=2), tmp_path / "w.safetensors"))


def _weights(model, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_a_head_without_a_fingerprint_attaches_with_a_warning(tmp_path):
    """Heads written before the fingerprint existed: no record to check."""
    path = save_head(nn.Linear(2 * 192, 2), tmp_path / "old.safetensors", model="x")
    assert "backbone_fingerprint" not in head_metadata(path)
    with pytest.warns(UserWarning, match="records no backbone fingerprint"):
        attach_head(_vit(), path)
    attach_head(_vit(), nn.Linear(2 * 192, 2))  # a head fresh from a fit: nothing to check


def test_probe_then_eval_in_another_process_with_random_weights(tmp_path, capsys):
    """No --checkpoint: every command builds the same seeded random weights, so the head
    fitted by 'probe' gives 'eval' the accuracy 'probe' measured on the same images. The
    global random state is moved between the commands, as another process would have it."""
    from leanvit.cli import main

    data = write_brightness_folder(tmp_path / "data", {"train": 10, "val": 8},
                                   [(f"c{i}", 100 + 12 * i) for i in range(4)], 32, 60,
                                   np.random.default_rng(0))
    head = tmp_path / "head.safetensors"
    args = [MODEL, "--img-size", "32"]
    torch.manual_seed(1234)
    assert main(["probe", *args, "--data", str(data), "--out", str(head), "--batch-size", "8",
                 "--no-progress", "--json", str(tmp_path / "probe.json")]) == 0
    err = capsys.readouterr().err
    assert err.count("random weights") == 1 and "seeded with 0" in err
    probe = json.loads((tmp_path / "probe.json").read_text())
    torch.manual_seed(99)
    torch.rand(1000)
    assert main(["eval", *args, "--head", str(head), "--data", str(data), "--no-progress",
                 "--repeats", "1", "--json", str(tmp_path / "eval.json")]) == 0
    assert capsys.readouterr().err.count("random weights") == 1
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["images"] == 8 * 4
    assert result["top1"] == probe["val_accuracy"]
    # and the head names the backbone both commands built
    with pytest.warns(UserWarning, match="random weights"):
        built = create_model(MODEL, img_size=32, num_classes=0)
    assert head_metadata(head)["backbone_fingerprint"] == backbone_fingerprint(built)


def test_compare_dense_refuses_a_dense_head_of_another_backbone(tmp_path, capsys):
    from leanvit.cli import main

    fitted = _vit(depth=12, num_classes=0)  # the command line builds the full depth
    head = save_head(nn.Linear(fitted.embed_dim, 2), tmp_path / "dense.safetensors",
                     backbone=fitted, dense=True, threshold=0.2, width=fitted.embed_dim)
    other = _weights(_vit(seed=3, depth=12, num_classes=0), tmp_path / "other.safetensors")
    assert main(["compare", "vit_tiny_patch16_224", "--img-size", "32", "--checkpoint",
                 str(other), "--dense", "--head", str(head), "--data", str(tmp_path / "data"),
                 "--methods", "none", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"dense head {head} was fitted to backbone" in err
    assert "check_backbone" not in err  # no Python-only hint on the command line
