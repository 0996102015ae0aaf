"""``dynamicvit``: learned token pruning with prediction modules (Rao et al., NeurIPS 2021;
TPAMI extension arXiv 2207.01580), one method for every family:

- :mod:`leanvit.methods.dynamicvit.tokens`: flat-token families (ViT; kind ``"tokens"``):
  prediction modules before ``locations`` drop patch tokens;
- :mod:`leanvit.methods.dynamicvit.hierarchical`: ConvNeXt and Swin: stage-3 positions routed
  to the block's MLP or a cheap fast path (DynamicCNN / DynamicSwin);
- :mod:`leanvit.methods.dynamicvit.predictor`: the prediction module both use, and the
  ``state.aux`` names of the decisions (:data:`DECISION`, :data:`KEPT`).
"""
import leanvit.methods.dynamicvit.hierarchical as _hier
from leanvit.methods.dynamicvit.authors import IMPORTER
from leanvit.methods.dynamicvit.predictor import DECISION, KEPT, Predictor
from leanvit.methods.dynamicvit.tokens import (_AUTHORS_NAMES, DynamicViT,  # noqa: F401
                                               DynamicViTOptions, build, from_authors_state_dict,
                                               keep_counts)
from leanvit.registry import Method, register

#: one method, one builder per family: token pruning on flat-token families (:mod:`.tokens`),
#: MLP routing in stage 3 on ConvNeXt and Swin (:mod:`.hierarchical`). The options differ per
#: family (:class:`DynamicViTOptions` here; ``keep_rate`` in (0.4, 1], stage-3 ``locations``
#: and ``ratio_step`` there, ``fast_layer_scale`` on ConvNeXt only); an option of another
#: family is an error naming the family that takes it.
METHOD = register(Method(
    "dynamicvit", DynamicViTOptions,
    {"tokens": build, "convnext": _hier.build, "swin": _hier.build},
    family_options={"convnext": _hier.ConvNeXtOptions, "swin": _hier.HierarchicalOptions},
    needs_training="needs trained predictors (leanvit train); pass them as a setting, e.g. "
                   "'dynamicvit load=FILE'",
    importers=(IMPORTER,),
    summary="learned prediction modules drop tokens before blocks (Rao et al. 2021); on "
            "ConvNeXt/Swin route stage-3 tokens to a slow or fast MLP (TPAMI extension); "
            "needs training: leanvit train --method dynamicvit"))

__all__ = ["DECISION", "KEPT", "Predictor", "DynamicViT", "DynamicViTOptions", "build",
           "keep_counts", "from_authors_state_dict", "METHOD"]
