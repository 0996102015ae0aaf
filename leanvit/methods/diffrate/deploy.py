"""``diffrate``: sort by class attention, prune the tail, merge the rest of the tail, with
per-block counts searched to a MAC budget (DiffRate, Chen et al., ICCV 2023). This file is the
deploy method; the search mode is :mod:`leanvit.methods.diffrate.search_mode`, the search loop
:func:`leanvit.search.diffrate.search`, the schedule format
:mod:`leanvit.methods.diffrate.schedule`, the tensor arithmetic
:mod:`leanvit.methods.diffrate.ops`.

Deploy (``leanvit.patch(model, "diffrate", schedule=...)``). In every block whose schedule
changes the token count, after the attention residual and before the MLP:

1. sort the tokens by head-averaged class attention (prefix tokens stay first);
2. prune: keep the first ``prune_kept[i]`` (prefix included), drop the rest;
3. merge: each token beyond ``merge_kept[i]`` joins its most similar token among the first
   ``merge_kept[i]`` (cosine of the hidden states ``x``, never a prefix token). The merged token
   is the plain mean of the destination and its sources (not size-weighted), and each source
   adds ``size x cosine`` to the destination's size (the authors' code, OpenGVLab/DiffRate
   ``patch/deit.py``; ``cosine`` is clamped at 0 here so that a non-positive similarity cannot
   shrink a size to zero and make ``log(size)`` NaN);
4. proportional attention with the token sizes in all later blocks (always on, as the
   authors).

Token sizes: the authors clamp sizes at 1 during their search but not at deploy; here both
modes use the same rule (size + source size x max(cosine, 0)), so a searched schedule is
evaluated exactly as it is deployed.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from dataclasses import dataclass

import torch
from torch import Tensor

from leanvit.methods.diffrate.ops import merge_tail, sort_order
from leanvit.methods.diffrate.schedule import Schedule, as_schedule, effective_counts
from leanvit.ops.tokens import gather_tokens
from leanvit.registry import Method, ModelInfo, Reducer, Search, check_bool, register
from leanvit.signals import Signals
from leanvit.state import TokenState

# --------------------------------------------------------------------------------------------
# Deploy


@dataclass(frozen=True)
class DiffRateOptions:
    """Options of ``diffrate`` (deploy a schedule).

    Attributes:
        schedule: a schedule file's path, a :class:`leanvit.methods.diffrate.Schedule`, or a pair of
            per-block lists ``(prune_kept, merge_kept)`` (prefix tokens included). Required.
            Its counts are for the model's input size: on a ``dynamic_img_size`` model, an
            input giving another token count is refused (:func:`check_token_count`).
        trace_source: keep ``state.source`` (which patches each token holds) for
            visualisation; off by default (costs ``O(N N0)`` per token).
    """

    schedule: Any = None
    trace_source: bool = False

    def __post_init__(self) -> None:
        if self.schedule is None:
            raise ValueError("diffrate needs schedule=...: a schedule file, a Schedule, or a pair "
                             "(prune_kept, merge_kept); get one with 'leanvit search MODEL "
                             "--method diffrate --target-gmacs G ...'")
        if not isinstance(self.schedule, (str, os.PathLike, Schedule, tuple, list, dict)):
            raise TypeError("schedule must be a path, a Schedule or a pair of lists "
                            f"(prune_kept, merge_kept), got {self.schedule!r}")
        check_bool("trace_source", self.trace_source)


def resolve_schedule(value: Any, info: ModelInfo) -> Schedule:
    """``value`` as a :class:`Schedule` checked against the model described by ``info``."""
    num_tokens = info.num_patches + info.num_prefix_tokens
    schedule = as_schedule(value, model=info.name, img_size=info.img_size, num_tokens=num_tokens,
                           prefix_tokens=info.num_prefix_tokens)
    schedule.check_model(depth=info.depth, num_tokens=num_tokens,
                         prefix_tokens=info.num_prefix_tokens, img_size=info.img_size,
                         model=info.name)
    return schedule


def check_token_count(method: str, planned: int, img_size: tuple[int, int], got: int) -> None:
    """``ValueError`` when the tokens entering block 0 (``got``, prefix included) are not the
    ``planned`` count the per-block kept counts were made for (``img_size``: the images that
    give it). A model built with ``dynamic_img_size=True`` takes other image sizes; absolute
    counts made for one token count would then cut far more in one block, or nothing at all,
    so another count is refused rather than rescaled."""
    if got != planned:
        raise ValueError(
            f"{method}: the schedule was made for {planned} tokens ({img_size[0]}x{img_size[1]} "
            f"images) but this input gives {got} tokens; resize the images to "
            f"{img_size[0]}x{img_size[1]} or search a schedule for this size")


def _needs_class_token(info: ModelInfo) -> None:
    if not info.has_class_token:
        raise ValueError("diffrate sorts tokens by class-token attention; this model has no "
                         "class token")


class DiffRateReducer(Reducer):
    """Applies a fixed schedule: static token counts per block (``torch.compile``-friendly)."""

    def __init__(self, options: DiffRateOptions, info: ModelInfo):
        super().__init__(options, info)
        _needs_class_token(info)
        self.schedule = resolve_schedule(options.schedule, info)
        self.prefix = info.num_prefix_tokens
        # (tokens in, kept after pruning, kept after merging) per block, from the schedule
        n, plan = self.schedule.num_tokens, []
        for p, m in zip(*effective_counts(self.schedule.prune_kept, self.schedule.merge_kept,
                                          self.schedule.num_tokens)):
            plan.append((n, p, m))
            n = m
        self.plan = plan

    def acts_after(self, i: int) -> bool:
        n, _, m = self.plan[i]
        return m < n

    def init_state(self, state: TokenState, x: Tensor) -> TokenState:
        check_token_count("diffrate", self.schedule.num_tokens, self.schedule.img_size,
                          x.shape[1])
        state = state.replace(prop_attn=True)
        if self.options.trace_source and state.source is None:
            B, N, _ = x.shape
            state = state.replace(source=torch.eye(N, dtype=x.dtype, device=x.device)
                                  .expand(B, N, N))
        return state

    def after_attention(self, i: int, x: Tensor, signals: Optional[Signals], state: TokenState
                        ) -> tuple[Tensor, TokenState]:
        N = x.shape[1]
        _, kp, km = self.plan[i]
        kp, km = min(kp, N), min(km, N)  # a count larger than the tokens present: no change
        if km >= N:
            return x, state
        if state.size is None:
            state = state.replace(size=state.sizes_like(x))
        order = sort_order(signals.cls_attn, self.prefix, kp)
        x = gather_tokens(x, order)
        state = state.gather(order)
        if km < kp:
            if state.recorder is not None:  # cosine similarities of the merge, per image
                state.recorder.add_extra("diffrate_merge", (kp - km) * km * x.shape[2])
            x, size, source, *where = merge_tail(x, state.size, self.prefix, km,
                                                 source=state.source, where=state.where)
            # the first km tokens remain, the merged ones folded into them: their positions
            state = state.replace(size=size, source=source, positions=state.positions[:, :km],
                                  where=where[0] if where else None)
        return x, state


def _build(options: DiffRateOptions, info: ModelInfo) -> Reducer:
    return DiffRateReducer(options, info)


def _schedule_content(reducer: Reducer) -> dict:
    """The schedule as the reducer resolved it (the file's content, not its path)."""
    return reducer.schedule.to_dict()


METHOD = register(Method(
    "diffrate", DiffRateOptions, _build, families=("tokens",),
    summary="DiffRate: searched per-block prune+merge counts (schedule=FILE)",
    # leanvit tune searches a schedule to its budget (by module path: the search imports
    # the training machinery, which a deployed model does not need)
    search=Search("leanvit.search.diffrate:search", "schedule",
                  "leanvit.methods.diffrate.schedule:save_schedule", title="DiffRate"),
    file_options={"schedule": _schedule_content}))

