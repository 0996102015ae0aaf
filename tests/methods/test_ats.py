"""ATS against a plainly written reference: per-image loops, materialised attention, the
inverse-transform sampling spelled out point by point."""
from __future__ import annotations


import pytest
import timm
import torch

import leanvit
from leanvit.methods.ats import default_locations, sample_tokens

torch.set_num_threads(1)


# -- reference ---------------------------------------------------------------------------------

def ref_sample(scores: list[float], num_samples: int) -> set[int]:
    """Indices (into ``scores``) kept by ATS's inverse-transform sampling, in plain Python."""
    n = len(scores)
    total = sum(scores)
    s = [v / total for v in scores]
    order = sorted(range(n), key=lambda j: (s[j], j))  # ascending; ties by position
    cdf, acc = [], 0.0
    for j in order:
        acc += s[j]
        cdf.append(acc)
    if n == 1:
        return {order[0]}
    ncdf = [(c - cdf[0]) / (cdf[-1] - cdf[0]) for c in cdf]
    start = min(c for c in ncdf if c > 0)
    kept = set()
    for m in range(num_samples):
        y = start + m * (1.0 - start) / (num_samples - 1)
        best = min(range(n), key=lambda p: (abs(y - ncdf[p]), p))  # nearest, first on ties
        kept.add(order[best])
    return kept


def ref_forward(model, image: torch.Tensor, locations, max_tokens=None):
    """One image through the ViT with ATS, written out: ``(output [1, ...], kept)`` where
    ``kept[i]`` is the set of ORIGINAL token indices (prefix included) leaving block ``i``."""
    p = model.num_prefix_tokens
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(image[None])))[0]  # [N0, C]
        n0 = x.shape[0]
        budget = max(max_tokens or n0, 8)
        ids = list(range(n0))
        kept = {}
        for i, blk in enumerate(model.blocks):
            attn = blk.attn
            n, heads, d = x.shape[0], attn.num_heads, attn.head_dim
            y = blk.norm1(x)
            qkv = torch.nn.functional.linear(y, attn.qkv.weight, attn.qkv.bias)
            q, k, v = qkv.reshape(n, 3, heads, d).permute(1, 2, 0, 3)  # each [H, N, D]
            a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # materialised [H, N, N]
            rows = list(range(n))
            if i in locations:
                cls_row = a[:, 0, :].sum(0)  # summed over heads
                vnorm = v.permute(1, 0, 2).reshape(n, heads * d).norm(dim=-1)
                scores = [float(cls_row[j] * vnorm[j]) for j in range(p, n)]
                picked = ref_sample(scores, budget - p)
                rows = list(range(p)) + sorted(j + p for j in picked)
            out = (a[:, rows, :] @ v).permute(1, 0, 2).reshape(len(rows), heads * d)
            out = attn.proj(out)
            x = x[rows] + blk.ls1(out)
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
            ids = [ids[r] for r in rows]
            kept[i] = set(ids)
        x = model.norm(x)[None]
        if model.global_pool == "avg":
            feat = x[:, p:].mean(1)
        else:
            feat = x[:, 0]
        return model.head(model.fc_norm(feat)), kept


# -- helpers -----------------------------------------------------------------------------------

def tiny_vit(sharpen: float = 4.0, **kw):
    """Random tiny ViT whose attention is sharpened so that images keep different counts."""
    torch.manual_seed(0)
    args = dict(img_size=64, patch_size=16, embed_dim=48, depth=4, num_heads=3,
                num_classes=5)
    args.update(kw)
    model = timm.create_model("vit_tiny_patch16_224", **args).eval()
    with torch.no_grad():
        for blk in model.blocks:
            c = blk.attn.qkv.weight.shape[1]
            blk.attn.qkv.weight[: 2 * c] *= sharpen  # q and k
    return model


def run_recording(model, images):
    """Patched forward; also the original token ids each image keeps after each ATS block."""
    reducer = model.leanvit
    original = reducer.select_queries
    n0 = model.patch_embed.num_patches + model.num_prefix_tokens
    track = {"ids": torch.arange(n0).expand(images.shape[0], n0), "kept": {}}

    def recording(i, signals, state):
        rows, new = original(i, signals, state)
        track["ids"] = track["ids"].gather(1, rows)
        valid = new.valid if new.valid is not None else torch.ones_like(rows, dtype=torch.bool)
        track["kept"][i] = [set(track["ids"][b][valid[b]].tolist())
                            for b in range(images.shape[0])]
        return rows, new

    reducer.select_queries = recording
    try:
        with torch.no_grad():
            out = model(images)
    finally:
        del reducer.select_queries
    return out, track["kept"]


# -- the sampling function ---------------------------------------------------------------------

def test_sample_tokens_matches_plain_reference_with_padding():
    torch.manual_seed(1)
    B, L = 6, 20
    scores = torch.rand(B, L) ** 4  # uneven, so duplicates occur
    valid = torch.rand(B, L) > 0.3
    valid[0] = True
    valid[1] = False
    valid[1, 7] = True  # a single real token
    for m in (5, 19, 40):
        keep = sample_tokens(scores, valid, m)
        for b in range(B):
            real = valid[b].nonzero().flatten().tolist()
            expected = {real[j] for j in ref_sample([float(scores[b, r]) for r in real], m)}
            assert set(keep[b].nonzero().flatten().tolist()) == expected
            assert len(expected) <= m


def test_sample_tokens_drops_lowest_and_keeps_highest():
    scores = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]])
    keep = sample_tokens(scores, None, 4)
    assert keep[0, 1] and not keep[0, 2]  # the top score is kept, the first in CDF order never


def test_sample_tokens_rejects_one_sample_point():
    with pytest.raises(ValueError, match="at least 2"):
        sample_tokens(torch.rand(1, 5), None, 1)


# -- the patched model against the reference ---------------------------------------------------

def test_matches_reference_per_image_with_variable_counts():
    model = tiny_vit()
    ref_model = tiny_vit()
    torch.manual_seed(2)
    images = torch.randn(6, 3, 64, 64)
    locations = (1, 2, 3)
    leanvit.patch(model, "ats", locations=locations)
    out, kept = run_recording(model, images)
    counts = set()
    for b in range(images.shape[0]):
        ref_out, ref_kept = ref_forward(ref_model, images[b], locations)
        torch.testing.assert_close(out[b:b + 1], ref_out, atol=1e-5, rtol=1e-5)
        for i in locations:
            assert kept[i][b] == ref_kept[i], (b, i)
        counts.add(len(ref_kept[3]))
    assert len(counts) > 1, "test needs images with different kept counts"


def test_padded_batch_equals_each_image_alone():
    for pool in ("token", "avg"):
        model = tiny_vit(global_pool=pool, init_values=0.5)  # LayerScale on, avg pooling
        leanvit.patch(model, "ats", locations=(0, 1, 2, 3))
        torch.manual_seed(3)
        images = torch.randn(5, 3, 64, 64)
        batch_out, kept = run_recording(model, images)
        assert len({len(k) for k in kept[3]}) > 1
        for b in range(images.shape[0]):
            alone, kept_alone = run_recording(model, images[b:b + 1])
            torch.testing.assert_close(batch_out[b:b + 1], alone, atol=1e-5, rtol=1e-5)
            assert all(kept_alone[i][0] == kept[i][b] for i in kept)


def test_register_tokens_and_max_tokens_match_reference():
    model = tiny_vit(reg_tokens=2)
    ref_model = tiny_vit(reg_tokens=2)
    leanvit.patch(model, "ats", locations=(1, 3), max_tokens=10)
    torch.manual_seed(4)
    images = torch.randn(3, 3, 64, 64)
    out, kept = run_recording(model, images)
    for b in range(3):
        ref_out, ref_kept = ref_forward(ref_model, images[b], (1, 3), max_tokens=10)
        torch.testing.assert_close(out[b:b + 1], ref_out, atol=1e-5, rtol=1e-5)
        assert kept[1][b] == ref_kept[1] and kept[3][b] == ref_kept[3]
        assert {0, 1, 2} <= kept[3][b] and len(kept[1][b]) <= 10


def test_macs_count_real_tokens_per_image():
    model = tiny_vit()
    torch.manual_seed(2)
    images = torch.randn(4, 3, 64, 64)
    leanvit.patch(model, "ats", locations=(1, 2, 3))
    _, kept = run_recording(model, images)
    report = leanvit.count_macs(model, images)
    c = model.embed_dim
    for i in (1, 2, 3):
        n_out = torch.tensor([len(k) for k in kept[i]], dtype=torch.float64)
        n_in = (torch.tensor([len(k) for k in kept[i - 1]], dtype=torch.float64) if i > 1
                else torch.full((4,), 17.0, dtype=torch.float64))
        blk = report.per_block[i]
        assert blk.tokens_out == pytest.approx(float(n_out.mean()))
        expected = (n_in * 3 * c * c + 2 * n_out * n_in * c + n_out * c * c).mean()
        assert blk.attention == pytest.approx(float(expected))
        assert blk.mlp == pytest.approx(float((n_out * 8 * c * c).mean()))


def test_default_locations_scale_with_depth():
    assert default_locations(12) == tuple(range(3, 12))
    assert default_locations(24) == tuple(range(6, 24))
    assert default_locations(4) == (1, 2, 3)
    model = tiny_vit()
    leanvit.patch(model, "ats")
    assert sorted(model.leanvit.locations) == [1, 2, 3]
    assert leanvit.patch(tiny_vit(), "ats", locations=2).leanvit.locations == {2}
    assert leanvit.patch(tiny_vit(), "ats", locations=[3, 1]).leanvit.locations == {1, 3}


# -- bad input ---------------------------------------------------------------------------------

def test_model_without_class_token_is_rejected():
    model = tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        leanvit.patch(model, "ats")
    assert not leanvit.is_patched(model)


@pytest.mark.parametrize("options, error, match", [
    (dict(locations=(1, 4)), ValueError, "outside"),
    (dict(locations=(-1,)), ValueError, ">= 0"),
    (dict(locations="1,2"), TypeError, "tuple"),
    (dict(max_tokens=4), ValueError, "max_tokens"),
    (dict(max_tokens=18), ValueError, "exceeds"),
    (dict(max_tokens=9.5), TypeError, "int"),
    (dict(keep_rate=0.5), ValueError, "unknown option"),
])
def test_bad_options(options, error, match):
    model = tiny_vit()
    with pytest.raises(error, match=match):
        leanvit.patch(model, "ats", **options)


def test_wrong_input_size_is_a_clear_error():
    model = leanvit.patch(tiny_vit(), "ats")
    with pytest.raises(ValueError, match="64x64"):
        model(torch.randn(1, 3, 96, 96))
