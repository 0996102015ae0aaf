"""``random``: keep a random subset of the tokens, the control for any learned or scored
selection ("did the predictor / the class attention choose better than chance?").

Before each block in ``locations`` (stage ``s``, 0-based), keep ``int(L0 * keep_rate **
(s + 1))`` of the ``L0`` patch tokens the model started with (DynamicViT's counts, Rao et al.
2021, so the two compare at equal MACs: DeiT-S at keep 0.7 keeps 137, 96, 67), chosen
uniformly at random per image; prefix tokens (class, distillation, registers) always stay
in front and survivors keep their order. Draws come from a generator seeded with ``seed``
when the method is patched in, so a patched model gives the same sequence of selections
every run (and a different selection at each forward pass).

Used as the random-keep control of ``benchmarks/dynamicvit_fashion_mnist.py`` (results in
``docs/dynamicvit.md``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from leanvit.methods.dynamicvit import keep_counts
from leanvit.methods.evit import check_locations_type, resolve_locations
from leanvit.registry import KEEP_RATE_KNOB, Method, ModelInfo, Reducer, check_number, register
from leanvit.state import TokenState


#: the largest seed ``torch.Generator.manual_seed`` takes (an unsigned 64-bit integer)
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class RandomOptions:
    """Options of ``random``.

    Attributes:
        keep_rate: per-stage keep ratio ``rho`` in (0, 1]: stage ``s`` keeps
            ``int(L0 * rho ** (s + 1))`` patch tokens (DynamicViT's schedule; default 0.7,
            its DeiT-S setting). 1 = no reduction.
        locations: 0-based blocks before which tokens are dropped. ``None`` = DynamicViT's and
            EViT's ``(3, 6, 9)`` at depth 12, ``(d//4, d//2, 3d//4)`` otherwise.
        seed: seed of the generator the selections are drawn from, in ``[0, 2**64 - 1]``
            (default 0).
    """

    keep_rate: float = 0.7
    locations: Optional[tuple[int, ...]] = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_number("keep_rate", self.keep_rate, lo=0.0, hi=1.0, lo_open=True)
        check_locations_type("locations", self.locations)
        check_number("seed", self.seed, lo=0, hi=MAX_SEED, integer=True)


def random_keep_index(batch: int, tokens: int, prefix: int, keep: int,
                      generator: torch.Generator) -> Tensor:
    """``[B, prefix + keep]`` long row indices: the prefix rows, then ``keep`` of the
    ``tokens - prefix`` other rows drawn uniformly without replacement per image (CPU
    ``generator``), in increasing order."""
    scores = torch.rand(batch, tokens - prefix, generator=generator)
    chosen = scores.topk(keep, dim=1).indices.sort(dim=1).values + prefix
    return torch.cat([torch.arange(prefix).expand(batch, prefix), chosen], dim=1)


class RandomKeep(Reducer):
    """Runtime of ``random``: drops tokens before the blocks of ``locations``."""

    def __init__(self, options: RandomOptions, info: ModelInfo):
        super().__init__(options, info)
        locs = resolve_locations(options.locations, info) if options.keep_rate < 1.0 else ()
        self.stage = {loc: s for s, loc in enumerate(sorted(locs))}
        self.locations = tuple(sorted(locs))
        self.generator = torch.Generator().manual_seed(options.seed)

    def acts_before(self, i: int) -> bool:
        return i in self.stage

    def before_block(self, i: int, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        if state.valid is not None or state.mask is not None:  # pragma: no cover - one method
            raise ValueError("random drops tokens of fixed-count batches only")
        s, prefix = self.stage[i], state.prefix
        keep = keep_counts(state.n0 - prefix, self.options.keep_rate, s + 1)[s]
        B, N = x.shape[:2]
        if keep >= N - prefix:
            return x, state
        index = random_keep_index(B, N, prefix, keep, self.generator).to(x.device)
        kept = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return kept, state.gather(index)


def build(options: RandomOptions, info: ModelInfo) -> Reducer:
    return RandomKeep(options, info)


METHOD = register(Method(
    "random", RandomOptions, build, families=("tokens",), knob=KEEP_RATE_KNOB,
    summary="control: keep DynamicViT's token counts, survivors drawn at random (seeded)"))
