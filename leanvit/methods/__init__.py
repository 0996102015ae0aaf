"""Methods: one file each, registered on import.

Each file holds the method's options dataclass (defaults with their source) and its
:class:`~leanvit.registry.Reducer`; tensor arithmetic shared between methods lives in
:mod:`leanvit.ops`.
"""
from leanvit.methods import none  # noqa: F401
from leanvit.methods import random_keep  # noqa: F401  (method "random")
from leanvit.methods import ats  # noqa: F401
from leanvit.methods import diffrate  # noqa: F401  (package: "diffrate", "diffrate-search")
from leanvit.methods import dynamicvit  # noqa: F401
from leanvit.methods import evit  # noqa: F401
from leanvit.methods import mctf  # noqa: F401
from leanvit.methods import pitome  # noqa: F401
from leanvit.methods import tome  # noqa: F401
from leanvit.methods import topk  # noqa: F401
from leanvit.methods import tofu  # noqa: F401
from leanvit.methods import zerotprune  # noqa: F401
from leanvit.methods import divprune  # noqa: F401
