"""DiffRate (Chen et al., "DiffRate: Differentiable Compression Rate for Efficient Vision
Transformers", ICCV 2023; OpenGVLab/DiffRate): per-block prune and merge counts searched to a
MAC budget, then deployed. One package:

- :mod:`~leanvit.methods.diffrate.deploy`: the ``diffrate`` method (deploy a schedule);
- :mod:`~leanvit.methods.diffrate.search_mode`: the ``diffrate-search`` mode whose rate logits
  a search trains (the loop itself is :func:`leanvit.search.diffrate.search`, an application
  above the methods);
- :mod:`~leanvit.methods.diffrate.schedule`: the schedule file format;
  :mod:`~leanvit.methods.diffrate.authors`: the authors' published schedules;
  :mod:`~leanvit.methods.diffrate.budget`: a schedule's MAC estimate and the hand-set
  schedules fitted to a MAC target;
- :mod:`~leanvit.methods.diffrate.ops`: the tensor arithmetic both modes share.

Importing the package registers both methods.
"""
from leanvit.methods.diffrate.authors import read_authors_schedule  # noqa: F401
from leanvit.methods.diffrate.budget import (HANDSET_KINDS, fit_handset,  # noqa: F401
                                             handset_counts, schedule_macs)
from leanvit.methods.diffrate.deploy import (METHOD, DiffRateOptions, DiffRateReducer,  # noqa: F401
                                             resolve_schedule)
from leanvit.methods.diffrate.ops import merge_tail, sort_order  # noqa: F401
from leanvit.methods.diffrate.schedule import (Schedule, ScheduleError, as_schedule,  # noqa: F401
                                               load_schedule, save_schedule)
from leanvit.methods.diffrate.search_mode import (SEARCH_METHOD,  # noqa: F401
                                                  DiffRateSearchOptions,
                                                  DiffRateSearchReducer, default_granularity)
