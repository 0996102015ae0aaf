"""``tome``: Token Merging (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

In every block with ``r > 0``, after the attention residual and before the MLP, ``r`` tokens
merge into others by bipartite soft matching on the attention keys averaged over heads
(:mod:`leanvit.ops.merge`): A = even positions, B = odd, cosine similarity, the ``r`` best
A->B edges merge by a size-weighted average. Prefix tokens are never merged and stay in front.
With proportional attention, each key's attention logit gets ``+log(size)`` (an additive
SDPA bias, see :func:`leanvit.state.attention_bias`), so a merged token weighs as much as the
tokens it stands for. Needs no training; ``r=0`` changes nothing (bit-identical).
"""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from leanvit.ops.merge import (bipartite_soft_matching, max_merges, merge_source, merge_wavg,
                              merge_where)
from leanvit.registry import TOME_KNOB, Method, ModelInfo, Reducer, check_bool, register
from leanvit.signals import Signals
from leanvit.state import TokenState

RSpec = Union[int, tuple, list]


def schedule(r: RSpec, depth: int) -> list[int]:
    """Tokens to merge in each block, as the authors' ``parse_r``.

    - ``int``: the same ``r`` in every block.
    - ``(r, inflect)`` tuple: block ``i`` of ``L`` gets ``int(m + i * (2r - 2m) / (L - 1))``
      with ``m = int(r * (1 - inflect))``: ``m`` at the first block and ``2r - m`` at the last
      (``inflect=0``: constant; ``(r, -1)``: from ``2r`` down to 0), the same total.
    - ``list``: per block, padded with zeros to the depth.

    Not yet clamped to the token count (see :func:`plan`).
    """
    if isinstance(r, list):
        if len(r) > depth:
            raise ValueError(f"r has {len(r)} entries but the model has {depth} blocks")
        return [int(v) for v in r] + [0] * (depth - len(r))
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / (depth - 1) if depth > 1 else 0.0
    return [int(lo + step * i) for i in range(depth)]


def planned_r(method: str, r: "RSpec", info, what: str = "merges") -> list[int]:
    """Tokens removed per block for a ToMe-style ``r`` option on the model ``info`` describes:
    :func:`schedule` clamped by :func:`plan`, with one ``UserWarning`` naming ``method`` and
    the clamped blocks (shared by the methods whose ``r`` works as ToMe's)."""
    n0 = info.num_patches + info.num_prefix_tokens
    per_block, clamped = plan(schedule(r, info.depth), n0, info.num_prefix_tokens)
    if clamped:
        warnings.warn(
            f"{method}: r={r!r} asks for more {what} than the tokens allow in blocks {clamped} "
            f"({n0} tokens, {info.num_prefix_tokens} prefix; at most (N - prefix) // 2 per "
            f"block); clamped to {per_block}", stacklevel=5)
    return per_block


def plan(per_block: list[int], n_tokens: int, prefix: int) -> tuple[list[int], list[int]]:
    """Clamp a schedule to what the tokens allow, block by block.

    Returns ``(clamped schedule, blocks that were clamped)``; each block can remove at most
    ``(N - prefix) // 2`` of the ``N`` tokens it receives (:func:`max_merges`).
    """
    out, clamped = [], []
    for i, r in enumerate(per_block):
        cap = max_merges(n_tokens, prefix)
        if r > cap:
            clamped.append(i)
            r = cap
        out.append(r)
        n_tokens -= r
    return out, clamped


def _check_r(r) -> None:
    def is_int(v) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if is_int(r):
        bad = r < 0
    elif isinstance(r, tuple):
        if len(r) != 2 or not is_int(r[0]) or isinstance(r[1], bool) or not isinstance(
                r[1], numbers.Real):
            raise TypeError(f"r as a tuple must be (r: int, inflect: float), got {r!r}")
        bad = r[0] < 0 or not -1.0 <= r[1] <= 1.0
    elif isinstance(r, list):
        if not all(is_int(v) for v in r):
            raise TypeError(f"r as a list must hold ints (tokens merged per block), got {r!r}")
        bad = any(v < 0 for v in r)
    else:
        raise TypeError("r must be an int, an (r, inflect) tuple or a per-block list of ints, "
                        f"got {r!r}")
    if bad:
        raise ValueError(f"r must be >= 0 (and inflect in [-1, 1]), got {r!r}")


@dataclass(frozen=True)
class ToMeOptions:
    """Options of ``tome``.

    Attributes:
        r: tokens merged per block: an int (the authors' off-the-shelf ViT-S/B setting 13), an
            ``(r, inflect)`` schedule or a per-block list (see :func:`schedule`). Clamped, with a
            warning, where fewer tokens are left than ``r`` needs.
        prop_attn: proportional attention, ``+log(size)`` on each key's logits (authors'
            default on for supervised ViTs; they turn it off for off-the-shelf MAE).
        trace_source: keep ``state.source`` ``[B, N, N0]``, which original patches each token
            holds (for visualisation; costs memory). Authors' default off.
    """

    r: RSpec = 13
    prop_attn: bool = True
    trace_source: bool = False

    def __post_init__(self) -> None:
        _check_r(self.r)
        check_bool("prop_attn", self.prop_attn)
        check_bool("trace_source", self.trace_source)


class ToMe(Reducer):
    """Bipartite soft matching after the attention of every block with ``r > 0``."""

    def __init__(self, options: ToMeOptions, info: ModelInfo):
        super().__init__(options, info)
        self.prefix = info.num_prefix_tokens
        per_block = schedule(options.r, info.depth)
        n0 = info.num_patches + info.num_prefix_tokens
        self.n0 = n0
        self.r_per_block, clamped = plan(per_block, n0, self.prefix)
        self._warned_counts: set[int] = set()  # other token counts already warned about
        if clamped:
            warnings.warn(
                f"tome: r={options.r!r} asks for more merges than the tokens allow in blocks "
                f"{clamped} ({n0} tokens, {self.prefix} prefix; at most (N - prefix) // 2 per "
                f"block); clamped to {self.r_per_block}", stacklevel=4)

    def acts_after(self, i: int) -> bool:
        return self.r_per_block[i] > 0

    def init_state(self, state: TokenState, x: Tensor) -> TokenState:
        self._warn_if_clamped(x.shape[1])
        # The bias only exists once sizes do (after the first merge), so r=0 stays exact.
        state = state.replace(prop_attn=self.options.prop_attn)
        if self.options.trace_source and state.source is None:
            B, N, _ = x.shape
            eye = torch.eye(N, dtype=x.dtype, device=x.device)
            state = state.replace(source=eye.expand(B, N, N))
        return state

    def _warn_if_clamped(self, n: int) -> None:
        """Warn (once per token count) when an input of another size than the model was built
        for (``dynamic_img_size`` models) gives ``n`` tokens, too few for the planned merges:
        :meth:`after_attention` then merges fewer (the authors' clamp), as the build-time
        warning says for the built size."""
        if n == self.n0 or n in self._warned_counts:
            return
        self._warned_counts.add(n)
        clamped_to, clamped = plan(self.r_per_block, n, self.prefix)
        if clamped:
            warnings.warn(
                f"tome: this input gives {n} tokens, not the {self.n0} r={self.options.r!r} was "
                f"planned for; too few for the planned merges in blocks {clamped}, which merge "
                f"{clamped_to} instead of {self.r_per_block}", stacklevel=2)

    def after_attention(self, i: int, x: Tensor, signals: Optional[Signals],
                        state: TokenState) -> tuple[Tensor, TokenState]:
        """``x`` ``[B, N, C]`` -> ``[B, N - r, C]``."""
        if state.valid is not None or state.mask is not None:
            raise ValueError("tome needs fixed token counts (no padding or training keep-mask "
                             "from another method)")
        # Another input size (dynamic_img_size models) can leave fewer tokens than planned.
        r = min(self.r_per_block[i], max_merges(x.shape[1], state.prefix))
        if r <= 0:
            return x, state
        metric = signals.keys  # [B, N, D]: keys averaged over heads
        m = bipartite_soft_matching(metric, r, state.prefix)
        if state.recorder is not None:  # the cosine similarities, unprotected A rows x B
            n = x.shape[1]
            rows = (n + 1) // 2 - (state.prefix + 1) // 2
            state.recorder.add_extra("matching", rows * (n // 2) * metric.shape[-1])
        n = x.shape[1]
        x, size = merge_wavg(m, x, state.size)
        source = None if state.source is None else merge_source(m, state.source)
        where = None if state.where is None else merge_where(m, state.where, n)
        # a merged token keeps its destination's position (relative position bias)
        return x, state.replace(size=size, source=source, where=where,
                                positions=state.merged_positions(m.keep))


def build(options: ToMeOptions, info: ModelInfo) -> Reducer:
    return ToMe(options, info)


METHOD = register(Method(
    "tome", ToMeOptions, build, families=("tokens",), knob=TOME_KNOB,
    summary="ToMe: merge r tokens per block by bipartite soft matching on keys (Bolya 2023)"))
