"""A local Hugging Face folder (``save_pretrained`` output) wherever a model name goes:
``leanvit bench`` / ``macs`` / ``compare`` on it, ``create_model`` loading it, clear errors;
and ``compare`` / ``tune`` on a transformers classifier in Python."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import leanvit
from leanvit.cli import main
from leanvit.models import create_model, is_hf_folder
from tests.conftest import write_brightness_folder

T = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
               patch_size=8)
    T.Dinov2Model(T.Dinov2Config(**cfg)).save_pretrained(root / "dino")
    T.ViTForImageClassification(T.ViTConfig(**cfg, intermediate_size=128, num_labels=2)
                                ).save_pretrained(root / "vit")
    write_brightness_folder(root / "data", {"train": 4, "val": 4},
                            (("dark", 30), ("light", 220)), 32, 20, np.random.default_rng(0))
    return root


def test_create_model_loads_the_saved_class(folders):
    assert is_hf_folder(folders / "dino") and not is_hf_folder(folders / "data")
    model = create_model(str(folders / "vit"))
    assert type(model).__name__ == "ViTForImageClassification" and not model.training
    with pytest.raises(ValueError, match="Hugging Face folder: checkpoint"):
        create_model(str(folders / "vit"), checkpoint="x.safetensors")
    with pytest.raises(ValueError, match="image_size=32"):
        create_model(str(folders / "vit"), img_size=64)


def test_bench_and_macs_take_a_folder(folders, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(folders / "dino"), "--method", "tome", "--set", "r=2",
                 "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--no-memory",
                 "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["config"]["img_size"] == [32, 32] and row["mac_ratio"] > 1
    assert main(["macs", str(folders / "vit"), "--method", "tome", "--set", "r=2"]) == 0
    assert "tome" in capsys.readouterr().out


def test_compare_takes_a_folder(folders, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", str(folders / "vit"), "--data", str(folders / "data"),
                 "--methods", "tome r=2", "--batch-size", "4", "--repeats", "1",
                 "--no-progress", "--out", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert "| none |" in text and "| tome | r=2 |" in text


def test_tune_on_a_transformers_classifier(folders, tmp_path):
    model = create_model(str(folders / "vit"))
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))]
    result = leanvit.tune(model, batches, {"gmacs": 1.0}, methods=["tome"], repeats=1,
                          progress=False, log=None)
    assert result.rows and type(model).__name__ == "ViTForImageClassification"
