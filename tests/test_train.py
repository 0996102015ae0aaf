"""The trainer: exact resume after a mid-epoch stop, and DDP (2 processes, gloo, CPU) equal to
one process with the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from leanvit.train import TrainConfig, _epoch_batches, lr_at, train

REPO = Path(__file__).resolve().parents[1]
MODEL_KW = {"depth": 2, "patch_size": 8, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny ImageFolder: 2 classes, 12 + 2 images each, 32x32 px, class-dependent colour."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 2)):
        for c, name in enumerate(("ants", "bees")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 255, (32, 32, 3)).astype(np.float32)
                img[..., c] = 0.5 * img[..., c] + 127
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i}.png")
    return root


def _cfg(folder, out, **kw):
    base = dict(model="vit_tiny_patch16_224", img_size=32, model_kwargs=MODEL_KW,
                data=str(folder), output=str(out), method="dynamicvit",
                options={"locations": (1,), "keep_rate": 0.5}, epochs=2, batch_size=8,
                workers=0, progress=False, log_every=1, lr=1e-3, freeze_backbone_epochs=1,
                warmup_epochs=0.5)
    base.update(kw)
    return TrainConfig(**base)


def _weights(path):
    return load_file(str(path))


def test_resumed_run_equals_uninterrupted_run(folder, tmp_path):
    torch.set_num_threads(1)
    full = train(_cfg(folder, tmp_path / "full", ema=True, ema_decay=0.9))
    assert full["global_step"] == 6 and not full["stopped_early"]
    # "killed" after 2 steps of epoch 0 (a checkpoint is written mid-epoch), then resumed
    part = train(_cfg(folder, tmp_path / "cut", ema=True, ema_decay=0.9, max_steps=2))
    assert part["stopped_early"] and part["global_step"] == 2
    ck = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert (ck["epoch"], ck["step"]) == (0, 2)
    rest = train(_cfg(folder, tmp_path / "cut", ema=True, ema_decay=0.9, resume="auto"))
    assert rest["global_step"] == 6
    a = _weights(tmp_path / "full" / "final.safetensors")
    b = _weights(tmp_path / "cut" / "final.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("leanvit.predictor") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea = _weights(tmp_path / "full" / "final_ema.safetensors")
    eb = _weights(tmp_path / "cut" / "final_ema.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_recipe_groups_freeze_and_never_update(folder, tmp_path):
    torch.set_num_threads(1)
    from leanvit.models import create_model
    torch.manual_seed(0)
    start = create_model("vit_tiny_patch16_224", img_size=32, num_classes=2, **MODEL_KW)
    train(_cfg(folder, tmp_path / "one", epochs=1, max_steps=2, mixup=0.0, cutmix=0.0))
    ck = torch.load(tmp_path / "one" / "last.pt", weights_only=False)["model"]
    for name, p in start.state_dict().items():  # epoch 0: backbone frozen (lr 0)
        assert torch.equal(ck[name], p), name
    full = train(_cfg(folder, tmp_path / "two", epochs=2))
    w = _weights(full["weights"])
    assert torch.equal(w["cls_token"], start.cls_token.detach())
    assert torch.equal(w["pos_embed"], start.pos_embed.detach())
    assert not torch.equal(w["blocks.0.attn.qkv.weight"], start.blocks[0].attn.qkv.weight)


def test_batches_split_one_global_batch_across_ranks():
    one = _epoch_batches(40, 3, 0, 8, 1, 0)
    two = [_epoch_batches(40, 3, 0, 8, 2, r) for r in range(2)]
    assert len(one) == 5
    for t in range(5):
        assert two[0][t] + two[1][t] == one[t]


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(data="x", epochs=10, warmup_epochs=2, min_lr=1e-5)
    assert lr_at(1.0, cfg, 1e-3) == pytest.approx(5e-4)
    assert lr_at(2.0, cfg, 1e-3) == pytest.approx(1e-3)
    assert lr_at(6.0, cfg, 1e-3) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr_at(10.0, cfg, 1e-3) == pytest.approx(1e-5)


def test_bad_configs_are_rejected(folder, tmp_path):
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(data="x", amp="fp8")
    with pytest.raises(ValueError, match="even"):
        TrainConfig(data="x", batch_size=3)
    with pytest.raises(ValueError, match="loss weight"):
        TrainConfig(data="x", loss={"ratio": -1.0})
    with pytest.raises(ValueError, match="no train/ folder"):
        train(_cfg(tmp_path, tmp_path / "o"))


def test_ddp_two_processes_match_one(folder, tmp_path):
    """2 processes x 4 images (gloo, CPU) against 1 process x 8: the same global batches.
    Deterministic method ("none": no Gumbel noise) and no mixup (it pairs images within each
    process's batch); tolerance 1e-5 (reduction order of the gradient all-reduce)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    common = ["vit_tiny_patch16_224", "--img-size", "32", "--data", str(folder), "--method",
              "none", "--epochs", "1", "--workers", "0", "--no-progress", "--lr", "1e-3",
              "--cfg", f"model_kwargs={MODEL_KW!r}", "--cfg", "mixup=0.0", "--cfg",
              "cutmix=0.0"]
    torch.set_num_threads(1)
    train(_cfg(folder, tmp_path / "one", method="none", options={}, epochs=1, lr=1e-3,
               mixup=0.0, cutmix=0.0, freeze_backbone_epochs=None, warmup_epochs=0.0))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "leanvit", "train", *common,
                          "--batch-size", "4", "--output", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = _weights(tmp_path / "one" / "final.safetensors")
    b = _weights(tmp_path / "two" / "final.safetensors")
    moved = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"max |1 process - 2 processes| = {moved:.3g}")
    assert moved <= 1e-5
    log = (tmp_path / "two" / "log.jsonl").read_text()
    assert '"rank_count": 2' in log


def test_keep_rate_warmup_hook(temp_method):
    """EViT-style warm-up: keep_rate follows a cosine from 1 to the target; methods without
    learned parameters get a rebuilt reducer, learned ones keep their modules."""
    import dataclasses as dc

    import timm

    import leanvit
    from leanvit.registry import Method, Reducer
    from leanvit.train import _keep_rate_at, _set_keep_rate

    cfg = TrainConfig(data="x", keep_rate_warmup_epochs=4)
    assert _keep_rate_at(0.0, cfg, 0.7) == pytest.approx(1.0)
    assert _keep_rate_at(2.0, cfg, 0.7) == pytest.approx(0.85)
    assert _keep_rate_at(4.0, cfg, 0.7) == 0.7

    @dc.dataclass(frozen=True)
    class Opts:
        keep_rate: float = 0.7

    temp_method(Method("kr_test", Opts, lambda o, i: Reducer(o, i)))
    model = leanvit.patch(timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32,
                                            patch_size=8), "kr_test")
    _set_keep_rate(model, 0.9)
    assert model.leanvit.options.keep_rate == 0.9 and leanvit.patched_method(model)[0] == "kr_test"
    model = leanvit.patch(timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32,
                                            patch_size=8), "dynamicvit", locations=(1,))
    predictor = model.leanvit.predictor
    _set_keep_rate(model, 0.9)
    assert model.leanvit.predictor is predictor and model.leanvit.keep_targets() == [0.9]


def test_cli_errors_are_one_line(tmp_path, capsys):
    from leanvit.cli import main

    assert main(["train", "vit_tiny_patch16_224", "--data", str(tmp_path)]) == 2
    assert "no train/ folder" in capsys.readouterr().err
    assert main(["train", "vit_tiny_patch16_224", "--data", str(tmp_path), "--cfg",
                 "nonsense=1"]) == 2
    assert "unknown --cfg key" in capsys.readouterr().err


def test_worker_count_does_not_change_the_run(folder, tmp_path):
    """Augmentation is seeded per (seed, epoch, image): 0 or 2 loader workers, same weights."""
    torch.set_num_threads(1)
    a = train(_cfg(folder, tmp_path / "w0", epochs=1, workers=0, freeze_backbone_epochs=0))
    b = train(_cfg(folder, tmp_path / "w2", epochs=1, workers=2, freeze_backbone_epochs=0))
    wa, wb = _weights(a["weights"]), _weights(b["weights"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_trains_dynamicvit_on_convnext_with_its_loss(folder, tmp_path):
    """ConvNeXt through the same trainer: the authors' hierarchical loss weights by default
    (ratio 10), the token term over every position, decisions of three predictors; the saved
    file loads into a fresh model."""
    import json

    import leanvit
    from leanvit.models import create_model

    torch.set_num_threads(1)
    kw = {"dims": (8, 16, 32, 64), "depths": (1, 1, 4, 1), "conv_mlp": False}
    cfg = _cfg(folder, tmp_path / "cnx", model="convnext_atto", model_kwargs=kw, img_size=32,
               options={"keep_rate": 0.7}, epochs=1, freeze_backbone_epochs=0)
    out = train(cfg)
    assert out["global_step"] == 3
    steps = [json.loads(line) for line in (tmp_path / "cnx" / "log.jsonl").read_text().splitlines()
             if '"event": "step"' in line]
    for s in steps:
        assert {"loss_cls", "loss_ratio", "loss_distill", "loss_token"} <= set(s)
        total = s["loss_cls"] + 10 * s["loss_ratio"] + 0.5 * (s["loss_distill"] + s["loss_token"])
        assert s["loss"] == pytest.approx(total, rel=1e-5)
    model = create_model("convnext_atto", img_size=32, num_classes=2, **kw)
    leanvit.load(model, out["weights"])
    assert model.leanvit.keep_targets() == pytest.approx([0.7, 0.5, 0.3])


def test_compact_option_trains_a_compacted_model_and_resumes_exactly(folder, tmp_path):
    """``compact=``: hMHSA + cFFN on the created model (calibrated on training images), then
    method ``none``; the final file reloads onto a plain model; a resumed run is exact."""
    torch.set_num_threads(1)
    import leanvit
    from leanvit.models import create_model

    kw = dict(method="none", options={}, compact={"hallucination": "mix"}, compact_images=4,
              mixup=0.0, cutmix=0.0, loss={"cls": 0.0, "distill": 1.0, "feature": 1.0},
              epochs=2, freeze_backbone_epochs=0)
    full = train(_cfg(folder, tmp_path / "full", **kw))
    part = train(_cfg(folder, tmp_path / "cut", max_steps=2, **kw))
    assert part["stopped_early"]
    train(_cfg(folder, tmp_path / "cut", resume="auto", **kw))
    a, b = _weights(full["weights"]), _weights(tmp_path / "cut" / "final.safetensors")
    assert a.keys() == b.keys() and "blocks.0.mlp.fc2.first.branches.1.0.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [__import__("json").loads(line) for line in open(tmp_path / "full" / "log.jsonl")]
    steps = [r for r in log if r["event"] == "step"]
    assert {"loss_distill", "loss_feature"} <= set(steps[0]) and "loss_cls" in steps[0]
    plain = create_model("vit_tiny_patch16_224", img_size=32, num_classes=2, **MODEL_KW).eval()
    model = leanvit.load(plain, full["weights"])
    assert leanvit.compaction_spec(model)["hallucination"] == "mix"


def test_a_prebuilt_model_and_teacher_with_a_frozen_head(folder, tmp_path):
    torch.set_num_threads(1)
    import copy

    import leanvit
    from leanvit.models import create_model

    torch.manual_seed(0)
    teacher = create_model("vit_tiny_patch16_224", img_size=32, num_classes=2, **MODEL_KW)
    student = leanvit.compact(copy.deepcopy(teacher))
    student.head.requires_grad_(False)  # a fixed probe
    head, t_state = student.head.weight.clone(), copy.deepcopy(teacher.state_dict())
    qkv = student.blocks[0].attn.qkv.weight.clone()
    out = train(_cfg(folder, tmp_path / "pre", method="none", options={}, mixup=0.0,
                     cutmix=0.0, epochs=1, freeze_backbone_epochs=0,
                     loss={"cls": 0.0, "distill": 1.0, "feature": 1.0}),
                model=student, teacher=teacher)
    assert out["global_step"] == 3
    assert torch.equal(student.head.weight, head)  # frozen parameters stay
    assert not torch.equal(student.blocks[0].attn.qkv.weight, qkv)  # the rest trains
    assert all(torch.equal(v, t_state[k]) for k, v in teacher.state_dict().items())
    with pytest.raises(ValueError, match="model is patched"):
        train(_cfg(folder, tmp_path / "bad", method="none", options={}),
              model=leanvit.patch(create_model("vit_tiny_patch16_224", img_size=32,
                                               num_classes=2, **MODEL_KW), "none"))


def test_crop_scale_reaches_the_training_transform(folder, tmp_path):
    from leanvit.models import create_model
    from leanvit.train import _datasets

    model = create_model("vit_tiny_patch16_224", img_size=32, num_classes=2, **MODEL_KW)
    for scale, want in ((None, (0.08, 1.0)), ((0.5, 1.0), (0.5, 1.0))):
        train_set, _, _ = _datasets(_cfg(folder, tmp_path, crop_scale=scale), model)
        crops = [t for t in train_set.folder.transform.transforms
                 if "RandomResizedCrop" in type(t).__name__]  # timm's ...AndInterpolation
        assert len(crops) == 1 and tuple(crops[0].scale) == want
    with pytest.raises(ValueError, match="crop_scale"):
        TrainConfig(data="x", crop_scale=(0.9, 0.5))
