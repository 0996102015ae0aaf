"""Every ```python block of README.md runs as written.

Each block runs on its own (fresh namespace, a temporary working directory, so files it saves
land there). The one substitution: ``timm.create_model`` builds the same architecture with
narrower layers (same depth, same image size, random weights, never a download), so the
blocks take seconds instead of minutes on a CPU; and layer compaction refines each fitted
hallucination with 2 instead of ``leanvit.compaction.KL_STEPS`` Adam steps. A block may state further substitutions in a
comment line ``# readme-test: NAME = EXPRESSION`` (evaluated before the block runs); none needs
one today.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch

import leanvit.compaction

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_SUBST = re.compile(r"^\s*# readme-test:\s*(\w+)\s*=\s*(.+)$", re.M)

# Narrow widths per family (depth and image size kept, so the blocks' locations and input
# shapes stay valid); head dimension 16 throughout.
_NARROW = (
    (("vit_", "deit_"), dict(embed_dim=96, num_heads=6)),
    (("convnext_",), dict(dims=(24, 48, 96, 192))),
    (("swin_",), dict(embed_dim=48)),
)


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a Markdown text, in order."""
    return _BLOCK.findall(text)


def _narrow_create_model(real):
    def create_model(name: str, pretrained: bool = False, **kwargs):
        for prefixes, widths in _NARROW:
            if name.startswith(prefixes):
                for k, v in widths.items():
                    kwargs.setdefault(k, v)
                break
        return real(name, pretrained=False, **kwargs)
    return create_model


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 4, f"README.md has {len(BLOCKS)} python blocks"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    source = BLOCKS[index]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(timm, "create_model", _narrow_create_model(timm.create_model))
    monkeypatch.setattr(leanvit.compaction, "KL_STEPS", 2)
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"readme_block_{index}"}
    for name, expr in _SUBST.findall(source):
        namespace[name] = eval(expr, namespace)  # noqa: S307 (our own README)
    code = compile(source, f"README.md python block {index}", "exec")
    exec(code, namespace)  # noqa: S102
    assert not (Path.cwd() != tmp_path), "a block changed the working directory"


def test_narrowing_keeps_the_architecture():
    """The substitution only narrows: same class, same depth as the named model."""
    small = _narrow_create_model(timm.create_model)("deit_small_patch16_224")
    assert type(small).__name__ == "VisionTransformer"
    assert len(small.blocks) == 12 and small.embed_dim == 96
