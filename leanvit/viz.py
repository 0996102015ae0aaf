"""Where the tokens went: source tracking through a patched model, drawn per reduction stage.

:func:`trace_stages` runs a model with source tracking on (``state.source``, ``[B, N, N0]``:
which original tokens each token holds) and keeps a snapshot after every block that changed
the token set. :func:`render` draws the input image once per stage, as in the token-reduction
papers' figures (EViT Fig. 4, ToMe Fig. 4, ATS Fig. 5): patches no token holds any more are
blanked, a token that holds several patches (a merged group) is painted in the mean colour of
its patches and outlined, a token that holds one patch shows it unchanged.

Works for every method whose reducer maintains ``state.source`` (``TokenState.gather`` does
for pruning and sampling; merging methods combine the rows of the merged tokens).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from leanvit._files import atomic_path

#: colour of patches that no token holds any more (white, as in the papers' figures)
BLANK = (1.0, 1.0, 1.0)


@dataclass
class Stage:
    """The tokens of one image after a block that changed them.

    Attributes:
        block: 0-based index of the block after which the snapshot was taken.
        source: ``[n, N0]`` float 0/1, one row per real token (padding removed), prefix
            tokens included, over the original tokens (prefix columns first).
        prefix: number of prefix tokens (their columns are not patches).
    """

    block: int
    source: Tensor
    prefix: int

    @property
    def num_tokens(self) -> int:
        """Real tokens after this stage, prefix included."""
        return self.source.shape[0]


def trace_stages(model: nn.Module, image: Tensor) -> list[Stage]:
    """Run ``model`` (patched or not) on one image with source tracking; one :class:`Stage`
    per block after which the token set changed.

    Args:
        model: a timm model of a supported family; an unpatched one runs as ``"none"`` (no
            stages) and is left as it was.
        image: ``[3, H, W]`` or ``[1, 3, H, W]``, preprocessed for the model.

    Raises:
        ValueError: more than one image, or a method that changes the tokens without keeping
            ``state.source`` up to date (it cannot be visualised).
    """
    from leanvit import adapters
    from leanvit.patching import patch, unpatch

    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"trace_stages takes one image [3, H, W], got {tuple(image.shape)}")
    adapter = adapters.find_adapter(model)
    was_patched = adapters.is_patched(model)
    if not was_patched:
        patch(model, "none")
    was_training = model.training
    stages: list[Stage] = []
    last: dict[str, Optional[Tensor]] = {"source": None}

    def snapshot(i: int, x: Tensor, state) -> None:
        src = state.source
        if src is None or src.shape[1] != x.shape[1]:
            name = getattr(model.leanvit, "method_name", "?")
            raise ValueError(f"method {name!r} does not keep state.source up to date in block "
                             f"{i}, so its tokens cannot be traced back to patches")
        if src is last["source"]:
            return  # the block did not touch the token set
        first, last["source"] = last["source"] is None, src
        if first and state.valid is None and src.shape[1] == src.shape[2] and torch.equal(
                src[0], torch.eye(src.shape[2], dtype=src.dtype, device=src.device)):
            return  # block 0 left every token as it was
        rows = src[0] if state.valid is None else src[0][state.valid[0]]
        stages.append(Stage(block=i, source=rows.detach().float().cpu(), prefix=state.prefix))

    try:
        model.eval()
        p = next(model.parameters(), None)
        if p is not None:
            image = image.to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            adapter.forward_features(model, image, trace_source=True, on_block=snapshot)
    finally:
        model.train(was_training)
        if not was_patched:
            unpatch(model)
    return stages


def stage_image(image: np.ndarray, stage: Stage, grid: tuple[int, int]) -> np.ndarray:
    """The input drawn for one stage: dropped patches blanked, merged groups in their mean
    colour and outlined.

    Args:
        image: ``[H, W, 3]`` float RGB in [0, 1], the preprocessed input the model saw.
        stage: a :class:`Stage` of the same image.
        grid: patch grid ``(rows, cols)``; ``H`` and ``W`` must be multiples of it.

    Returns:
        ``[H, W, 3]`` float RGB in [0, 1].
    """
    gh, gw = grid
    h, w = image.shape[:2]
    if h % gh or w % gw:
        raise ValueError(f"image {h}x{w} is not a whole number of {gh}x{gw} patches")
    ph, pw = h // gh, w // gw
    patches = stage.source[:, stage.prefix:].numpy() > 0  # [n, gh*gw]
    if patches.shape[1] != gh * gw:
        raise ValueError(f"source has {patches.shape[1]} patch columns, grid {gh}x{gw} "
                         f"has {gh * gw}")
    covered = patches.any(axis=0)
    owner = np.where(covered, patches.argmax(axis=0), -1)  # token holding each patch
    group = patches.sum(axis=1)  # patches per token
    merged = covered & (group[np.maximum(owner, 0)] > 1)

    # Per-patch mean colours, then per-token mean colours for merged groups.
    tiles = image.reshape(gh, ph, gw, pw, 3).transpose(0, 2, 1, 3, 4).reshape(gh * gw, ph, pw, 3)
    patch_mean = tiles.mean(axis=(1, 2))  # [P, 3]
    token_mean = (patches.astype(np.float64) @ patch_mean) / np.maximum(group, 1)[:, None]
    out = tiles.copy()
    out[~covered] = BLANK
    out[merged] = token_mean[owner[merged]][:, None, None, :]
    out = out.reshape(gh, gw, ph, pw, 3).transpose(0, 2, 1, 3, 4).reshape(h, w, 3)

    # Outlines: pixel edges between different owners where one side is a merged group.
    label = np.repeat(np.repeat(owner.reshape(gh, gw), ph, 0), pw, 1)
    in_group = np.repeat(np.repeat(merged.reshape(gh, gw), ph, 0), pw, 1)
    edge = np.zeros((h, w), dtype=bool)
    dv = (label[1:] != label[:-1]) & (in_group[1:] | in_group[:-1])
    dh = (label[:, 1:] != label[:, :-1]) & (in_group[:, 1:] | in_group[:, :-1])
    edge[1:] |= dv
    edge[:, 1:] |= dh
    out[edge] = 0.0
    return np.clip(out, 0.0, 1.0)


def render(image: np.ndarray, stages: Sequence[Stage], grid: tuple[int, int],
           path: str | os.PathLike, title: str = "", columns: int = 5,
           panel_inches: float = 2.0, dpi: int = 100) -> list[str]:
    """Draw the input and one panel per stage into a PNG (matplotlib, ``Agg``), atomically.

    Panel titles give the block after which the snapshot was taken and the real tokens left
    (prefix included). Returns the panel titles, in order.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n0 = grid[0] * grid[1]
    panels = [(f"input: {n0} patches", image)] + [
        (f"after block {s.block}: {s.num_tokens} tokens", stage_image(image, s, grid))
        for s in stages]
    cols = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False, layout="constrained",
                             figsize=(cols * panel_inches, rows * (panel_inches + 0.25) + 0.3))
    for ax in axes.flat:
        ax.axis("off")
    for ax, (head, img) in zip(axes.flat, panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(head, fontsize=8)
    if title:  # wrapped to the figure's width (a one-panel figure is 2 inches wide)
        import textwrap

        chars = max(16, int(cols * panel_inches * 11))  # ~11 characters per inch at 10 pt
        fig.suptitle(textwrap.fill(title, chars), fontsize=10)
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=(path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
    return [head for head, _ in panels]


def data_transform(model: nn.Module):
    """timm's eval transform for ``model`` at the input size it was built for (resize, centre
    crop, normalise: ``resolve_data_config`` + ``create_transform``) and its config."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=model)
    h, w = model.patch_embed.img_size
    cfg["input_size"] = (3, h, w)  # the pretrained config may name another size (DINOv2: 518)
    return create_transform(**cfg), cfg


def load_image(path: str | os.PathLike, model: nn.Module) -> tuple[Tensor, np.ndarray]:
    """An image file as the model's input ``[1, 3, H, W]`` and as the RGB picture ``[H, W, 3]``
    in [0, 1] it shows (the same resize and crop, without normalisation)."""
    from leanvit.data import read_image

    if not Path(path).is_file():
        raise ValueError(f"image {path} does not exist")
    pil = read_image(str(path))  # a truncated or garbage file: ValueError naming it
    transform, cfg = data_transform(model)
    x = transform(pil)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    shown = (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return x[None], shown


def check_drawable(model: nn.Module) -> None:
    """``ValueError`` unless ``model`` is of a flat-token family (ViT), whose methods remove or
    merge tokens that :func:`visualize` can draw."""
    from leanvit.adapters import find_family

    family = find_family(model)
    if family.kind != "tokens" or not hasattr(model, "patch_embed"):
        raise ValueError(f"viz draws which tokens each stage keeps, drops or merges in "
                         f"flat-token models (ViT family); {type(model).__name__} is a "
                         f"{family.name} model whose methods keep every position of its feature "
                         f"maps (dynamicvit routes them through a slow or fast path), so there is "
                         f"nothing to draw")


def visualize(model: nn.Module, image_path: str | os.PathLike, out: str | os.PathLike,
              title: str = "") -> list[Stage]:
    """Trace ``image_path`` through ``model`` and write the per-stage figure to ``out``.

    Raises:
        ValueError: a model of a family whose methods remove no tokens (ConvNeXt, Swin:
            ``dynamicvit`` routes positions inside stage 3 and keeps the feature map whole),
            or an image that is missing or unreadable.
    """
    check_drawable(model)
    x, shown = load_image(image_path, model)
    stages = trace_stages(model, x)
    render(shown, stages, tuple(model.patch_embed.grid_size), out, title=title)
    return stages


# --------------------------------------------------------------------------------------------
# Dense-feature PCA


def pca_rgb(features: Sequence[Tensor], fit_on: int = 0) -> list[np.ndarray]:
    """The first three principal components of dense features as RGB images.

    Args:
        features: ``[H_p, W_p, C]`` tensors (e.g. :func:`leanvit.dense_features` of one image
            from several models); all are projected on the SAME components, fitted on
            ``features[fit_on]`` (the unpatched model's, so colours compare across panels).
        fit_on: index of the features the PCA is fitted on.

    Returns:
        one ``[H_p, W_p, 3]`` float array in [0, 1] per input: component ``k`` is channel
        ``k``, scaled so the fitted features' 1st..99th percentile spans [0, 1] (clipped).
    """
    ref = features[fit_on].reshape(-1, features[fit_on].shape[-1]).double()
    mean = ref.mean(0)
    _, _, vh = torch.linalg.svd(ref - mean, full_matrices=False)
    basis = vh[:3].T  # [C, 3]
    proj_ref = (ref - mean) @ basis
    lo = torch.quantile(proj_ref, 0.01, dim=0)
    hi = torch.quantile(proj_ref, 0.99, dim=0)
    out = []
    for f in features:
        p = (f.reshape(-1, f.shape[-1]).double() - mean) @ basis
        rgb = ((p - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
        out.append(rgb.reshape(*f.shape[:2], 3).numpy())
    return out


def visualize_pca(model: nn.Module, image_path: str | os.PathLike, out: str | os.PathLike,
                  title: str = "", panel_inches: float = 3.0, dpi: int = 100) -> dict:
    """The input, the unpatched model's and the patched model's dense-feature PCA (first
    three components as RGB, :func:`pca_rgb` fitted on the unpatched features) side by side,
    written to ``out`` (PNG, atomically).

    ``model`` is patched (any method); its unpatched features are computed on the same model
    with the method off for that pass (:func:`leanvit.unpatch`, then patched back with the
    same reducer, so learned method state is kept). Returns ``{"cosine": mean cosine of the
    patched to the unpatched patch features, "method": name}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanvit import adapters
    from leanvit.dense import dense_features
    from leanvit.patching import ATTR

    if not adapters.is_patched(model):
        raise ValueError("visualize_pca compares a patched model with its unpatched self; "
                         "patch the model first (leanvit.patch)")
    x, shown = load_image(image_path, model)
    was_training = model.training
    model.eval()
    reducer = getattr(model, ATTR)
    try:
        with torch.no_grad():
            p = next(model.parameters())
            x = x.to(device=p.device, dtype=p.dtype)
            patched = dense_features(model, x)[0].float().cpu()
            cls = type(model)
            model.__class__ = adapters.original_class(model)  # the method off for one pass
            try:
                plain = dense_features(model, x)[0].float().cpu()
            finally:
                model.__class__ = cls
    finally:
        model.train(was_training)
    cosine = float(torch.nn.functional.cosine_similarity(patched, plain, dim=-1).mean())
    rgb_plain, rgb_patched = pca_rgb([plain, patched])
    name = getattr(reducer, "method_name", "?")
    panels = [("input", shown), ("unpatched: dense PCA", rgb_plain),
              (f"{name}: dense PCA (cos {cosine:.3f})", rgb_patched)]
    fig, axes = plt.subplots(1, 3, layout="constrained",
                             figsize=(3 * panel_inches, panel_inches + 0.5))
    for ax, (head, img) in zip(axes, panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(head, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(out)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=(path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
    return {"cosine": cosine, "method": name}
