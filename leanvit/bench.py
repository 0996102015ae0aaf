"""Throughput benchmark: the unmodified model and the patched one, in the same run.

Protocol (ToMe / EViT / timm conventions, see ``shared/notes/methods.md``): random input of a
fixed batch, eval mode under ``torch.inference_mode``, warm-up, then ``repeats`` rounds in
which both models are timed back to back (the order alternates every round so that neither
always runs on a warmer machine), synchronising on GPU; the median time per batch is
reported. Peak memory: CUDA ``max_memory_allocated`` on GPU; on CPU a separate process per
model measures the peak resident memory of one forward pass above what the process held
before it (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``).
"""
from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

import torch
from torch import Tensor, nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _build(model_name: str, method: Optional[str], options: dict, img_size, checkpoint,
           num_classes, head=None) -> nn.Module:
    from leanvit.models import create_model

    model = create_model(model_name, img_size=img_size, checkpoint=checkpoint,
                         num_classes=num_classes, head=head)
    if method is not None:
        apply_method(model, method, options)
    return model.eval()


#: timing rounds whose (max - min) / median exceeds this probably shared the cores with
#: another heavy process: run_benchmark warns
SPREAD_WARNING = 0.20


def round_spread(times: list[float]) -> float:
    """``(max - min) / median`` of one model's round times (0 for one round)."""
    return (max(times) - min(times)) / statistics.median(times) if times else 0.0


def apply_method(model: nn.Module, method: str, options: dict) -> nn.Module:
    """``leanvit.patch(model, method, **options)``, or :func:`leanvit.load` when ``options``
    hold ``load=FILE`` (``--set load=FILE``: a :func:`leanvit.save` file, e.g. ``leanvit
    tune``'s choice; other options override the stored ones; ``method`` may be ``"none"``, the
    command-line default, or the file's method)."""
    from leanvit.patching import patch

    options = dict(options)
    path = options.pop("load", None)
    if path is None:
        return patch(model, method, **options)
    from leanvit.io import load

    stored = method_of(method, {"load": path})
    if method not in ("none", stored):
        raise ValueError(f"{path} holds method {stored!r}, not {method!r}")
    return load(model, str(path), **options)


def method_of(method: str, options: dict) -> str:
    """The method that :func:`apply_method` applies: ``method``, or the stored method of a
    ``load=FILE`` among ``options``."""
    if options.get("load") is None:
        return method
    from leanvit.io import read

    return read(str(options["load"]))[1].get("method") or method


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(model: nn.Module, x: torch.Tensor, iters: int, device: torch.device) -> float:
    """Seconds per batch, averaged over ``iters`` forward passes."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        model(x)
    _sync(device)
    return (time.perf_counter() - t0) / iters


def time_models(baseline: nn.Module, candidate: nn.Module, x: torch.Tensor, *,
                warmup: int = 2, repeats: int = 5, iters: int = 1,
                desc: Optional[str] = None) -> dict[str, list[float]]:
    """Seconds per batch of two models on the same input ``x``, timed back to back.

    Under ``torch.inference_mode``: ``warmup`` untimed rounds, then ``repeats`` rounds in which
    both run ``iters`` times, the order alternating every round (neither always runs on a
    warmer machine); CUDA is synchronised around each timing. The models must already be in
    eval mode on ``x``'s device and dtype. ``desc``: show a progress bar with this label.
    Returns ``{"baseline": [...], "candidate": [...]}`` (one entry per round); take medians.
    """
    dev = x.device
    runners = {"baseline": baseline, "candidate": candidate}
    times: dict[str, list[float]] = {"baseline": [], "candidate": []}
    bar = None
    if desc is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * (warmup + repeats), desc=desc, unit="round", file=sys.stderr,
                   leave=False)
    with torch.inference_mode():
        for _ in range(warmup):
            for m in runners.values():
                _time(m, x, 1, dev)
                bar is not None and bar.update(1)
        for r in range(repeats):
            order = ("baseline", "candidate") if r % 2 == 0 else ("candidate", "baseline")
            for key in order:
                times[key].append(_time(runners[key], x, iters, dev))
                bar is not None and bar.update(1)
    if bar is not None:
        bar.close()
    return times


def environment(device: torch.device) -> dict[str, Any]:
    import timm

    import leanvit

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return {
        "device": str(device), "device_name": name, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "timm": timm.__version__,
        "leanvit": leanvit.__version__, "python": platform.python_version(),
    }


def _cpu_peak_memory_mb(spec: dict) -> Optional[float]:
    """Peak extra resident memory (MB) of one forward pass, measured in a fresh process."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    cmd = [sys.executable, "-m", "leanvit.bench", json.dumps(spec)]
    # glibc: a fixed mmap threshold serves every large tensor by mmap and returns it to the
    # system when freed, so the peak resident size follows the live tensors; its default
    # dynamic threshold keeps freed blocks in the heap and the peak then varies from run to
    # run with the allocation order (other C libraries ignore these variables)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def cpu_peak_memory_mb(model: str, method: Optional[str] = None, options: Optional[dict] = None,
                       *, batch_size: int = 64, img_size: Optional[int] = None,
                       dtype: str = "fp32", threads: Optional[int] = None) -> Optional[float]:
    """Peak resident memory (MB) one CPU forward pass of ``model`` adds, in a fresh process:
    the model unmodified (``method=None``, timm's own forward) or with ``method`` and its
    ``options`` on; random weights, ``batch_size`` random images at the model's input size
    (or ``img_size``). What :func:`run_benchmark` reports as ``peak_mem_mb`` on CPU. ``None``
    where the system has no ``/proc/self/clear_refs`` (not Linux)."""
    from leanvit.models import input_size

    probe = _build(model, None, {}, img_size, None, None)
    h, w = input_size(probe)
    del probe
    return _cpu_peak_memory_mb(dict(
        model=model, method=method, options=options or {}, img_size=img_size, checkpoint=None,
        num_classes=None, head=None, batch_size=batch_size, height=h, width=w, dtype=dtype,
        threads=threads or torch.get_num_threads()))


def _read_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_probe(spec: dict) -> None:
    """Entry of the child process: build, warm up, then measure one forward's peak RSS."""
    torch.set_num_threads(spec["threads"])
    model = _build(spec["model"], spec["method"], spec["options"], spec["img_size"],
                   spec["checkpoint"], spec["num_classes"], spec.get("head")).to(DTYPES[spec["dtype"]])
    torch.manual_seed(0)
    x = torch.randn(spec["batch_size"], 3, spec["height"], spec["width"],
                    dtype=DTYPES[spec["dtype"]])
    with torch.inference_mode():
        model(x)  # first call allocates caches; measure the second
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size (VmHWM)
        before = _read_status_kb("VmRSS")
        model(x)
        peak = _read_status_kb("VmHWM")
    print(json.dumps({"peak_mb": (peak - before) / 1024}))


def run_benchmark(
    model: str,
    method: str = "none",
    options: Optional[dict] = None,
    *,
    img_size: Optional[int] = None,
    batch_size: int = 64,
    device: str = "cpu",
    dtype: str = "fp32",
    compile: bool = False,
    checkpoint: Optional[str] = None,
    num_classes: Optional[int] = None,
    head: Optional[str] = None,
    warmup: int = 2,
    repeats: int = 5,
    iters: int = 1,
    memory: bool = True,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Time the unmodified ``model`` and the one patched with ``method`` in the same run.

    Returns a dict with ``baseline`` and ``patched`` (``images_per_s``, ``ms_per_batch``,
    ``gmacs``, ``peak_mem_mb``, the per-round times), ``speedup`` (patched over baseline
    images/s), ``mac_ratio`` (baseline over patched GMACs), ``config`` and ``environment``.
    """
    from leanvit.macs import count_macs

    options = dict(options or {})
    dev = _check_run(dtype, device, batch_size=batch_size, repeats=repeats, iters=iters)

    base = _build(model, None, {}, img_size, checkpoint, num_classes, head)
    patched = apply_method(copy.deepcopy(base), method, options).eval()
    method = method_of(method, options)  # the file's method for --set load=FILE
    from leanvit.patching import warn_if_untrained

    warn_if_untrained(patched)
    from leanvit.models import input_size

    h, w = input_size(base)
    torch.manual_seed(seed)
    x = torch.randn(batch_size, 3, h, w)
    mac_images = x[: min(batch_size, 16)]
    gmacs_base = count_macs(base, mac_images).gmacs
    gmacs_patched = count_macs(patched, mac_images).gmacs

    torch_dtype = DTYPES[dtype]
    base = base.to(dev, torch_dtype)
    patched = patched.to(dev, torch_dtype)
    x = x.to(dev, torch_dtype)
    runners = {"baseline": base, "patched": patched}
    if compile:
        runners = {k: torch.compile(m) for k, m in runners.items()}

    rounds = time_models(runners["baseline"], runners["patched"], x, warmup=warmup,
                         repeats=repeats, iters=iters,
                         desc=f"bench {model} / {method}" if progress else None)
    times = {"baseline": rounds["baseline"], "patched": rounds["candidate"]}
    spread = {k: round_spread(v) for k, v in times.items()}
    _warn_spread(spread)

    peak: dict[str, Optional[float]] = {"baseline": None, "patched": None}
    if memory:
        if dev.type == "cuda":
            peak = _cuda_peak_memory_mb(runners, x, dev)
        else:
            for key, meth in (("baseline", None), ("patched", method)):
                peak[key] = _cpu_peak_memory_mb(dict(
                    model=model, method=meth, options=options, img_size=img_size,
                    checkpoint=checkpoint, num_classes=num_classes, head=head,
                    batch_size=batch_size,
                    height=h, width=w, dtype=dtype, threads=torch.get_num_threads()))

    def summary(key: str, gmacs: float) -> dict[str, Any]:
        med = statistics.median(times[key])
        return {"images_per_s": batch_size / med, "ms_per_batch": med * 1e3, "gmacs": gmacs,
                "peak_mem_mb": peak[key], "round_ms": [t * 1e3 for t in times[key]],
                "spread": spread[key]}

    result = {
        "baseline": summary("baseline", gmacs_base),
        "patched": summary("patched", gmacs_patched),
        "config": {"model": model, "method": method, "options": _jsonable(options),
                   "resolved_options": _jsonable(resolved_options(patched)),
                   "img_size": [h, w], "batch_size": batch_size, "dtype": dtype,
                   "compile": compile, "checkpoint": checkpoint, "head": head,
                   "warmup": warmup,
                   "repeats": repeats, "iters": iters},
        "environment": environment(dev),
    }
    result["speedup"] = result["patched"]["images_per_s"] / result["baseline"]["images_per_s"]
    result["mac_ratio"] = gmacs_base / gmacs_patched
    return result


def _check_run(dtype: str, device: str, **counts: int) -> torch.device:
    """The device of a :func:`run_benchmark` run, after checking its dtype, device and
    positive-int counts (one-line ``ValueError`` naming the bad one)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available here")
    for name, v in counts.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return dev


def _warn_spread(spread: dict[str, float]) -> None:
    """Warn (to :func:`run_benchmark`'s caller) when a model's timing rounds spread by more
    than :data:`SPREAD_WARNING` of their median: the speedup is then unreliable."""
    worst = max(spread, key=spread.get)
    if spread[worst] > SPREAD_WARNING:
        import warnings

        load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") \
            else "n/a"
        warnings.warn(f"the {worst} model's timing rounds spread by {spread[worst]:.0%} of their "
                      f"median (> {SPREAD_WARNING:.0%}): another process probably competed for "
                      f"the cores (load average {load}); the speedup is unreliable", UserWarning,
                      stacklevel=3)


def _cuda_peak_memory_mb(runners: dict[str, nn.Module], x: Tensor, dev: torch.device
                         ) -> dict[str, Optional[float]]:
    """Peak allocated CUDA memory (MB) of one forward pass of each runner on ``x``."""
    peak: dict[str, Optional[float]] = {}
    with torch.inference_mode():
        for key, m in runners.items():
            torch.cuda.reset_peak_memory_stats(dev)
            m(x)
            torch.cuda.synchronize(dev)
            peak[key] = torch.cuda.max_memory_allocated(dev) / 2**20
    return peak


def _jsonable(options: dict) -> dict:
    """Options as values ``json`` writes: tuples stay tuples (JSON arrays in a file, tuples
    when printed; they were repr strings), other objects become their repr."""
    def one(v):
        if isinstance(v, (tuple, list)):
            return type(v)(one(x) for x in v)
        if isinstance(v, dict):
            return {str(k): one(x) for k, x in v.items()}
        return v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)

    return {k: one(v) for k, v in options.items()}


def resolved_options(model: nn.Module) -> dict:
    """Every option of the method patched into ``model``, defaults filled in, and resolved
    block ``locations`` where the method resolves them (``None`` -> the depth's default)."""
    import dataclasses

    reducer = getattr(model, "leanvit", None)
    opts = getattr(reducer, "options", None)
    if opts is None or not dataclasses.is_dataclass(opts):
        return {}
    out = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
    if out.get("locations", 0) is None and getattr(reducer, "locations", None) is not None:
        out["locations"] = tuple(sorted(reducer.locations))  # frozensets have no order
    return out


def format_options(options: dict) -> str:
    """``keep_rate=0.7, locations=(3, 6, 9)``: Python literals, as ``--set`` takes them."""
    return ", ".join(f"{k}={v!r}" for k, v in options.items()) or "(no options)"


def format_table(result: dict) -> str:
    """A plain-text table of a :func:`run_benchmark` result."""
    rows = [("", "images/s", "ms/batch", "GMACs", "peak MB")]
    for key in ("baseline", "patched"):
        r = result[key]
        mem = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        rows.append((key, f"{r['images_per_s']:.1f}", f"{r['ms_per_batch']:.1f}",
                     f"{r['gmacs']:.3f}", mem))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    cfg, env = result["config"], result["environment"]
    lines.append(f"speedup {result['speedup']:.3f}x   MAC ratio {result['mac_ratio']:.3f}x")
    shown = cfg.get("resolved_options") or cfg["options"]
    lines.append(f"{cfg['model']} method={cfg['method']} {format_options(shown)} batch "
                 f"{cfg['batch_size']} {cfg['dtype']} on {env['device_name']} "
                 f"({env['threads']} threads), torch {env['torch']}, timm {env['timm']}")
    return "\n".join(lines)


if __name__ == "__main__":  # the CPU memory probe's child process
    _memory_probe(json.loads(sys.argv[1]))
