"""Schedule files: round trip, the authors' format, validation errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from leanvit.methods.diffrate.authors import read_authors_schedule
from leanvit.methods.diffrate.schedule import (FORMAT, FORMAT_VERSION, Schedule, ScheduleError,
                                               effective_counts, load_schedule, save_schedule)
from tests.conftest import SHARED

AUTHORS = SHARED / "reference" / "diffrate_compression_rate.json"


def make(**kw) -> Schedule:
    d = dict(model="deit_small_patch16_224", img_size=(224, 224), num_tokens=197,
             prefix_tokens=1, prune_kept=[197, 190, 150], merge_kept=[197, 176, 100])
    d.update(kw)
    return Schedule(**d)


def test_round_trip_is_readable_json(tmp_path):
    s = make(gmacs=2.9, obtained={"how": "search", "target_gmacs": 2.9})
    path = save_schedule(s, tmp_path / "sub" / "s.json")
    text = path.read_text()
    d = json.loads(text)
    assert d["format"] == FORMAT and d["format_version"] == FORMAT_VERSION
    assert d["depth"] == 3 and d["prune_kept"] == [197, 190, 150]
    assert '"prune_kept": [197, 190, 150]' in text  # one line per list
    back = load_schedule(path)
    assert back == s and back.obtained == s.obtained
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temp file


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "s.json"
    save_schedule(make(), path)
    before = path.read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("leanvit.methods.diffrate.schedule.os.replace", boom)
    with pytest.raises(OSError):
        save_schedule(make(prune_kept=[197, 180, 150]), path)
    assert path.read_text() == before
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("kw,msg", [
    (dict(merge_kept=[197, 176]), "prune_kept has 3 blocks but merge_kept has 2"),
    (dict(prune_kept=[198, 190, 150]), r"prune_kept\[0\] = 198 is outside \[2, 197\]"),
    (dict(merge_kept=[197, 176, 1]), r"merge_kept\[2\] = 1 is outside"),
    (dict(prune_kept=[197, 190, 180]), r"counts increase: prune_kept\[2\] = 180 > merge_kept\[1\]"),
    (dict(merge_kept=[197, 191, 100]), r"counts increase: merge_kept\[1\] = 191"),
    (dict(prune_kept=[197, "190", 150]), r"prune_kept\[1\] must be an int"),
    (dict(img_size=(224,)), "img_size must be"),
    (dict(gmacs=-1.0), "gmacs must be"),
])
def test_invalid_schedules_name_the_problem(kw, msg):
    with pytest.raises(ScheduleError, match=msg):
        make(**kw)


def test_check_model_errors():
    s = make()
    s.check_model(depth=3, num_tokens=197, prefix_tokens=1, img_size=(224, 224))
    with pytest.raises(ScheduleError, match="3 blocks but the model .* has 12"):
        s.check_model(depth=12, num_tokens=197, prefix_tokens=1, model="x")
    with pytest.raises(ScheduleError, match="224x224 images but the model takes 384x384"):
        s.check_model(depth=3, num_tokens=197, prefix_tokens=1, img_size=(384, 384))
    with pytest.raises(ScheduleError, match="197 tokens but the model has 257"):
        s.check_model(depth=3, num_tokens=257, prefix_tokens=1)


@pytest.mark.parametrize("content,msg", [
    ("{oops", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"format": "other"}), "not a leanvit schedule"),
    (json.dumps({"format": FORMAT, "format_version": 99}), "format_version 99"),
    (json.dumps({"format": FORMAT, "format_version": 1, "model": "m"}), "missing field"),
    (json.dumps({"ViT-S-DeiT": {}}), "authors' format"),
])
def test_malformed_files(tmp_path, content, msg):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(ScheduleError, match=msg):
        load_schedule(p)


def test_depth_field_must_match_lists(tmp_path):
    d = make().to_dict()
    d["depth"] = 4
    p = tmp_path / "s.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ScheduleError, match="depth"):
        load_schedule(p)


def test_missing_file():
    with pytest.raises(ScheduleError, match="does not exist"):
        load_schedule("/nonexistent/schedule.json")


def test_effective_counts_running_minimum():
    assert effective_counts([197, 150, 170], [180, 160, 100], 197) == \
        ([197, 150, 150], [180, 150, 100])


def test_authors_format_synthetic(tmp_path):
    p = tmp_path / "rates.json"
    p.write_text(json.dumps({"ViT-S-DeiT": {"2.9": {
        "prune_kept_num": "[197,196,190]", "merge_kept_num": "[197,194,176]"}}}))
    s = read_authors_schedule(p, "ViT-S-DeiT", 2.9)
    assert s.prune_kept == (197, 196, 190) and s.merge_kept == (197, 194, 176)
    assert s.model == "deit_small_patch16_224" and s.obtained["how"] == "authors"
    with pytest.raises(ScheduleError, match="no target"):
        read_authors_schedule(p, "ViT-S-DeiT", "3.3")
    with pytest.raises(ScheduleError, match="no model"):
        read_authors_schedule(p, "ViT-B-DeiT", "2.9")
    p.write_text(json.dumps({"ViT-S-DeiT": {"2.9": {"prune_kept_num": "[197,",
                                                    "merge_kept_num": "[197]"}}}))
    with pytest.raises(ScheduleError, match="prune_kept_num is not a list"):
        read_authors_schedule(p, "ViT-S-DeiT", "2.9")


@pytest.mark.skipif(not AUTHORS.is_file(), reason=f"authors' schedules not found at {AUTHORS}")
def test_reads_every_published_vit_schedule():
    data = json.loads(AUTHORS.read_text())
    n = 0
    for key in ("ViT-T-DeiT", "ViT-S-DeiT", "ViT-B-DeiT", "ViT-B-MAE", "ViT-L-MAE", "ViT-H-MAE"):
        for target in data[key]:
            s = read_authors_schedule(AUTHORS, key, target)
            assert s.depth == len(s.obtained["published_prune_kept"])
            n += 1
    assert n == 28
    with pytest.raises(ScheduleError, match="not a ViT schedule"):
        read_authors_schedule(AUTHORS, "CAFormer-S36", "5.2")


_COEFFS = {"constant": 0.0, "attn_token": 1.0, "attn_pair": 1.0, "mlp_token": 1.0}


@pytest.mark.parametrize("target", [float("nan"), -1.0, 0.0, float("inf")])
def test_fit_handset_refuses_a_target_it_cannot_fit(target):
    """A NaN target compares false with every estimate: the bisection returned a schedule
    fitted to nothing, without a word."""
    from leanvit.methods.diffrate.budget import fit_handset

    with pytest.raises(ValueError, match="target_gmacs must be a positive finite number"):
        fit_handset("merge-uniform", target, 17, 1, 2, _COEFFS)


@pytest.mark.parametrize("kw,msg", [
    (dict(kind="merge-3stage", strength=5.0), r"fraction of tokens each stage keeps, in \[0, 1\]"),
    (dict(first_block=-3), r"first_block must be a block index in 0\.\.3, got -3"),
    (dict(first_block=4), r"first_block must be a block index in 0\.\.3, got 4"),
    (dict(depth=0), "depth must be a positive int"),
])
def test_handset_counts_refuse_options_out_of_range(kw, msg):
    """A 3-stage fraction of 5 was clamped to 1, a negative first block compressed block 0."""
    from leanvit.methods.diffrate.budget import handset_counts

    args = dict(kind="merge-uniform", strength=1.0, num_tokens=17, prefix_tokens=1, depth=4)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        handset_counts(**args)
    assert handset_counts("merge-3stage", 1.0, 17, 1, 4) == ([17] * 4, [17] * 4)
