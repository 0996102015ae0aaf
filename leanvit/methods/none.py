"""``none``: the identity method.

Runs the model through leanvit's block loop and hooks without changing anything, so that
``bench --method none`` measures what the machinery itself costs. Outputs are bit-identical to
the unpatched model.
"""
from __future__ import annotations

from dataclasses import dataclass

from leanvit.registry import Method, ModelInfo, Reducer, register


@dataclass(frozen=True)
class NoneOptions:
    """The identity method takes no options."""


def build(options: NoneOptions, info: ModelInfo) -> Reducer:
    return Reducer(options, info)


METHOD = register(Method("none", NoneOptions, build, families=("tokens", "hierarchical"),
                         summary="identity: the patch machinery alone"))
