"""DiffRate schedules by MACs: the per-image MAC estimate of a schedule on a plain ViT, and
the hand-set schedules of DiffRate's space (the same number of tokens removed in every block,
or three EViT-like stages) fitted to a MAC target. Used by the search
(:mod:`leanvit.search.diffrate`) to start from and to score snapshots.
"""
from __future__ import annotations

import math
from typing import Sequence

from leanvit.methods.diffrate.schedule import effective_counts

#: Hand-set shapes of DiffRate's schedule space (:func:`handset_counts`): the same number of
#: tokens merged / pruned in every block from ``first_block`` on, or EViT-like three stages
#: (blocks ``d//4, d//2, 3d//4``) each keeping the same fraction, by merging or by pruning.
HANDSET_KINDS = ("merge-uniform", "prune-uniform", "merge-3stage", "prune-3stage")


def schedule_macs(prune_kept: Sequence[int], merge_kept: Sequence[int], num_tokens: int,
                  coeffs: dict) -> float:
    """MACs per image (in 1e9) of a schedule on a plain ViT with per-image coefficients
    ``coeffs`` (``constant``, ``attn_token``, ``attn_pair``, ``mlp_token``: see
    :func:`leanvit.search.diffrate.mac_model`): each block's attention at the tokens entering
    it, its MLP at the tokens left after pruning and merging (the merge similarities and the
    class-attention row, < 0.1% of a block, are left out)."""
    n, total = num_tokens, float(coeffs["constant"])
    for m in effective_counts(prune_kept, merge_kept, num_tokens)[1]:
        total += n * coeffs["attn_token"] + n * n * coeffs["attn_pair"]
        n = m
        total += n * coeffs["mlp_token"]
    return total / 1e9


def handset_counts(kind: str, strength: float, num_tokens: int, prefix_tokens: int, depth: int,
                   first_block: int = 1) -> tuple[list[int], list[int]]:
    """``(prune_kept, merge_kept)`` of a hand-set schedule (prefix tokens included).

    Args:
        kind: one of :data:`HANDSET_KINDS`.
        strength: ``*-uniform``: tokens removed per block from ``first_block`` on (a float:
            block ``i`` keeps ``round(P - strength * (i - first_block + 1))`` of the ``P``
            patches); ``*-3stage``: the fraction of the present patches each of the blocks
            ``depth // 4, depth // 2, 3 * depth // 4`` keeps (``ceil``), in ``[0, 1]``.
        first_block: first block that may compress, in ``0..depth - 1`` (DiffRate leaves
            block 0 alone: 1).
    """
    if kind not in HANDSET_KINDS:
        raise ValueError(f"kind must be one of {', '.join(HANDSET_KINDS)}, got {kind!r}")
    if not math.isfinite(strength) or strength < 0:
        raise ValueError(f"strength must be a finite number >= 0, got {strength!r}")
    if kind.endswith("3stage") and strength > 1:
        raise ValueError(f"strength of {kind} is the fraction of tokens each stage keeps, in "
                         f"[0, 1]; got {strength!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    if isinstance(first_block, bool) or not isinstance(first_block, int) or \
            not 0 <= first_block < depth:
        raise ValueError(f"first_block must be a block index in 0..{depth - 1}, got "
                         f"{first_block!r}")
    patches = num_tokens - prefix_tokens
    stages = (depth // 4, depth // 2, 3 * depth // 4)
    present, prune, merge = patches, [], []
    for i in range(depth):
        kept = present
        if kind.endswith("uniform") and i >= first_block:
            kept = round(patches - strength * (i - first_block + 1))
        elif kind.endswith("3stage") and i in stages:
            kept = math.ceil(strength * present)
        kept = max(1, min(present, kept))
        prune.append(prefix_tokens + (kept if kind.startswith("prune") else present))
        merge.append(prefix_tokens + kept)
        present = kept
    return prune, merge


def fit_handset(kind: str, target_gmacs: float, num_tokens: int, prefix_tokens: int,
                depth: int, coeffs: dict, first_block: int = 1
                ) -> tuple[list[int], list[int], float, float]:
    """The hand-set schedule of ``kind`` whose :func:`schedule_macs` is closest to
    ``target_gmacs``: bisection on its strength. Returns ``(prune_kept, merge_kept, strength,
    gmacs)``."""
    if isinstance(target_gmacs, bool) or not isinstance(target_gmacs, (int, float)) or \
            not math.isfinite(target_gmacs) or target_gmacs <= 0:
        # a NaN target compares false with every estimate: the bisection would return a
        # schedule fitted to nothing
        raise ValueError(f"target_gmacs must be a positive finite number, got {target_gmacs!r}")
    uniform = kind.endswith("uniform")
    lo, hi = (0.0, float(num_tokens)) if uniform else (0.0, 1.0)
    best = None
    for _ in range(60):
        mid = (lo + hi) / 2
        p, m = handset_counts(kind, mid, num_tokens, prefix_tokens, depth, first_block)
        g = schedule_macs(p, m, num_tokens, coeffs)
        if best is None or abs(g - target_gmacs) < abs(best[3] - target_gmacs):
            best = (p, m, mid, g)
        # uniform: a larger strength removes more (fewer MACs); 3stage: a larger keep fraction
        # removes less
        if (g > target_gmacs) == uniform:
            lo = mid
        else:
            hi = mid
    return best
