"""Proportional attention (ToMe's ``log(size)`` key bias) and padding masks (ATS's ``-inf``
keys) in compiled CPU code: FlexAttention's ``score_mod`` against SDPA with a float mask
(``leanvit.ops.attention.KEY_BIAS_KERNEL``, the one switch this script sets): DeiT-S ToMe,
batch 64, fp32, interleaved rounds with the dense model (eager and compiled, inductor
default); ``--ops``: the attention op alone, with and without padding::

    flock /tmp/leanvit-cpu.lock python benchmarks/prop_attn.py
    flock /tmp/leanvit-cpu.lock python benchmarks/prop_attn.py --ops --repeats 7 \
        --out benchmarks/results/prop_attn_ops      # the attention op alone (OP_SHAPES)

Writes ``results/prop_attn.{json,md}``. Each kernel's model is traced with the switch set and
called with it set again every round (the switch is read at trace time; dynamo guards on it).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

from _common import RESULTS, command, loadavg, md_table, write_results

MODEL = "deit_small_patch16_224"
#: end to end: ToMe with proportional attention (ATS's padding mask is measured on the op alone,
#: ``--ops``: its compiled model breaks the graph in every ATS block and compiles for minutes)
CASES = [("tome r=13 (prop_attn)", "tome", {"r": 13})]


#: (batch, tokens, padded) of the op-level comparison: DeiT-S batch 64 before and after ToMe's
#: merges, DINOv2 ViT-S/14 batch 8 at 518 px (1370 tokens) and at about 600; ``padded``: every
#: other image's last third of keys at ``-inf`` (ATS's padding) on top of the bias
OP_SHAPES = [(64, 197, False), (64, 120, False), (64, 60, False), (8, 1370, False),
             (8, 600, False), (64, 197, True), (8, 1370, True)]


def ops(repeats: int) -> list[dict]:
    """The attention alone, ``[B, 6, N, 64]`` with a ``log(size)``-like per-key bias ``[B, N]``:
    compiled SDPA with the ``[B, 1, 1, N]`` float mask, compiled FlexAttention with a
    ``score_mod``, eager SDPA; median ms of ``repeats`` interleaved rounds."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    def sdpa(q, k, v, kb):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=kb[:, None, None, :])

    def flex(q, k, v, kb):
        return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + kb[b, j])

    # static shapes: a fresh graph per shape, as a model of fixed size compiles
    fns = {"compiled sdpa": torch.compile(sdpa, dynamic=False),
           "compiled flex": torch.compile(flex, dynamic=False),
           "eager sdpa": sdpa}
    rows = []
    for B, N, padded in OP_SHAPES:
        g = torch.Generator().manual_seed(N)
        q, k, v = torch.randn(3, B, 6, N, 64, generator=g).unbind(0)
        kb = torch.rand(B, N, generator=g).log1p()
        if padded:
            kb[::2, N - N // 3:] = float("-inf")
        t: dict[str, list[float]] = {k: [] for k in fns}
        with torch.inference_mode():
            ref = sdpa(q, k, v, kb)
            diff = {k: float((f(q, k, v, kb) - ref).abs().max()) for k, f in fns.items()}
            for _ in range(repeats):
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    f(q, k, v, kb)
                    t[name].append(time.perf_counter() - t0)
        rows.append({"batch": B, "tokens": N, "padded": padded, "max_abs_diff": diff,
                     **{k: 1e3 * statistics.median(v) for k, v in t.items()}})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ops", action="store_true", help="the attention op alone (OP_SHAPES)")
    p.add_argument("--out", default=str(RESULTS / "prop_attn"))
    args = p.parse_args(argv)
    if args.ops:
        rows, cmd = ops(args.repeats), command("prop_attn.py", argv)
        md = md_table(["batch", "tokens", "padded", "compiled sdpa ms", "compiled flex ms",
                       "eager sdpa ms", "flex / sdpa"],
                      [[r["batch"], r["tokens"], r["padded"], f"{r['compiled sdpa']:.1f}",
                        f"{r['compiled flex']:.1f}", f"{r['eager sdpa']:.1f}",
                        f"{r['compiled flex'] / r['compiled sdpa']:.2f}"] for r in rows])
        md = (f"# Per-key bias attention op, fp32 CPU\n\nCommand: `{cmd}`. Load average after: "
              f"{loadavg()}.\n\n{md}")
        write_results(args.out, {"command": cmd, "rows": rows}, md)
        print(md)
        return 0
    import torch

    import leanvit
    import leanvit.ops.attention as attention_ops
    from leanvit.models import create_model

    print(f"leanvit from {leanvit.__file__}", file=sys.stderr)
    dense = create_model(MODEL).eval()
    x = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def with_kernel(fn, kernel):
        def run(images):
            attention_ops.KEY_BIAS_KERNEL = kernel
            return fn(images)
        return run

    runners = {"eager dense": dense}
    for label, method, opts in CASES:
        m = leanvit.patch(copy.deepcopy(dense), method, **opts).eval()
        runners[f"eager {label}"] = m
        for kernel in ("sdpa", "flex"):
            runners[f"compiled {label} {kernel}"] = with_kernel(torch.compile(m), kernel)
    runners["compiled dense"] = torch.compile(dense)
    times: dict[str, list[float]] = {k: [] for k in runners}
    outs, first = {}, {}
    load = loadavg()
    with torch.inference_mode():
        for r in range(args.repeats + 1):  # round 0: warm-up and compilation
            for k in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
                t0 = time.perf_counter()
                y = runners[k](x)
                dt = time.perf_counter() - t0
                if r:
                    times[k].append(dt)
                else:
                    first[k], outs[k] = dt, y
    attention_ops.KEY_BIAS_KERNEL = "auto"
    rows, cells = [], []
    for k, t in times.items():
        mode = k.split()[0]
        base = times[f"{mode} dense"]
        ratios = [b / c for b, c in zip(base, t)]
        ref = outs[k.replace("compiled", "eager").replace(" sdpa", "").replace(" flex", "")]
        row = {"model": k, "ms": 1e3 * statistics.median(t), "round_ms": [1e3 * v for v in t],
               "speedup": statistics.median(base) / statistics.median(t),
               "spread": [min(ratios), max(ratios)], "first_s": first[k],
               "max_abs_diff_vs_eager": float((outs[k] - ref).abs().max())}
        rows.append(row)
        cells.append([k, f"{row['ms']:.0f}", f"{row['speedup']:.3f}x",
                      f"{min(ratios):.2f}-{max(ratios):.2f}", f"{row['first_s']:.0f}",
                      f"{row['max_abs_diff_vs_eager']:.1e}"])
    env = leanvit.bench.environment(torch.device("cpu"))
    cmd = command("prop_attn.py", argv)
    md = "\n".join([f"# Key-bias kernels in compiled code: {MODEL}, batch {args.batch_size}, "
                    "fp32, CPU", "", f"{env['device_name']}, {env['threads']} threads, torch "
                    f"{env['torch']}. Command: `{cmd}`. Load average before {load}, after "
                    f"{loadavg()}. Speedup over the dense model of the same mode, median of "
                    f"{args.repeats} interleaved rounds; spread = per-round ratios.", "",
                    md_table(["model", "ms/batch", "speedup", "spread", "first call s",
                              "max |out - eager|"], cells)])
    write_results(args.out, {"command": cmd, "environment": env, "rows": rows}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
