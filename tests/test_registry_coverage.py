"""The registry is the only place that knows a method: adding a method is one file in
``leanvit/methods/`` (plus its test file), and this test fails until the new method is covered.

A registered method (internal modes aside) must declare how ``leanvit tune`` treats it (a
strength knob, a need for training, or a search; only the identity declares none), appear in
``tune``'s grid when it is training-free, have its own test file ``tests/methods/test_<name>.py``
and appear in every per-method test matrix below (or be exempt there, with the reason). The
keep-all matrix is derived from the registry itself: every knob at its mildest value must give
the unpatched model bit for bit.

:func:`coverage_problems` is checked on the real registry, and shown to fail on a registry
with a dummy method added (monkeypatched) that declares nothing, then one with a knob but no
tests.
"""
from __future__ import annotations

import ast
import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import pytest
import torch

import leanvit
from leanvit import registry
from leanvit.registry import IDENTITY, KEEP_RATE_KNOB, Method, ModelInfo, Reducer, registered
from tests.methods._vit_reference import tiny_vit

ROOT = Path(__file__).resolve().parents[1]

#: per-method test matrices: (module, attribute holding ``(method, options, ...)`` rows or a
#: ``{method: options}`` dict, {method: why it is exempt})
MATRICES: list[tuple[str, str, dict[str, str]]] = [
    ("tests.methods.test_half_precision", "VIT_CASES", {
        "random": "a control whose survivors are drawn anew at every forward: two forwards "
                  "differ at any precision"}),
    ("tests.methods.test_compile", "CASES", {
        "ats": "per-image token counts: data-dependent shapes by design",
        "random": "draws from a CPU torch.Generator in the forward (a graph break)"}),
    ("tests.methods.test_hf_vit_methods", "SETTINGS", {}),
    ("tests.methods.test_open_clip_methods", "REDUCING", {}),
    ("tests.adapters.test_hf_vit", "KEEP_ALL", {}),
]


def matrix_methods(module: str, attribute: str) -> set[str]:
    """The method names a test matrix lists."""
    rows = getattr(importlib.import_module(module), attribute)
    if isinstance(rows, Mapping):
        return set(rows)
    return {row[0] for row in rows}


def coverage_problems(methods: Mapping[str, Method]) -> list[str]:
    """One line per gap: a method tune cannot place, a training-free method missing from tune's
    grid, a method without its test file or missing from a test matrix."""
    from leanvit.tune import grid_methods, searched_methods

    gridded, _ = grid_methods()
    searched = searched_methods()
    listed = {(m, a): matrix_methods(m, a) for m, a, _ in MATRICES}
    problems = []
    for name, m in methods.items():
        if m.internal:
            continue
        if name != IDENTITY and m.knob is None and m.needs_training is None and m.search is None:
            problems.append(f"{name}: declares no knob, needs_training or search on its Method: "
                            "leanvit tune can neither grid nor search it")
        if m.knob is not None and name not in gridded:
            problems.append(f"{name}: training-free (knob {m.knob.option}) but not in tune's grid")
        if m.search is not None and name not in searched:
            problems.append(f"{name}: declares a search that tune does not run")
        if name != IDENTITY and not (ROOT / "tests" / "methods" / f"test_{name}.py").is_file():
            problems.append(f"{name}: no test file tests/methods/test_{name}.py")
        for module, attribute, exempt in MATRICES:
            if name not in listed[module, attribute] and name not in exempt:
                problems.append(f"{name}: missing from {module}.{attribute} (add a row, or an "
                                "exemption with the reason in tests/test_registry_coverage.py)")
    return problems


def test_every_registered_method_is_covered():
    assert coverage_problems(registered()) == []


@dataclass(frozen=True)
class _DummyOptions:
    keep_rate: float = 1.0


def _build_dummy(options: _DummyOptions, info: ModelInfo) -> Reducer:
    return Reducer(options, info)


def _add(monkeypatch, method: Method) -> None:
    """Register ``method`` for this test only (the registry is restored afterwards)."""
    monkeypatch.setitem(registry._METHODS, method.name, method)


def test_a_method_that_declares_nothing_is_reported(monkeypatch):
    _add(monkeypatch, Method("dummy", _DummyOptions, _build_dummy, families=("tokens",)))
    problems = [p for p in coverage_problems(registered()) if p.startswith("dummy:")]
    assert any("declares no knob, needs_training or search" in p for p in problems)
    assert any("no test file tests/methods/test_dummy.py" in p for p in problems)
    for module, attribute, _ in MATRICES:
        assert any(f"missing from {module}.{attribute}" in p for p in problems), (module, problems)
    # the real methods stay covered: only the dummy is reported
    assert all(p.startswith("dummy:") for p in coverage_problems(registered()))


def test_a_training_free_method_goes_into_tunes_grid_from_its_declaration(monkeypatch):
    """Declaring the knob is all tune needs: the dummy is gridded (and still reported for its
    missing tests)."""
    from leanvit.tune import grid_methods

    _add(monkeypatch, Method("dummy", _DummyOptions, _build_dummy, families=("tokens",),
                             knob=KEEP_RATE_KNOB))
    assert "dummy" in grid_methods()[0]
    problems = coverage_problems(registered())
    assert not any("tune" in p for p in problems)
    assert any(p.startswith("dummy: no test file") for p in problems)


def test_the_coverage_check_reports_a_knob_method_tune_leaves_out(monkeypatch):
    """If tune's grid stopped following the registry, the check would say so."""
    tune = importlib.import_module("leanvit.tune")  # the module, not leanvit.tune the function
    monkeypatch.setattr(tune, "grid_methods", lambda methods=None: ([], []))
    problems = coverage_problems(registered())
    knobbed = [n for n, m in registered().items() if m.knob is not None]
    assert knobbed and all(any(p.startswith(f"{n}: training-free") for p in problems)
                           for n in knobbed)


#: knob methods whose mildest knob value still changes the model, and why
NOT_KEEP_ALL = {"ats": "samples its query rows even when it may keep every token (a token "
                       "drawn twice is kept once); its keep-all setting is locations=()"}


@pytest.mark.parametrize("name", [n for n, m in registered().items()
                                  if m.knob is not None and n not in NOT_KEEP_ALL])
def test_every_knob_at_its_mildest_is_the_unpatched_model(name):
    """The keep-all matrix, from the registry: each training-free method at the mildest value
    of its declared knob gives the unpatched model's logits bit for bit."""
    knob = registered()[name].knob
    model = tiny_vit(seed=1).float().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = leanvit.patch(tiny_vit(seed=1).float(), "none").leanvit.info
    value = knob.mildest(tokens.num_patches + tokens.num_prefix_tokens)
    value = int(value) if knob.integer else value
    with torch.no_grad():
        want = model(x)
        got = leanvit.patch(model, name, **{knob.option: value})(x)
    assert torch.equal(got, want), f"{name} {knob.option}={value} changes the outputs"


def _code_words(path: Path) -> set[str]:
    """Identifiers, attribute names, imported module paths and non-docstring string constants of
    a Python file, split into words (docstrings and comments may name methods as examples)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    words: set[str] = set()
    for node in ast.walk(tree):
        texts: list[str] = []
        if isinstance(node, ast.Name):
            texts = [node.id]
        elif isinstance(node, ast.Attribute):
            texts = [node.attr]
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            texts = [node.name]
        elif isinstance(node, ast.ImportFrom):
            texts = [node.module or ""] + [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            texts = [a.name for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            texts = [node.value]
        for t in texts:
            words.update(w.lower() for w in re.split(r"[^A-Za-z0-9]+|_", t) if w)
    return words


def test_tune_names_no_method():
    """``leanvit/tune.py`` iterates the registry: no method name in its code."""
    named = sorted(_code_words(ROOT / "leanvit" / "tune.py")
                   & {n.lower() for n in registered() if n != IDENTITY})
    assert named == []


def test_the_name_check_sees_a_method_named_in_code(tmp_path):
    src = tmp_path / "x.py"
    src.write_text('"""tome in a docstring is fine."""\nfrom leanvit.search.diffrate import s\n'
                   'KNOBS = {"evit": 1}\n')
    assert {"diffrate", "evit"} <= _code_words(src) and "tome" not in _code_words(src)
