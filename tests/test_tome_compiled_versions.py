"""``benchmarks/tome_compiled_versions.py``: its version loading (a private copy of tome.py bound to
its own merge.py, the method registry untouched) and its argument errors. The timing itself
compiles DeiT-S several times and is a benchmark, not a test."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import leanvit.ops.merge
from leanvit.methods.tome import ToMe
from leanvit.registry import get_method

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "tome_compiled_versions.py"


def _script():
    spec = importlib.util.spec_from_file_location("leanvit_bench_tome_versions", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_version_copy_is_private_and_leaves_the_registry_alone():
    mod = _script()
    registered = get_method("tome")
    cls = mod._version_tome("t", ROOT)
    assert cls is not ToMe and cls.__name__ == "ToMe"
    glob = cls.after_attention.__globals__
    assert glob["merge_wavg"] is not leanvit.ops.merge.merge_wavg  # its own merge module
    assert glob["merge_wavg"].__module__ == "_lv_merge_t"
    assert get_method("tome") is registered


@pytest.mark.parametrize("argv, message", [
    (["only=."], "at least two versions"),
    (["a=.", "a=."], "at least two versions"),
    (["a=.", "b"], "LABEL=CHECKOUT"),
    (["a=.", "b=/nonexistent"], "LABEL=CHECKOUT"),
    (["a=.", "b=.", "--inductor", "no_such_setting=1"], "--inductor takes KEY=VALUE"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        _script().main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
