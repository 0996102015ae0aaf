"""The registry's per-family methods: one name, a builder and an options dataclass per
family, dispatch on the model's family, clear errors for options of another family."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

import leanvit
from leanvit.registry import Method, Reducer
from tests._hier_models import tiny_convnext
from tests.conftest import tiny_vit


@dataclass(frozen=True)
class _VitOpts:
    a: int = 1


@dataclass(frozen=True)
class _ConvOpts:
    a: int = 1
    b: float = 0.5


class _Tag(Reducer):
    pass


def test_builders_per_family_dispatch_on_the_model(temp_method):
    built = []

    def make(tag):
        def build(options, info):
            built.append((tag, options, info.family))
            return _Tag(options, info)
        return build

    m = temp_method(Method("_perfam", _VitOpts, {"vit": make("v"), "convnext": make("c")},
                           family_options={"convnext": _ConvOpts}))
    assert m.families == ("vit", "convnext")
    assert list(leanvit.available_methods()).count("_perfam") == 1
    leanvit.patch(tiny_vit(), "_perfam", a=2)
    leanvit.patch(tiny_convnext(), "_perfam", b=0.25)
    assert built == [("v", _VitOpts(a=2), "vit"), ("c", _ConvOpts(a=1, b=0.25), "convnext")]
    with pytest.raises(ValueError, match="'b' applies to the convnext family only"):
        leanvit.patch(tiny_vit(), "_perfam", b=0.1)
    from tests._hier_models import tiny_swin

    with pytest.raises(ValueError, match="needs a vit model or a convnext model; this is a "
                                         "swin model"):
        leanvit.patch(tiny_swin(), "_perfam")


def test_a_family_without_builder_is_refused_at_registration():
    with pytest.raises(ValueError, match="no builder"):
        Method("_bad", _VitOpts, {"vit": lambda o, i: None}, families=("vit", "swin"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_number_rejects_non_finite_numbers(bad):
    """Issue 13.4: NaN compared False with both bounds and so passed every range check."""
    from leanvit.registry import check_number

    with pytest.raises(ValueError, match="finite"):
        check_number("x", bad, lo=0.0, hi=1.0)
    with pytest.raises(ValueError, match="finite"):
        check_number("x", bad)


@pytest.mark.parametrize("method,options,bad", [
    ("evit", dict(keep_rate=0.7), dict(keep_rate=float("nan"))),
    ("topk", dict(keep_rate=0.7), dict(keep_rate=float("nan"))),
    ("dynamicvit", dict(locations=(1,), tau=1.0), dict(tau=float("nan"))),
    ("dynamicvit", dict(locations=(1,), keep_rate=0.7), dict(keep_rate=float("inf"))),
    ("tome", dict(r=(2, 0.5)), dict(r=(2, float("nan")))),
])
def test_methods_refuse_nan_options(method, options, bad):
    """The same options with a finite value patch; with NaN/inf they are refused."""
    import leanvit
    from tests.conftest import tiny_vit

    model = tiny_vit()
    leanvit.unpatch(leanvit.patch(model, method, **options))
    with pytest.raises(ValueError, match="finite|must be"):
        leanvit.patch(model, method, **{**options, **bad})
    assert not leanvit.is_patched(model)


def test_training_config_and_loss_weights_refuse_nan():
    from leanvit.losses import LossWeights
    from leanvit.train import TrainConfig

    with pytest.raises(ValueError, match="finite"):
        LossWeights(ratio=float("nan"))
    for name in ("lr", "weight_decay", "smoothing", "mixup", "clip_grad"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            TrainConfig(**{name: float("nan")})


def test_a_method_is_training_free_trained_or_searched_not_several():
    from leanvit.registry import R_KNOB, Search

    with pytest.raises(ValueError, match="declares knob and needs_training"):
        Method("_two", _VitOpts, lambda o, i: None, knob=R_KNOB, needs_training="train it")
    with pytest.raises(ValueError, match="declares knob and search"):
        Method("_two", _VitOpts, lambda o, i: None, knob=R_KNOB,
               search=Search("m:f", "schedule", "m:g"))
    with pytest.raises(TypeError, match="knob must be a Knob"):
        Method("_bad", _VitOpts, lambda o, i: None, knob=("r", 0, None))


def test_knob_ranges():
    from leanvit.registry import KEEP_RATE_KNOB, R_KNOB, Knob

    assert (R_KNOB.upper(197), R_KNOB.mildest(197)) == (98.0, 0.0)  # at most half the tokens
    assert (KEEP_RATE_KNOB.upper(197), KEEP_RATE_KNOB.mildest(197)) == (1.0, 1.0)
    tokens = Knob("max_tokens", 2, None, True, False)
    assert (tokens.upper(197), tokens.mildest(197)) == (197.0, 197.0)


def test_reducer_training_hooks_default_to_nothing():
    model = leanvit.patch(tiny_vit(), "none")
    r = model.leanvit
    assert (dict(r.default_loss_weights), r.decision_key, r.keep_targets()) == ({}, None, [])
    assert r.trained_keep_rate() is None
    assert r.consistency_view(__import__("torch").Generator()) is None
    with pytest.raises(ValueError, match="none has no keep_rate option"):
        r.with_keep_rate(0.5)


def test_load_reads_authors_checkpoints_through_the_importer_a_method_declares(temp_method,
                                                                              tmp_path):
    """io names no method: a registered method's importer is found and used."""
    import torch

    from leanvit.registry import Importer

    seen = []

    def plan(tensors, path, options):
        seen.append(sorted(tensors))
        return {"a": int(tensors["mine.a"].item()), **options}, {}, {}

    temp_method(Method("_imp", _VitOpts, lambda o, i: _Tag(o, i), families=("tokens",),
                       needs_training="train it",
                       importers=(Importer("a test format (mine.* tensors)",
                                           lambda t: "mine.a" in t, plan),)))
    path = tmp_path / "authors.pth"
    torch.save({"model": {"mine.a": torch.tensor(3)}}, path)
    model = leanvit.load(tiny_vit(), path)
    assert model.leanvit.method_name == "_imp" and model.leanvit.options == _VitOpts(a=3)
    assert seen == [["mine.a"]]
    torch.save({"model": {"other.b": torch.tensor(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="nor a test format \\(mine.\\* tensors\\)"):
        leanvit.load(tiny_vit(), tmp_path / "other.pth")
