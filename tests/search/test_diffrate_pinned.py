"""A tiny seeded DiffRate search gives the schedule it gave before the search was split into
a config and phases (values recorded on main at a27a4c3, before the split): the refactor
moved code, it did not change what the search computes."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch

import leanvit
from leanvit.search.diffrate import search

#: (search options, classes of the head, prune_kept, merge_kept, selected step) as main gave
CASES = {
    "snapshots": (dict(ops="both", select_every=4, holdout=4, steps=12), 10,
                  [17, 17, 13, 8], [17, 13, 8, 3], 0),
    "zero-start": (dict(ops="merge", init="zero", epochs=2), 10,
                   [17, 17, 8, 8], [17, 8, 8, 8], None),
    "features": (dict(ops="prune", steps=6), 0, [17, 14, 9, 4], [17, 14, 9, 4], None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_seeded_search_gives_the_recorded_schedule(case):
    options, classes, prune, merge, selected = CASES[case]
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=4, img_size=64,
                              num_classes=classes).eval()
    images = torch.randn(12, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    dense = leanvit.count_macs(model, images[:1]).gmacs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # off-target warnings of so short a search
        result = search(model, 0.7 * dense, images, batch_size=4, progress=False,
                        granularity=1, mac_weight=1e5, lr=0.3, seed=3, **options)
    assert (list(result.schedule.prune_kept), list(result.schedule.merge_kept)) == (prune, merge)
    assert result.schedule.obtained.get("selected_step") == selected
