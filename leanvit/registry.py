"""The one registry of methods, and the reducer interface every method implements.

A method is a :class:`Method`: a name, an options dataclass whose defaults are documented
with their source, and a factory that builds its :class:`Reducer` for one model. The adapter
of each backbone family calls the reducer's hooks; nothing here knows about timm.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import Tensor, nn

from leanvit.signals import Signals
from leanvit.state import TokenState


@dataclass(frozen=True)
class ModelInfo:
    """What a method may know about the model it is applied to (filled by the adapter)."""

    family: str
    depth: int
    embed_dim: int
    num_heads: int
    num_prefix_tokens: int
    has_class_token: bool
    num_patches: int
    global_pool: str
    name: str = ""
    #: input size ``(H, W)`` in pixels the model was built for (``None`` if unknown)
    img_size: Optional[tuple[int, int]] = None


class Reducer(nn.Module):
    """Base class of a method's runtime object: every hook is the identity.

    A reducer is an ``nn.Module`` attached to the patched model as ``model.leanvit``, so
    learned parts (predictors) move with ``.to()``, appear in ``state_dict()`` and reach
    optimisers. Hooks receive the block index ``i`` (0-based), tokens ``x`` ``[B, N, C]`` and
    the :class:`TokenState`; they return new ones. ``signals`` give cheap attention statistics.
    """

    def __init__(self, options: Any, info: ModelInfo):
        super().__init__()
        self.options = options
        self.info = info

    # -- which hooks run where (plain Python, decided at build time: static for torch.compile)
    def acts_before(self, i: int) -> bool:
        """Whether :meth:`before_block` runs before block ``i``."""
        return False

    def selects_queries(self, i: int) -> bool:
        """Whether :meth:`select_queries` runs inside block ``i``'s attention."""
        return False

    def acts_after(self, i: int) -> bool:
        """Whether :meth:`after_attention` runs in block ``i`` (after the attention residual)."""
        return False

    def needs_signals(self, i: int) -> bool:
        """Whether block ``i`` must compute :class:`Signals` (its q, k, v are then exposed)."""
        return self.acts_after(i) or self.selects_queries(i)

    # -- hooks
    def init_state(self, state: TokenState, x: Tensor) -> TokenState:
        """Called once per forward, before the first block."""
        return state

    def before_block(self, i: int, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        return x, state

    def select_queries(
        self, i: int, signals: Signals, state: TokenState
    ) -> tuple[Optional[Tensor], TokenState]:
        """Query rows to compute, ``[B, K]`` long (``None`` = all); all keys/values stay."""
        return None, state

    def after_attention(
        self, i: int, x: Tensor, signals: Optional[Signals], state: TokenState
    ) -> tuple[Tensor, TokenState]:
        return x, state

    def extra_repr(self) -> str:
        return repr(self.options)


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        name: the name users pass to :func:`leanvit.patch`.
        options: dataclass type; its fields are the method's options with their defaults.
        build: ``build(options, info) -> Reducer``; validates options against the model and
            raises ``ValueError`` for a model the method cannot serve.
        families: backbone families the method supports (adapter names).
        summary: one line for ``leanvit --help`` and error messages.
    """

    name: str
    options: type
    build: Callable[[Any, ModelInfo], Reducer]
    families: tuple[str, ...] = ("vit",)
    summary: str = ""

    def make_options(self, **kwargs: Any) -> Any:
        """The options dataclass from keyword arguments; clear errors for unknown names."""
        fields = {f.name: f for f in dataclasses.fields(self.options)}
        unknown = sorted(set(kwargs) - set(fields))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for method {self.name!r}; "
                f"valid options: {describe_options(self.options)}"
            )
        return self.options(**kwargs)


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (its name must be new)."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    if not dataclasses.is_dataclass(method.options):
        raise TypeError("Method.options must be a dataclass type")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``; ``ValueError`` listing the methods otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}")
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; available methods: {', '.join(sorted(_METHODS))}"
        ) from None


def available_methods() -> dict[str, type]:
    """Method name -> its options dataclass (read the defaults from its fields)."""
    return {name: m.options for name, m in sorted(_METHODS.items())}


def describe_options(options_cls: type) -> str:
    fields = dataclasses.fields(options_cls)
    if not fields:
        return "(none: this method takes no options)"
    return ", ".join(f"{f.name} (default {f.default!r})" for f in fields)


# -- small validators used by options dataclasses ------------------------------------------

def check_number(name: str, value: Any, *, lo: float = -math.inf, hi: float = math.inf,
                 lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``value`` is a number in the given range."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_locations(name: str, locations: Any, depth: int) -> tuple[int, ...]:
    """Validate block indices against the model depth; returns them as a sorted tuple."""
    if isinstance(locations, int) and not isinstance(locations, bool):
        locations = (locations,)
    if not isinstance(locations, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in locations
    ):
        raise TypeError(f"{name} must be a tuple of block indices, got {locations!r}")
    bad = [v for v in locations if not 0 <= v < depth]
    if bad:
        raise ValueError(f"{name} {bad} outside the model's blocks 0..{depth - 1}")
    if len(set(locations)) != len(locations):
        raise ValueError(f"{name} has repeated blocks: {locations!r}")
    return tuple(sorted(locations))
