"""``diffrate-search``: DiffRate's training-time rate-search mode (Chen et al., ICCV 2023), the
reducer :func:`leanvit.search.diffrate.search` trains. The deploy method is
:mod:`leanvit.methods.diffrate.deploy`; both share :mod:`leanvit.methods.diffrate.ops`.

Per compressible block and per operation, learnable logits over candidate kept counts
(``P, P-g, ..., > 0`` patches, granularity ``g`` = 4 for DeiT at 224: the authors' default),
zero-initialised. Expected kept count = straight-through ``ceil(candidates . softmax(logits))``
+ prefix; the mask of token position ``j`` is the probability that the kept count exceeds
``j``, hardened straight-through. Tokens are masked (the adapter's masked attention) instead of
removed, and the loss is ``task + 5 (GMACs - target)^2`` (the authors' ``main.py``: AdamW lr
0.01, cosine to 0.001, weight decay 0), with the backbone frozen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from leanvit.methods.diffrate.ops import masked_cls_attn as _masked_cls_attn
from leanvit.methods.diffrate.ops import merge_tail, sort_order, ste_ceil, ste_min
from leanvit.methods.diffrate.schedule import Schedule, effective_counts
from leanvit.ops.tokens import gather_tokens
from leanvit.registry import Method, ModelInfo, Reducer, check_number, register
from leanvit.signals import Signals
from leanvit.state import TokenState


def default_granularity(num_patches: int) -> int:
    """Candidate spacing: 4 tokens for 196 patches (the authors' DeiT default), scaled with
    the patch count so every model gets ~49 candidates (256 patches -> 5)."""
    return max(1, round(num_patches / 49))


@dataclass(frozen=True)
class DiffRateSearchOptions:
    """Options of ``diffrate-search`` (the training-time mode :func:`search` uses).

    Attributes:
        granularity: spacing of candidate kept counts; ``None`` = :func:`default_granularity`.
        first_block: first compressible block (the authors leave block 0 alone: 1).
        mac_model: per-image MAC coefficients ``{"constant", "attn_token", "attn_pair",
            "mlp_token"}`` for the differentiable MAC estimate (:func:`mac_model`); ``None``
            gives the plain ViT formula ``4NC^2 + 2N^2C + 8NC^2`` (no stem/head).
        ops: which operations are searched: ``"both"`` (the authors': pruning then merging in
            every block), ``"merge"`` (merging only; nothing is pruned) or ``"prune"``. A
            restriction to one operation searches the subspace where the other keeps every
            token (e.g. where pruning is known to cost accuracy, as on DINOv2 with a linear
            probe: ``docs/diffrate.md``).
    """

    granularity: Optional[int] = None
    first_block: int = 1
    mac_model: Optional[dict] = None
    ops: str = "both"

    def __post_init__(self) -> None:
        if self.ops not in OPS:
            raise ValueError(f"ops must be one of {', '.join(OPS)}, got {self.ops!r}")
        if self.granularity is not None:
            check_number("granularity", self.granularity, lo=1, integer=True)
        check_number("first_block", self.first_block, lo=0, integer=True)
        if self.mac_model is not None:
            if not isinstance(self.mac_model, dict) or set(self.mac_model) != set(_MAC_KEYS):
                raise ValueError(f"mac_model must be a dict with keys {', '.join(_MAC_KEYS)}")
            for k in _MAC_KEYS:  # a NaN coefficient would make every MAC loss NaN
                check_number(f"mac_model[{k!r}]", self.mac_model[k], lo=0.0)


_MAC_KEYS = ("constant", "attn_token", "attn_pair", "mlp_token")
#: values of :attr:`DiffRateSearchOptions.ops`
OPS = ("both", "merge", "prune")


class DiffRateSearchReducer(Reducer):
    """Learnable kept-count distributions; masks tokens instead of removing them.

    Parameters: ``prune_logits`` and ``merge_logits`` ``[depth, K]`` over the candidates
    ``candidates`` ``[K]`` (patch counts, prefix excluded); rows of blocks before
    ``first_block`` are unused.
    """

    def __init__(self, options: DiffRateSearchOptions, info: ModelInfo):
        super().__init__(options, info)
        if not info.has_class_token:
            raise ValueError("diffrate sorts tokens by class-token attention; this model has no "
                             "class token")
        if options.first_block >= info.depth:
            raise ValueError(f"first_block {options.first_block} must be below the depth "
                             f"{info.depth}")
        self.prefix = info.num_prefix_tokens
        self.num_tokens = info.num_patches + self.prefix
        g = options.granularity or default_granularity(info.num_patches)
        if g >= info.num_patches:  # one candidate (every patch): nothing could be searched
            raise ValueError(f"granularity {g} leaves one candidate count for the model's "
                             f"{info.num_patches} patches; use 1..{info.num_patches - 1} (None: "
                             f"{default_granularity(info.num_patches)})")
        cand = torch.arange(info.num_patches, 0, -g, dtype=torch.float32)
        self.register_buffer("candidates", cand, persistent=False)
        positions = torch.arange(self.num_tokens, dtype=torch.float32)
        # exceeds[c, j] = 1 if a kept count of candidate c (+ prefix) keeps position j
        self.register_buffer("exceeds", (positions[None, :] < cand[:, None] + self.prefix)
                             .float(), persistent=False)
        self.prune_logits = nn.Parameter(torch.zeros(info.depth, len(cand)))
        self.merge_logits = nn.Parameter(torch.zeros(info.depth, len(cand)))
        self.prune_on, self.merge_on = options.ops != "merge", options.ops != "prune"
        self.prune_logits.requires_grad_(self.prune_on)  # a frozen op keeps every token
        self.merge_logits.requires_grad_(self.merge_on)
        C = info.embed_dim
        self.macs = dict(options.mac_model or {"constant": 0.0, "attn_token": 4.0 * C * C,
                                               "attn_pair": 2.0 * C, "mlp_token": 8.0 * C * C})

    def compressible(self, i: int) -> bool:
        return i >= self.options.first_block

    def acts_after(self, i: int) -> bool:
        return self.compressible(i)

    # -- the differentiable counts
    def expected_count(self, logits: Tensor) -> Tensor:
        """Straight-through ceil of the expected candidate count, plus the prefix (scalar)."""
        return ste_ceil(self.candidates @ logits.softmax(-1)) + self.prefix

    def kept_counts(self) -> tuple[list[Tensor], list[Tensor]]:
        """Per block, the expected (prune, merge) kept counts as scalar tensors with grads."""
        full = self.candidates.new_tensor(float(self.num_tokens))
        prune, merge = [], []
        for i in range(self.info.depth):
            if self.compressible(i):
                prune.append(self.expected_count(self.prune_logits[i]) if self.prune_on
                             else full)
                merge.append(self.expected_count(self.merge_logits[i]) if self.merge_on
                             else full)
            else:
                prune.append(full)
                merge.append(full)
        return prune, merge

    def expected_gmacs(self) -> Tensor:
        """Differentiable MACs per image in 1e9 (the authors' ``calculate_flop_training``)."""
        c = self.macs
        prune, merge = self.kept_counts()
        n = self.candidates.new_tensor(float(self.num_tokens))
        total = n.new_tensor(float(c["constant"]))
        for i in range(self.info.depth):
            total = total + n * c["attn_token"] + n * n * c["attn_pair"]
            if self.compressible(i):
                n = ste_min(n, prune[i], merge[i])
            total = total + n * c["mlp_token"]
        return total / 1e9

    @torch.no_grad()
    def warm_start(self, prune_kept: Sequence[int], merge_kept: Sequence[int],
                   spread: float = 2.0) -> None:
        """Set the logits so that the expected kept counts are ``prune_kept`` /
        ``merge_kept`` (per block, prefix included; e.g. a hand-set schedule that already
        meets the MAC target): each block's distribution is a discretised Gaussian over the
        candidates, ``spread`` candidates wide (standard deviation), whose mean is moved until
        the expected count is half a token below the wanted one (so its ceil is that count).
        Every block then starts with a soft boundary and gets task gradient from step 1,
        unlike the zero start, where every block starts at the same (middle) count. (A count
        of one patch, the smallest candidate, is reached only in the limit: it starts at
        two.)"""
        check_number("spread", spread, lo=0, lo_open=True)
        for name, counts in (("prune_kept", prune_kept), ("merge_kept", merge_kept)):
            if len(counts) != self.info.depth:
                raise ValueError(f"{name} needs {self.info.depth} counts, got {len(counts)}")
        cand = self.candidates.double()
        g = float(cand[0] - cand[1]) if len(cand) > 1 else 1.0
        sigma = spread * g
        for logits, counts in ((self.prune_logits, prune_kept), (self.merge_logits, merge_kept)):
            for i, c in enumerate(counts):
                if not self.compressible(i):
                    continue
                want = min(max(float(c) - self.prefix, float(cand[-1])), float(cand[0])) - 0.5
                lo, hi = float(cand[-1]) - 20 * sigma, float(cand[0]) + 20 * sigma
                for _ in range(80):  # the expected count grows with the mean
                    mu = (lo + hi) / 2
                    row = -0.5 * ((cand - mu) / sigma) ** 2
                    e = float(cand @ row.softmax(-1))
                    lo, hi = (mu, hi) if e < want else (lo, mu)
                logits[i] = (-0.5 * ((cand - (lo + hi) / 2) / sigma) ** 2).float()

    def _op_mask(self, logits: Tensor, kept: int, present: int) -> Tensor:
        """``[N0]`` mask: 0 at positions ``kept .. present-1`` (1 elsewhere), plus the
        straight-through probability that the kept count exceeds each position."""
        prob = logits.softmax(-1) @ self.exceeds
        hard = torch.ones_like(prob)
        hard[kept:present] = 0
        return hard + prob - prob.detach()

    # -- hooks
    def init_state(self, state: TokenState, x: Tensor) -> TokenState:
        B, N, _ = x.shape
        if N != self.num_tokens:
            size = self.info.img_size
            made = f" ({size[0]}x{size[1]} images)" if size else ""
            raise ValueError(f"diffrate-search: the rate search was built for {self.num_tokens} "
                             f"tokens{made} but this input gives {N} tokens; search on images "
                             "of the size the model was built for")
        return state.replace(prop_attn=True, mask=x.new_ones(B, N), size=x.new_ones(B, N))

    def after_attention(self, i: int, x: Tensor, signals: Optional[Signals], state: TokenState
                        ) -> tuple[Tensor, TokenState]:
        mask = state.mask
        alive = mask.detach() > 0.5
        # class attention under the same eps-masked softmax as the block's attention; alive
        # tokens first whatever their attention (a masked token's eps weight could otherwise
        # outrank an alive token with a near-zero weight), each group in exact order
        attn = _masked_cls_attn(signals, mask)
        order = sort_order(attn, self.prefix, x.shape[1], alive=alive)
        x = gather_tokens(x, order)
        state = state.gather(order)
        mask = state.mask
        present = int(alive[0].sum())
        kp = int(self.expected_count(self.prune_logits[i]).detach()) if self.prune_on \
            else present
        km = int(self.expected_count(self.merge_logits[i]).detach()) if self.merge_on \
            else present
        if kp < present:
            mask = mask * self._op_mask(self.prune_logits[i], kp, present)[None]
        mid = min(present, kp)
        if km < mid:
            # merged sources stay in place, masked out (as the authors' search)
            x, size, source = merge_tail(x, state.size, self.prefix, km, end=mid,
                                         source=state.source, keep_sources=True)
            state = state.replace(size=size, source=source)
            mask = mask * self._op_mask(self.merge_logits[i], km, mid)[None]
        return x, state.replace(mask=mask)

    def to_schedule(self, model: str = "", img_size: Optional[Sequence[int]] = None,
                    obtained: Optional[dict] = None) -> Schedule:
        """The current hard counts as a deployable :class:`Schedule` (effective counts)."""
        prune, merge = self.kept_counts()
        p = [int(v.detach()) for v in prune]
        m = [int(v.detach()) for v in merge]
        p, m = effective_counts(p, m, self.num_tokens)
        return Schedule(model=model, img_size=tuple(img_size or self.info.img_size),
                        num_tokens=self.num_tokens, prefix_tokens=self.prefix, prune_kept=p,
                        merge_kept=m, obtained=dict(obtained or {"how": "search"}))


def _build_search(options: DiffRateSearchOptions, info: ModelInfo) -> Reducer:
    return DiffRateSearchReducer(options, info)


SEARCH_METHOD = register(Method(
    "diffrate-search", DiffRateSearchOptions, _build_search, families=("tokens",),
    summary="DiffRate's training-time rate search mode (used by 'leanvit search')",
    internal=True))

