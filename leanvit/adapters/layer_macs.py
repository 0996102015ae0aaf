"""MACs of a model that runs as itself (no token method), counted layer by layer.

For families leanvit counts but runs no method on (PVTv2 and NextViT, plain or compacted by
:func:`leanvit.compact`): one eval forward pass with forward hooks on every ``nn.Linear`` and
``nn.Conv2d`` (MACs = output positions x ``in_features / groups`` x kernel area x
``out_features``, from the shapes that actually ran), plus the attention products, which are
not modules: for each attention module, ``q k^T`` and ``attn @ v`` from the query rows its
``q`` projection and the key rows its ``kv`` / ``k`` projection processed
(``2 n_q n_kv x width``, or the hMHSA module's own ``attention_macs`` with its hallucination).
Same convention as :mod:`leanvit.macs`: normalisations, activations, pooling and softmax
cost 0, and a fused SDPA costs what the materialised products would.

The family says where its blocks and attention modules are (:class:`LayerMap`); the result
goes into a ``MacRecorder`` (duck-typed: ``record_stem``, ``record_block``, ``record_layer``,
``record_head``) as stem, one entry per block (``attention``: the block's attention module(s),
``mlp``: the rest of the block), layers between blocks (downsampling) and head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerMap:
    """Where a family keeps its parts (dotted module paths, as ``model.named_modules()``).

    Attributes:
        blocks: ``model -> paths`` of the blocks, in order (block ``i`` of the report).
        attention: ``model -> paths`` of the attention modules (inside blocks); each has a
            ``q`` projection and a ``kv`` or ``k`` projection (``nn.Linear``).
        stem: path prefixes of the stem (``record_stem``); other modules outside the blocks
            are layers (``record_layer``, by their path) except ``head``.
        head: path prefix of the classifier (``record_head``; 0 with ``pre_logits``).
    """

    blocks: Callable[[nn.Module], Iterable[str]]
    attention: Callable[[nn.Module], Iterable[str]]
    stem: tuple[str, ...]
    head: str = "head"


def _linear_macs(module: nn.Linear, out: Tensor) -> int:
    return (out.numel() // module.out_features) * module.in_features * module.out_features


def _conv_macs(module: nn.Conv2d, out: Tensor) -> int:
    kh, kw = module.kernel_size
    return out.numel() * (module.in_channels // module.groups) * kh * kw


def attention_products(attn: nn.Module, n_q: int, n_kv: int) -> int:
    """``q k^T`` and ``attn @ v`` MACs per image of an attention module with ``n_q`` query
    rows and ``n_kv`` keys: the hMHSA module's ``attention_macs`` (computed heads, cheap
    operation, all heads' values), else ``2 n_q n_kv x`` the query width."""
    own = getattr(attn, "attention_macs", None)
    if callable(own):
        return int(own(n_q, n_kv))
    return 2 * n_q * n_kv * attn.q.out_features


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def forward_with_layer_macs(model: nn.Module, images: Tensor, layers: LayerMap, recorder,
                            pre_logits: bool = False) -> Tensor:
    """Run ``model`` on ``images`` (as the caller set it up: eval, no grad) and record its MACs
    per image into ``recorder``. Returns the model's output (``forward_head(pre_logits=True)``
    with ``pre_logits``)."""
    B = images.shape[0]
    macs: dict[str, int] = {}
    rows: dict[str, int] = {}  # output rows of each Linear (tokens it processed), all images
    positions: dict[str, int] = {}  # output positions of each block, per image
    handles = []

    def count(path: str) -> Callable:
        def hook(module, args, out):
            if isinstance(module, nn.Linear):
                macs[path] = macs.get(path, 0) + _linear_macs(module, out)
                rows[path] = rows.get(path, 0) + out.numel() // module.out_features
            else:
                macs[path] = macs.get(path, 0) + _conv_macs(module, out)
        return hook

    def block_size(path: str) -> Callable:
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            positions[path] = out.shape[1] if out.dim() == 3 else out.shape[-2] * out.shape[-1]
        return hook

    block_paths = list(layers.blocks(model))
    attn_paths = list(layers.attention(model))
    modules = dict(model.named_modules())
    try:
        for path, m in modules.items():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                handles.append(m.register_forward_hook(count(path)))
        for path in block_paths:
            handles.append(modules[path].register_forward_hook(block_size(path)))
        if pre_logits:
            out = model.forward_head(model.forward_features(images), pre_logits=True)
        else:
            out = model(images)
    finally:
        for h in handles:
            h.remove()

    def total(prefix: str, skip: Iterable[str] = ()) -> int:
        return sum(v for p, v in macs.items()
                   if _under(p, prefix) and not any(_under(p, s) for s in skip))

    def key_rows(path: str) -> int:
        for name in ("kv", "k"):
            if f"{path}.{name}" in rows:
                return rows[f"{path}.{name}"]
        raise ValueError(f"attention module {path} ran no kv / k projection")

    recorder.record_stem(sum(total(s) for s in layers.stem) / B)
    for i, path in enumerate(block_paths):
        inner = [a for a in attn_paths if _under(a, path)]
        attention = sum(total(a) for a in inner)
        for a in inner:
            attention += B * attention_products(modules[a], rows[f"{a}.q"] // B,
                                                key_rows(a) // B)
        mlp = total(path, skip=inner)
        n = torch.full((B,), float(positions.get(path, 0)))
        recorder.record_block(i, tokens_in=n, tokens_out=n, attention=n * 0 + attention / B,
                              mlp=n * 0 + mlp / B, signals=n * 0)
    counted = list(layers.stem) + block_paths + [layers.head]
    for path in sorted({p for p in macs if not any(_under(p, c) for c in counted)}):
        recorder.record_layer(path, macs[path] / B)
    recorder.record_head(0 if pre_logits else total(layers.head) / B)
    return out
