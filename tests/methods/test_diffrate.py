"""DiffRate: deploy against a plainly written reference, search mode against deploy, the
MAC formula against the authors', the rate search, and bad inputs."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch

import leanvit
from leanvit.adapters import vit as vit_adapter
from leanvit.methods.diffrate import merge_tail
from leanvit.methods.diffrate.search_mode import DiffRateSearchReducer
from leanvit.search.diffrate import search
from leanvit.methods.diffrate import Schedule, ScheduleError, read_authors_schedule, save_schedule

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
AUTHORS = SHARED / "reference" / "diffrate_compression_rate.json"


def tiny(name="deit_tiny_patch16_224", depth=3, img_size=64, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, depth=depth, img_size=img_size, **kw).eval()


# -- an independent reference: explicit loops, materialised attention -----------------------

def ref_attention(blk, x, size):
    """timm's attention written out, with log(size) added to every key's logit."""
    B, N, C = x.shape
    a = blk.attn
    H = a.num_heads
    D = C // H
    qkv = x @ a.qkv.weight.T + a.qkv.bias
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    out = torch.zeros(B, N, C)
    cls_row = torch.zeros(B, N)
    for b in range(B):
        for h in range(H):
            qh, kh, vh = (t[b, :, h * D:(h + 1) * D] for t in (q, k, v))
            logits = (qh @ kh.T) * D ** -0.5 + torch.log(size[b])[None, :]
            att = torch.softmax(logits, dim=-1)
            out[b, :, h * D:(h + 1) * D] = att @ vh
            cls_row[b] += att[0] / H
    return out @ a.proj.weight.T + a.proj.bias, cls_row


def ref_forward(model, images, prune_kept, merge_kept):
    """Class token after the final norm, DiffRate applied with plain Python per image."""
    x = model._pos_embed(model.patch_embed(images))
    B = x.shape[0]
    outs = []
    for b in range(B):
        xb = x[b:b + 1]
        size = torch.ones(1, xb.shape[1])
        for i, blk in enumerate(model.blocks):
            a, cls_row = ref_attention(blk, blk.norm1(xb), size)
            xb = xb + a
            toks, sizes, attn = list(xb[0]), list(size[0]), list(cls_row[0])
            n = len(toks)
            kp, km = min(prune_kept[i], n), min(merge_kept[i], n)
            if km < n:
                order = [0] + sorted(range(1, n), key=lambda j: -float(attn[j]))
                order = order[:kp]
                toks = [toks[j] for j in order]
                sizes = [sizes[j] for j in order]
                dst = [[toks[d]] for d in range(km)]
                new_sizes = [sizes[d] for d in range(km)]
                for s in range(km, kp):
                    best, best_cos = None, -2.0
                    for d in range(1, km):  # never into the class token
                        cos = float(torch.dot(toks[s], toks[d]) /
                                    (toks[s].norm() * toks[d].norm()))
                        if cos > best_cos:
                            best, best_cos = d, cos
                    dst[best].append(toks[s])
                    new_sizes[best] = new_sizes[best] + sizes[s] * max(best_cos, 0.0)
                toks = [torch.stack(group).mean(0) for group in dst]
                sizes = new_sizes
            xb = torch.stack(toks)[None]
            size = torch.stack([torch.as_tensor(s) for s in sizes])[None].float()
            xb = xb + blk.mlp(blk.norm2(xb))
        outs.append(model.norm(xb)[0, 0])
    return torch.stack(outs)


def test_deploy_matches_plain_reference():
    model = tiny(depth=4)  # 16 patches + cls
    prune, merge = [17, 15, 12, 7], [17, 13, 9, 4]
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref_forward(model, images, prune, merge)
        leanvit.patch(model, "diffrate", schedule=(prune, merge))
        got, state = vit_adapter.forward_features(model, images)
    assert got.shape[1] == 4
    torch.testing.assert_close(got[:, 0], expected, atol=1e-4, rtol=1e-4)


def test_keep_all_schedule_is_bit_identical():
    model = tiny()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(images)
        leanvit.patch(model, "diffrate", schedule=([17] * 3, [17] * 3))
        assert torch.equal(model(images), ref)


def test_merge_arithmetic_mean_and_size_times_cosine():
    # dst 0 = cls (protected), dst 1 = e1; sources 2 = e1 + e2 (cos 1/sqrt2), 3 = -e1 (cos -1)
    x = torch.tensor([[[5.0, 5.0], [1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]])
    size = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out, new_size, _ = merge_tail(x, size, prefix=1, k=2)
    # only one non-prefix destination: both sources join token 1
    torch.testing.assert_close(out[0, 1], (x[0, 1] + x[0, 2] + x[0, 3]) / 3)
    torch.testing.assert_close(out[0, 0], x[0, 0])
    # size 2 + 3 * cos(45 deg) + 4 * max(-1, 0): the guard keeps log(size) finite
    torch.testing.assert_close(new_size[0], torch.tensor([1.0, 2.0 + 3.0 / math.sqrt(2)]))
    assert torch.isfinite(new_size.log()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_into_copies_goes_to_the_first_copy(dtype):
    """Destinations that are copies of one token tie exactly; rounding in the product must
    not decide which copy receives: every source goes to the first copy, whatever its own
    norm (so the product's blocking differs from row to row)."""
    g = torch.Generator().manual_seed(0)
    C, k = 48, 12
    base = torch.randn(C, generator=g, dtype=torch.float64)
    x = torch.randn(1, 40, C, generator=g, dtype=torch.float64)
    x[0, 3:k:2] = base  # destinations 3, 5, 7, 9, 11 are copies
    x[0, k:] = base * torch.linspace(0.3, 7.0, 40 - k, dtype=torch.float64)[:, None] \
        + 1e-3 * torch.randn(40 - k, C, generator=g, dtype=torch.float64)
    x = x.to(dtype)
    size = torch.ones(1, 40, dtype=dtype)
    out, new_size, _ = merge_tail(x, size, prefix=1, k=k)
    assert new_size[0, 3] > 1 + 0.9 * (40 - k)  # every source joined the first copy
    assert torch.equal(new_size[0, 5:k:2], torch.ones(4, dtype=dtype))  # the others: none
    assert torch.equal(out[0, 5:k:2], x[0, 5:k:2])


def test_counts_larger_than_present_change_nothing():
    from leanvit.signals import Signals
    from leanvit.state import TokenState

    model = tiny(depth=3)
    leanvit.patch(model, "diffrate", schedule=([17, 15, 10], [17, 12, 6]))
    r = model.leanvit
    B, N, C, H = 2, 9, model.embed_dim, 3  # block 1 expects 17 tokens; only 9 are present
    x = torch.randn(B, N, C)
    q, k, v = (torch.randn(B, H, N, C // H) for _ in range(3))
    state = TokenState(prefix=1, n0=17)
    y, st = r.after_attention(1, x, Signals(q, k, v, 0.1, None), state)
    assert y is x and st is state
    # block 2 keeps 10 then merges to 6: only the merge acts on 9 tokens
    y, st = r.after_attention(2, x, Signals(q, k, v, 0.1, None), state)
    assert y.shape == (B, 6, C) and st.size.shape == (B, 6)


@pytest.mark.skipif(not AUTHORS.is_file(), reason=f"authors' schedules not found at {AUTHORS}")
def test_authors_no_op_counts_become_effective_counts():
    # DeiT-T 1.0 merges to 148 in block 6, then lists prune 164 / merge 156 in block 7
    s = read_authors_schedule(AUTHORS, "ViT-T-DeiT", "1.0")
    assert s.obtained["published_merge_kept"][7] == 156 and s.merge_kept[7] == 148
    assert 7 in s.obtained["blocks_with_no_op_counts"]
    with pytest.raises(ScheduleError, match="counts increase"):
        Schedule(s.model, s.img_size, s.num_tokens, 1, s.obtained["published_prune_kept"],
                 s.obtained["published_merge_kept"])


def test_source_tracking_follows_merges():
    model = tiny(depth=3)
    with torch.no_grad():
        leanvit.patch(model, "diffrate", schedule=([17, 12, 8], [17, 10, 5]), trace_source=True)
        x, state = vit_adapter.forward_features(model, torch.randn(2, 3, 64, 64))
    assert state.source.shape == (2, 5, 17)
    # every original token is in at most one kept token; the class token only in itself
    assert (state.source.sum(1) <= 1).all()
    assert state.source[:, 0, 0].eq(1).all() and state.source[:, 0, 1:].eq(0).all()


def test_torch_compile_static_shapes():
    model = tiny(depth=2)
    leanvit.patch(model, "diffrate", schedule=([17, 12], [17, 8]))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(images)
        compiled = torch.compile(model, backend="eager", fullgraph=False)
        torch.testing.assert_close(compiled(images), ref)


# -- search mode vs deploy ------------------------------------------------------------------

def _set_hard(reducer: DiffRateSearchReducer, prune, merge):
    """Logits that put all probability on the candidate equal to each count."""
    with torch.no_grad():
        for logits, counts in ((reducer.prune_logits, prune), (reducer.merge_logits, merge)):
            logits.fill_(-1e4)
            for i, c in enumerate(counts):
                j = (reducer.candidates == c - reducer.prefix).nonzero()
                if i >= reducer.options.first_block:
                    logits[i, int(j)] = 0.0


def test_search_mode_masked_equals_deploy_removed():
    prune, merge = [17, 15, 11, 7], [17, 12, 9, 4]
    images = torch.randn(3, 3, 64, 64)
    model = tiny(depth=4)
    with torch.no_grad():
        leanvit.patch(model, "diffrate", schedule=(prune, merge))
        deployed = vit_adapter.forward_features(model, images)[0][:, 0]
        leanvit.unpatch(model)
        leanvit.patch(model, "diffrate-search", granularity=1)
        _set_hard(model.leanvit, prune, merge)
        assert model.leanvit.to_schedule().merge_kept == tuple(merge)
        x, state = vit_adapter.forward_features(model, images)
    assert x.shape[1] == 17  # nothing removed, only masked
    assert state.mask.sum(1).eq(4).all()
    torch.testing.assert_close(x[:, 0], deployed, atol=1e-4, rtol=1e-4)


def test_mac_gradient_reaches_rate_logits():
    model = tiny(depth=3)
    leanvit.patch(model, "diffrate-search", granularity=2)
    gm = model.leanvit.expected_gmacs()
    ((gm - 0.0) ** 2).backward()
    r = model.leanvit
    assert r.prune_logits.grad[1:].abs().sum() > 0 and r.merge_logits.grad[1:].abs().sum() > 0
    assert r.prune_logits.grad[0].abs().sum() == 0  # block 0 is not compressible


def test_task_gradient_reaches_rate_logits_through_masks():
    model = tiny(depth=3)
    leanvit.patch(model, "diffrate-search", granularity=2)
    with torch.no_grad():  # start below the full count so masks are active
        model.leanvit.prune_logits[:, :4] = -5.0
    x, _ = vit_adapter.forward_features(model, torch.randn(2, 3, 64, 64))
    x[:, 0].square().sum().backward()
    assert model.leanvit.prune_logits.grad[1:].abs().sum() > 0


def test_search_reaches_target_macs_on_tiny_model():
    model = tiny(depth=3, num_classes=0)
    dense = leanvit.count_macs(model, torch.randn(1, 3, 64, 64)).gmacs
    target = 0.75 * dense
    images = torch.randn(4, 3, 64, 64)
    # a tiny model's MACs are ~0.02 G: weight the MAC term so it is not negligible, and take
    # bigger steps (30 steps here against the authors' thousands)
    result = search(model, target, images, epochs=30, batch_size=4, progress=False,
                    granularity=1, mac_weight=1e5, lr=0.3, min_lr=0.03)
    got = result.schedule.gmacs
    assert abs(got - target) / target < 0.03, (got, target)
    assert not leanvit.is_patched(model)
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the search
    assert result.steps == 30 and result.history[-1]["gmacs"] == pytest.approx(target, rel=0.03)


# -- MACs: the authors' schedules -----------------------------------------------------------

def authors_formula_gmacs(C, num_classes, prune, merge, patch=16, num_patches=196):
    """The authors' MAC formula: per block 4NC^2 + 2N^2C at the incoming N, 8N'C^2 after the
    block's pruning and merging; plus patch embedding and classifier."""
    N = 197
    total = 0
    for p, m in zip(prune, merge):
        total += 4 * N * C * C + 2 * N * N * C
        N = min(N, p, m)
        total += 8 * N * C * C
    total += num_patches * C * 3 * patch * patch  # patch embedding (196 patches)
    total += C * num_classes
    return total / 1e9


@pytest.mark.skipif(not AUTHORS.is_file(), reason=f"authors' schedules not found at {AUTHORS}")
def test_authors_deit_s_2_9_gives_2_905_gmacs():
    s = read_authors_schedule(AUTHORS, "ViT-S-DeiT", "2.9")
    model = timm.create_model("deit_small_patch16_224").eval()
    leanvit.patch(model, "diffrate", schedule=s)
    g = leanvit.count_macs(model, torch.randn(1, 3, 224, 224)).gmacs
    assert abs(g - 2.905) / 2.905 < 0.01


@pytest.mark.skipif(not AUTHORS.is_file(), reason=f"authors' schedules not found at {AUTHORS}")
@pytest.mark.parametrize("key,name,C", [("ViT-T-DeiT", "deit_tiny_patch16_224", 192),
                                        ("ViT-S-DeiT", "deit_small_patch16_224", 384),
                                        ("ViT-B-DeiT", "deit_base_patch16_224", 768)])
def test_authors_deit_entries_match_their_formula(key, name, C):
    import json
    targets = json.loads(AUTHORS.read_text())[key]
    # MACs depend on token counts only: a meta-device model (no weights, no arithmetic)
    # gives the same counts as a real one in a fraction of the time
    with torch.device("meta"):
        model = timm.create_model(name).eval()
    images = torch.randn(1, 3, 224, 224)
    for target, entry in targets.items():
        prune, merge = eval(entry["prune_kept_num"]), eval(entry["merge_kept_num"])
        leanvit.patch(model, "diffrate", schedule=read_authors_schedule(AUTHORS, key, target))
        report = leanvit.count_macs(model, images)
        leanvit.unpatch(model)
        formula = authors_formula_gmacs(C, 1000, prune, merge)
        # leanvit also counts the class-attention row and the merge similarities (<0.5%)
        extra = (sum(b.signals for b in report.per_block) + sum(report.extra.values())) / 1e9
        assert report.gmacs - extra == pytest.approx(formula, rel=1e-6), (target,)
        assert report.gmacs == pytest.approx(formula, rel=5e-3)
    if key == "ViT-T-DeiT":
        assert authors_formula_gmacs(C, 1000, *[eval(targets["0.6"][k]) for k in (
            "prune_kept_num", "merge_kept_num")]) == pytest.approx(0.655, abs=5e-4)


# -- bad inputs -----------------------------------------------------------------------------

def test_bad_schedules_are_clear_errors(tmp_path):
    model = tiny(depth=3)
    with pytest.raises(ValueError, match="needs schedule"):
        leanvit.patch(model, "diffrate")
    with pytest.raises(ValueError, match="3 blocks but the model"):
        leanvit.patch(tiny(depth=2), "diffrate", schedule=([17] * 3, [17] * 3))
    with pytest.raises(ValueError, match="outside"):
        leanvit.patch(model, "diffrate", schedule=([17, 18, 10], [17, 10, 5]))
    with pytest.raises(ValueError, match="outside"):
        leanvit.patch(model, "diffrate", schedule=([17, 12, 10], [17, 10, 1]))
    with pytest.raises(ValueError, match="increase"):
        leanvit.patch(model, "diffrate", schedule=([17, 12, 10], [17, 10, 11]))
    with pytest.raises(TypeError, match="schedule must be"):
        leanvit.patch(model, "diffrate", schedule=3.5)
    s = Schedule("deit_tiny_patch16_224", (224, 224), 17, 1, [17] * 3, [17] * 3)
    with pytest.raises(ValueError, match="224x224 images"):
        leanvit.patch(model, "diffrate", schedule=s)
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ScheduleError, match="not valid JSON"):
        leanvit.patch(model, "diffrate", schedule=str(path))
    assert not leanvit.is_patched(model)


def test_schedule_file_round_trip_through_patch(tmp_path):
    model = tiny(depth=3)
    s = Schedule("deit_tiny_patch16_224", (64, 64), 17, 1, [17, 14, 9], [17, 12, 5])
    path = save_schedule(s, tmp_path / "s.json")
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        leanvit.patch(model, "diffrate", schedule=str(path))
        a = model(images)
        leanvit.unpatch(model)
        leanvit.patch(model, "diffrate", schedule=s)
        b = model(images)
    assert torch.equal(a, b)


@pytest.mark.parametrize("objective", ["ce", "distill-logits"])
def test_search_objectives_with_a_head(objective):
    model = tiny(depth=2, num_classes=4)
    dense = leanvit.count_macs(model, torch.randn(1, 3, 64, 64)).gmacs
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    r = search(model, 0.8 * dense, images, labels=labels, objective=objective, epochs=1,
               batch_size=2, progress=False)
    assert r.steps == 2 and r.schedule.obtained["objective"] == objective
    assert all(math.isfinite(h["task"]) for h in r.history)


def test_search_bad_inputs():
    model = tiny(depth=2, num_classes=0)
    images = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="objective must be one of"):
        search(model, 0.01, images, objective="mse")
    with pytest.raises(ValueError, match="needs a classifier head"):
        search(model, 0.01, images, objective="ce")
    with pytest.raises(ValueError, match="not below the dense"):
        search(model, 100.0, images)
    leanvit.patch(model, "none")
    with pytest.raises(ValueError, match="unpatched model"):
        search(model, 0.01, images)


@pytest.mark.parametrize("size,tokens", [(96, 37), (48, 10)])
def test_schedule_refuses_another_token_count_on_a_dynamic_size_model(size, tokens):
    """With dynamic_img_size=True the model takes other image sizes; a schedule for 17 tokens
    cut 21 tokens in one block at 37 tokens, and nothing at all at 10, without a word."""
    model = tiny(depth=2, dynamic_img_size=True)  # 64 px: 16 patches + cls = 17 tokens
    leanvit.patch(model, "diffrate", schedule=([17, 17], [17, 10]))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    msg = (f"diffrate: the schedule was made for 17 tokens (64x64 images) but this input gives "
           f"{tokens} tokens")
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
        model(torch.randn(1, 3, size, size))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=f"this input gives {tokens} tokens"):
        leanvit.count_macs(model, torch.randn(1, 3, size, size))
    search = leanvit.patch(tiny(depth=2, dynamic_img_size=True), "diffrate-search")
    with pytest.raises(ValueError, match=f"built for 17 tokens .*gives {tokens} tokens"):
        search(torch.randn(1, 3, size, size))


def test_search_mode_refuses_a_nan_mac_model_and_a_granularity_leaving_one_candidate():
    """A NaN coefficient made every MAC loss NaN; a granularity beyond the patch count was an
    OverflowError (2**70) or a search with nothing to choose."""
    coeffs = {"constant": 0.0, "attn_token": 1.0, "attn_pair": 1.0, "mlp_token": float("nan")}
    with pytest.raises(ValueError, match=r"mac_model\['mlp_token'\] must be a finite number"):
        leanvit.patch(tiny(depth=2), "diffrate-search", mac_model=coeffs)
    for g in (16, 2**70):  # 64 px, patch 16: 16 patches
        with pytest.raises(ValueError, match=rf"granularity {g} leaves one candidate count for "
                                             r"the model's 16 patches; use 1\.\.15"):
            leanvit.patch(tiny(depth=2), "diffrate-search", granularity=g)
    red = leanvit.patch(tiny(depth=2), "diffrate-search", granularity=15).leanvit
    assert red.candidates.tolist() == [16.0, 1.0]
