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
    assert json.loads(meta["options_tuples"]) == [["locations"]]
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
    # a consistent file (checksum of its own tensors) that was made for another model
    meta["tensors_sha256"] = leanvit.io.tensors_sha256(tensors)
    save_file(tensors, str(broken), metadata=meta)
    model = _tiny()
    with pytest.raises(ValueError, match="wrong shape"):
        leanvit.load(model, broken)
    assert not leanvit.is_patched(model)  # left as it was


# -- self-contained, checked files ---------------------------------------------------------

def _meta(path):
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def test_replacing_a_file_keeps_its_mode(tmp_path):
    """A private file stays private when save (or any atomic writer) replaces it; a new file
    gets 0666 less the umask, as open() gives."""
    import os
    import stat

    from leanvit._files import atomic_write_text

    path = tmp_path / "dv.safetensors"
    path.write_bytes(b"old")
    os.chmod(path, 0o600)
    leanvit.save(_patched(), path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = tmp_path / "notes.txt"
    text.write_text("old")
    os.chmod(text, 0o640)
    atomic_write_text(text, "new")
    assert stat.S_IMODE(os.stat(text).st_mode) == 0o640 and text.read_text() == "new"
    umask = os.umask(0o022)
    try:
        fresh = leanvit.save(_patched(), tmp_path / "fresh.safetensors")
        assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o644
    finally:
        os.umask(umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dv.safetensors", "fresh.safetensors",
                                                         "notes.txt"]


def _deit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("deit_tiny_patch16_224", depth=3, img_size=64).eval()


def test_a_diffrate_file_embeds_its_schedule(tmp_path):
    """Editing or deleting the schedule file after saving changes nothing in what load
    gives: the file holds the schedule itself."""
    from leanvit.methods.diffrate.schedule import Schedule, save_schedule

    sched = Schedule("deit_tiny_patch16_224", (64, 64), 17, 1, [17, 14, 9], [17, 12, 5])
    json_path = save_schedule(sched, tmp_path / "s.json")
    src = leanvit.patch(_deit(), "diffrate", schedule=str(json_path))
    path = leanvit.save(src, tmp_path / "dr.safetensors")
    stored = json.loads(_meta(path)["options"])["schedule"]
    assert stored["prune_kept"] == [17, 14, 9] and stored["merge_kept"] == [17, 12, 5]
    save_schedule(Schedule("deit_tiny_patch16_224", (64, 64), 17, 1, [17, 17, 17],
                           [17, 17, 17]), json_path)  # edited afterwards
    dst = leanvit.load(_deit(), path)
    assert dst.leanvit.schedule == sched
    json_path.unlink()  # deleted afterwards
    dst = leanvit.load(_deit(), path)
    assert dst.leanvit.schedule == sched
    x = _images()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    # a Schedule object (not JSON by itself) is stored the same way
    path2 = leanvit.save(leanvit.patch(_deit(), "diffrate", schedule=sched),
                         tmp_path / "dr2.safetensors")
    assert leanvit.load(_deit(), path2).leanvit.schedule == sched


def test_an_option_naming_a_file_it_cannot_embed_is_refused(tmp_path, temp_method):
    import dataclasses
    from typing import Any

    from leanvit.registry import Method, Reducer

    @dataclasses.dataclass(frozen=True)
    class _Opts:
        table: Any = None

    temp_method(Method("_filetable", _Opts, lambda o, i: Reducer(o, i)))
    table = tmp_path / "table.txt"
    table.write_text("3 6 9")
    model = leanvit.patch(_tiny(), "_filetable", table=str(table))
    with pytest.raises(ValueError, match="table=.*is a file, whose content"):
        leanvit.save(model, tmp_path / "t.safetensors")
    assert not (tmp_path / "t.safetensors").exists()


@pytest.mark.parametrize("method,options", [
    ("tome", dict(r=(2, -1.0))),  # (r, inflect): a tuple, not a per-block list
    ("tome", dict(r=[2, 1, 0, 1])),  # a per-block list stays a list
    ("evit", dict(keep_rate=0.5, locations=(1, 2))),
    ("diffrate", dict(schedule=((65, 60, 50, 40), (65, 55, 45, 35)))),  # nested tuples
])
def test_options_round_trip_exactly(tmp_path, method, options):
    src = leanvit.patch(_tiny(), method, **options)
    path = leanvit.save(src, tmp_path / "m.safetensors")
    dst = leanvit.load(_tiny(), path)
    assert leanvit.patched_method(dst) == leanvit.patched_method(src)
    for k, v in options.items():
        assert getattr(dst.leanvit.options, k) == v and type(getattr(dst.leanvit.options, k)) \
            is type(v), k
    x = _images()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


def _eva():
    torch.manual_seed(0)
    return timm.create_model("eva02_tiny_patch14_224", depth=2, img_size=56).eval()


def _beit():
    torch.manual_seed(0)
    return timm.create_model("beit_base_patch16_224", depth=2, img_size=64, embed_dim=192,
                             num_heads=3).eval()


def test_the_file_records_its_architecture_and_refuses_another(tmp_path):
    """DynamicViT predictors made on DeiT have the shapes EVA02 and BEiT (same depth, width,
    heads) need, so they loaded without a word; the family and class now tell them apart."""
    deit = timm.create_model("deit_tiny_patch16_224", depth=2, img_size=64).eval()
    src = leanvit.patch(deit, "dynamicvit", keep_rate=0.7, locations=(1,))
    path = leanvit.save(src, tmp_path / "dv.safetensors")
    meta = _meta(path)
    assert meta["architecture"] == "deit_tiny_patch16_224"
    assert meta["model_class"] == "VisionTransformer"
    info = json.loads(meta["model_info"])
    assert info == {"family": "vit", "kind": "tokens", "depth": 2, "embed_dim": 192,
                    "num_heads": 3, "num_prefix_tokens": 1, "num_patches": 16,
                    "patch_size": [16, 16], "grid_size": [4, 4], "stage_depths": [],
                    "stage_dims": []}
    for other, cls in ((_eva(), "Eva"), (_beit(), "Beit")):
        with pytest.raises(ValueError) as e:
            leanvit.load(other, path)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg
        assert "deit_tiny_patch16_224 (VisionTransformer" in msg and f"({cls}," in msg
        assert f"class VisionTransformer in the file, {cls} in this model" in msg
        assert not leanvit.is_patched(other)
    # same class and shapes, another patch size (DINOv2-like 14 px): refused too
    p14 = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=56, patch_size=14)
    with pytest.raises(ValueError, match=r"patch_size=\[16, 16\] in the file, \[14, 14\]"):
        leanvit.load(p14, path)
    # another input size only: a warning, and it loads (the predictors do not depend on it)
    with pytest.warns(UserWarning, match="num_patches=16 in the file, 64 in this model"):
        leanvit.load(timm.create_model("deit_tiny_patch16_224", depth=2, img_size=128), path)


def test_a_file_in_the_old_format_still_loads(tmp_path):
    """What leanvit wrote before the checksum and architecture record: loads, with one
    warning saying what could not be checked."""
    from safetensors.torch import save_file

    src = _patched()
    tensors = {"leanvit." + k: v.contiguous() for k, v in src.leanvit.state_dict().items()}
    meta = {"format": "leanvit", "format_version": "1", "leanvit_version": "0.1.0",
            "method": "dynamicvit",
            "options": json.dumps({"keep_rate": 0.6, "locations": [1, 3], "tau": 1.0}),
            "architecture": "vit_tiny_patch16_224",
            "model_info": json.dumps({"depth": 4, "embed_dim": 64, "num_heads": 4,
                                      "num_prefix_tokens": 1, "num_patches": 64}),
            "backbone": "0"}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    with pytest.warns(UserWarning, match="does not record a tensor checksum, the model class "
                                         "or the model family"):
        dst = leanvit.load(_tiny(), tmp_path / "old.safetensors")
    assert dst.leanvit.options == src.leanvit.options
    x = _images()
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    # its structure is still checked
    with pytest.raises(ValueError, match="embed_dim=64 in the file, 96 in this model"):
        leanvit.load(_tiny(embed_dim=96), tmp_path / "old.safetensors")


def test_corrupted_tensor_bytes_are_refused(tmp_path):
    path = leanvit.save(_patched(), tmp_path / "dv.safetensors", backbone=True)
    assert _meta(path)["tensors_sha256"] == leanvit.io.tensors_sha256(leanvit.io.read(path)[0])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # one bit of the last tensor's data (the header is at the start)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad.safetensors: checksum mismatch: the file is "
                                         "corrupt or was edited"):
        leanvit.load(_tiny(), bad)
