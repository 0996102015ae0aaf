"""Accuracy against cost of several method settings on one model and one data split: a table
(Markdown) and a plot (PNG) of top-1 against GMACs and against measured throughput, with
the Pareto front marked.

Each setting is evaluated by :func:`leanvit.evaluate.evaluate` on the same images (same
fixed subset), on a fresh copy of the same model, in one process; ``speedup`` is images/s
over the images/s of the unmodified model (``none``) measured in the same run.
"""
from __future__ import annotations

import ast
import copy
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from torch import nn

from leanvit._files import atomic_path, atomic_write_text
from leanvit.patching import warn_if_untrained
from leanvit.registry import IDENTITY


@dataclass
class Setting:
    """One method with its options, e.g. ``Setting("tome", {"r": 13})``.

    ``load`` names a file written by ``leanvit.save`` (learned or searched method state,
    e.g. a trained DynamicViT or a DiffRate schedule), applied with ``leanvit.load`` instead
    of ``leanvit.patch``.
    """

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    load: Optional[str] = None

    @property
    def label(self) -> str:
        """``"evit keep_rate=0.7"``: the method and its options as written on the command line."""
        parts = [self.method] + [f"{k}={_fmt(v)}" for k, v in self.options.items()]
        if self.load:
            parts.append(f"load={self.load}")
        return " ".join(parts)

    @property
    def settings_text(self) -> str:
        parts = [f"{k}={_fmt(v)}" for k, v in self.options.items()]
        if self.load:
            parts.append(f"load={Path(self.load).name}")
        return " ".join(parts) or "(defaults)"


def _fmt(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return "(" + ",".join(_fmt(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    return repr(v) if isinstance(v, str) else str(v)


def parse_methods(text: str) -> list[Setting]:
    """``"none; evit keep_rate=0.7; tome r=13 prop_attn=False"`` -> settings.

    Settings are separated by ``;`` (or new lines); each is a method name followed by
    ``key=value`` options (Python literals, as ``--set``; quote values with spaces, e.g.
    ``'locations=(3, 6, 9)'``); ``load=FILE`` loads saved method state.
    """
    out = []
    for chunk in text.replace("\n", ";").split(";"):
        words = shlex.split(chunk)
        if not words:
            continue
        method, items = words[0], words[1:]
        if "=" in method:
            raise ValueError(f"setting {chunk.strip()!r} must start with a method name")
        options = {}
        for item in items:
            key, sep, raw = item.partition("=")
            if not sep or not key.isidentifier():
                raise ValueError(f"options take key=value, got {item!r} in {chunk.strip()!r}")
            try:
                options[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                options[key] = raw  # not a literal: a path or a word
        load = options.pop("load", None)
        out.append(Setting(method, options, None if load is None else str(load)))
    if not out:
        raise ValueError("no method settings given; e.g. --methods 'none; tome r=13'")
    return out


def setting_from(method: str, options: dict[str, Any]) -> Setting:
    """A :class:`Setting` from a method name and options among which ``load=FILE`` (a
    :func:`leanvit.save` file, e.g. ``leanvit tune``'s ``choice.safetensors``) may stand, as
    ``--set load=FILE`` gives it; with ``method="none"`` (the command-line default) the
    file's method is taken. Other options then override the stored ones."""
    options = dict(options)
    load = options.pop("load", None)
    if load is None:
        return Setting(method, options)
    load = str(load)
    if method == IDENTITY:
        from leanvit.io import read

        method = read(load)[1].get("method") or IDENTITY
    return Setting(method, options, load)


def apply_setting(model: nn.Module, setting: Setting) -> nn.Module:
    """``leanvit.patch`` (or ``leanvit.load`` for saved state) on ``model``, in place."""
    import leanvit

    if setting.load is not None:
        try:
            from leanvit.io import load
        except ImportError:
            raise ValueError("load= needs leanvit.io (saved method state), which this version "
                             "of leanvit lacks") from None
        if not Path(setting.load).is_file():
            raise ValueError(f"saved method state {setting.load} does not exist")
        model = load(model, setting.load, **setting.options)
        got = leanvit.patched_method(model)
        if got is not None and got[0] != setting.method:
            raise ValueError(f"{setting.load} holds method {got[0]!r}, not {setting.method!r}")
        return model
    if setting.method == IDENTITY and not setting.options:
        return model
    leanvit.patch(model, setting.method, **setting.options)
    warn_if_untrained(model)
    return model


def run_compare(
    model: nn.Module,
    settings: Sequence[Setting],
    loader,
    *,
    progress: bool = True,
    warmup: int = 1,
    repeats: int = 3,
    evaluate_fn=None,
    callback: Optional[Callable[[int, Setting, Optional[dict[str, Any]]], None]] = None,
) -> list[dict[str, Any]]:
    """Evaluate every setting on ``loader`` with a fresh copy of the unpatched ``model``.

    The unmodified model (``none``) is evaluated first (also when not listed; then it is
    marked ``"listed": False``) and gives ``speedup`` = images/s / baseline images/s and
    ``mac_ratio`` = baseline GMACs / GMACs. Returns one row dict per setting.

    ``evaluate_fn(model, loader, progress=, warmup=, repeats=, desc=) -> dict`` replaces
    :func:`leanvit.evaluate.evaluate` (its dict needs ``gmacs`` and ``images_per_s``), e.g.
    :class:`leanvit.dense.DenseEvaluation` for ``compare --dense``.
    ``callback(i, setting, row)`` is called before (``row=None``) and after evaluating the
    ``i``-th setting of the run (the unmodified model included), e.g. to show progress.
    """
    from leanvit.evaluate import evaluate

    run_eval = evaluate if evaluate_fn is None else evaluate_fn

    if any(s.method != IDENTITY and s.load is None for s in settings):
        available = set(__import__("leanvit").available_methods())
        unknown = sorted({s.method for s in settings if s.load is None} - available)
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; available methods: "
                             f"{', '.join(sorted(available))}")
    rows: list[dict[str, Any]] = []
    plain = [s for s in settings if s.method == IDENTITY and not s.options and s.load is None]
    order = list(settings) if plain else [Setting(IDENTITY)] + list(settings)
    base = None
    for i, s in enumerate(order):
        if callback is not None:
            callback(i, s, None)
        m = apply_setting(copy.deepcopy(model), s).eval()
        r = run_eval(m, loader, progress=progress, warmup=warmup, repeats=repeats,
                     desc=s.label[:40])
        row = {"method": s.method, "settings": s.settings_text, "label": s.label,
               "options": {k: (list(v) if isinstance(v, tuple) else v)
                           for k, v in s.options.items()},
               "load": s.load, "listed": bool(plain) or s is not order[0], **r}
        if base is None:
            base = row
        row["speedup"] = row["images_per_s"] / base["images_per_s"]
        row["mac_ratio"] = base["gmacs"] / row["gmacs"]
        rows.append(row)
        del m
        if callback is not None:
            callback(i, s, row)
    return rows


# --------------------------------------------------------------------------------------------
# Outputs


def pareto(points: Sequence[tuple[float, float]], lower_x_better: bool) -> list[int]:
    """Indices of the points not dominated: no other point has accuracy (second value) at
    least as high and cost (first value) at least as good (lower x if ``lower_x_better``,
    else higher x), with one of them strictly better. Sorted by x."""
    idx = []
    for i, (xi, yi) in enumerate(points):
        dominated = False
        for j, (xj, yj) in enumerate(points):
            if j == i:
                continue
            better_x = xj <= xi if lower_x_better else xj >= xi
            strictly = (xj != xi) or (yj > yi)
            if better_x and yj >= yi and strictly:
                dominated = True
                break
        if not dominated:
            idx.append(i)
    return sorted(idx, key=lambda i: points[i][0])


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Method, settings, top-1, top-5, GMACs, images/s, speedup (over ``none``, same run).

    Dense rows (``compare --dense``, with ``miou``): per-patch accuracy, mIoU and the mean
    cosine to the unmodified model's dense features instead of top-1 / top-5."""
    if rows and "miou" in rows[0]:
        lines = ["| method | settings | per-patch acc. (%) | mIoU (%) | cosine to unpatched | "
                 "GMACs | images/s | speedup |",
                 "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            lines.append(f"| {r['method']} | {r['settings'].replace('|', '/')} | "
                         f"{r['pixel_accuracy']:.2f} | {r['miou']:.2f} | {r['cosine']:.4f} | "
                         f"{r['gmacs']:.3f} | {r['images_per_s']:.1f} | {r['speedup']:.2f}x |")
        return "\n".join(lines) + "\n"
    lines = ["| method | settings | top-1 (%) | top-5 (%) | GMACs | images/s | speedup |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['settings'].replace('|', '/')} | {r['top1']:.2f} | "
                     f"{r['top5']:.2f} | {r['gmacs']:.3f} | {r['images_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def _point_label(row: dict[str, Any]) -> str:
    """Short label of a plotted setting: file paths (schedules, saved methods) by file name."""
    if row["settings"] == "(defaults)":
        return "unmodified" if row["method"] == IDENTITY else row["method"]
    return re.sub(r"""(['"]?)[^\s'"=]*/([^/\s'"]+?)(\.json|\.safetensors)?\1(?=\s|$)""",
                  r"\2", row["settings"])


def label_offsets(points: Sequence[tuple[float, float]], texts: Sequence[str],
                  fontsize: float = 7.0,
                  heights: Sequence[float] = (4.0, -10.0, 14.0, -20.0, 24.0, -30.0)
                  ) -> list[tuple[float, float]]:
    """Text offsets (points) for point labels that do not overlap each other.

    ``points`` are the labelled points in display points (1/72 inch). Each label is a box
    starting 5 points right of its point, ``0.6 * fontsize`` wide per character and
    ``1.2 * fontsize`` high; it takes the first of ``heights`` (offsets above/below the point)
    at which its box meets no box placed before it, else the first height.
    """
    cw, h = 0.6 * fontsize, 1.2 * fontsize
    placed: list[tuple[float, float, float, float]] = []
    out = []
    for (x, y), text in zip(points, texts):
        for dy in (*heights, heights[0]):
            box = (x + 5, y + dy, x + 5 + cw * len(text), y + dy + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]
                       for b in placed):
                break
        placed.append(box)
        out.append((5.0, dy))
    return out


def plot(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "",
         metric: Optional[str] = None) -> Path:
    """PNG: top-1 against GMACs (left) and against images/s (right), one colour and marker
    per method, each point labelled with its settings, the Pareto front as a dashed line
    with the points on it ringed. ``metric``: the row key plotted (default ``"top1"``, or
    ``"miou"`` for dense rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if metric is None:
        metric = "miou" if rows and "miou" in rows[0] else "top1"
    ylabel = {"top1": "top-1 accuracy (%)", "miou": "mIoU (%)",
              "pixel_accuracy": "per-patch accuracy (%)"}.get(metric, metric)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cmap = plt.get_cmap("tab10")
    markers = "osD^vP*Xph"
    style = {m: (cmap(i % 10), markers[i % len(markers)]) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.6), constrained_layout=True)
    panels = (("gmacs", "GMACs per image (lower is cheaper)", True),
              ("images_per_s", "throughput (images/s, higher is faster)", False))
    for ax, (key, xlabel, lower) in zip(axes, panels):
        pts = [(r[key], r[metric]) for r in rows]
        for m in methods:
            sel = [r for r in rows if r["method"] == m]
            color, marker = style[m]
            ax.scatter([r[key] for r in sel], [r[metric] for r in sel], color=color,
                       marker=marker, s=60, label=m, zorder=3)
        ax.autoscale_view()
        texts = [_point_label(r) for r in rows]
        shown = ax.transData.transform(pts) * (72.0 / fig.dpi)  # display points
        for r, text, offset in zip(rows, texts, label_offsets(shown.tolist(), texts)):
            ax.annotate(text, (r[key], r[metric]), textcoords="offset points",
                        xytext=offset, fontsize=7, color="0.25")
        front = pareto(pts, lower_x_better=lower)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="black",
                linewidth=1, drawstyle="steps-post" if lower else "steps-pre", zorder=2,
                label="Pareto front")
        ax.scatter([pts[i][0] for i in front], [pts[i][1] for i in front], s=180,
                   facecolors="none", edgecolors="black", linewidths=1, zorder=4)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_title("accuracy vs. compute")
    axes[1].set_title("accuracy vs. measured throughput")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, title="method (ringed: Pareto front)")
    if title:
        fig.suptitle(title, fontsize=11)
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=130, format="png")
    finally:
        plt.close(fig)
    return path


def write_outputs(rows: Sequence[dict[str, Any]], out_dir: str | Path, meta: dict[str, Any],
                  title: str = "") -> dict[str, Path]:
    """``out_dir/results.{json,md,png}``: the rows with ``meta``, the table, the plot."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png"}
    _atomic_text(paths["json"], json.dumps({"meta": meta, "rows": list(rows)}, indent=2) + "\n")
    _atomic_text(paths["md"], markdown_table(rows))
    plot(rows, paths["png"], title=title)
    return paths


def _atomic_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)
