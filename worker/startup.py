"""A worker's start-up, made cheaper: every cold start, restart and standby pays it.

Two costs that the run does not need:

- ``transformers.trainer`` imports HuggingFace ``datasets`` whenever it is installed (about
  0.1 s of CPU beyond pandas and pyarrow, which scikit-learn imports anyway), only to recognise
  a ``datasets.Dataset`` handed to the Trainer. The worker hands it its own torch datasets, except with
  ``data.source: hf_dataset``, so for every other source the Trainer is told, just before it
  is imported, that ``datasets`` is not there (:func:`skip_unused_imports`).
- Python's cyclic garbage collector runs hundreds of times while torch and transformers are
  imported, traversing a heap that only grows (about 0.8 s of CPU here), and accelerate runs
  a full collection when training starts (another 0.25 s over that heap).
  :func:`imports_without_gc` imports with the collector off and then freezes what exists
  (``gc.freeze``): modules and classes live as long as the process, so no later collection
  needs to look at them again. What the imports left as cyclic garbage (a few thousand
  objects) is frozen with them instead of freed.

tests/test_startup.py fails if a heavy module sneaks back into a plain worker's imports.
"""

from __future__ import annotations

import gc
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from supervisor.schema import Config

NOT_IMPORTED = ("datasets",)
"""Modules a worker whose data source is not ``hf_dataset`` never imports."""


class _BeforeImport(importlib.abc.MetaPathFinder):
    """Calls ``action`` once, just before module ``name`` is first imported, then steps aside
    (it finds nothing itself: the normal finders import the module)."""

    def __init__(self, name: str, action: Callable[[], None]) -> None:
        self.name = name
        self.action = action

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == self.name:
            sys.meta_path.remove(self)
            self.action()
        return None


def _trainer_without_datasets() -> None:
    # transformers.trainer reads this name from transformers.utils when it is imported: at module
    # level (``import datasets``) and in its isinstance checks, which are False for torch datasets.
    import transformers.utils

    transformers.utils.is_datasets_available = lambda: False


def skip_unused_imports(cfg: Config) -> None:
    """Keep the Trainer from importing ``datasets`` unless the run's data comes from it."""
    if cfg.data.source == "hf_dataset" or "transformers.trainer" in sys.modules:
        return
    sys.meta_path.insert(0, _BeforeImport("transformers.trainer", _trainer_without_datasets))


@contextmanager
def imports_without_gc() -> Iterator[None]:
    """Run the block (the worker's heavy imports) with the cyclic collector off, then freeze
    every object that exists, so that later collections skip them."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
