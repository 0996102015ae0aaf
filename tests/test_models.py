"""Creating models from local checkpoints: loads what fits, rejects what does not."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from leanvit.models import create_model


def test_loads_a_local_safetensors_checkpoint(tmp_path):
    src = timm.create_model("deit_tiny_patch16_224", depth=2, img_size=64)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    model = create_model("deit_tiny_patch16_224", depth=2, img_size=64,
                         checkpoint=tmp_path / "w.safetensors")
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_headless_checkpoint_gives_a_headless_model(tmp_path):
    src = timm.create_model("deit_tiny_patch16_224", depth=2, img_size=64, num_classes=0)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    model = create_model("deit_tiny_patch16_224", depth=2, img_size=64,
                         checkpoint=tmp_path / "w.safetensors")
    assert model.num_classes == 0


def test_bad_checkpoints_and_names_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        create_model("deit_tiny_patch16_224", checkpoint=tmp_path / "missing.pth")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        create_model("deit_tiny_patch16_224", checkpoint=bad)
    badpth = tmp_path / "bad.pth"
    badpth.write_bytes(b"garbage, not a pickle")
    with pytest.raises(ValueError, match="could not load checkpoint"):
        create_model("deit_tiny_patch16_224", checkpoint=badpth)
    other = timm.create_model("deit_small_patch16_224", depth=2, img_size=64)
    save_file(other.state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="could not load checkpoint .* into deit_tiny"):
        create_model("deit_tiny_patch16_224", depth=2, img_size=64,
                     checkpoint=tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="unknown timm model"):
        create_model("deit_smol")
    with pytest.raises(ValueError, match="img_size"):
        create_model("deit_tiny_patch16_224", img_size=-3)


def _tiny(**kw):
    torch.manual_seed(1)
    return timm.create_model("deit_tiny_patch16_224", depth=2, img_size=64, **kw)


def test_a_checkpoint_missing_backbone_tensors_is_refused_even_with_a_new_class_count(tmp_path):
    """Issue 13.1: timm loads non-strictly when the class count changes; a file lacking
    blocks.1.* must not give a model with random blocks."""
    sd = {k: v for k, v in _tiny().state_dict().items() if not k.startswith("blocks.1.")}
    save_file(sd, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor\(s\): blocks\.1\.") as e:
        create_model("deit_tiny_patch16_224", depth=2, img_size=64, num_classes=10,
                     checkpoint=tmp_path / "partial.safetensors")
    assert "\n" not in str(e.value)


def test_a_leanvit_method_file_is_not_taken_for_weights(tmp_path):
    import leanvit

    model = _tiny()
    leanvit.patch(model, "dynamicvit", keep_rate=0.7, locations=(1,))
    leanvit.save(model, tmp_path / "dyn.safetensors")
    with pytest.raises(ValueError, match="missing tensor"):
        create_model("deit_tiny_patch16_224", depth=2, img_size=64, num_classes=3,
                     checkpoint=tmp_path / "dyn.safetensors")


def test_only_the_classifier_is_replaced_when_the_class_count_changes(tmp_path):
    src = _tiny()
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    model = create_model("deit_tiny_patch16_224", depth=2, img_size=64, num_classes=7,
                         checkpoint=tmp_path / "w.safetensors")
    assert model.head.weight.shape == (7, 192)
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(model.state_dict()[k], v), k


def test_a_fine_tuned_classifier_of_another_class_count_is_loaded(tmp_path):
    """A 10-class checkpoint loaded with num_classes=10 keeps its head (timm's default is 1000
    classes, and it discarded the head as 'another class count')."""
    src = _tiny(num_classes=10)
    save_file(src.state_dict(), tmp_path / "w10.safetensors")
    torch.save(src.state_dict(), tmp_path / "w10.pth")
    for f in ("w10.safetensors", "w10.pth"):
        for n in (10, None):
            model = create_model("deit_tiny_patch16_224", depth=2, img_size=64, num_classes=n,
                                 checkpoint=tmp_path / f)
            assert torch.equal(model.head.weight, src.head.weight), (f, n)


def test_a_shape_mismatch_names_the_tensors_and_both_shapes(tmp_path):
    other = timm.create_model("deit_small_patch16_224", depth=2, img_size=64)
    save_file(other.state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(ValueError) as e:
        create_model("deit_tiny_patch16_224", depth=2, img_size=64,
                     checkpoint=tmp_path / "other.safetensors")
    msg = str(e.value)
    assert "\n" not in msg
    assert "cls_token is [1, 1, 384] in the checkpoint, [1, 1, 192] in the model" in msg


def test_random_weights_are_seeded_and_announced():
    """Without a checkpoint two builds (in any process) give the same weights, drawn from a
    generator seeded with RANDOM_WEIGHTS_SEED; the caller's random state is left as it was."""
    from leanvit.models import RANDOM_WEIGHTS_SEED

    torch.manual_seed(5)
    state = torch.get_rng_state()
    with pytest.warns(UserWarning, match=f"random weights .*seeded with {RANDOM_WEIGHTS_SEED}"):
        a = create_model("deit_tiny_patch16_224", depth=2, img_size=64)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(100)  # another global state: the weights do not depend on it
    with pytest.warns(UserWarning, match="random weights"):
        b = create_model("deit_tiny_patch16_224", depth=2, img_size=64)
    assert a.state_dict().keys() == b.state_dict().keys()
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # the reference: timm's own build after seeding the generator with that seed
    torch.manual_seed(RANDOM_WEIGHTS_SEED)
    ref = timm.create_model("deit_tiny_patch16_224", depth=2, img_size=64)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, a.state_dict()[k]), k
