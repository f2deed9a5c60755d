"""Goodput accounting: where a run's wall time went (issue 14).

A run's wall time, across attempts and supervisor restarts, is split into the
buckets below, which add up to the whole; goodput = ``training`` / total.
``RunRecord.goodput`` (``run/state.json``) holds seconds per bucket name.
"""

from __future__ import annotations

BUCKETS: tuple[str, ...] = (
    "training",  # optimizer steps past the run's high-water mark: new work
    "redo",  # steps done again because a fault lost them
    "startup",  # launch -> first step of an attempt: imports, restore, standby take-over
    "checkpoint",  # disk checkpoint saves (worker heartbeat state "saving")
    "evaluation",  # evaluation passes (heartbeat state "evaluating")
    "disk_wait",  # waiting for free disk (supervisor WAITING, worker waiting_for_disk)
    "backoff",  # the delay between a failed attempt and the next launch
    "detection",  # fault -> the supervisor noticed it (a hang's silent time)
    "stopping",  # a requested stop: the worker's final save and exit
)
"""Bucket names, in the order ``status`` and the metrics list them."""
