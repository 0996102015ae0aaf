"""The one registry of methods, and the reducer interface every method implements.

A method is a :class:`Method`: a name, an options dataclass whose defaults are documented
with their source, and a factory that builds its :class:`Reducer` for one model. The adapter
of each backbone family calls the reducer's hooks; nothing here knows about timm.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

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
    #: hierarchical families (ConvNeXt, Swin): blocks and width of each stage (empty for ViTs;
    #: ``depth`` is then the total block count, ``embed_dim`` the final feature width)
    stage_depths: tuple[int, ...] = ()
    stage_dims: tuple[int, ...] = ()
    #: the family's kind (:data:`leanvit.adapters.base.KINDS`): ``"tokens"`` (a flat token
    #: sequence: vit, eva, beit) or ``"hierarchical"`` (stages of maps: convnext, swin)
    kind: str = "tokens"


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

    def needs_attention_map(self, i: int) -> bool:
        """Whether block ``i``'s method reads the whole post-softmax map
        (:attr:`leanvit.signals.Signals.attn`): the engine then computes the block's attention
        explicitly and hands its map over, instead of the fused kernel plus a second ``q k^T``
        for the signal (float32/float64 only; in half precision the signal keeps its own
        float32 map)."""
        return False

    def needs_signals(self, i: int) -> bool:
        """Whether block ``i`` must compute :class:`Signals` (its q, k, v are then exposed)."""
        return self.acts_after(i) or self.selects_queries(i)

    # -- hierarchical families (ConvNeXt, Swin: leanvit.adapters.stages): whole stages
    def acts_on_stage(self, s: int) -> bool:
        """Whether :meth:`run_stage` runs stage ``s`` (0-based); otherwise the adapter runs
        the stage's timm blocks themselves."""
        return False

    def run_stage(self, s: int, blocks: Sequence[Any], x: Tensor, state: TokenState
                  ) -> tuple[Tensor, TokenState]:
        """Run stage ``s``'s blocks on its input map ``x`` (the family's own layout, after the
        stage's downsampling). ``blocks``: one :class:`leanvit.adapters.stages.BlockParts`
        per block (the block split into its dense spatial part and its MLP)."""
        raise NotImplementedError(f"{type(self).__name__} acts on stage {s} but has no run_stage")

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
        options: dataclass type; its fields are the method's options with their defaults (for
            a method serving several families: the options of its first family).
        build: ``build(options, info) -> Reducer``; validates options against the model and
            raises ``ValueError`` for a model the method cannot serve. Or a mapping
            ``family or kind -> build`` when the method's algorithm differs per backbone family
            (e.g. ``dynamicvit``: token pruning on flat-token families, MLP routing on
            ConvNeXt/Swin); then ``families`` defaults to the mapping's keys and
            ``method.build(options, info)`` dispatches on ``info.family``, else ``info.kind``.
        families: what the method serves: backbone family names (``"vit"``, ``"convnext"``)
            and/or family kinds (``"tokens"``: every flat-token family, present and future, so
            a new family of that kind needs no edit here; ``"hierarchical"``). See
            :meth:`serves`.
        summary: one line for ``leanvit --help`` and error messages.
        family_options: options dataclass per family where it differs from ``options``
            (families not listed use ``options``). An option given for a family whose
            dataclass lacks it is an error naming the families that take it.
    """

    name: str
    options: type
    build: Union[Callable[[Any, ModelInfo], Reducer], Mapping[str, Callable[[Any, ModelInfo],
                                                                           Reducer]]]
    families: tuple[str, ...] = ("vit",)
    summary: str = ""
    family_options: Mapping[str, type] = dataclasses.field(default_factory=dict)
    #: a mode other code patches in (``diffrate-search``, used by ``leanvit search``): not
    #: listed by :func:`available_methods` and ``leanvit methods``, still accepted by ``patch``
    internal: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.build, Mapping):
            builders = dict(self.build)
            if self.families == ("vit",):  # the default: take the mapping's families
                object.__setattr__(self, "families", tuple(builders))
            missing = [f for f in self.families if f not in builders]
            if missing:
                raise ValueError(f"method {self.name!r} has no builder for {missing}")

            def build(options: Any, info: ModelInfo) -> Reducer:
                key = info.family if info.family in builders else info.kind
                if key not in builders:
                    raise ValueError(f"method {self.name!r} supports the families "
                                     f"{', '.join(builders)}, not {info.family!r}")
                return builders[key](options, info)

            build.builders = builders  # type: ignore[attr-defined]
            object.__setattr__(self, "build", build)
        for fam, cls in self.family_options.items():
            if not dataclasses.is_dataclass(cls):
                raise TypeError(f"family_options[{fam!r}] must be a dataclass type")

    def serves(self, family: str, kind: str) -> bool:
        """Whether the method runs on a model of ``family`` (of ``kind``): the family or its
        kind is in :attr:`families`."""
        return family in self.families or kind in self.families

    def options_for(self, family: Optional[str] = None) -> type:
        """The options dataclass of ``family`` (``None``: :attr:`options`)."""
        if family is None:
            return self.options
        return self.family_options.get(family, self.options)

    def make_options(self, family: Optional[str] = None, /, **kwargs: Any) -> Any:
        """The options dataclass (of ``family``, when given) from keyword arguments; clear
        errors for unknown names, naming the families that take an option this one lacks."""
        cls = self.options_for(family)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - set(fields))
        if unknown:
            where = ""
            others = {fam: self.options_for(fam) for fam in self.families if fam != family}
            for k in unknown:
                takers = [fam for fam, c in others.items()
                          if k in {f.name for f in dataclasses.fields(c)}]
                if takers:
                    where += f"; option {k!r} applies to the {', '.join(takers)} family only"
            fam = f" on a {family} model" if family is not None and len(self.families) > 1 else ""
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for method {self.name!r}"
                f"{fam}; valid options: {describe_options(cls)}{where}"
            )
        return cls(**kwargs)


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
        # internal modes (Method.internal) are accepted by name but never offered
        offered = list(available_methods())
        close = difflib.get_close_matches(name, offered, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown method {name!r}; available methods: {', '.join(offered)}{hint}"
        ) from None


def available_methods() -> dict[str, type]:
    """Method name -> its options dataclass (read the defaults from its fields); internal
    modes (``Method.internal``) are left out."""
    return {name: m.options for name, m in sorted(_METHODS.items()) if not m.internal}


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
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_locations(name: str, locations: Any, depth: Optional[int]) -> tuple[int, ...]:
    """Validate block indices (0-based) against the model depth; returns them as a sorted
    tuple. ``depth=None``: the model is not known yet (an options dataclass), so only the
    types, ``>= 0`` and repeats are checked; the caller checks the depth when it builds."""
    if isinstance(locations, int) and not isinstance(locations, bool):
        locations = (locations,)
    if not isinstance(locations, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in locations
    ):
        raise TypeError(f"{name} must be a tuple of block indices, got {locations!r}")
    if depth is None:
        negative = [v for v in locations if v < 0]
        if negative:
            raise ValueError(f"{name} {negative}: block indices must be >= 0 (block 0 is the "
                             "first block)")
    else:
        bad = [v for v in locations if not 0 <= v < depth]
        if bad:
            raise ValueError(f"{name} {bad} outside the model's blocks 0..{depth - 1} "
                             f"(it has {depth} blocks)")
    if len(set(locations)) != len(locations):
        raise ValueError(f"{name} has repeated blocks: {locations!r}")
    return tuple(sorted(locations))
