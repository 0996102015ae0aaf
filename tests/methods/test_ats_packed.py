"""Packed execution of per-image token counts (ATS) against the padded blocks, on several
families, and the packing helpers against plain per-image loops.

The padded path is the reference here: it is itself checked image by image against plainly
written forwards (test_ats.py, test_eva.py, the family method tests). Packed and padded must
give the same real tokens, pooled outputs and MACs; the packed blocks must actually run where
counts differ, and never where they do not.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import leanvit
from leanvit.adapters import tokens as engine
from leanvit.adapters import vit as vit_adapter
from leanvit.methods.ats import ATSReducer
from leanvit.ops.packed import moved_rows, pack, packing, unpack
from tests.methods import _eva_reference as eva_ref
from tests.methods._vit_reference import tiny_vit

torch.set_num_threads(1)


# -- the helpers against plain loops -----------------------------------------------------------

def _valid(counts, width):
    return torch.arange(width)[None, :] < torch.tensor(counts)[:, None]


def test_pack_unpack_and_moved_rows_match_loops():
    torch.manual_seed(0)
    valid = _valid([5, 2, 4], 5)
    valid[0, 1] = False  # real rows need not be in front
    x = torch.randn(3, 5, 7)
    pk = packing(valid, 3, 5)
    xp = pack(x, pk)
    assert torch.equal(xp, torch.cat([x[b][valid[b]] for b in range(3)]))
    back = unpack(xp, pk)
    assert torch.equal(back[valid], x[valid]) and not back[~valid].any()
    # a gather of the padded layout, rows[b, j] = old row of new token j
    rows = torch.tensor([[4, 0, 2], [1, 0, 0], [3, 2, 1]])
    new_valid = torch.tensor([[True, True, False], [True, True, False], [True, True, True]])
    new = packing(new_valid, 3, 3)
    old_ids = [[(b, j) for j in range(5) if valid[b, j]] for b in range(3)]
    flat_old = [bj for img in old_ids for bj in img]
    want = [flat_old.index((b, int(rows[b, j]))) for b in range(3) for j in range(3)
            if new_valid[b, j]]
    assert moved_rows(pk, rows, new).tolist() == want
    uniform = packing(None, 3, 5)
    assert uniform.index is None and pack(x, uniform).shape == (15, 7)
    assert moved_rows(uniform, rows, new).tolist() == [
        b * 5 + int(rows[b, j]) for b in range(3) for j in range(3) if new_valid[b, j]]


# -- packed blocks against padded blocks -------------------------------------------------------

def _sharp_vit(dtype=torch.float64, **kw):
    """A random ViT (img_size 64, 16x16 patches) with wide-spread weights (peaked attention, so
    ATS keeps different counts per image)."""
    kw = dict(img_size=64, patch_size=16, depth=2) | kw
    model = tiny_vit(**kw)
    return model.to(dtype)


def _families():
    """(name, tiny model builder) of the families ATS serves, depth 2, 64 px where the family
    takes it."""
    out = [("vit", lambda: _sharp_vit()),
           ("vit_avg_ls", lambda: _sharp_vit(global_pool="avg", init_values=0.5)),
           ("vit_reg_map", lambda: _sharp_vit(reg_tokens=2, global_pool="map")),
           ("vit_fp32", lambda: _sharp_vit(torch.float32))]
    out += [(f"eva_{kind}", lambda kind=kind: eva_ref.tiny_eva(kind, depth=2))
            for kind in eva_ref.CONFIGS]
    return out


def _images(model, batch=6, seed=3):
    dtype = next(model.parameters()).dtype
    size = model.patch_embed.img_size
    return torch.randn(batch, 3, *size, dtype=dtype, generator=torch.Generator().manual_seed(seed))


class Spy:
    """Counts the packed blocks run (wraps ``tokens.packed_block``)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = engine.packed_block

        def counting(*args, **kw):
            self.calls += 1
            return real(*args, **kw)

        monkeypatch.setattr(engine, "packed_block", counting)


def _forward(model, images, adapter):
    with torch.no_grad():
        x, state = adapter.forward_features(model, images)
        return model(images), x, state


def _real(out, valid):
    """A model's outputs without its padding rows (which hold nothing: zeros when packed, a
    dropped token's features when padded): a tensor as it is (pooled), an output object's
    token tensors ``[B, N, C]`` at ``valid``."""
    if isinstance(out, torch.Tensor):
        return out
    return {k: v[valid] if v.dim() == 3 and v.shape[:2] == valid.shape else v
            for k, v in out.items()}


def _compare(base, images, adapter, monkeypatch, **options):
    padded = leanvit.patch(copy.deepcopy(base), "ats", packed=False, **options)
    packed = leanvit.patch(copy.deepcopy(base), "ats", packed=True, **options)
    spy = Spy(monkeypatch)
    out_pad, x_pad, st_pad = _forward(padded, images, adapter)
    pad_calls, spy.calls = spy.calls, 0
    out_pk, x_pk, st_pk = _forward(packed, images, adapter)
    assert pad_calls == 0
    assert st_pad.valid is not None, "test needs images that keep different counts"
    assert spy.calls > 0, "the packed blocks did not run"
    assert torch.equal(st_pk.valid, st_pad.valid)
    torch.testing.assert_close(_real(out_pk, st_pk.valid), _real(out_pad, st_pad.valid),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_pk[st_pk.valid], x_pad[st_pad.valid], atol=1e-5, rtol=1e-5)
    assert leanvit.count_macs(packed, images).total == pytest.approx(
        leanvit.count_macs(padded, images).total, rel=1e-9)


@pytest.mark.parametrize("name,build", _families(), ids=[n for n, _ in _families()])
def test_packed_equals_padded(name, build, monkeypatch):
    from leanvit.adapters import eva as eva_adapter

    model = build()
    adapter = eva_adapter if name.startswith("eva") else vit_adapter
    _compare(model, _images(model), adapter, monkeypatch)


def test_packed_equals_padded_hf_and_open_clip(monkeypatch):
    from leanvit.adapters import hf_vit, open_clip as oc_adapter
    from tests.methods.test_hf_vit_methods import images as hf_images
    from tests.methods.test_hf_vit_methods import pair
    from tests.methods.test_open_clip_methods import oc_model

    _, hf = pair("dinov2")
    _compare(hf, hf_images(6), hf_vit, monkeypatch, locations=(1, 2, 3))
    oc = oc_model()
    _compare(oc, hf_images(6), oc_adapter, monkeypatch, locations=(1, 2, 3))


def test_deep_packed_run_with_max_tokens_and_a_hook_that_unpacks(monkeypatch):
    """Four ATS blocks stay packed; a block whose method sees the tokens (after_attention)
    pads the batch again, and the blocks after it pack again."""
    model = _sharp_vit(depth=5)
    images = _images(model)
    _compare(model, images, vit_adapter, monkeypatch, max_tokens=14)
    seen = []

    def after(self, i, x, signals, state):
        seen.append((i, x.dim(), x.shape[0]))
        return x, state

    monkeypatch.setattr(ATSReducer, "acts_after", lambda self, i: i == 2, raising=False)
    monkeypatch.setattr(ATSReducer, "after_attention", after, raising=False)
    _compare(model, images, vit_adapter, monkeypatch)
    assert seen and all(d == 3 and b == images.shape[0] for _, d, b in seen)


def test_beit_relative_bias_and_training_stay_padded(monkeypatch):
    from leanvit.adapters import beit as beit_adapter

    spy = Spy(monkeypatch)
    beit = timm.create_model("beit_base_patch16_224", img_size=64, embed_dim=32, depth=2,
                             num_heads=4, num_classes=5).eval()
    packed = leanvit.patch(copy.deepcopy(beit), "ats", packed=True)
    padded = leanvit.patch(copy.deepcopy(beit), "ats", packed=False)
    images = _images(beit)
    out, _, _ = _forward(packed, images, beit_adapter)
    torch.testing.assert_close(out, _forward(padded, images, beit_adapter)[0])
    vit = leanvit.patch(_sharp_vit(), "ats", packed=True).train()
    with torch.no_grad():
        vit(_images(vit))
    assert spy.calls == 0


def test_equal_counts_stay_padded_and_bit_identical(monkeypatch):
    spy = Spy(monkeypatch)
    base = _sharp_vit(torch.float32, depth=4)
    images = _images(base)
    with torch.no_grad():
        ref = base(images)
        for method, opts in (("tome", dict(r=2)), ("evit", dict(keep_rate=0.7)),
                             ("tome", dict(r=0))):
            out = leanvit.patch(copy.deepcopy(base), method, **opts)(images)
            if opts.get("r") == 0:
                assert torch.equal(out, ref)
        assert spy.calls == 0
        # ATS on one image (one count, never padding): a block that selects query rows runs
        # packed, and gives the padded blocks' values bit for bit
        one = images[:1]
        padded = leanvit.patch(copy.deepcopy(base), "ats", packed=False)(one)
        packed = leanvit.patch(copy.deepcopy(base), "ats", packed=True)(one)
    assert spy.calls > 0 and torch.equal(packed, padded)


def test_auto_packs_a_padded_batch_only_above_the_padding_threshold(monkeypatch):
    """Block 0 selects rows (packed); block 1's hook sees padded tokens; blocks 2 and 3 get a
    padded batch and pack it under ``"auto"`` only when its padding share reaches the
    threshold."""
    monkeypatch.setattr(ATSReducer, "acts_after", lambda self, i: i == 1, raising=False)
    model = leanvit.patch(_sharp_vit(depth=4), "ats", locations=(0, 1))
    images = _images(model)
    fractions = []
    real = engine.pad_fraction
    monkeypatch.setattr(engine, "pad_fraction", lambda v: fractions.append(real(v)) or
                        fractions[-1])
    with torch.no_grad():
        ref = model(images)
    f = fractions[0]
    assert f > 0
    for threshold, calls in ((f + 0.01, 1), (f - 0.01, 3)):
        monkeypatch.setattr(engine, "PACK_MIN_PADDING", threshold)
        spy = Spy(monkeypatch)
        with torch.no_grad():
            torch.testing.assert_close(model(images), ref, atol=1e-5, rtol=1e-5)
        assert spy.calls == calls


def test_auto_leaves_the_packed_layout_when_little_padding_is_left(monkeypatch):
    """ATS in blocks 0..3: block 0 selects rows packed; under ``"auto"`` the next blocks stay
    packed only while the padding share of the packed layout reaches the threshold
    (otherwise the padded blocks run: packing's copies would cost more than the padding);
    ``packed=True`` stays packed. Outputs equal the padded blocks' either way."""
    base = _sharp_vit(depth=4)
    images = _images(base)
    shares = []
    real = engine.packed_block

    def recording(*args, **kw):
        out = real(*args, **kw)
        shares.append(out[2].pad_share)
        return out

    monkeypatch.setattr(engine, "packed_block", recording)
    padded = leanvit.patch(copy.deepcopy(base), "ats", locations=(0, 1, 2, 3), packed=False)
    with torch.no_grad():
        ref = padded(images)
        leanvit.patch(copy.deepcopy(base), "ats", locations=(0, 1, 2, 3), packed=True)(images)
    assert len(shares) == 4 and 0 < shares[0], "every block packed under packed=True"
    # above every block's padding share: only the selecting block 0 packs, then leaves
    model = leanvit.patch(copy.deepcopy(base), "ats", locations=(0, 1, 2, 3))
    for threshold, calls in ((max(shares) + 1e-6, 1), (0.0, 4)):
        monkeypatch.setattr(engine, "PACK_MIN_PADDING", threshold)
        shares.clear()
        with torch.no_grad():
            torch.testing.assert_close(model(images), ref, atol=1e-10, rtol=1e-10)
        assert len(shares) == calls


@pytest.mark.parametrize("bad", ["yes", 1, None, "Auto"])
def test_bad_packed_option_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="packed must be 'auto', True or False"):
        leanvit.patch(_sharp_vit(), "ats", packed=bad)
