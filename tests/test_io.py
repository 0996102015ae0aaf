"""leanvit.save / leanvit.load: round trips, the authors' DynamicViT checkpoints, bad files."""
from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch
from safetensors import safe_open

import leanvit
from leanvit.methods.dynamicvit import _AUTHORS_NAMES


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(depth=4, img_size=64, patch_size=8, embed_dim=64, num_heads=4, num_classes=10)
    cfg.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **cfg).eval()


def _images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def _patched(seed=0):
    m = leanvit.patch(_tiny(seed), "dynamicvit", keep_rate=0.6, locations=[1, 3])
    with torch.no_grad():  # learned-looking predictors (not the fresh initialisation)
        for p in m.leanvit.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


def test_round_trip_restores_method_options_and_predictors(tmp_path):
    src = _patched()
    path = leanvit.save(src, tmp_path / "dv.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "leanvit" and meta["method"] == "dynamicvit"
    assert meta["leanvit_version"] == leanvit.__version__
    assert json.loads(meta["options"]) == {"keep_rate": 0.6, "locations": [1, 3], "tau": 1.0}
    assert keys == {"leanvit." + k for k in src.leanvit.state_dict()}  # method state only
    dst = leanvit.load(_tiny(), path)  # same backbone weights (seed 0), fresh model
    assert leanvit.patched_method(dst) == ("dynamicvit", src.leanvit.options)
    assert not dst.leanvit.training  # follows the model's eval mode
    for (k, a), (_, b) in zip(src.leanvit.state_dict().items(), dst.leanvit.state_dict().items()):
        assert torch.equal(a, b), k
    x = _images()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_backbone_is_stored_on_request(tmp_path):
    src = _patched(seed=0)
    path = leanvit.save(src, tmp_path / "full.safetensors", backbone=True)
    dst = leanvit.load(_tiny(seed=1), path)  # other weights: replaced by the stored ones
    x = _images()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def test_load_overrides_options(tmp_path):
    path = leanvit.save(_patched(), tmp_path / "dv.safetensors")
    dst = leanvit.load(_tiny(), path, keep_rate=0.5)
    assert dst.leanvit.options.keep_rate == 0.5 and dst.leanvit.options.locations == (1, 3)


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "dv.safetensors"
    leanvit.save(_patched(), path)
    leanvit.save(_patched(seed=2), path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dv.safetensors"]


def _authors_checkpoint(model, path):
    """What the authors' training script saves: their names, a dict with args."""
    inv = {v: k for k, v in _AUTHORS_NAMES.items()}
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("leanvit.predictor."):
            _, _, s, mod, leaf = k.split(".")
            sd[f"score_predictor.{s}.{inv[mod]}.{leaf}"] = v.clone()
        else:
            sd[k] = v.clone()
    torch.save({"model": sd, "epoch": 29, "args": argparse.Namespace(base_rate=0.7)}, path)


def test_reads_the_authors_checkpoints(tmp_path):
    src3 = leanvit.patch(_tiny(seed=0), "dynamicvit", keep_rate=0.7, locations=(1, 2, 3))
    with torch.no_grad():
        for p in src3.leanvit.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    path = tmp_path / "dynamic-vit_64_r0.7.pth"
    _authors_checkpoint(src3, path)
    # three predictors: their default locations (3, 6, 9) do not fit a 4-block model
    with pytest.raises(ValueError, match="outside"):
        leanvit.load(_tiny(seed=1), path)
    dst = leanvit.load(_tiny(seed=1), path, locations=(1, 2, 3))  # rate from the file name
    assert dst.leanvit.options.keep_rate == 0.7
    x = _images()
    with torch.no_grad():
        assert torch.equal(src3(x), dst(x))  # backbone and predictors both came from the file
    # without a rate in the name, the error says what to pass
    plain = tmp_path / "checkpoint.pth"
    _authors_checkpoint(src3, plain)
    with pytest.raises(ValueError, match="keep_rate"):
        leanvit.load(_tiny(), plain, locations=(1, 2, 3))
    assert leanvit.load(_tiny(), plain, locations=(1, 2, 3), keep_rate=0.5)


def test_errors_name_the_problem(tmp_path):
    m = _patched()
    path = leanvit.save(m, tmp_path / "dv.safetensors")
    with pytest.raises(ValueError, match="not patched"):
        leanvit.save(_tiny(), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        leanvit.load(_tiny(), tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="already patched"):
        leanvit.load(m, path)
    # another width: the stored structure does not match
    wide = _tiny(embed_dim=96, num_heads=4)
    with pytest.raises(ValueError, match="embed_dim=64"):
        leanvit.load(wide, path)
    assert not leanvit.is_patched(wide)
    # truncated file
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        leanvit.load(_tiny(), bad)
    # garbage and empty files
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="neither a safetensors file nor a readable torch"):
        leanvit.load(_tiny(), junk)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        leanvit.load(_tiny(), empty)
    # a plain timm state dict is not a method file
    from safetensors.torch import save_file
    foreign = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in _tiny().state_dict().items()}, str(foreign))
    with pytest.raises(ValueError, match="neither a leanvit file"):
        leanvit.load(_tiny(), foreign)
    # a file whose tensors do not fit the method
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    tensors["leanvit.predictor.0.fc1.weight"] = torch.zeros(5, 5)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    broken = tmp_path / "shape.safetensors"
    save_file(tensors, str(broken), metadata=meta)
    model = _tiny()
    with pytest.raises(ValueError, match="wrong shape"):
        leanvit.load(model, broken)
    assert not leanvit.is_patched(model)  # left as it was
