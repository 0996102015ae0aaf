"""The one registry of methods, and the reducer interface every method implements.

A method is a :class:`Method`: a name, an options dataclass whose defaults are documented
with their source, and a factory that builds its :class:`Reducer` for one model. The adapter
of each backbone family calls the reducer's hooks; nothing here knows about timm.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence, Union

import torch
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

    def reads_map(self, i: int) -> bool:
        """Whether block ``i``'s method takes only a per-image statistic of its map
        (:meth:`read_map`), so the engine need not keep the whole map: with
        :meth:`needs_attention_map`, the explicit attention then runs one chunk of images at a
        time and each chunk's map is read while it is in cache
        (:func:`leanvit.ops.attention.map_attention`); the results reach the method as
        :attr:`leanvit.signals.Signals.map_read` (``None`` in half precision: read
        :attr:`~leanvit.signals.Signals.attn` then)."""
        return False

    def reads_received(self, i: int) -> bool:
        """Whether block ``i``'s method reads only the attention each token receives
        (:attr:`leanvit.signals.Signals.attn_received`: the map averaged over heads and query
        rows): the engine then computes it with the block's own explicit attention, a chunk
        of query rows at a time (:func:`leanvit.ops.attention.received_attention`), and keeps
        no map (float32/float64; in half precision the signal forms its own float32 map)."""
        return False

    def read_map(self, i: int, weights: Tensor, signals: Signals, state: TokenState,
                 images: slice) -> Tensor:
        """What block ``i``'s method keeps of a chunk of its post-softmax map ``weights``
        ``[b, H, N, N]`` (float32/float64) of the images ``images`` (a slice of the batch):
        a ``[b, ...]`` tensor. ``signals`` (:class:`~leanvit.signals.Signals`) and ``state``
        (:class:`~leanvit.state.TokenState`) are the block's, for the whole batch."""
        raise NotImplementedError(f"{type(self).__name__} reads no attention map")

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

    # -- training hooks (leanvit.train): what the method offers a fine-tuning run. Every one
    # has a default that means "nothing": a method declares only what it uses.

    #: :class:`leanvit.losses.LossWeights` fields the method's training starts from (the
    #: user's ``loss`` weights override them); empty: the losses' own defaults (DynamicViT's
    #: DeiT recipe).
    default_loss_weights: ClassVar[Mapping[str, float]] = {}
    #: name in ``state.aux`` under which the method records its per-stage keep decisions
    #: ``[B, N0 - prefix]`` for the ratio loss; ``None``: it records none (no ratio term).
    decision_key: ClassVar[Optional[str]] = None

    def keep_targets(self) -> list[float]:
        """Per-stage target kept fractions of the ratio loss (one per recorded decision);
        default: none."""
        return []

    def trained_keep_rate(self) -> Optional[float]:
        """The keep rate a keep-rate warm-up ramps to (from 1): the options' ``keep_rate``
        field when they have one (``evit``, ``topk``, ``dynamicvit``, ...); ``None``: the
        method has no keep rate (the warm-up is refused)."""
        value = getattr(self.options, "keep_rate", None)
        return float(value) if isinstance(value, (int, float)) else None

    def with_keep_rate(self, value: float) -> "Reducer":
        """This reducer with keep rate ``value`` (a keep-rate warm-up step). Default: a
        reducer with learned parameters keeps its modules and gets new ``options`` (it must
        read ``self.options.keep_rate`` when called, as DynamicViT does); one without is built
        afresh from the new options (same method, same model). Returns ``self`` or the new
        reducer, which the caller puts in place of this one."""
        if self.trained_keep_rate() is None:
            raise ValueError(f"{getattr(self, 'method_name', type(self).__name__)} has no "
                             "keep_rate option")
        opts = dataclasses.replace(self.options, keep_rate=value)
        if any(True for _ in self.parameters()):
            self.options = opts
            return self
        new = get_method(self.method_name).build(opts, self.info)
        new.method_name = self.method_name
        new.train(self.training)
        return new

    def consistency_view(self, generator: torch.Generator) -> Optional["Reducer"]:
        """The reducer of the second, milder view of the token-reduction-consistency loss
        (MCTF's fine-tuning, Lee et al. 2024): the same method, same learned modules, with
        less reduction, drawn anew for each step with ``generator``. The trainer runs the
        images through both views and pulls the reduced view's class token towards the
        milder one's (:func:`leanvit.losses.consistency_loss`). Default ``None``: the method
        offers no such loss (``consistency_weight`` > 0 is refused for it)."""
        return None

    def extra_repr(self) -> str:
        return repr(self.options)


# -- what a method declares besides its reducer ---------------------------------------------

def resolve(entry: Union[str, Callable[..., Any]]) -> Callable[..., Any]:
    """A callable given itself or as ``"package.module:name"`` (imported on first use, so a
    method can name a heavy or circular-importing entry point without importing it)."""
    if callable(entry):
        return entry
    if not isinstance(entry, str) or ":" not in entry:
        raise TypeError(f"an entry point is a callable or 'module:name', got {entry!r}")
    module, name = entry.split(":", 1)
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Knob:
    """The one option of a training-free method that trades accuracy for MACs (what
    :mod:`leanvit.tune` bisects on MACs).

    Attributes:
        option: the option's name (``keep_rate``, ``r``, ``max_tokens``).
        lo / hi: its range (the options' own checks; ``hi=None``: ``hi_fraction`` of the
            model's token count, prefix tokens included).
        integer: whether it takes ints.
        more_is_cheaper: whether a larger value removes more tokens (fewer MACs).
        hi_fraction: with ``hi=None``, the upper end as a fraction of the token count (``r``
            of the merging methods: 0.5, at most half the tokens in one block).
        inflections: schedule shapes tried beside the constant value, each bisected on its own:
            the option given as ``(value, inflect)`` (ToMe's ``(r, inflect)`` schedule; ``-1``:
            from ``2r`` in the first block down to 0 in the last). Empty: the constant only.
    """

    option: str
    lo: float
    hi: Optional[float]
    integer: bool
    more_is_cheaper: bool
    hi_fraction: float = 1.0
    inflections: tuple[float, ...] = ()

    def upper(self, tokens: int) -> float:
        """The upper end of the range for a model of ``tokens`` tokens."""
        if self.hi is not None:
            return float(self.hi)
        top = tokens * self.hi_fraction
        return float(int(top) if self.integer else top)

    def mildest(self, tokens: int) -> float:
        """The value that removes the fewest tokens (``lo`` or the upper end)."""
        return float(self.lo) if self.more_is_cheaper else self.upper(tokens)


#: ``r`` of the merging methods (``tome`` and those built on its schedule): tokens removed per
#: block, from 0 to half the tokens.
R_KNOB = Knob("r", 0, None, True, True, hi_fraction=0.5)
#: ToMe's ``r``, constant and decreasing (``(r, -1)``: more merges in the early blocks, none in
#: the last), since on a self-supervised backbone the decreasing schedule can hold accuracy
#: where the constant one does not (docs/token_reduction.md, "ToMe's schedule on DINOv2").
TOME_KNOB = dataclasses.replace(R_KNOB, inflections=(-1.0,))
#: ``keep_rate`` of the pruning methods: the kept fraction, in [0.05, 1].
KEEP_RATE_KNOB = Knob("keep_rate", 0.05, 1.0, False, False)


@dataclass(frozen=True)
class Search:
    """How a searched method finds its setting for a MAC target (``leanvit tune`` runs it).

    Attributes:
        entry: ``search(model, target_gmacs, images, *, progress, **options) -> result`` (a
            callable or ``"module:name"``): ``result.schedule`` is what was found (with
            ``.gmacs``, ``.obtained`` and ``.to_dict()``), ``result.seconds`` the time taken.
            Its keyword-only arguments are the search's options; a ``tolerance`` argument's
            default is the relative MAC tolerance of the result.
        option: the method option the found result is given as (a file path or its contents).
        save: ``save(found, path)`` writing what was found to a JSON file (a callable or
            ``"module:name"``).
        title: how messages name the search (``"DiffRate"``); default: the method's name.
    """

    entry: Union[str, Callable[..., Any]]
    option: str
    save: Union[str, Callable[..., Any]]
    title: str = ""

    def function(self) -> Callable[..., Any]:
        return resolve(self.entry)

    def saver(self) -> Callable[..., Any]:
        return resolve(self.save)


@dataclass(frozen=True)
class Importer:
    """Reads a method's checkpoints as its authors released them (:func:`leanvit.load`).

    Attributes:
        what: what such a file is, for messages (``"DynamicViT authors' checkpoint
            (score_predictor.* tensors)"``).
        recognizes: ``recognizes(tensors) -> bool`` on the file's tensors by name.
        plan: ``plan(tensors, path, options) -> (options, reducer state, backbone state)``:
            the method's options (the user's ``options`` applied) and the tensors split into
            the reducer's state dict and the model's own; ``ValueError`` naming what is
            missing (e.g. a keep rate the file does not record).
    """

    what: str
    recognizes: Callable[[Mapping[str, Tensor]], bool]
    plan: Callable[[dict, Union[str, os.PathLike], dict], tuple[dict, dict, dict]]


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
    #: the strength option of a training-free method (:class:`Knob`), which ``leanvit tune``
    #: sets for a MAC budget; ``None`` for the identity, trained and searched methods
    knob: Optional[Knob] = None
    #: a method that needs training before it is useful: how to pass its trained state
    #: instead (``leanvit tune`` leaves it out with this text); ``None``: needs none
    needs_training: Optional[str] = None
    #: a method whose setting is searched for a MAC target (:class:`Search`)
    search: Optional[Search] = None
    #: readers of the authors' released checkpoints (:class:`Importer`, :func:`leanvit.load`)
    importers: tuple = ()
    #: options whose value may name a file, and how :func:`leanvit.save` stores the file's
    #: content instead: option name -> ``content(reducer)`` (the reducer resolved the file
    #: when it was built), e.g. DiffRate's ``schedule``
    file_options: Mapping[str, Callable[[Reducer], Any]] = dataclasses.field(
        default_factory=dict)

    def __post_init__(self) -> None:
        declared = [what for what, v in (("knob", self.knob), ("needs_training",
                                          self.needs_training), ("search", self.search))
                    if v is not None]
        if len(declared) > 1:
            raise ValueError(f"method {self.name!r} declares {' and '.join(declared)}; a method "
                             "is training-free (knob), trained or searched, not several")
        for what, cls in (("knob", Knob), ("search", Search)):
            v = getattr(self, what)
            if v is not None and not isinstance(v, cls):
                raise TypeError(f"method {self.name!r}: {what} must be a {cls.__name__}")
        if not all(isinstance(i, Importer) for i in self.importers):
            raise TypeError(f"method {self.name!r}: importers must be Importer objects")
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
#: the identity method (:mod:`leanvit.methods.none`): the unmodified model's setting, the
#: baseline every comparison measures against
IDENTITY = "none"


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


def registered() -> dict[str, Method]:
    """Every registered :class:`Method` by name (internal modes included), sorted by name:
    what ``tune``, ``io``, ``compare`` and the tests iterate."""
    return dict(sorted(_METHODS.items()))


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
