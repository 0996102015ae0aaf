"""Choosing for a budget: which method, at which setting, gives the best accuracy within a MAC
(or speedup) budget, for this model and these images.

:func:`tune` builds a grid of settings around the budget for every registered method that
needs no training (its one strength option bisected on MACs: :data:`KNOBS`), searches a
DiffRate schedule to the budget itself, adds settings given explicitly (trained predictors with
``load=``), evaluates all of them with :func:`leanvit.compare.run_compare` (accuracy, GMACs
averaged over the images, throughput at the loader's batch size in the same run as the
unmodified model), and returns the Pareto front and the choice: the most accurate setting
within the budget (ties: the cheaper). ``leanvit tune`` is the command line of the same.

Budgets: ``{"gmacs": G}`` (mean GMACs per image over the evaluated images at most ``G``) or
``{"speedup": S}`` (measured images/s at least ``S`` x the unmodified model's, same run).
"""
from __future__ import annotations

import collections.abc
import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from leanvit.compare import Setting, apply_setting, pareto, run_compare
from leanvit.registry import IDENTITY, Knob, Method, get_method, registered

# --------------------------------------------------------------------------------------------
# The grid


class _KnobView(collections.abc.Mapping):
    """Method name -> its :class:`~leanvit.registry.Knob`, read live from the registry (a
    method declares its knob when it registers; this view only reads)."""

    def _knobs(self) -> dict[str, Knob]:
        return {n: m.knob for n, m in registered().items() if m.knob is not None}

    def __getitem__(self, name: str) -> Knob:
        return self._knobs()[name]

    def __iter__(self):
        return iter(self._knobs())

    def __len__(self) -> int:
        return len(self._knobs())

    def __repr__(self) -> str:
        return f"KNOBS({self._knobs()!r})"


#: Training-free methods and their strength option, as each method declares it
#: (:attr:`leanvit.registry.Method.knob`): a read-only view of the registry.
KNOBS: Mapping[str, Knob] = _KnobView()
#: Options of tune's DiffRate search (:func:`leanvit.search.diffrate.search`); ``search_options``
#: override them. ``num_images`` (1000, the paper's ~1000) applies to a folder of search
#: images; ``max_seconds`` (9 min) keeps the search to a part of a run of minutes; batch 16
#: gives twice the steps of 32 in that time. ``select_every=50``: snapshots scored on
#: held-out images, the best one within the MAC tolerance returned (``docs/diffrate.md``):
#: the search's last step can end over the budget, a setting tune then cannot choose
#: (``docs/tune.md``). ``init="best-handset"``: the search starts from the hand-set schedule
#: of DiffRate's space that scores best on those held-out images and is one of the
#: snapshots, so tune's search returns nothing worse there than that start.
SEARCH_DEFAULTS: dict[str, Any] = {"num_images": 1000, "batch_size": 16, "max_seconds": 540.0,
                                   "select_every": 50, "init": "best-handset"}
#: Arguments of :func:`leanvit.search.diffrate.search` that tune sets itself (or that are not
#: options: labels come from no folder in tune, progress and log follow tune's own).
SEARCH_NOT_OPTIONS = ("labels", "progress", "log")


def searched_methods() -> dict[str, Method]:
    """The registered methods tune searches itself (:attr:`leanvit.registry.Method.search`)."""
    return {n: m for n, m in registered().items() if m.search is not None and not m.internal}


def search_option_types() -> dict[str, str]:
    """The search options tune passes on (keyword-only arguments of each searched method's
    search entry, :attr:`leanvit.registry.Search.entry`, but :data:`SEARCH_NOT_OPTIONS`) ->
    their annotated type (``"int"``, ``"Optional[float]"``, ...)."""
    import inspect

    types: dict[str, str] = {}
    for m in searched_methods().values():
        params = inspect.signature(m.search.function()).parameters
        types.update({name: str(p.annotation) for name, p in params.items()
                      if p.kind is inspect.Parameter.KEYWORD_ONLY
                      and name not in SEARCH_NOT_OPTIONS})
    return types


def _has_type(value: Any, annotation: str) -> bool:
    """Whether ``value`` fits an annotation of the search's signature (int, float, str,
    Optional[...] of them; others are not checked here)."""
    if annotation.startswith("Optional[") and annotation.endswith("]"):
        if value is None:
            return True
        annotation = annotation[len("Optional["):-1]
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation == "str":
        return isinstance(value, str)
    return True


def check_search_options(options: Optional[Mapping[str, Any]], source: str = "search_options"
                         ) -> dict[str, Any]:
    """``options`` for the DiffRate search, checked: every key an option of
    :func:`leanvit.search.diffrate.search` (:func:`search_option_types`), every value of its
    type. ``ValueError`` naming ``source`` (``--search`` on the command line), the key and the
    valid keys otherwise: a misspelled key must not drop the search without a word. Value
    ranges are checked by the search itself (its errors name the option too)."""
    import difflib

    options = dict(options or {})
    types = search_option_types()
    for key, value in options.items():
        if key not in types:
            close = difflib.get_close_matches(key, types, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            titles = " / ".join(m.search.title or n for n, m in searched_methods().items())
            raise ValueError(f"{source}: unknown {titles} search option {key!r}{hint}; valid: "
                             f"{', '.join(sorted(types))}")
        if not _has_type(value, types[key]):
            raise ValueError(f"{source}: {key}={value!r} is not of the option's type "
                             f"{types[key]}")
    return options


#: Targets of the grid, as fractions of the MAC budget: the setting closest to the budget from
#: below, a cheaper one, and one above the budget (it shows the front beyond it).
FRACTIONS = (1.0, 0.85, 1.15)


@dataclass
class Budget:
    """A budget: mean GMACs per image at most ``gmacs``, or a measured speedup over the
    unmodified model (same run) of at least ``speedup``; exactly one of them."""

    gmacs: Optional[float] = None
    speedup: Optional[float] = None

    def __post_init__(self) -> None:
        if (self.gmacs is None) == (self.speedup is None):
            raise ValueError("give exactly one budget: gmacs=G (GMACs per image) or "
                             "speedup=S (times the unmodified model's images/s)")
        for name in ("gmacs", "speedup"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v) or v <= 0):
                raise ValueError(f"budget {name} must be a positive finite number, got {v!r}")

    @classmethod
    def of(cls, budget: Any) -> "Budget":
        """A number (GMACs), ``{"gmacs": G}`` / ``{"speedup": S}``, or a :class:`Budget`."""
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, Mapping):
            unknown = set(budget) - {"gmacs", "speedup"}
            if unknown:
                raise ValueError(f"budget takes gmacs= or speedup=, got {sorted(unknown)}")
            return cls(**budget)
        if isinstance(budget, (int, float)) and not isinstance(budget, bool):
            return cls(gmacs=float(budget))
        raise TypeError(f"budget must be GMACs (a number), {{'gmacs': G}} or {{'speedup': S}}, "
                        f"got {budget!r}")

    def fits(self, row: Mapping[str, Any]) -> bool:
        """Whether an evaluated row (``gmacs``, ``speedup``) is within the budget."""
        if self.gmacs is not None:
            return row["gmacs"] <= self.gmacs
        return row["speedup"] >= self.speedup

    def describe(self) -> str:
        return (f"<= {self.gmacs:g} GMACs per image" if self.gmacs is not None
                else f">= {self.speedup:g}x the unmodified model's images/s")


def _estimate(model: nn.Module, setting: Setting, images: Tensor) -> float:
    """GMACs per image of ``setting`` on ``images`` (a few), by :func:`leanvit.count_macs`."""
    from leanvit.macs import count_macs

    m = apply_setting(copy.deepcopy(model), setting).eval()
    return count_macs(m, images).gmacs


def knob_setting(model: nn.Module, method: str, target_gmacs: float, images: Tensor,
                 memo: Optional[dict] = None, inflect: Optional[float] = None
                 ) -> tuple[Setting, float]:
    """The setting of ``method``'s knob (its :attr:`leanvit.registry.Method.knob`) whose GMACs
    on ``images`` come closest to ``target_gmacs`` without exceeding it (or the cheapest, when
    none is that cheap): bisection on the knob. ``inflect``: one of the knob's
    ``inflections``, the option then given as ``(value, inflect)``. Returns the setting and
    its GMACs on ``images``."""
    from leanvit.adapters import find_adapter

    knob = get_method(method).knob
    if knob is None:
        raise ValueError(f"method {method!r} declares no strength option (Method.knob)")
    info = find_adapter(model).describe(model)
    tokens = info.num_patches + info.num_prefix_tokens
    lo, hi = float(knob.lo), knob.upper(tokens)
    memo = {} if memo is None else memo

    def shaped(v: float) -> Any:
        return v if inflect is None else (v, inflect)

    def gm(v: float) -> float:
        """GMACs at knob value ``v``; ``-inf`` for a value the method refuses (taken as too
        aggressive, so the bisection moves to milder values)."""
        v = int(round(v)) if knob.integer else round(v, 4)
        key = (method, v, inflect)
        if key not in memo:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # e.g. ToMe's clamped r
                    memo[key] = _estimate(model, Setting(method, {knob.option: shaped(v)}),
                                          images)
            except ValueError:
                memo[key] = -math.inf
        return memo[key]

    best: Optional[tuple[float, float]] = None  # (value, gmacs), within the target
    cheapest: Optional[tuple[float, float]] = None
    a, b = lo, hi
    for _ in range(30):
        mid = (a + b) / 2
        if knob.integer:
            mid = int(round(mid))
        g = gm(mid)
        if g > -math.inf and (cheapest is None or g < cheapest[1]):
            cheapest = (mid, g)
        if -math.inf < g <= target_gmacs and (best is None or g > best[1]):
            best = (mid, g)
        cheaper_side_up = knob.more_is_cheaper
        if (g > target_gmacs) == cheaper_side_up:
            a = mid
        else:
            b = mid
        if knob.integer and b - a <= 1:
            for v in (int(a), int(b)):
                gv = gm(v)
                if gv == -math.inf:
                    continue
                if gv <= target_gmacs and (best is None or gv > best[1]):
                    best = (v, gv)
                if cheapest is None or gv < cheapest[1]:
                    cheapest = (v, gv)
            break
        if not knob.integer and b - a < 5e-3:  # keep rates to ~0.005: 8 steps
            break
    if best is None and cheapest is None:
        raise ValueError(f"{method}: no value of {knob.option} in [{lo:g}, {hi:g}] is accepted "
                         "for this model")
    value, g = best or cheapest
    value = int(value) if knob.integer else round(float(value), 3)
    return (Setting(method, {knob.option: shaped(value)}),
            memo.get((method, value, inflect), g))


def grid_methods(methods: Optional[Sequence[str]] = None
                 ) -> tuple[list[str], list[tuple[str, str]]]:
    """Which of ``methods`` (default: every registered method but internal modes) tune grids:
    those declaring a strength option (:attr:`leanvit.registry.Method.knob`). Returns them and
    the methods left out with the reason (trained ones: how to pass their state); the identity
    and searched methods (:func:`searched_methods`) are in neither list. ``ValueError`` for a
    name that is not registered."""
    offered = {n: m for n, m in registered().items() if not m.internal}
    gridded: list[str] = []
    skipped: list[tuple[str, str]] = []
    for name in (list(methods) if methods is not None else list(offered)):
        if name not in offered:
            raise ValueError(f"unknown method {name!r}; available methods: "
                             f"{', '.join(offered)}")
        m = offered[name]
        if name == IDENTITY or m.search is not None:
            continue
        if m.knob is None:
            skipped.append((name, m.needs_training or "has no strength option tune knows; "
                                                      "pass a setting explicitly"))
        else:
            gridded.append(name)
    return gridded, skipped


def grid(model: nn.Module, gmacs_targets: Sequence[float], images: Tensor,
         methods: Optional[Sequence[str]] = None) -> tuple[list[Setting], dict[str, float],
                                                           list[tuple[str, str]]]:
    """Settings of every training-free method (``methods``: names of registered methods;
    default all of them) closest to each of ``gmacs_targets`` from below, without duplicates.
    Each method's strength option is the knob it declares (:attr:`leanvit.registry.Method.
    knob`); the identity, internal modes and searched methods are not gridded (searches run in
    :func:`tune`).

    Returns the settings, their estimated GMACs by label, and the registered methods left out
    with the reason.
    """
    names, skipped = grid_methods(methods)
    settings: list[Setting] = []
    est: dict[str, float] = {}
    memo: dict = {}
    for name in names:
        shapes = (None, *get_method(name).knob.inflections)
        try:
            for t in gmacs_targets:
                for inflect in shapes:
                    s, g = knob_setting(model, name, t, images, memo, inflect)
                    if s.label not in est:
                        settings.append(s)
                        est[s.label] = g
        except (ValueError, TypeError) as e:  # a method that cannot serve this model
            skipped.append((name, f"not applicable to this model: {e}"))
    return settings, est, skipped


# --------------------------------------------------------------------------------------------
# The result


@dataclass
class TuneResult:
    """What :func:`tune` returns.

    Attributes:
        budget: the :class:`Budget`.
        rows: every evaluated setting (the rows of :func:`leanvit.compare.run_compare`:
            ``method``, ``settings``, ``label``, ``options``, ``load``, ``top1``, ``top5``,
            ``gmacs``, ``images_per_s``, ``speedup``, ...; plus ``within_budget``).
        front: the rows on the Pareto front (top-1 against GMACs, or against images/s for a
            speedup budget), cheapest first.
        choice: the most accurate row within the budget (ties: fewer GMACs); ``None`` when
            nothing fits.
        settings: the :class:`leanvit.compare.Setting` of each row (same order).
        schedules: DiffRate schedules searched, by label.
        skipped: registered methods left out, with the reason.
        seconds: wall time of the whole run.
    """

    budget: Budget
    rows: list[dict]
    front: list[dict]
    choice: Optional[dict]
    settings: list[Setting] = field(default_factory=list)
    schedules: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def choice_setting(self) -> Optional[Setting]:
        """The :class:`leanvit.compare.Setting` of :attr:`choice`."""
        if self.choice is None:
            return None
        return self.settings[self.rows.index(self.choice)]

    def apply(self, model: nn.Module) -> nn.Module:
        """Patch ``model`` (unpatched, same architecture) with the chosen setting, in place."""
        s = self.choice_setting
        if s is None:
            raise ValueError(f"no evaluated setting is within the budget "
                             f"({self.budget.describe()})")
        return apply_setting(model, _self_contained(s, self.schedules))

    def save_choice(self, model: nn.Module, path: Union[str, Path]) -> Path:
        """Write the chosen setting as a :func:`leanvit.save` file (method, options and learned
        state; a DiffRate schedule is stored inside it): ``leanvit.load(model, path)``,
        ``--set load=PATH`` and ``leanvit bench --set load=PATH`` apply it."""
        from leanvit.io import save
        from leanvit.patching import patch

        m = self.apply(copy.deepcopy(model))
        from leanvit.patching import is_patched

        if not is_patched(m):  # the unmodified model is the best within the budget
            m = patch(m, IDENTITY)
        return save(m, path)


def _self_contained(s: Setting, schedules: Mapping[str, Any]) -> Setting:
    """The setting with what a search found given as its contents, not a file path."""
    if s.label in schedules:
        option = get_method(s.method).search.option
        return Setting(s.method, {**s.options, option: schedules[s.label].to_dict()}, s.load)
    return s


def choose(rows: Sequence[dict], budget: Budget) -> Optional[dict]:
    """The most accurate row within ``budget`` (ties: fewer GMACs, then listed first)."""
    fitting = [r for r in rows if budget.fits(r)]
    if not fitting:
        return None
    return max(fitting, key=lambda r: (r["top1"], -r["gmacs"]))


def front_of(rows: Sequence[dict], budget: Budget) -> list[dict]:
    """Pareto front (:func:`leanvit.compare.pareto`): top-1 against GMACs, or against images/s
    for a speedup budget."""
    if budget.gmacs is not None:
        pts = [(r["gmacs"], r["top1"]) for r in rows]
        return [rows[i] for i in pareto(pts, lower_x_better=True)]
    pts = [(r["images_per_s"], r["top1"]) for r in rows]
    return [rows[i] for i in pareto(pts, lower_x_better=False)]


# --------------------------------------------------------------------------------------------
# The run


def _batches(loader: Iterable) -> list[tuple[Tensor, Tensor]]:
    """The loader's batches, read once and kept (every setting sees the same tensors; images
    are decoded once)."""
    out = []
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError("the loader must yield (images [B, 3, H, W], labels [B]) batches")
        out.append((batch[0], batch[1]))
    if not out:
        raise ValueError("the loader yielded no images")
    return out


def parse_methods_arg(text: Optional[str]) -> tuple[Optional[list[str]], list[Setting]]:
    """``--methods``: ``;``-separated entries (``leanvit compare``'s syntax); a bare method name
    asks for its grid (or its search), an entry with options or ``load=`` is one explicit
    setting. ``None``: every method's grid. Returns (methods to grid, explicit settings)."""
    from leanvit.compare import parse_methods

    if text is None:
        return None, []
    names, explicit = [], []
    for s in parse_methods(text):
        if s.options or s.load is not None:
            explicit.append(s)
        else:
            names.append(s.method)
    return names, explicit


def tune(
    model: nn.Module,
    loader: Iterable,
    budget: Any,
    *,
    methods: Optional[Sequence[Union[str, Setting]]] = None,
    search_images: Optional[Tensor] = None,
    search_options: Optional[dict] = None,
    fractions: Sequence[float] = FRACTIONS,
    repeats: int = 3,
    out: Optional[Union[str, Path]] = None,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = print,
) -> TuneResult:
    """Find the most accurate setting within ``budget`` for ``model`` on ``loader``'s images.

    Args:
        model: an unpatched classifier (a headless backbone gets a probe head first:
            :func:`leanvit.probe.attach_head`), eval mode; not modified.
        loader: ``(images [B, 3, H, W], labels [B])`` batches (read once and kept in memory);
            throughput is measured on its first batch, so its batch size is the one timed.
        budget: GMACs per image (a number or ``{"gmacs": G}``) or ``{"speedup": S}``.
        methods: method names (their grids; ``"diffrate"``: a search to the budget) and/or
            :class:`leanvit.compare.Setting` objects (evaluated as given, e.g.
            ``Setting("dynamicvit", load="predictors.safetensors")``). Default: every
            registered training-free method's grid, the DiffRate search and the unmodified
            model.
        search_images: ``[M, 3, H, W]`` images for the DiffRate search (no labels needed: it
            distils the unpatched model); default: the loader's images.
        search_options: keyword arguments of :func:`leanvit.search.diffrate.search`.
        fractions: grid targets as fractions of the MAC budget (:data:`FRACTIONS`); for a
            speedup budget, of ``dense GMACs / speedup``.
        repeats: timed passes per setting (throughput).
        out: folder for the searched DiffRate schedules (default: a temporary folder).
        log: one line per step (what is tried, how long is left); ``None``: silent.

    Returns:
        :class:`TuneResult`.
    """
    from leanvit.macs import count_macs
    from leanvit.patching import is_patched

    say = log or (lambda _: None)
    b = Budget.of(budget)
    search_options = check_search_options(search_options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_patched(model):
        raise ValueError("tune needs an unpatched model; call leanvit.unpatch(model) first")
    for f in fractions:
        if not (isinstance(f, (int, float)) and math.isfinite(f) and f > 0):
            raise ValueError(f"fractions must be positive numbers, got {f!r}")
    t_start = time.perf_counter()
    batches = _batches(loader)
    # a few images to place the grid by MACs (each bisection step is a forward pass of them;
    # data-dependent methods, ATS, average over them)
    sample = batches[0][0][:2]
    model = model.eval()
    dense = count_macs(model, sample).gmacs
    center = b.gmacs if b.gmacs is not None else dense / b.speedup
    targets = [center * f for f in fractions]

    names, explicit = _split_methods(methods)
    say(f"tune: budget {b.describe()}; unmodified model {dense:.3f} GMACs; grid targets "
        + ", ".join(f"{t:.2f}" for t in targets) + " GMACs")
    settings, est, skipped = grid(model, targets, sample, names)
    # a setting that removes nothing (e.g. tome r=0) is the unmodified model again
    settings = [s for s in settings if est[s.label] < dense * (1 - 1e-9)]
    for s in explicit:
        est.setdefault(s.label, _estimate(model, s, sample))
    schedules = _searched_settings(model, names, center, dense, search_images, batches,
                                   search_options, out, progress, say, settings, est, skipped)
    all_settings = [Setting(IDENTITY)] + settings + explicit
    for s in all_settings:
        if s.label not in est:
            est[s.label] = dense
    rows = _evaluate_settings(model, all_settings, batches, est, repeats, progress, say)
    for r in rows:
        r["within_budget"] = b.fits(r)
    choice = choose(rows, b)
    result = TuneResult(budget=b, rows=rows, front=front_of(rows, b), choice=choice,
                        settings=all_settings, schedules=schedules, skipped=skipped,
                        seconds=time.perf_counter() - t_start)
    if choice is None:
        say(f"tune: no setting is within the budget ({b.describe()})")
    else:
        say(f"tune: chosen {choice['label']}: top-1 {choice['top1']:.2f}% at "
            f"{choice['gmacs']:.3f} GMACs, {choice['speedup']:.2f}x ({_dur(result.seconds)})")
    return result


def _split_methods(methods: Optional[Sequence[Union[str, Setting]]]
                   ) -> tuple[Optional[list[str]], list[Setting]]:
    """``tune``'s ``methods`` as (method names, or ``None`` for every registered one;
    explicit :class:`Setting` objects)."""
    if methods is None:
        return None, []
    names: list[str] = []
    explicit: list[Setting] = []
    for m in methods:
        if isinstance(m, Setting):
            explicit.append(m)
        elif isinstance(m, str):
            names.append(m)
        else:
            raise TypeError(f"methods takes names and Settings, got {m!r}")
    return names, explicit


def _searched_settings(model: nn.Module, names: Optional[list[str]], center: float,
                       dense: float, search_images, batches, search_options, out, progress,
                       say, settings: list[Setting], est: dict, skipped: list) -> dict:
    """Run the searches of the searched methods (:func:`searched_methods`) that ``names``
    asks for to ``center`` GMACs: each found setting is appended to ``settings`` (its GMACs to
    ``est``), each search that cannot run to ``skipped``; returns what each found (a schedule)
    by setting label."""
    want_search = [n for n in searched_methods() if names is None or n in names]
    schedules: dict[str, Any] = {}
    for m in want_search:
        if center >= dense:
            skipped.append((m, f"the budget is not below the unmodified model's {dense:.3f} "
                               "GMACs: nothing to search"))
            continue
        s, schedule = _run_search(get_method(m), model, center, search_images, batches,
                                  search_options, out, progress, say)
        if s is None:
            skipped.append((m, schedule))
            continue
        schedules[s.label] = schedule
        settings.append(s)
        est[s.label] = schedule.gmacs
    return schedules


def _evaluate_settings(model: nn.Module, all_settings: list[Setting], batches, est: dict,
                       repeats: int, progress: bool, say) -> list[dict]:
    """Evaluate every setting (the unmodified model first) with :func:`run_compare`, saying
    what is left (by the settings' estimated GMACs ``est``) after each."""
    images = sum(int(x.shape[0]) for x, _ in batches)
    total_cost = sum(est[s.label] for s in all_settings)
    clock = {"done": 0.0, "t0": time.perf_counter()}

    def show(i: int, s: Setting, row: Optional[dict]) -> None:
        if row is None:
            say(f"[{i + 1}/{len(all_settings)}] {s.label[:70]} (~{est[s.label]:.2f} GMACs)")
            return
        clock["done"] += est[s.label]
        elapsed = time.perf_counter() - clock["t0"]
        left = elapsed / clock["done"] * (total_cost - clock["done"])
        say(f"    top-1 {row['top1']:.2f}%  {row['gmacs']:.3f} GMACs  "
            f"{row['images_per_s']:.1f} images/s ({row['speedup']:.2f}x); about {_dur(left)} "
            "left")

    say(f"tune: evaluating {len(all_settings)} settings on {images} images")
    return run_compare(model, all_settings, batches, progress=progress, repeats=repeats,
                       callback=show)


def _dur(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _run_search(method: Method, model, target, search_images, batches, options, out, progress,
                say):
    """One search of ``method`` (its :attr:`leanvit.registry.Method.search`) to ``target``
    GMACs; returns (setting, schedule) or (None, why)."""
    import inspect
    import tempfile

    save_schedule, search = method.search.saver(), method.search.function()
    tolerance = inspect.signature(search).parameters.get("tolerance")  # its default tolerance
    TOLERANCE = tolerance.default if tolerance is not None else 0.0
    imgs = search_images if search_images is not None else torch.cat([x for x, _ in batches])
    backbone = copy.deepcopy(model)
    opts = {**SEARCH_DEFAULTS, **dict(options or {})}
    if isinstance(imgs, Tensor):
        opts.pop("num_images", None)
    where = (f"{len(imgs)} images" if isinstance(imgs, Tensor)
             else f"{opts.get('num_images') or 'all'} images of {imgs}")
    # Aim below the budget so that a result within the search's MAC tolerance (either side
    # of its target) stays within the budget: 4.0 G -> 3.922 G at the default 2%.
    tol = opts.get("tolerance", TOLERANCE)
    try:
        aim = target / (1.0 + float(tol))
    except (TypeError, ValueError):
        return None, f"search failed: tolerance must be a number, got {tol!r}"
    say(f"tune: {method.name} search to {aim:.3f} GMACs ({target:.3f} / (1 + {tol}) tolerance) on "
        f"{where} ({', '.join(f'{k}={v}' for k, v in opts.items())})")
    try:
        r = search(backbone, aim, imgs, progress=progress, **opts)
    except (ValueError, TypeError) as e:
        named = [k for k in (options or {}) if str(e).startswith(f"{k} ")]
        if named:  # the user's option is out of range: their error, not a failed search
            raise ValueError(f"search_options {named[0]}={options[named[0]]!r}: {e}") from None
        return None, f"search failed: {e}"
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="leanvit-tune-"))
    path = folder / f"{method.name}_{aim:.3f}_{method.search.option}.json"
    save_schedule(r.schedule, path)
    warn = r.schedule.obtained.get("warning")
    say(f"tune: searched {r.schedule.gmacs:.3f} GMACs in {_dur(r.seconds)}"
        + (f"; WARNING: {warn}" if warn else "") + f"; {path}")
    return Setting(method.name, {method.search.option: str(path)}), r.schedule


# --------------------------------------------------------------------------------------------
# Outputs


def write_tune_outputs(result: TuneResult, model: nn.Module, out_dir: Union[str, Path],
                       meta: dict, command: str = "") -> dict[str, Path]:
    """Write ``out_dir``: ``results.{md,png,json}`` (every setting; :func:`leanvit.compare.
    write_outputs`, Pareto front ringed), ``front.md`` (the front and the choice),
    ``choice.safetensors`` (:meth:`TuneResult.save_choice`), ``choice.json`` (the chosen
    setting, its numbers and how to use it; ``choice_schedule.json`` too for DiffRate) and
    ``tune.json`` (everything). Files are written atomically."""
    import json

    from leanvit._files import atomic_write_text
    from leanvit.compare import markdown_table, write_outputs
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    b = result.budget
    budget = {"gmacs": b.gmacs} if b.gmacs is not None else {"speedup": b.speedup}
    model_name = meta.get("model", "MODEL")
    title = (f"leanvit tune {model_name}: budget {b.describe()} "
             f"({meta.get('images', '?')} images)")
    paths = write_outputs(result.rows, out, {**meta, "budget": budget}, title=title)
    lines = [f"# leanvit tune: {model_name}, budget {b.describe()}", ""]
    if command:
        lines += [f"Command: `{command}` ({result.seconds / 60:.1f} min)", ""]
    lines += ["Pareto front (top-1 against "
              + ("GMACs" if b.gmacs is not None else "images/s") + "):", "",
              markdown_table(result.front).rstrip(), ""]
    c = result.choice
    if c is None:
        lines.append(f"No evaluated setting is within the budget ({b.describe()}).")
    else:
        lines.append(f"Chosen (most accurate within the budget, of {sum(r['within_budget'] for r in result.rows)} "
                     f"settings within it, {len(result.rows)} evaluated): **{c['label']}**, "
                     f"top-1 {c['top1']:.2f}%, {c['gmacs']:.3f} GMACs, {c['speedup']:.2f}x.")
    if result.skipped:
        lines += ["", "Left out:", ""] + [f"- `{m}`: {why}" for m, why in result.skipped]
    paths["front"] = out / "front.md"
    atomic_write_text(paths["front"], "\n".join(lines) + "\n")

    info: dict[str, Any] = {"budget": budget, "choice": None}
    if c is not None:
        s = result.choice_setting
        paths["choice"] = result.save_choice(model, out / "choice.safetensors")
        use = {"python": f"leanvit.load(model, {str(paths['choice'])!r})",
               "bench": f"leanvit bench {model_name} --set load={paths['choice']}",
               "set": f"--set load={paths['choice']}"}
        options = dict(s.options)
        if s.label in result.schedules:  # a searched setting: what was found, as a file
            search = get_method(s.method).search
            sched = out / f"choice_{search.option}.json"
            search.saver()(result.schedules[s.label], sched)
            options[search.option] = str(sched)
            use["set"] = f"--method {s.method} --set {search.option}={sched}"
        elif s.load is None and options:
            use["set"] = f"--method {s.method} " + " ".join(
                f"--set {k}={_literal(v)}" for k, v in options.items())
        info["choice"] = {"method": s.method, "options": _jsonable(options), "load": s.load,
                          "label": c["label"], "top1": c["top1"], "top5": c["top5"],
                          "gmacs": c["gmacs"], "images_per_s": c["images_per_s"],
                          "speedup": c["speedup"], "file": str(paths["choice"]), "use": use}
    paths["json_choice"] = out / "choice.json"
    atomic_write_text(paths["json_choice"], json.dumps(info, indent=2) + "\n")
    paths["tune"] = out / "tune.json"
    atomic_write_text(paths["tune"], json.dumps({
        "meta": {**meta, "budget": budget}, "command": command, "seconds": result.seconds,
        "rows": result.rows, "front": [r["label"] for r in result.front],
        "choice": None if c is None else c["label"],
        "skipped": [list(x) for x in result.skipped]}, indent=2, default=str) + "\n")
    return paths


def _literal(v: Any) -> str:
    text = repr(tuple(v) if isinstance(v, list) else v)
    return f"'{text}'" if any(ch in text for ch in " (),") else text


def _jsonable(options: Mapping[str, Any]) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()}
