"""Real experiment (issue 8): convert the real DINOv2 ViT-S/14 with hMHSA + cFFN, fine-tune it
briefly by distillation with the shared trainer, and measure linear-probe accuracy at each
stage.

Model: the real DINOv2 ViT-S/14 at 224 px (``<shared>/weights``), headless. Data: Fashion-MNIST
(Debian ``dataset-fashion-mnist``) exported by :func:`leanvit.data.export_fashion_mnist`
(class-balanced, seed 0): ``--train`` images of the official training split (fine-tune data;
the probe is fitted on a fixed ``--probe-train`` subset of them) and ``--val`` images of the
official test split (held out; never trained on). Images go through the model's timm eval
transform (28 px grey -> 224 px RGB, ImageNet mean/std), as ``leanvit probe`` does.

1. Plain model: probe features (class token + mean patch token, :func:`leanvit.probe.features`)
   -> :func:`leanvit.probe.fit_probe` (L-BFGS logistic regression, weight decay chosen on a
   held-out 20 %). This probe is FIXED for the whole experiment ("fixed probe").
2. Conversion: :func:`leanvit.compact` with the best setting on main (``hallucination="mix"``,
   ``ffn_ratio=2/3``, ``branches=2``: fitted mixing beat dwconv on DINOv2 in feature cosine and
   probe accuracy, ``benchmarks/results/compaction_head_similarity.json``,
   ``benchmarks/results/compaction_probe.json``), calibrated on ``--calib`` training images (the first of
   a seeded permutation, not among the probe's). Accuracy right after conversion.
3. Fine-tune: :func:`leanvit.train.train` (the shared trainer) on the converted model with the
   fixed probe attached and FROZEN (:func:`leanvit.probe.attach_head`, head
   ``requires_grad=False``), method ``none`` (no token reduction), teacher = the unconverted
   model with the same probe. Loss (documented choice): ``KL(teacher || student)`` of the probe
   logits (weight 1; the authors' ``batchmean`` KL) + ``feature`` = MSE of all final tokens to
   the teacher's (weight 1; dense, probe-independent: it also serves refitted probes); no
   label cross-entropy (``cls=0``: the goal is to recover the unconverted model, not to fit
   the labels of 1000 images). The trainer's standard timm training transform (random resized
   crop, flip, colour jitter; ``--crop-scale`` narrows the crop areas), no
   RandAugment/mixup/random erasing (short run, small batch).
   AdamW, cosine lr, cFFN BatchNorms in training mode.
4. After the fine-tune: accuracy again, then :func:`leanvit.reparameterize` (deploy form,
   checked to give the same outputs) for GMACs (:func:`leanvit.count_macs`) and parameters.

At each stage both the FIXED probe (fitted once on the plain model's features) and a probe
REFITTED on that stage's own features (same protocol, same images) are evaluated.

    flock /tmp/leanvit-cpu.lock python benchmarks/compaction_finetune.py
    # -> benchmarks/results/compaction_finetune.json
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import DINOV2_MODEL as MODEL, RESULTS, dinov2, write_results
from torch import nn

import leanvit
from leanvit.data import export_fashion_mnist, fixed_subset, image_folder, loader, split_dir
from leanvit.probe import attach_head, extract_features, fit_probe
from leanvit.train import TrainConfig, train


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def accuracy(head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((head(feats).argmax(1) == labels).double().mean())


def _time_step(student: nn.Module, teacher: nn.Module, calib: torch.Tensor, batch: int
               ) -> float:
    """Seconds of one training step's model work (student forward + backward in training
    mode, on a copy; teacher forward), batch ``batch``; the second of two runs."""
    model = copy.deepcopy(student).train()
    x = calib[:batch]
    if len(x) < batch:
        x = x.repeat(-(-batch // len(x)), 1, 1, 1)[:batch]
    took = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        model(x).float().square().mean().backward()
        with torch.no_grad():
            teacher(x)
        took = time.perf_counter() - t0
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=1000, help="fine-tune images (train split)")
    ap.add_argument("--probe-train", type=int, default=500,
                    help="probe-fitting images: a fixed subset of --train")
    ap.add_argument("--val", type=int, default=500, help="held-out images (test split)")
    ap.add_argument("--calib", type=int, default=16, help="conversion calibration images")
    ap.add_argument("--steps", type=int, default=200,
                    help="fine-tune optimizer steps (at most: see --budget-s)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of the whole run: the step count is cut so that "
                         "the fine-tune fits, from a timed student step + teacher forward "
                         "(the steps used are recorded; rerun with --steps N to repeat)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--feature-weight", type=float, default=1.0)
    ap.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                    help="random-resized-crop area range (default: timm's 0.08 1)")
    ap.add_argument("--no-refit", action="store_true",
                    help="skip the refitted probes (saves two forward passes of --probe-train)")
    ap.add_argument("--workdir", default=None, help="exported images and the run (default: tmp)")
    ap.add_argument("--out", default=str(RESULTS / "compaction_finetune.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    t_start = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="leanvit-compaction-ft-"))
    data = work / f"fmnist-{args.train}-{args.val}"
    if not data.is_dir():
        export_fashion_mnist(data, train=args.train, val=args.val, seed=0)

    plain = dinov2(num_classes=0)
    train_all = image_folder(split_dir(data, "train"), plain)
    probe_set = fixed_subset(train_all, args.probe_train, seed=0)
    val_set = image_folder(split_dir(data, "val"), plain)
    probe_idx = set(probe_set.indices) if hasattr(probe_set, "indices") else set(
        range(len(train_all)))
    g = torch.Generator().manual_seed(1)
    calib_idx = [i for i in torch.randperm(len(train_all), generator=g).tolist()
                 if i not in probe_idx][: args.calib]
    calib = torch.stack([train_all[i][0] for i in calib_idx])

    def stage_features(model, refit: bool):
        t0 = time.perf_counter()
        fv, yv = extract_features(model, loader(val_set, 50), progress=False)
        ft = yt = None
        if refit:
            ft, yt = extract_features(model, loader(probe_set, 50), progress=False)
        return fv, yv, ft, yt, time.perf_counter() - t0

    results: dict = {"stages": {}}

    def record(name: str, model, head, refit: bool, extra: dict) -> None:
        fv, yv, ft, yt, secs = stage_features(model, refit)
        row = {"fixed_probe_top1": accuracy(head, fv, yv), **extra,
               "feature_seconds": round(secs, 1)}
        if refit:
            info: dict = {}
            own = fit_probe(ft, yt, num_classes=10, info=info)
            row["refitted_probe_top1"] = accuracy(own, fv, yv)
            row["refitted_weight_decay"] = info["weight_decay"]
        results["stages"][name] = row
        print(name, json.dumps(row), flush=True)

    # 1. plain model and its probe (the fixed probe)
    t0 = time.perf_counter()
    ft, yt = extract_features(plain, loader(probe_set, 50), progress=False)
    info: dict = {}
    head = fit_probe(ft, yt, num_classes=10, info=info)
    results["probe"] = {"weight_decay": info["weight_decay"],
                        "train_top1": 100 * info["train_accuracy"],
                        "fit_seconds": round(time.perf_counter() - t0, 1)}
    macs_plain = leanvit.count_macs(attach_head(copy.deepcopy(plain), head), calib[:1])
    record("before_conversion", plain, head, refit=False,
           extra={"gmacs": macs_plain.gmacs, "params": params(plain)})
    results["stages"]["before_conversion"]["refitted_probe_top1"] = \
        results["stages"]["before_conversion"]["fixed_probe_top1"]  # the same probe

    # 2. conversion
    t0 = time.perf_counter()
    options = dict(attention="hallucinate", ffn="compact", ffn_ratio=2 / 3, branches=2,
                   hallucination="mix")
    student = leanvit.compact(copy.deepcopy(plain), images=calib, **options).eval()
    convert_s = time.perf_counter() - t0
    deployed = leanvit.reparameterize(copy.deepcopy(student))
    macs_compact = leanvit.count_macs(attach_head(copy.deepcopy(deployed), head), calib[:1])
    record("after_conversion", student, head, refit=not args.no_refit,
           extra={"gmacs_deployed": macs_compact.gmacs, "params_deployed": params(deployed),
                  "params_training_form": params(student),
                  "conversion_seconds": round(convert_s, 1)})

    # 3. distillation fine-tune with the shared trainer
    attach_head(student, head)
    student.head.requires_grad_(False)
    teacher = attach_head(copy.deepcopy(plain), head)
    n_steps = args.steps
    if args.budget_s is not None:
        step_s = _time_step(student, teacher, calib, args.batch_size)
        left = args.budget_s - (time.perf_counter() - t_start)
        # the last stage costs about what the previous one did, plus MACs and reparameterize
        left -= results["stages"]["after_conversion"]["feature_seconds"] + 20
        n_steps = max(10, min(args.steps, int(left / (1.1 * step_s))))
        results["step_seconds_measured"] = round(step_s, 2)
        print(f"step {step_s:.2f} s, {left:.0f} s left: {n_steps} steps", flush=True)
    steps_per_epoch = args.train // args.batch_size
    epochs = max(1, -(-n_steps // steps_per_epoch))
    cfg = TrainConfig(
        model=MODEL, data=str(data), method="none", options={}, output=str(work / "run"),
        epochs=epochs, max_steps=n_steps, batch_size=args.batch_size, lr=args.lr,
        min_lr=1e-6, weight_decay=0.05, warmup_epochs=0.0,
        loss={"cls": 0.0, "distill": 1.0, "feature": args.feature_weight, "token": 0.0},
        mixup=0.0, cutmix=0.0, smoothing=0.0, auto_augment=None, reprob=0.0, workers=0,
        crop_scale=tuple(args.crop_scale) if args.crop_scale else None,
        eval_every=0, progress=False, log_every=10, seed=0)
    t0 = time.perf_counter()
    summary = train(cfg, model=student, teacher=teacher)
    train_s = time.perf_counter() - t0
    log = [json.loads(line) for line in open(work / "run" / "log.jsonl")]
    steps = [r for r in log if r["event"] == "step"]
    results["finetune"] = {
        "steps": summary["global_step"], "epochs_planned": epochs, "batch_size": args.batch_size,
        "images_seen": summary["global_step"] * args.batch_size, "lr": args.lr,
        "loss_weights": cfg.loss, "wall_seconds": round(train_s, 1),
        "first_step": {k: v for k, v in steps[0].items() if k.startswith("loss")},
        "last_step": {k: v for k, v in steps[-1].items() if k.startswith("loss")},
        "trainer_summary": {k: v for k, v in summary.items() if k in ("global_step",
                                                                      "stopped_early")},
    }
    student.eval()
    leanvit.unpatch(student)
    with torch.no_grad():
        x = calib[:4]
        before = student(x)
        leanvit.reparameterize(student)
        deploy_diff = float((student(x) - before).abs().max())
    macs_ft = leanvit.count_macs(student, calib[:1])
    record("after_finetune", student, head, refit=not args.no_refit,
           extra={"gmacs_deployed": macs_ft.gmacs,
                  "params_deployed": params(student) - params(student.head),  # as above
                  "reparameterize_max_abs_diff": deploy_diff})
    results.update(
        model=f"{MODEL} (real DINOv2 weights), 224 px, 257 tokens",
        data=(f"Fashion-MNIST via leanvit.data.export_fashion_mnist seed 0: {args.train} "
              f"train-split images (fine-tune), fixed probe fitted on {len(probe_set)} of them,"
              f" {len(val_set)} test-split images held out; {len(calib)} calibration images"),
        conversion=options, calib_images=len(calib),
        mac_ratio=macs_compact.total / macs_plain.total,
        param_ratio=results["stages"]["after_conversion"]["params_deployed"] / params(plain),
        probe_note=("fixed_probe: fitted once on the plain model's features (leanvit.probe."
                    "fit_probe), never refitted; refitted_probe: refitted on each stage's own "
                    "features (same images, same protocol). GMACs include the 2C->10 probe."),
        threads=torch.get_num_threads(), total_wall_seconds=round(time.perf_counter() - t_start, 1),
        command="flock /tmp/leanvit-cpu.lock python benchmarks/compaction_finetune.py "
                + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                           if k in ("train", "probe_train", "val", "batch_size", "lr",
                                    "calib", "feature_weight"))
                + f" --steps {n_steps}" + (" --no-refit" if args.no_refit else "")
                + (" --crop-scale %g %g" % tuple(args.crop_scale) if args.crop_scale else ""),
    )
    write_results(args.out, results)
    print(json.dumps({k: v for k, v in results.items() if k != "stages"}, indent=1))


if __name__ == "__main__":
    main()
