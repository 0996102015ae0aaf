"""Cost of :func:`leanvit.dense_features` over the patched model's own ``forward_features``.

Issue 15: at batch 64 on CPU, ``dense_features`` (the full patch grid: index map traced
through every gather and merge, departing tokens copied, one scatter at the end) must stay
within 5% of the patched model's ``forward_features`` (the reduced tokens only). Per method,
both are timed back to back on the same patched model (``leanvit.bench.time_models``:
warm-up, then interleaved rounds with alternating order), and the ratio
``dense / forward_features`` is reported per round (median, min, max).

The recorded runs (``results/dense_speed_{run1,quiet}.*``: commits 2d6d9b8 and a1d02dd, this
script as of 6cdf304) also timed the dense-only functions' share of each pass and a
``[B, N, N0]`` source map; both wrapped library internals and informed a decision now taken
(an index map, not a source matrix), so they are gone.

Model: DINOv2 ViT-S/14 at 224 px (257 tokens), the real weights in ``<shared>/weights`` when
present (ATS's token counts depend on them), random otherwise; random input of a fixed seed
(the fixed-rate methods do the same work whatever the input).

Run it under the shared CPU lock::

    flock /tmp/leanvit-cpu.lock python benchmarks/dense.py

Writes ``benchmarks/results/dense_speed.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from _common import DINOV2_MODEL, DINOV2_WEIGHTS, RESULTS, dinov2, loadavg, md_table, \
    write_results
from torch import nn

import leanvit
from leanvit.bench import environment, time_models

SCHEDULE = RESULTS / "diffrate_dinov2_4.0_schedule.json"

#: (label, method, options); diffrate uses the searched DINOv2 schedule in results/
METHODS = [
    ("evit 0.7", "evit", {"keep_rate": 0.7}),
    ("topk 0.7", "topk", {"keep_rate": 0.7}),
    ("tome r=13", "tome", {"r": 13}),
    ("ats", "ats", {}),
    ("dynamicvit 0.7", "dynamicvit", {"keep_rate": 0.7}),
    ("diffrate 4.0G", "diffrate", {"schedule": str(SCHEDULE)}),
]

#: the issue's bound on dense_features / forward_features
TARGET = 1.05


class _Features(nn.Module):
    """``model.forward_features`` as a module (what the patched model computes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


class _Dense(_Features):
    def forward(self, x):
        return leanvit.dense_features(self.model, x)


def _model() -> nn.Module:
    if DINOV2_WEIGHTS.is_file():
        return dinov2(num_classes=0)
    from leanvit.models import create_model

    return create_model(DINOV2_MODEL, img_size=224, num_classes=0).eval()


def _ratios(times: dict) -> dict:
    r = [c / b for b, c in zip(times["baseline"], times["candidate"])]
    return {"median": statistics.median(r), "min": min(r), "max": max(r), "rounds": r,
            "baseline_s": statistics.median(times["baseline"]),
            "candidate_s": statistics.median(times["candidate"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="*", default=None, metavar="LABEL",
                   help="subset of the labels: " + ", ".join(m[0] for m in METHODS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "dense_speed"))
    args = p.parse_args(argv)

    load_before = loadavg()
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 224, 224)
    rows = []
    for label, method, options in METHODS:
        if args.methods is not None and label not in args.methods:
            continue
        model = leanvit.patch(_model(), method, **options).eval()
        with torch.inference_mode():
            n_tokens = model.forward_features(x[:2]).shape[1]
        t = time_models(_Features(model), _Dense(model), x, warmup=args.warmup,
                        repeats=args.repeats, desc=label)
        rows.append({"label": label, "method": method, "final_tokens": n_tokens,
                     "dense": _ratios(t)})
        print(json.dumps(rows[-1], default=str), flush=True)
    result = {"model": DINOV2_MODEL,
              "weights": str(DINOV2_WEIGHTS) if DINOV2_WEIGHTS.is_file() else "random",
              "batch_size": args.batch_size, "repeats": args.repeats, "warmup": args.warmup,
              "target": TARGET, "loadavg_before": load_before, "loadavg_after": loadavg(),
              "environment": environment(torch.device("cpu")), "rows": rows}
    write_results(args.out, result, format_table(result))
    print(format_table(result))
    return 0


def format_table(result: dict) -> str:
    head = (f"dense_features / forward_features, {result['model']}, batch "
            f"{result['batch_size']}, CPU fp32, {result['repeats']} interleaved rounds "
            f"(load average before {' '.join(result['loadavg_before'])}, after "
            f"{' '.join(result['loadavg_after'])})\n\n")
    cells = [[r["label"], r["final_tokens"], f"{r['dense']['baseline_s']:.2f}",
              f"{r['dense']['median']:.3f} ({r['dense']['min']:.3f}-{r['dense']['max']:.3f})"]
             for r in result["rows"]]
    return head + md_table(["method", "final tokens", "forward_features s/batch",
                            "dense / forward_features (median, min-max)"], cells)


if __name__ == "__main__":
    sys.exit(main())
