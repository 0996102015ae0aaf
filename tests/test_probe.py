"""Linear probes: fitting, saving, attaching in place (also to patched, token-merging models)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import leanvit
from leanvit import registry
from leanvit.adapters import vit as vit_adapter
from leanvit.probe import (attach_head, class_mean, features, fit_probe, head_metadata, load_head,
                           save_head)
from leanvit.state import TokenState
from tests.conftest import tiny_vit


def _clusters(n_per: int, k: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 4
    y = torch.arange(k).repeat_interleave(n_per)
    x = centres[y] + torch.randn(len(y), d, generator=g) * 0.5 + 10  # offset: not centred
    return x, y


def test_probe_separates_separable_features():
    x, y = _clusters(40, 4, 16, seed=0)
    info = {}
    head = fit_probe(x, y, info=info)
    assert isinstance(head, nn.Linear) and head.in_features == 16 and head.out_features == 4
    xt, yt = _clusters(40, 4, 16, seed=0)  # same centres (same seed), fresh noise below
    xt = xt + torch.randn_like(xt) * 0.1
    assert (head(x).argmax(1) == y).float().mean() == 1.0
    assert (head(xt).argmax(1) == yt).float().mean() >= 0.99
    assert info["weight_decay"] in info["held_out_accuracy"]


def test_fit_probe_rejects_bad_input():
    with pytest.raises(ValueError, match="labels"):
        fit_probe(torch.randn(4, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[M, D\]"):
        fit_probe(torch.randn(4), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="lie in"):
        fit_probe(torch.randn(4, 3), torch.tensor([0, 1, 0, 5]), num_classes=2)


def test_saved_head_reloads_bit_identically(tmp_path):
    head = nn.Linear(8, 3)
    path = save_head(head, tmp_path / "h.safetensors", model="deit_tiny_patch16_224",
                     classes=["a", "b", "c"])
    back = load_head(path)
    assert torch.equal(back.weight, head.weight) and torch.equal(back.bias, head.bias)
    meta = head_metadata(path)
    assert meta["classes"] == ["a", "b", "c"] and meta["width"] == 4
    assert meta["model"] == "deit_tiny_patch16_224"
    with pytest.raises(ValueError, match="class names"):
        save_head(head, tmp_path / "x.safetensors", classes=["a"])
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable"):
        load_head(tmp_path / "bad.safetensors")


def test_features_are_class_token_and_patch_mean():
    model = tiny_vit(num_classes=0)
    x = torch.randn(2, 3, 64, 64)
    tokens = model.forward_features(x)
    f = features(model, x)
    assert f.shape == (2, 2 * model.embed_dim)
    assert torch.allclose(f[:, :model.embed_dim], tokens[:, 0])
    assert torch.allclose(f[:, model.embed_dim:], tokens[:, 1:].mean(1), atol=1e-6)


def test_attached_head_makes_the_model_a_classifier_in_place():
    model = tiny_vit(num_classes=0)
    x = torch.randn(3, 3, 64, 64)
    head = nn.Linear(2 * model.embed_dim, 5)
    f = features(model, x)
    assert attach_head(model, head) is model
    with torch.no_grad():
        out = model(x)
        assert torch.allclose(out, head(f), atol=1e-5)
        leanvit.patch(model, "none")  # still a leanvit model: same logits, MACs count the head
        assert torch.equal(model(x), out)
        report = leanvit.count_macs(model, x)
        assert report.head == head.in_features * head.out_features
        leanvit.unpatch(model)
        assert torch.equal(model(x), out)


def test_head_for_another_width_is_a_clear_error():
    model = tiny_vit(num_classes=0)
    with pytest.raises(ValueError, match="width"):
        attach_head(model, nn.Linear(10, 3))
    with pytest.raises(ValueError, match="distillation"):
        attach_head(tiny_vit("deit_tiny_distilled_patch16_224", num_classes=0),
                    nn.Linear(2 * model.embed_dim, 3))
    with pytest.raises(ValueError, match="class token"):
        attach_head(tiny_vit(class_token=False, global_pool="avg", num_classes=0),
                    nn.Linear(2 * model.embed_dim, 3))


@dataclass(frozen=True)
class _MergeOpts:
    pass


class _MergeFirstPair(registry.Reducer):
    """Test method: in the last block, merge patch tokens 1 and 2 (size-weighted mean)."""

    def acts_after(self, i):
        return i == self.info.depth - 1

    def after_attention(self, i, x, signals, state: TokenState):
        size = state.sizes_like(x)
        merged = (x[:, 1:2] * size[:, 1:2, None] + x[:, 2:3] * size[:, 2:3, None]) / (
            size[:, 1:2, None] + size[:, 2:3, None])
        x = torch.cat([x[:, :1], merged, x[:, 3:]], dim=1)
        new_size = torch.cat([size[:, :1], size[:, 1:2] + size[:, 2:3], size[:, 3:]], dim=1)
        return x, state.replace(size=new_size)


def test_pooling_weights_merged_tokens_by_size(temp_method):
    temp_method(registry.Method("_merge_pair", _MergeOpts, lambda o, info: _MergeFirstPair(o, info)))
    model = tiny_vit(num_classes=0)
    head = nn.Linear(2 * model.embed_dim, 4)
    attach_head(model, head)
    leanvit.patch(model, "_merge_pair")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens, state = vit_adapter.forward_features(model, x)
        assert tokens.shape[1] == 1 + 16 - 1 and state.size[0, 1] == 2
        # reference: explicit loop over tokens, weight = number of patches each stands for
        ref = []
        for b in range(2):
            num, den = torch.zeros(model.embed_dim), 0.0
            for n in range(1, tokens.shape[1]):
                num += float(state.size[b, n]) * tokens[b, n]
                den += float(state.size[b, n])
            ref.append(torch.cat([tokens[b, 0], num / den]))
        ref = torch.stack(ref)
        assert torch.allclose(features(model, x), ref, atol=1e-5)
        assert torch.allclose(model(x), head(ref), atol=1e-5)
        assert not torch.allclose(ref[:, model.embed_dim:], tokens[:, 1:].mean(1), atol=1e-4)


def test_class_mean_skips_register_tokens():
    x = torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 5, 2)
    out = class_mean(x, num_prefix_tokens=2)
    assert torch.equal(out[:, :2], x[:, 0]) and torch.allclose(out[:, 2:], x[:, 2:].mean(1))
