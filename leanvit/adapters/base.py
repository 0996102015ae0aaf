"""The backbone contract: what a family's adapter provides, and the one family registry record.

A backbone family is ONE file in :mod:`leanvit.adapters` (a module, e.g. ``adapters/vit.py``)
plus ONE line in ``leanvit/adapters/__init__.py`` registering it::

    register_family(vit)       # reads FAMILY, KIND, DESCRIPTION, matches, COMPACTION from it

The module implements :class:`Backbone` (every family that runs token methods), and
:class:`TokenBackbone` on top of it when ``KIND == "tokens"``. A family that only supports
layer compaction (PVTv2, NextViT) provides just ``FAMILY``, ``KIND``, ``DESCRIPTION``,
``matches`` and ``COMPACTION``, and ``LAYERS`` (a
:class:`leanvit.adapters.layer_macs.LayerMap`: where its blocks and attention modules are) so
that :func:`leanvit.count_macs` counts it, plain or compacted, layer by layer. Nothing
outside :mod:`leanvit.adapters` may use a function of a specific adapter: callers go through
the adapter found for the model (:func:`leanvit.adapters.find_adapter`) and the functions
listed here.

Kinds, and which methods serve a family (a method's ``families`` names families or kinds,
:class:`leanvit.registry.Method`):

- ``"tokens"``: a flat token sequence ``[B, N, C]`` (``N`` = prefix tokens, then patches in
  row-major order) through a stack of pre-norm blocks (``vit``, ``eva``, ``beit``). The family
  file is a small :class:`~leanvit.adapters.tokens.TokenSpec` (how to embed, where the blocks'
  norms, attention, layer scale and MLP are, how to read q/k/v and the output projection, the
  position rule, the head) run by the one :class:`~leanvit.adapters.tokens.TokenEngine`, which
  exports the contract functions below. The engine runs every
  :class:`~leanvit.registry.Reducer` hook (``before_block``, ``select_queries``,
  ``after_attention``), honours every :class:`~leanvit.state.TokenState` field (``size`` with
  ``prop_attn`` -> ``log(size)`` key bias, ``valid`` -> ``-inf`` key bias, ``mask`` -> the fp32
  masked softmax, ``source``, ``where``), and records MACs from the token counts each block
  saw. Every method registered for the kind ``"tokens"`` (tome, evit, topk, ats, diffrate,
  dynamicvit's token pruning) then serves the family without edits to the method.
- ``"hierarchical"``: stages of 2-D maps (``convnext``, ``swin``): the adapter runs each stage
  through :func:`leanvit.adapters.stages.run_stage` (the reducer's ``acts_on_stage`` /
  ``run_stage``), with blocks split into :class:`leanvit.adapters.stages.BlockParts`.

Optional module-level hooks a family file may add (read with ``getattr``; timm's names are
the defaults): ``image_tower(model) -> module | None``, the module to patch inside a wrapper
(open_clip: a CLIP model's ``visual``; :func:`leanvit.adapters.image_tower`);
``final_norm(model)`` (the norm ``forward_features`` ends with, ``None``: none) and
``patch_grid(model, images) -> (rows, cols)``, for :func:`leanvit.dense_features` on a model
without timm's ``norm`` / ``patch_embed``.

Shapes: ``B`` batch, ``N`` tokens now present (prefix included), ``N0`` tokens entering the
first block, ``C`` width, ``K`` selected query rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterator, NamedTuple, Optional, Protocol, runtime_checkable

from torch import Tensor, nn

from leanvit.recorder import MacRecorder
from leanvit.registry import ModelInfo
from leanvit.signals import Signals
from leanvit.state import TokenState

#: the kinds a family can be (see the module docstring)
KINDS = ("tokens", "hierarchical")


@runtime_checkable
class Backbone(Protocol):
    """What every family that runs leanvit methods provides (module-level names of its file).

    MAC formulas: :func:`forward_features` and :func:`forward_head` record MACs per image into
    ``recorder`` (a :class:`leanvit.recorder.MacRecorder`) when one is given:
    ``record_stem(macs)`` (patch embedding), ``record_block(i, tokens_in=[B], tokens_out=[B],
    attention=[B], mlp=[B], signals=[B])`` for each block (from the token counts the block
    actually saw), ``record_layer(name, macs)`` for layers between stages, ``record_head(macs)``
    (pooling modules and classifier; 0 with ``pre_logits``). One MAC = one multiply-accumulate
    of a matrix product (the convention of :mod:`leanvit.macs`); :func:`leanvit.count_macs`
    must agree with ``torch.utils.flop_counter.FlopCounterMode`` / 2 within 1%.
    """

    #: family name, as methods name it in ``Method.families`` (e.g. ``"vit"``)
    FAMILY: str
    #: ``"tokens"`` or ``"hierarchical"`` (:data:`KINDS`)
    KIND: str
    #: one line for error messages, e.g. ``"vit (timm VisionTransformer: vit_*, deit_*)"``
    DESCRIPTION: str
    #: mixin class put in front of the model's class while patched
    #: (:func:`leanvit.adapters.patched_class`); its ``forward`` / ``forward_features`` call
    #: this module's :func:`forward_features` and :func:`forward_head`
    PATCHED: type

    def matches(self, cls: type) -> bool:
        """Whether an (unpatched) model class belongs to the family."""

    def check_supported(self, model: nn.Module) -> None:
        """``ValueError`` (one line, naming the block and what is unsupported) for variants of
        the family the adapter cannot run faithfully."""

    def describe(self, model: nn.Module) -> ModelInfo:
        """What a method may know of the model (``family``, ``kind``, ``depth``, widths,
        prefix tokens, patches, input size ``(H, W)``, ...)."""

    def check_input(self, model: nn.Module, x: Any) -> None:
        """``TypeError``/``ValueError`` (one line) for images ``x`` the model cannot take
        (not a tensor, not ``[B, C, H, W]``, wrong channels or size)."""

    def forward_features(self, model: nn.Module, x: Tensor,
                         recorder: Optional[MacRecorder] = None, trace_source: bool = False,
                         on_block: Optional[Callable[[int, Tensor, TokenState], None]] = None
                         ) -> tuple[Tensor, TokenState]:
        """Images ``[B, 3, H, W]`` -> the final normed features (tokens ``[B, N', C]`` or the
        family's final map) and the :class:`TokenState`, with the patched model's reducer
        (``model.leanvit``) hooks applied. ``trace_source`` starts ``state.source`` as the
        identity; ``on_block(i, x, state)`` is called after block ``i`` (inspection only).
        Families that cannot trace sources or report blocks ignore the two. ``"tokens"``
        families also take ``trace_where=True`` (:func:`leanvit.dense_features`): start
        ``state.where`` as ``arange(N0)`` and call :func:`leanvit.state.record_departures`
        after each reducer hook that may remove tokens."""

    def forward_head(self, model: nn.Module, x: Tensor, state: TokenState,
                     pre_logits: bool = False, recorder: Optional[MacRecorder] = None) -> Tensor:
        """Pooling and classifier on :func:`forward_features`' output: ``[B, num_classes]``
        (``[B, C']`` pooled features with ``pre_logits``). Pooling weights merged tokens by
        their size and leaves out padding and masked-out tokens."""

    def loss_tokens(self, model: nn.Module, x: Tensor, state: Optional[TokenState]
                    ) -> tuple[Tensor, Optional[Tensor]]:
        """The tokens the token-distillation loss compares (:mod:`leanvit.losses`): from
        :func:`forward_features`' output ``x`` (student: with its ``state``; teacher: the
        unpatched model's ``forward_features`` output and ``state=None``), ``[B, N, C]``, and
        the keep weights ``[B, N]`` of the positions to compare (``None`` = every token)."""


@runtime_checkable
class TokenBackbone(Backbone, Protocol):
    """What a ``"tokens"`` family provides besides :class:`Backbone` (the functions callers
    outside the adapter use: the DiffRate search caches frozen blocks with :func:`embed` /
    :func:`run_blocks`, the linear probe pools with :func:`token_weights`)."""

    def embed(self, model: nn.Module, x: Tensor) -> tuple[Tensor, TokenState]:
        """Tokens entering block 0, ``[B, N0, C]`` (patch embedding, prefix tokens, position
        embedding: whatever the family adds before its blocks), and the reducer's initial
        state (``model.leanvit.init_state``)."""

    def run_blocks(self, model: nn.Module, x: Tensor, state: TokenState, start: int = 0,
                   stop: Optional[int] = None) -> tuple[Tensor, TokenState]:
        """Blocks ``start .. stop - 1`` with the reducer's hooks; ``stop=None`` also applies
        the final norm, so ``run_blocks(model, *embed(model, x))`` equals
        :func:`forward_features`. Positional information a family keeps per token (e.g. rotary
        angles) travels in the state, so the blocks can be run in pieces."""

    def token_weights(self, state: TokenState, x: Tensor) -> Tensor:
        """Pooling weight of each token, ``[B, N]`` in ``x``'s dtype: how many patches it
        stands for (1 before any merge), 0 for padding, times the training keep-mask."""

    def block_macs(self, blk: nn.Module, n_kv: Tensor, n_q: Tensor, n_mlp: Tensor,
                   signals: Optional[Signals]) -> dict[str, Tensor]:
        """One block's MACs per image from the token counts it saw (``[B]`` each: keys/values
        entering, query rows computed, tokens through the MLP): the keyword arguments of
        ``MacRecorder.record_block`` (``tokens_in``, ``tokens_out``, ``attention``, ``mlp``,
        ``signals``)."""


def input_size(model: nn.Module) -> tuple[int, int]:
    """The ``(H, W)`` input size a model is built or configured for: ``patch_embed.img_size``
    (ViT, Swin), else a Hugging Face model's ``config.image_size``, else its data config's ``input_size`` (ConvNeXt: any size works; 224 by
    default, or what :func:`leanvit.models.create_model`'s ``img_size`` set). For ``describe``."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        return int(size[0]), int(size[1])
    size = getattr(getattr(model, "config", None), "image_size", None)  # Hugging Face config
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        return int(h), int(w)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    s = cfg.get("input_size", (3, 224, 224))
    return int(s[1]), int(s[2])


# --------------------------------------------------------------------------------------------
# Layer compaction (hMHSA + cFFN, leanvit.compaction): where a family keeps its modules


class Site(NamedTuple):
    """A module compaction replaces: ``getattr(parent, name)``."""

    parent: nn.Module
    name: str
    path: str  # dotted name in the model, for messages and the recorded head orders

    @property
    def module(self) -> nn.Module:
        return getattr(self.parent, self.name)


@dataclass(frozen=True)
class CompactionSites:
    """What :func:`leanvit.compact` needs of a family (``COMPACTION`` in its adapter file).

    Attributes:
        attention_sites: ``model -> Site`` s of the attention modules to replace by hMHSA.
        ffn_sites: ``model -> Site`` s of the FFN output projections to factorise (cFFN).
        attention_class: returns the :mod:`leanvit.compaction.modules` class that replaces
            the family's attention, called as ``cls(original, hallucination, kernel_size,
            computed_heads)`` (a function, so that the adapter does not import compaction).
        plain_logits: ``(original attention, *its forward args) -> [B, H, Nq, Nk]`` scaled
            pre-softmax logits, for fitting the hallucination to a pretrained model.
        conv_ffn: whether the FFN projections are 1x1 ``nn.Conv2d`` (else ``nn.Linear``).
    """

    attention_sites: Callable[[nn.Module], Iterator[Site]]
    ffn_sites: Callable[[nn.Module], Iterator[Site]]
    attention_class: Callable[[], type]
    plain_logits: Callable[..., Tensor]
    conv_ffn: bool


# --------------------------------------------------------------------------------------------
# The registry record


@dataclass(frozen=True)
class Family:
    """A registered backbone family (:func:`leanvit.adapters.register_family`).

    Attributes:
        name / kind / description: the adapter module's ``FAMILY``, ``KIND``, ``DESCRIPTION``.
        matches: the module's ``matches(model_class)``.
        adapter: the module when it implements :class:`Backbone` (token methods run on the
            family), else ``None`` (compaction only).
        compaction: the module's ``COMPACTION`` when :func:`leanvit.compact` supports the
            family, else ``None``.
        layers: the module's ``LAYERS`` (:class:`leanvit.adapters.layer_macs.LayerMap`) for a
            family without a method-running adapter that :func:`leanvit.count_macs` counts
            layer by layer, else ``None``.
    """

    name: str
    kind: str
    description: str
    matches: Callable[[type], bool]
    adapter: Optional[ModuleType] = None
    compaction: Optional[CompactionSites] = None
    layers: Optional[Any] = None

    @classmethod
    def from_module(cls, module: ModuleType) -> "Family":
        """The record of an adapter file; ``TypeError`` naming what the file lacks."""
        for name in ("FAMILY", "KIND", "DESCRIPTION", "matches"):
            if not hasattr(module, name):
                raise TypeError(f"adapter {module.__name__} lacks {name}")
        if module.KIND not in KINDS:
            raise ValueError(f"adapter {module.__name__}: KIND must be one of {KINDS}, got "
                             f"{module.KIND!r}")
        runs_methods = hasattr(module, "forward_features")
        if runs_methods:
            need = TokenBackbone if module.KIND == "tokens" else Backbone
            missing = [n for n in _members(need) if not hasattr(module, n)]
            if missing:
                raise TypeError(f"adapter {module.__name__} lacks {', '.join(missing)} of the "
                                f"{need.__name__} contract (leanvit.adapters.base)")
        return cls(name=module.FAMILY, kind=module.KIND, description=module.DESCRIPTION,
                   matches=module.matches, adapter=module if runs_methods else None,
                   compaction=getattr(module, "COMPACTION", None),
                   layers=getattr(module, "LAYERS", None))


def _members(protocol: type) -> list[str]:
    names: list[str] = []
    for klass in reversed(protocol.__mro__):
        if klass in (object, Protocol) or not getattr(klass, "_is_protocol", False):
            continue
        names += [n for n in list(getattr(klass, "__annotations__", {})) + list(vars(klass))
                  if not n.startswith("_") and n not in names]
    return names


# --------------------------------------------------------------------------------------------
# The patched class's methods


def patched_mixin(name: str, forward_features: Callable[..., tuple[Tensor, TokenState]],
                  forward_head: Callable[..., Tensor], *, takes_attn_mask: bool = False) -> type:
    """The mixin a family's adapter exports as ``PATCHED``: its ``forward_features`` and
    ``forward`` run the adapter's :func:`Backbone.forward_features` /
    :func:`Backbone.forward_head` on the patched model (one definition for every family).

    ``takes_attn_mask``: keep timm's ``attn_mask`` / ``is_causal`` arguments (ViT, Eva) and
    refuse them when given (token reduction changes the sequence a mask would refer to).
    """
    if takes_attn_mask:
        def features(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                     is_causal: bool = False) -> Tensor:
            _no_mask(attn_mask, is_causal)
            return forward_features(self, x)[0]

        def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                    is_causal: bool = False) -> Tensor:
            _no_mask(attn_mask, is_causal)
            x, state = forward_features(self, x)
            return forward_head(self, x, state)
    else:
        def features(self, x: Tensor) -> Tensor:  # type: ignore[misc]
            return forward_features(self, x)[0]

        def forward(self, x: Tensor) -> Tensor:  # type: ignore[misc]
            x, state = forward_features(self, x)
            return forward_head(self, x, state)
    doc = "Mixed in front of the model's own class by :func:`leanvit.patch`."
    return type(name, (), {"forward_features": features, "forward": forward, "__doc__": doc,
                           "__module__": __name__})


def _no_mask(attn_mask: Optional[Tensor], is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("leanvit-patched models do not take attn_mask / is_causal")
