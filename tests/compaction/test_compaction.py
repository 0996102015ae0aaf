"""leanvit.compact / leanvit.reparameterize on tiny ViT, PVTv2 and NextViT models.

References are independent of the compaction code: the unmodified timm model itself (made to
have hallucinated heads that duplicate computed ones, or exact mixtures of them), and plain
parameter arithmetic.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import leanvit
from leanvit.compaction import compaction_spec, spec_options
from leanvit.compaction.modules import CompactProjection, HallucinatedAttention


def tiny(name: str = "deit_tiny_patch16_224", **kw) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("pvt_v2"):
        kw.setdefault("depths", (1, 1, 1, 1))
    elif name.startswith("nextvit"):
        kw.setdefault("depths", (1, 1, 5, 1))
    else:
        kw.setdefault("depth", 2)
        kw.setdefault("img_size", 64)
    return timm.create_model(name, **kw).eval()


def images(n: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, 3, 64, 64)


def nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _head_rows(h: int, d: int) -> slice:
    return slice(h * d, (h + 1) * d)


@torch.no_grad()
def duplicate_heads(model: nn.Module) -> None:
    """Give each original head ``Hc + j`` the query/key weights of head ``j``, so that a
    copy-initialised hMHSA (hallucinated ``Hc + j`` = computed ``j``) is exactly the model."""
    for mod in model.modules():
        if type(mod).__name__ not in ("Attention", "EfficientAttention"):
            continue
        H, D = mod.num_heads, mod.head_dim
        hc = (H + 1) // 2
        if hasattr(mod, "qkv"):  # timm ViT: [q | k | v]
            pairs = [(mod.qkv, 0), (mod.qkv, H)]
        elif hasattr(mod, "kv"):  # PVTv2: q, [k | v]
            pairs = [(mod.q, 0), (mod.kv, 0)]
        else:  # NextViT: q, k, v
            pairs = [(mod.q, 0), (mod.k, 0)]
        for lin, off in pairs:
            for j in range(H - hc):
                lin.weight[_head_rows(off + hc + j, D)] = lin.weight[_head_rows(off + j, D)]
                if lin.bias is not None:
                    lin.bias[_head_rows(off + hc + j, D)] = lin.bias[_head_rows(off + j, D)]


FAMILIES = ["deit_tiny_patch16_224", "pvt_v2_b0", "nextvit_small"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("hallucination", ["mix", "dwconv"])
def test_copy_initialised_hmhsa_equals_model_whose_heads_duplicate(name, hallucination):
    model = tiny(name)
    duplicate_heads(model)
    x = images()
    with torch.no_grad():
        ref = model(x)
        leanvit.compact(model, ffn=None, hallucination=hallucination).eval()
        out = model(x)
    assert any(isinstance(m, HallucinatedAttention) for m in model.modules())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_hallucinated_heads_have_no_query_or_key_projections():
    model = tiny()  # 3 heads of 64: 2 computed, 1 hallucinated
    C, H, D = 192, 3, 64
    before = nparams(model)
    leanvit.compact(model, ffn=None, hallucination="mix")
    attn = model.blocks[0].attn
    assert (attn.computed_heads, attn.hallucinated_heads) == (2, 1)
    assert attn.qkv.out_features == (2 * 2 + 3) * D  # q, k of 2 heads; v of all 3
    saved_per_block = 2 * D * (C + 1) - attn.hallucinate.weight.numel()  # q,k rows + biases
    assert before - nparams(model) == 2 * saved_per_block


def test_odd_head_count_computes_one_more_head_than_it_hallucinates():
    model = tiny(embed_dim=160, num_heads=5)  # head dim 32
    leanvit.compact(model, ffn=None)
    attn = model.blocks[0].attn
    assert (attn.computed_heads, attn.hallucinated_heads) == (3, 2)
    assert attn.hallucinate.weight.shape == (2, 3)
    assert model(images()).shape == (2, 1000)


def test_single_head_stays_plain_attention():
    model = tiny(embed_dim=64, num_heads=1)
    x = images()
    with torch.no_grad():
        ref = model(x)
        leanvit.compact(model, ffn=None)
        out = model(x)
    attn = model.blocks[0].attn
    assert attn.hallucinate is None and attn.hallucinated_heads == 0
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_pvt_stages_split_heads_1_2_5_8():
    model = leanvit.compact(tiny("pvt_v2_b0"), ffn=None)
    splits = [(s.blocks[0].attn.computed_heads, s.blocks[0].attn.hallucinated_heads)
              for s in model.stages]
    assert splits == [(1, 0), (1, 1), (3, 2), (4, 4)]


@pytest.mark.parametrize("name", FAMILIES)
def test_reparameterize_matches_training_form_in_eval_with_fewer_parameters(name):
    model = tiny(name)
    leanvit.compact(model, branches=2)
    x = images(4)
    model.train()  # move the branch BatchNorm statistics away from their initial values
    with torch.no_grad():
        for _ in range(2):
            model(x + 0.1 * torch.randn_like(x))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d) and m.num_features > 0:
                m.weight.mul_(1.5).add_(0.1)
    model.eval()
    with torch.no_grad():
        train_form = model(x)
        n_train = nparams(model)
        assert leanvit.reparameterize(model) is model
        deploy = model(x)
    assert nparams(model) < n_train
    assert all(m.deployed for m in model.modules() if isinstance(m, CompactProjection))
    torch.testing.assert_close(deploy, train_form, atol=1e-5, rtol=1e-5)
    assert compaction_spec(model)["deployed"] is True


def test_full_rank_ffn_compaction_is_exact_and_deploy_form_has_two_factors():
    model = tiny()
    x = images()
    with torch.no_grad():
        ref = model(x)
        leanvit.compact(model, attention=None, ffn_ratio=1.0, branches=3)
        out = model(x)
        leanvit.reparameterize(model)
        deployed = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(deployed, ref, atol=1e-5, rtol=1e-4)
    fc2 = model.blocks[0].mlp.fc2
    assert (fc2.first.fused.weight.shape, fc2.second.fused.weight.shape) == ((192, 768),
                                                                            (192, 192))


def test_default_rank_is_two_thirds_of_the_width():
    model = leanvit.compact(tiny(), attention=None)
    fc2 = model.blocks[0].mlp.fc2
    assert fc2.rank == 128 and len(fc2.first.branches) == 2


def test_calibrated_conversion_keeps_training_mode_close_to_eval_mode():
    model = tiny()
    x = images(4)
    leanvit.compact(model, attention=None, images=x)
    with torch.no_grad():
        model.eval()
        ev = model(x)
        model.train()  # batch statistics of the calibration batch: the same affine maps
        tr = model(x)
    torch.testing.assert_close(tr, ev, atol=1e-4, rtol=1e-4)


def test_conversion_recovers_heads_that_are_mixtures_of_others():
    """Keys shared by all heads and queries of heads 2, 3 mixing heads 0, 1: their maps'
    logits are exact mixtures, so the fitted hMHSA must reproduce the model."""
    model = tiny(embed_dim=128, num_heads=4)
    D = 32
    with torch.no_grad():
        for blk in model.blocks:
            w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
            for h in range(1, 4):
                w[_head_rows(4 + h, D)] = w[_head_rows(4, D)]
                b[_head_rows(4 + h, D)] = b[_head_rows(4, D)]
            for h, (a0, a1) in ((2, (0.7, -0.4)), (3, (0.2, 1.1))):
                w[_head_rows(h, D)] = a0 * w[_head_rows(0, D)] + a1 * w[_head_rows(1, D)]
                b[_head_rows(h, D)] = a0 * b[_head_rows(0, D)] + a1 * b[_head_rows(1, D)]
    x = images(2)
    with torch.no_grad():
        ref = model(x)
        plain = copy.deepcopy(model)
        leanvit.compact(model, ffn=None, images=x, hallucination="mix")
        out = model(x)
        leanvit.compact(plain, ffn=None)  # no fitting: copies
        unfitted = plain(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)
    assert (unfitted - ref).abs().max() > 100 * (out - ref).abs().max()


def test_spec_rebuilds_the_structure_for_loading_a_state_dict():
    model = tiny()
    leanvit.compact(model, hallucination="dwconv", images=images())
    leanvit.reparameterize(model)
    spec = compaction_spec(model)
    fresh = tiny()
    leanvit.compact(fresh, **spec_options(spec))
    if spec["deployed"]:
        leanvit.reparameterize(fresh)
    fresh.load_state_dict(model.state_dict())
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_bad_options_and_models_give_clear_errors():
    with pytest.raises(ValueError, match="hallucination must be one of mix, dwconv"):
        leanvit.compact(tiny(), hallucination="ghost")
    with pytest.raises(ValueError, match="ffn_ratio"):
        leanvit.compact(tiny(), ffn_ratio=0)
    with pytest.raises(TypeError, match="branches"):
        leanvit.compact(tiny(), branches=2.0)
    with pytest.raises(ValueError, match="attention must be"):
        leanvit.compact(tiny(), attention="ghost")
    with pytest.raises(ValueError, match="kernel_size"):
        leanvit.compact(tiny(), hallucination="dwconv", kernel_size=2)
    with pytest.raises(ValueError, match="supports timm VisionTransformer"):
        leanvit.compact(nn.Sequential(nn.Linear(2, 2)))
    model = leanvit.compact(tiny())
    with pytest.raises(ValueError, match="already compacted"):
        leanvit.compact(model)
    with pytest.raises(ValueError, match="no cFFN"):
        leanvit.reparameterize(leanvit.compact(tiny(), ffn=None))
