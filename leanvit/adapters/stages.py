"""What the hierarchical adapters (:mod:`~leanvit.adapters.convnext`,
:mod:`~leanvit.adapters.swin`) share: a block split into its dense spatial part and its MLP,
and the loop over a stage's blocks.

A block of both families is ``x_out = base + drop_path(branch(h))`` where ``(base, h) =
spatial(x)`` and ``branch`` is the block's MLP with its norm (and layer scale):

    ConvNeXt: base = x,                               h = dwconv(x),  branch = gamma * mlp(norm(h))
    Swin:     base = x + drop_path(attn(norm1(x))),   h = base,       branch = mlp(norm2(h))

A method that routes tokens (``dynamicvit`` on these families) replaces ``branch`` per token;
the spatial part (depthwise convolution, window attention) always runs densely, so the map
keeps its layout. Tokens ``[B, N, C]`` are the map's positions flattened row-major,
channels last.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from leanvit.registry import Reducer
from leanvit.state import TokenState


def linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates per token of every ``nn.Linear`` inside ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules()
               if isinstance(m, nn.Linear))


class BlockParts:
    """One block of a hierarchical model, split for MLP routing (subclassed per family).

    Attributes:
        block: the timm block (never modified or copied).
        index: the block's index over the whole model (0-based, stages in order).
        dim: channels ``C``.
        stream_residual: in the authors' two-stream training, whether each stream adds its
            branch to its own previous value (ConvNeXt, whose ``base`` is the block input) or
            both streams to the shared dense ``base`` (Swin, after the window attention).
    """

    stream_residual: bool = False

    def __init__(self, block: nn.Module, index: int, dim: int):
        self.block, self.index, self.dim = block, index, dim

    def dense(self, x: Tensor) -> Tensor:
        """The timm block itself on its native map (exactly timm's result)."""
        return self.block(x)

    def spatial(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Native map -> (``base`` in the native layout, MLP input ``h`` ``[B, N, C]``)."""
        raise NotImplementedError

    def slow(self, h: Tensor) -> Tensor:
        """The block's own MLP branch on tokens ``[B, K, C]`` (norm, MLP, layer scale),
        without drop-path."""
        raise NotImplementedError

    def finish(self, base: Tensor, y: Tensor) -> Tensor:
        """``base + drop_path(y)`` with ``y`` ``[B, N, C]`` brought to the native layout."""
        raise NotImplementedError

    def to_tokens(self, x: Tensor) -> Tensor:
        """Native map -> ``[B, N, C]``."""
        raise NotImplementedError

    def from_tokens(self, t: Tensor, like: Tensor) -> Tensor:
        """``[B, N, C]`` -> the native layout of ``like``."""
        raise NotImplementedError

    def mask_like(self, mask: Tensor, like: Tensor) -> Tensor:
        """A per-position mask ``[B, N]`` shaped to broadcast against the native map."""
        raise NotImplementedError

    def spatial_macs(self, x: Tensor) -> int:
        """MACs per image of the spatial part on the native map ``x`` (dense)."""
        raise NotImplementedError

    @property
    def slow_macs(self) -> int:
        """MACs per token of the MLP branch (its linear layers)."""
        raise NotImplementedError

    def num_tokens(self, x: Tensor) -> int:
        raise NotImplementedError

    def record(self, state: TokenState, x: Tensor, n_slow) -> None:
        """Record this block's MACs per image: spatial part dense, MLP on ``n_slow`` tokens
        (a number or ``[B]``)."""
        if state.recorder is None:
            return
        n = self.num_tokens(x)
        state.recorder.record_block(self.index, tokens_in=n, tokens_out=n,
                                    attention=self.spatial_macs(x),
                                    mlp=n_slow * self.slow_macs, signals=0.0)


def run_stage(reducer: Reducer, s: int, parts: Sequence[BlockParts], x: Tensor,
              state: TokenState) -> tuple[Tensor, TokenState]:
    """Stage ``s``'s blocks on ``x``: the reducer's :meth:`~leanvit.registry.Reducer.run_stage`
    when it acts on the stage, otherwise the timm blocks themselves (MACs recorded)."""
    if reducer.acts_on_stage(s):
        return reducer.run_stage(s, parts, x, state)
    for p in parts:
        if state.recorder is not None:
            p.record(state, x, p.num_tokens(x))
        x = p.dense(x)
    return x, state
