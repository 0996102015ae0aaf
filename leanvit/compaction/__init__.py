"""Layer compaction: attention-map hallucination (hMHSA) and FFN compaction (cFFN).

Xu et al., "Vision Transformer with Attention Map Hallucination and FFN Compaction", arXiv
2306.10875 (no public code; seed ``002_*``). Unlike token methods this changes the model's
layers, so it is not a :func:`leanvit.patch` method; the result is still a timm model of the
same class and composes with token reduction::

    model = timm.create_model("deit_small_patch16_224")
    leanvit.compact(model, images=calib)          # convert (SVD + fitted hallucination)
    leanvit.reparameterize(model)                  # merge cFFN branches: deploy form
    leanvit.patch(model, "tome", r=8)              # token merging on top

Decisions where the paper is silent (see :mod:`leanvit.ops.hallucinate` too):

- hMHSA: ``ceil(H/2)`` heads compute ``q k^T``; ``floor(H/2)`` heads get their pre-softmax
  logits from the computed ones by ``hallucination="mix"`` (learned mixing across heads, the
  default: row by row, so query selection computes only the selected rows; one small matmul;
  it converts with better fidelity than dwconv and runs faster on CPU, measured in
  ``docs/compaction.md``) or
  ``"dwconv"`` (a ``kernel_size`` x ``kernel_size`` depthwise convolution over each computed
  map, GhostNet-style). Every head keeps its values; the output projection is unchanged.
  One head: nothing is hallucinated. Maps are materialised in hallucinated blocks (no fused
  SDPA), and the MACs count them.
- cFFN: the FFN's second projection ``fc2`` (``m -> C``) becomes ``m -> r -> C`` with
  ``r = round(ffn_ratio * C)`` (paper: ``t = 2/3``, factorising ``fc2`` beat ``fc1`` by 0.2%),
  each factor ``branches`` parallel linear+BatchNorm branches (paper: ``r = 2``), merged by
  :func:`reparameterize`. BatchNorm over tokens (as RepVGG's over pixels).
- Conversion (beyond the paper, which trains from scratch): the factors start from the
  truncated SVD of the pretrained ``fc2`` (branch 0 holds it minus a small random part that
  branch 1 holds, so branches differ yet sum to it), and with calibration ``images`` each
  block chooses the heads to keep computing (greedy least squares) and fits the cheap
  operation to the pretrained maps (least squares on row-centred logits). Without images:
  the first ``ceil(H/2)`` heads are kept and hallucinated heads start as copies.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from leanvit.compaction import modules as M
from leanvit.adapters import find_family as _find_family
from leanvit.adapters.base import Family, Site
from leanvit.ops.hallucinate import (choose_computed_heads, dwconv_logits, fit_dwconv, fit_mix,
                                     mix_logits, refine_kl, split_heads, truncated_svd_factors)

#: attribute under which a compacted model records how it was compacted (a plain dict)
SPEC_ATTR = "leanvit_compaction"

#: Adam steps refining the least-squares hallucination fit on the maps' KL divergence
#: (leanvit's choice; 0 = least squares only). See benchmarks/compaction_head_similarity.py.
KL_STEPS = 50

ATTENTION_CHOICES = ("hallucinate", None)
FFN_CHOICES = ("compact", None)


def _check(attention, ffn, ffn_ratio, branches, hallucination, kernel_size, images) -> None:
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be 'hallucinate' or None, got {attention!r}")
    if ffn not in FFN_CHOICES:
        raise ValueError(f"ffn must be 'compact' or None, got {ffn!r}")
    if isinstance(ffn_ratio, bool) or not isinstance(ffn_ratio, (int, float)):
        raise TypeError(f"ffn_ratio must be a number, got {type(ffn_ratio).__name__}")
    if not 0 < ffn_ratio <= 1:  # also refuses NaN
        raise ValueError(f"ffn_ratio must be in (0, 1] (fraction of the width C), got {ffn_ratio}")
    if isinstance(branches, bool) or not isinstance(branches, int):
        raise TypeError(f"branches must be an int, got {type(branches).__name__}")
    if branches < 1:
        raise ValueError(f"branches must be >= 1, got {branches}")
    if hallucination not in M.HALLUCINATIONS:
        raise ValueError(f"hallucination must be one of {', '.join(M.HALLUCINATIONS)}, "
                         f"got {hallucination!r}")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise TypeError(f"kernel_size must be an int, got {type(kernel_size).__name__}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size}")
    if images is not None and (not isinstance(images, Tensor) or images.dim() != 4):
        raise ValueError("images must be a [B, 3, H, W] tensor of calibration images or None")
    if images is not None:
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch; give a few calibration images or None")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor (normalised as the model expects), "
                            f"got {images.dtype}")
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images hold NaN or infinite values; calibration needs real images")


def compact(
    model: nn.Module,
    attention: Optional[str] = "hallucinate",
    ffn: Optional[str] = "compact",
    ffn_ratio: float = 2 / 3,
    branches: int = 2,
    hallucination: str = "mix",
    kernel_size: int = 3,
    images: Optional[Tensor] = None,
    seed: int = 0,
) -> nn.Module:
    """Replace attention with hMHSA and the FFN's output projection with cFFN, in place.

    Args:
        model: a timm ``VisionTransformer`` (``deit_*``, ``vit_*``, DINOv2), ``pvt_v2_*`` or
            ``nextvit_*`` model (patched or not), pretrained or not.
        attention: ``"hallucinate"`` (hMHSA) or ``None`` (leave the attention).
        ffn: ``"compact"`` (cFFN) or ``None`` (leave the FFN).
        ffn_ratio: rank of the factorised hidden-to-output projection as a fraction of the
            block width ``C`` (paper's compaction ratio ``t = 2/3``).
        branches: parallel linear+BatchNorm branches per factor while training (paper:
            ``r = 2``; 3 was worse, 1 worse too).
        hallucination: the cheap operation, ``"mix"`` or ``"dwconv"`` (see module docs).
        kernel_size: the depthwise convolution's size (``"dwconv"``; GhostNet's 3).
        images: ``[B, 3, H, W]`` calibration images (normalised as the model expects): the
            heads to keep and the hallucination are fitted to the model's own maps, and the
            cFFN BatchNorms are calibrated so that they stay close to the identity in training
            mode. ``None``: copies and identity BatchNorms.
        seed: for the small random split between branches.

    Returns:
        ``model``, with ``model.leanvit_compaction`` recording the options
        (:func:`compaction_spec`). Eval-mode outputs equal the original model's exactly when
        nothing is dropped (``attention=None`` and full-rank ``ffn_ratio``).

    Raises:
        ValueError / TypeError: bad options, unsupported model, or an already compacted model.
    """
    _check(attention, ffn, ffn_ratio, branches, hallucination, kernel_size, images)
    family = _compaction_family(model)
    if getattr(model, SPEC_ATTR, None) is not None:
        raise ValueError("model is already compacted (leanvit.compaction_spec(model) says how)")
    att_sites = list(family.compaction.attention_sites(model)) if attention else []
    ffn_sites = list(family.compaction.ffn_sites(model)) if ffn else []
    captured = _capture(model, att_sites, [], images) if images is not None and att_sites \
        else {}
    gen = torch.Generator().manual_seed(seed)

    orders: dict[str, list[int]] = {}
    for site in att_sites:
        src = site.module
        args = captured.get(site.path)
        computed = None
        fit = None
        if args is not None and src.num_heads > 1:
            with torch.no_grad():
                logits = family.compaction.plain_logits(src, *args).float()
            computed, fit = _plan_heads(logits, hallucination, kernel_size)
        new = family.compaction.attention_class()(src, hallucination, kernel_size, computed)
        if fit is not None and new.hallucinate is not None:
            with torch.no_grad():
                new.hallucinate.weight.copy_(fit(new.head_order))
        new.train(src.training)
        setattr(site.parent, site.name, new)
        orders[site.path] = new.head_order

    for site in ffn_sites:
        src = site.module
        new = _compact_projection(src, ffn_ratio, branches, family.compaction.conv_ffn, gen)
        new.train(src.training)
        setattr(site.parent, site.name, new)
    if images is not None and ffn_sites:
        # BatchNorm calibration on the inputs the COMPACTED model gives each cFFN (in eval
        # mode these do not depend on the calibration, which leaves eval outputs unchanged)
        captured = _capture(model, [], ffn_sites, images)
        for site in ffn_sites:
            _calibrate(site.module, captured[site.path][0])

    setattr(model, SPEC_ATTR, dict(
        attention=attention, ffn=ffn, ffn_ratio=float(ffn_ratio), branches=branches,
        hallucination=hallucination, kernel_size=kernel_size, family=family.name,
        deployed=False, head_order=orders))
    return model


def _compaction_family(model: nn.Module) -> Family:
    """The registered family of ``model`` that compaction supports (one registry for token
    methods and compaction: :mod:`leanvit.adapters`)."""
    return _find_family(model, compaction=True)


def reparameterize(model: nn.Module) -> nn.Module:
    """Merge every cFFN's training branches into plain layers (deploy form), in place.

    Eval-mode outputs are unchanged (to float rounding); parameters and MACs drop. BatchNorm
    uses its running statistics, so call it on a model whose statistics are final. Idempotent.
    """
    found = False
    for m in model.modules():
        if isinstance(m, M.CompactProjection):
            m.reparameterize_()
            found = True
    if not found:
        raise ValueError("model has no cFFN to reparameterize (call leanvit.compact first)")
    spec = getattr(model, SPEC_ATTR, None)
    if spec is not None:
        spec["deployed"] = True
    return model


def compaction_spec(model: nn.Module) -> Optional[dict[str, Any]]:
    """How ``model`` was compacted (options, family, ``deployed``, per-site head order), or
    ``None``. To rebuild a compacted model's structure before loading its state dict:
    ``compact(fresh, **options)`` with the options of this dict, then ``reparameterize`` if
    ``deployed`` (the head order is already baked into the weights); :func:`rebuild` does
    this, and :func:`leanvit.save` / :func:`leanvit.load` store and re-create it."""
    spec = getattr(model, SPEC_ATTR, None)
    return None if spec is None else dict(spec)


def spec_options(spec: dict[str, Any]) -> dict[str, Any]:
    """The :func:`compact` keyword arguments recorded in a spec."""
    keys = ("attention", "ffn", "ffn_ratio", "branches", "hallucination", "kernel_size")
    return {k: spec[k] for k in keys}


def rebuild(model: nn.Module, spec: dict[str, Any]) -> Callable[[], None]:
    """Give the plain ``model`` the structure that ``spec`` (:func:`compaction_spec`)
    describes, in place, ready for ``load_state_dict`` of the compacted model's weights:
    :func:`compact` with the spec's options (no calibration: the weights come from the state
    dict), :func:`reparameterize` if ``spec["deployed"]``, and the recorded head orders.

    Returns a function that undoes it (puts the original modules back and forgets the spec):
    nothing of the original modules' weights is changed by ``rebuild`` itself, because
    uncalibrated construction keeps the heads in their original order.

    Raises:
        ValueError: a spec that is incomplete or made for another model family.
    """
    missing = [k for k in ("attention", "ffn", "ffn_ratio", "branches", "hallucination",
                           "kernel_size", "family", "deployed") if k not in spec]
    if missing:
        raise ValueError(f"compaction spec lacks {', '.join(missing)} (corrupt?)")
    family = _compaction_family(model)
    if spec["family"] != family.name:
        raise ValueError(f"the compaction was made for a {spec['family']} model, but this "
                         f"model is a {family.name} model ({type(model).__name__})")
    sites = list(family.compaction.attention_sites(model)) + list(
        family.compaction.ffn_sites(model))
    originals = [(s.parent, s.name, s.module) for s in sites]

    def undo() -> None:
        for parent, name, module in originals:
            setattr(parent, name, module)
        if hasattr(model, SPEC_ATTR):
            delattr(model, SPEC_ATTR)

    try:
        compact(model, **spec_options(spec))
        if spec["deployed"]:
            reparameterize(model)
        orders = {str(k): [int(h) for h in v] for k, v in (spec.get("head_order") or {}).items()}
        for path, order in orders.items():
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise ValueError(f"compaction spec names {path}, which this model lacks "
                                 "(saved from another architecture?)") from None
            if not isinstance(module, M.HallucinatedAttention) or \
                    sorted(order) != list(range(module.num_heads)):
                raise ValueError(f"compaction spec's head order {order} for {path} does not "
                                 "fit this model (saved from another architecture?)")
            module.head_order = order
        getattr(model, SPEC_ATTR)["head_order"] = orders
    except BaseException:
        undo()
        raise
    return undo


# --------------------------------------------------------------------------------------------
# Conversion helpers


def _capture(model: nn.Module, att_sites: list[Site], ffn_sites: list[Site], images: Tensor
             ) -> dict[str, tuple]:
    """Inputs each site's module receives when ``model`` runs on ``images`` (eval, no grad)."""
    captured: dict[str, tuple] = {}
    handles = []
    for site in att_sites + ffn_sites:
        def hook(mod, args, path=site.path):
            captured[path] = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        handles.append(site.module.register_forward_pre_hook(hook))
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        with torch.no_grad():
            try:
                model(images.to(device=p.device, dtype=p.dtype))
            except (AssertionError, RuntimeError, ValueError) as e:  # timm asserts the size
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ValueError(f"calibration images {list(images.shape)} do not fit the "
                                 f"model: {reason}") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return captured


def _plan_heads(logits: Tensor, hallucination: str, kernel_size: int):
    """Choose the computed heads of one block and return ``(computed, fit)`` where
    ``fit(order)`` gives the fitted weight of the cheap operation for the final head order."""
    H = logits.shape[1]
    n_c, n_h = split_heads(H)
    computed = choose_computed_heads(logits, n_c)
    dropped = [h for h in range(H) if h not in computed]
    if hallucination == "dwconv":
        # pair each hallucinated head with its most similar still-unpaired computed head and
        # put partners at the same position (dwconv maps computed j -> hallucinated j)
        x = logits - logits.mean(-1, keepdim=True)
        x = x.transpose(0, 1).reshape(H, -1).double()
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sim = x @ x.T
        free, paired = list(computed), []
        for h in dropped:
            best = max(free, key=lambda c: float(sim[h, c]))
            free.remove(best)
            paired.append(best)
        computed = paired + free

    def fit(order: list[int]) -> Tensor:
        comp, hall = logits[:, order[:n_c]], logits[:, order[n_c:]]
        if hallucination == "mix":
            w, apply = fit_mix(comp, hall), mix_logits
        else:
            w, apply = fit_dwconv(comp, hall, kernel_size), dwconv_logits
        return refine_kl(apply, w, comp, hall, steps=KL_STEPS) if KL_STEPS else w

    return computed, fit


def _compact_projection(src: nn.Module, ffn_ratio: float, branches: int, conv: bool,
                        gen: torch.Generator) -> M.CompactProjection:
    """A cFFN projection replacing ``src`` (``nn.Linear`` or 1x1 ``nn.Conv2d``), initialised
    from the truncated SVD of ``src``'s weight; its bias goes to the second factor."""
    if conv:
        if not (isinstance(src, nn.Conv2d) and src.kernel_size == (1, 1) and src.groups == 1):
            raise ValueError(f"expected a 1x1 Conv2d FFN projection, got {src}")
        w = src.weight.detach()[:, :, 0, 0]
    else:
        if not isinstance(src, nn.Linear):
            raise ValueError(f"expected an nn.Linear FFN projection, got {type(src).__name__}")
        w = src.weight.detach()
    c_out, m = w.shape
    rank = max(1, int(round(ffn_ratio * c_out)))
    new = M.CompactProjection(m, c_out, rank, branches, conv).to(w)
    first, second = truncated_svd_factors(w.float(), rank)
    for rep, full in ((new.first, first), (new.second, second)):
        parts = _split_branches(full, branches, gen)
        rep.set_branch_weights([p.to(w) for p in parts])
    if src.bias is not None:
        with torch.no_grad():
            new.second.branches[0][1].bias.copy_(src.bias.detach())
    return new


def _split_branches(full: Tensor, branches: int, gen: torch.Generator) -> list[Tensor]:
    """``branches`` weights summing to ``full``: branch ``b > 0`` gets a small random matrix
    (10% of ``full``'s scale), branch 0 the rest, so that branches start different."""
    if branches == 1:
        return [full]
    scale = 0.1 * float(full.std())
    extra = [torch.randn(full.shape, generator=gen) * scale for _ in range(branches - 1)]
    return [full - sum(extra)] + extra


@torch.no_grad()
def _calibrate(proj: M.CompactProjection, x: Tensor) -> None:
    """Set every branch BatchNorm to its branch's statistics on ``x`` (the original ``fc2``'s
    input) with ``gamma = sqrt(var + eps)``, ``beta = mean`` (+ the bias it held): unchanged in
    eval mode, and close to the identity in training mode on similar batches."""
    for rep in (proj.first, proj.second):
        outs = []
        for lin, bn in rep.branches:
            z = lin(x)
            zf = z.transpose(0, 1).reshape(z.shape[1], -1) if rep.conv else \
                z.reshape(-1, z.shape[-1]).T
            mean, var = zf.mean(1), zf.var(1, unbiased=False)
            extra = bn.bias - bn.weight / torch.sqrt(bn.running_var + bn.eps) * bn.running_mean
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            bn.bias.copy_(mean + extra)
            outs.append(z + (extra[:, None, None] if rep.conv else extra))
        x = sum(outs)
