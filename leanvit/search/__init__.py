"""Searches that produce a method's settings for one model (DiffRate's kept-count schedule:
:func:`leanvit.search.diffrate.search`)."""
