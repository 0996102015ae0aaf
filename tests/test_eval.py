"""``evaluate``: accuracy equals a hand computation; MACs, throughput and compare outputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from leanvit.compare import (Setting, label_offsets, markdown_table, parse_methods, pareto, plot,
                             run_compare)
from leanvit.data import loader
from leanvit.evaluate import check_classes, evaluate, load_split, topk_correct
from tests.conftest import tiny_vit


def make_image_folder(root, classes=("ant", "bee", "cat"), per_class=4, size=40, seed=0):
    """A tiny ImageFolder of random RGB images: ``root/val/<class>/<i>.png``."""
    rng = np.random.default_rng(seed)
    for c in classes:
        d = root / "val" / c
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(d / f"{i}.png")
    return root


def test_eval_accuracy_equals_hand_computation(tmp_path):
    data = make_image_folder(tmp_path)
    model = tiny_vit(num_classes=3)
    cfg = resolve_data_config(model=model)
    tf = create_transform(**{**cfg, "input_size": (3, 64, 64)}, is_training=False)
    correct = 0
    with torch.no_grad():
        for k, c in enumerate(("ant", "bee", "cat")):
            for f in sorted((data / "val" / c).iterdir()):
                x = tf(Image.open(f).convert("RGB"))[None]
                correct += int(model(x).argmax(1).item() == k)
    ds = load_split(model, data, "val")
    r = evaluate(model, loader(ds, batch_size=5), progress=False, repeats=1, warmup=0)
    assert r["images"] == 12 and r["correct1"] == correct
    assert r["top1"] == pytest.approx(100 * correct / 12)
    assert r["top5"] == 100.0  # 3 classes: top-min(5, 3)
    assert r["gmacs"] > 0 and r["images_per_s"] > 0
    # the trainer's form: the model's own forward, no MACs or timing, eval mode restored
    model.train()
    plain = evaluate(model, loader(ds, batch_size=5), progress=False, throughput=False,
                     macs=False)
    assert model.training
    assert plain["correct1"] == correct and plain["images"] == 12
    assert "gmacs" not in plain and "images_per_s" not in plain


def test_topk_correct_counts_by_hand():
    # row 0 ranks 1, 5, 4, 3, 0, 2; row 1 ranks 0, 2, 5, 4, 1, 3
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4], [0.5, 0.1, 0.4, -1.0, 0.2, 0.3]])
    assert topk_correct(logits, torch.tensor([1, 2])) == {1: 1, 5: 2}
    assert topk_correct(logits, torch.tensor([2, 3])) == {1: 0, 5: 0}
    assert topk_correct(logits, torch.tensor([0, 0])) == {1: 1, 5: 2}


def test_wrong_number_of_classes_and_headless_models_are_clear_errors():
    with pytest.raises(ValueError, match="outputs 3 classes but the data has 2"):
        check_classes(tiny_vit(num_classes=3), ["a", "b"])
    with pytest.raises(ValueError, match="headless"):
        check_classes(tiny_vit(num_classes=0), ["a", "b"])


def test_parse_methods_reads_settings():
    s = parse_methods("none; evit keep_rate=0.7 'locations=(3, 6, 9)'\n tome r=13 prop_attn=False;")
    assert [x.method for x in s] == ["none", "evit", "tome"]
    assert s[1].options == {"keep_rate": 0.7, "locations": (3, 6, 9)}
    assert s[2].options == {"r": 13, "prop_attn": False}
    assert s[1].label == "evit keep_rate=0.7 locations=(3,6,9)"
    d = parse_methods("dynamicvit load=runs/dvit.safetensors")[0]
    assert d.load == "runs/dvit.safetensors" and d.options == {}
    with pytest.raises(ValueError, match="no method"):
        parse_methods(" ; ")
    with pytest.raises(ValueError, match="key=value"):
        parse_methods("tome 13")


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    pts = [tuple(map(float, p)) for p in rng.integers(0, 6, (25, 2))]
    for lower in (True, False):
        brute = []
        for i, (x, y) in enumerate(pts):
            beaten = any((xj <= x if lower else xj >= x) and yj >= y and (xj, yj) != (x, y)
                         for xj, yj in pts)
            if not beaten:
                brute.append(i)
        assert sorted(pareto(pts, lower)) == brute


def test_compare_rows_table_and_plot(tmp_path, temp_method):
    data = make_image_folder(tmp_path, per_class=2)
    model = tiny_vit(num_classes=3)
    ds = load_split(model, data, "val")
    rows = run_compare(model, [Setting("none")], loader(ds, 6), progress=False, repeats=1,
                       warmup=0)
    assert len(rows) == 1 and rows[0]["speedup"] == 1.0 and rows[0]["listed"]
    rows = run_compare(model, [], loader(ds, 6),  # none is added as the baseline
                       progress=False, repeats=1, warmup=0)
    assert [r["method"] for r in rows] == ["none"] and not rows[0]["listed"]
    with pytest.raises(ValueError, match="unknown method"):
        run_compare(model, [Setting("nosuch")], loader(ds, 6), progress=False)
    table = markdown_table(rows)
    assert "| none | (defaults) |" in table and "speedup" in table
    png = plot(rows * 2, tmp_path / "p.png", title="t")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_point_labels_are_placed_without_overlapping_boxes():
    pts = [(100.0, 100.0), (104.0, 101.0), (400.0, 100.0), (100.0, 99.0)]
    texts = ["keep_rate=0.7", "r=16", "far away", "max_tokens=128"]
    off = label_offsets(pts, texts, fontsize=7.0)
    assert off[0] == (5.0, 4.0) and off[2] == (5.0, 4.0)  # no neighbour: the default
    boxes = [(x + 5, y + dy, x + 5 + 4.2 * len(t), y + dy + 8.4)
             for (x, y), t, (_, dy) in zip(pts, texts, off)]
    for i in range(len(boxes)):
        for j in range(i):
            a, b = boxes[i], boxes[j]
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (i, j)
