"""``leanvit.count_macs`` on PVTv2 and NextViT, plain and compacted (hMHSA + cFFN, training
and deploy form): equal to PyTorch's FLOP counter, and the per-block split written out."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import leanvit
from tests.compaction.test_compaction import images, tiny

torch.set_num_threads(1)


def flop_counter_macs(model, x) -> float:
    """FlopCounterMode total / 2 per image with the attention materialised (the counter does
    not see CPU fused SDPA; count_macs counts the products either way)."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]


@pytest.mark.parametrize("name", ["pvt_v2_b0", "nextvit_small"])
@pytest.mark.parametrize("form", ["plain", "compacted", "deployed", "dwconv"])
def test_count_macs_equals_flop_counter(name, form):
    model = tiny(name)
    x = images()
    if form != "plain":  # NextViT's cFFN (an SVD of wide layers) only once, deployed
        ffn = "compact" if name.startswith("pvt") or form == "deployed" else None
        leanvit.compact(model, hallucination="dwconv" if form == "dwconv" else "mix", ffn=ffn)
    if form == "deployed":
        leanvit.reparameterize(model)
    report = leanvit.count_macs(model, x)
    assert report.total == flop_counter_macs(model, x)
    assert len(report.per_block) == sum(len(s.blocks) for s in model.stages)


def test_compaction_lowers_the_count():
    x = images()
    base = leanvit.count_macs(tiny("pvt_v2_b0"), x)
    small = leanvit.count_macs(leanvit.reparameterize(leanvit.compact(tiny("pvt_v2_b0"))), x)
    assert small.total < base.total
    assert small.stem == base.stem and small.head == base.head


def test_pvt_block_written_out():
    """A PVTv2-b0 stage-1 block on 64x64 images: 16x16 = 256 tokens of width 32, one head,
    keys from the 8x8-strided reduction (2x2 = 4 tokens), MLP ratio 8 with a 3x3 depthwise
    convolution."""
    model = tiny("pvt_v2_b0")
    report = leanvit.count_macs(model, images())
    n, c, nk, hidden = 256, 32, 4, 256
    attention = (n * c * c          # q
                 + nk * c * 8 * 8 * c  # sr: 8x8 stride-8 convolution, one output per key
                 + nk * c * 2 * c   # kv
                 + 2 * n * nk * c   # q k^T, attn @ v
                 + n * c * c)       # proj
    mlp = n * c * hidden + n * hidden * 9 + n * hidden * c
    b = report.per_block[0]
    assert (b.attention, b.mlp, b.tokens_in) == (attention, mlp, n)
    assert report.stem == n * 3 * 7 * 7 * c  # 7x7 stride-4 overlapping patch embedding
    assert report.head == 256 * 1000
    assert set(report.layers) == {f"stages.{s}.downsample.proj" for s in (1, 2, 3)}


def test_mode_restored_and_pre_existing_errors_kept():
    model = tiny("nextvit_small").train()
    leanvit.count_macs(model, images())
    assert model.training
    with pytest.raises(ValueError, match="unsupported model type"):
        leanvit.patch(tiny("pvt_v2_b0"), "tome")


def test_macs_command_on_pvt(tmp_path, capsys):
    import json

    from leanvit.cli import main

    out = tmp_path / "m.json"
    assert main(["macs", "pvt_v2_b0", "--json", str(out)]) == 0  # 224x224 (paper: 0.6 G)
    data = json.loads(out.read_text())
    assert data["gmacs"] == pytest.approx(0.566, abs=1e-3)
    assert len(data["per_block"]) == 8  # b0: depths (2, 2, 2, 2)
    assert "downsample" in capsys.readouterr().out
