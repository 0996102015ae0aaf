"""``leanvit.bench.time_models``: both models timed each round, in alternating order."""
from __future__ import annotations

import torch
from torch import nn

from leanvit.bench import time_models


class _Log(nn.Module):
    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log

    def forward(self, x):
        self.log.append(self.name)
        return x


def test_time_models_times_each_model_every_round_in_alternating_order():
    log: list[str] = []
    t = time_models(_Log("a", log), _Log("b", log), torch.zeros(1), warmup=1, repeats=3, iters=2)
    assert sorted(t) == ["baseline", "candidate"]
    assert len(t["baseline"]) == len(t["candidate"]) == 3
    assert all(s >= 0 for s in t["baseline"] + t["candidate"])
    # warm-up a b, round 0: a a b b, round 1: b b a a, round 2: a a b b
    assert "".join(log) == "ab" + "aabb" + "bbaa" + "aabb"
