"""leanvit: faster Vision Transformers by removing redundant computation.

Public API::

    import leanvit, timm
    model = timm.create_model("deit_small_patch16_224")
    leanvit.patch(model, "none")            # a method, in place; weights untouched
    report = leanvit.count_macs(model, images)
    leanvit.save(model, "m.safetensors")    # the method's learned state (predictors, ...)
    leanvit.unpatch(model)                  # back to the original, exactly
    leanvit.load(model, "m.safetensors")    # patch again with the saved method and state
    leanvit.compact(model); leanvit.reparameterize(model)   # hMHSA + cFFN layer compaction
    feats = leanvit.dense_features(model, images)   # [B, H_p, W_p, C] on the full patch grid
    result = leanvit.tune(model, loader, budget=4.0)   # best setting within 4 GMACs per image
"""
from leanvit import methods as _methods  # noqa: F401  (registers the built-in methods)
from leanvit.compaction import compact, compaction_spec, reparameterize
from leanvit.dense import dense_features
from leanvit.io import load, save
from leanvit.macs import MacReport, count_macs
from leanvit.patching import is_patched, patch, patched_method, unpatch
from leanvit.registry import available_methods
# ``leanvit.tune`` is the function (the module leanvit/tune.py stays importable by its
# names: ``from leanvit.tune import TuneResult, Budget``)
from leanvit.tune import TuneResult, tune

__version__ = "0.1.0"

__all__ = [
    "patch", "unpatch", "is_patched", "patched_method", "available_methods", "count_macs",
    "MacReport", "save", "load", "compact", "reparameterize", "compaction_spec", "dense_features",
    "tune", "TuneResult", "__version__",
]
