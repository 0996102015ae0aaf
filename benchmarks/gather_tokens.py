"""Moving tokens: ``gather`` with an index expanded over the channels (what
``leanvit.state.gather_tokens`` did before issue 16) against the rows-``index_select`` it does
now, DeiT-S shapes (keep 184 of 197 tokens of width 384), batch 1 and 64, fp32, CPU.

    flock /tmp/leanvit-cpu.lock python benchmarks/gather_tokens.py

Prints microseconds per call (best of 7 rounds) and the ratio; checks the values are equal.
"""
from __future__ import annotations

import argparse
import time

import torch

from leanvit.state import gather_tokens


def gather_expanded(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The former ``gather_tokens``: ``x.gather(1, index[..., None].expand(-1, -1, C))``."""
    return x.gather(1, index.unsqueeze(-1).expand(index.shape + x.shape[2:]))


def best_us(f, n: int) -> float:
    for _ in range(3):
        f()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        times.append((time.perf_counter() - t0) / n * 1e6)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--keep", type=int, default=184)
    p.add_argument("--dim", type=int, default=384)
    args = p.parse_args()
    print(f"threads {torch.get_num_threads()}, load {open('/proc/loadavg').read().split()[:3]}")
    for b, n in ((1, 200), (64, 10)):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, args.tokens, args.dim, generator=g)
        idx = torch.rand(b, args.tokens, generator=g).argsort(1)[:, :args.keep]
        assert torch.equal(gather_expanded(x, idx), gather_tokens(x, idx))
        with torch.inference_mode():
            old = best_us(lambda: gather_expanded(x, idx), n)
            new = best_us(lambda: gather_tokens(x, idx), n)
        print(f"batch {b}: gather (expanded index) {old:.0f} us, gather_tokens "
              f"(index_select) {new:.0f} us, {old / new:.1f}x")


if __name__ == "__main__":
    main()
