"""Goodput accounting: where a run's wall time went (issue 14).

A run's wall time, across attempts and supervisor restarts, is split into the
buckets below, which add up to the whole; goodput = ``training`` / total.
``RunRecord.goodput`` (``run/state.json``) holds seconds per bucket name.

The supervisor feeds a :class:`Ledger` (pure logic: every call takes the time,
so tests drive it with a fake clock) with what it sees:

- its own state changes (:meth:`Ledger.phase`): STARTING is ``startup`` (or
  ``stopping`` while a previous supervisor's worker still saves), BACKOFF is
  ``backoff``, WAITING is ``disk_wait``, and a worker's lifetime is split by
  its heartbeat. ``startup`` is the run's first start (and the first after a
  deliberate stop); every launch after a worker's exit, and the first after a
  supervisor that died, is ``restart`` instead, so the cost of faults is the
  sum of the :data:`LOST` buckets;
- each heartbeat whose (state, step) changed (:meth:`Ledger.observe`). The time
  since the previous change is *booked* then, by the state the worker was in
  (the heartbeat is rewritten at every state change, and the supervisor wakes
  on every rewrite): ``training`` splits the interval between ``training`` and
  ``redo`` by how many of the steps it completed were past the run's high-water
  mark and how many below it; ``saving``, ``evaluating``, ``waiting_for_disk``
  and ``stopping`` go to their buckets; launch -> first training heartbeat
  (imports, restore, a standby's take-over) is ``startup``;
- a hang verdict (:meth:`Ledger.hang`): the silent time since the last change,
  and the kill that follows, become ``detection``;
- the exit (:meth:`Ledger.exited`): the open interval is closed with the
  step the worker reached (its exit report may know a later step than the last
  heartbeat), so the totals are exact at the end of every attempt; a failed
  worker's time after its last word (its exit report) is ``detection``.

Booked totals only grow (the metrics export them as counters); the interval
since the worker's last heartbeat change is held back until it is known what
it was (a hang verdict can still turn it into ``detection``), so while a worker
runs the booked sum trails the wall time by that interval (about one heartbeat
interval while training; a whole save or evaluation pass while one runs).
Supervisor-only phases (backoff, disk wait, start-up before the launch, the
wind-down after the final state: a standby's exit) are booked as they pass.

The wall time of a run is the sum of the lifetimes of the supervisors that
watched it (each from its process start to its final state), and a second
``start`` continues the totals read from ``state.json``. The time between a
deliberate end (stopped, failed, completed) and the next ``start`` is not the
run's and is not counted. After a supervisor that died (its state file still
says an active state), the time from its last state write (rewritten at least
every few seconds while it lives) to the new start is ``unsupervised``: the
run made no supervised progress then, which is what a restart of the
supervisor by systemd, or by hand the next morning, costs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

BUCKETS: tuple[str, ...] = (
    "training",  # optimizer steps past the run's high-water mark: new work
    "redo",  # steps done again because a fault lost them
    "startup",  # the supervisor's and the first worker's start -> its first step: imports, restore
    "checkpoint",  # disk checkpoint saves (worker heartbeat state "saving")
    "evaluation",  # evaluation passes (heartbeat state "evaluating")
    "disk_wait",  # waiting for free disk (supervisor WAITING, worker waiting_for_disk)
    "backoff",  # the delay between a failed attempt and the next launch
    "detection",  # fault -> the supervisor noticed it (a hang's silent time)
    "stopping",  # a requested stop: the worker's final save and exit; the supervisor's wind-down at the end
    "restart",  # like startup, for every launch after a worker's exit (and the first after a dead supervisor)
    "unsupervised",  # a supervisor had died: its last state write -> the next start
)
"""Bucket names, in the order ``status`` and the metrics list them."""

LOST: tuple[str, ...] = ("redo", "restart", "detection", "backoff", "disk_wait", "unsupervised")
"""The buckets a run without faults would not have: the cost of faults and of recovering from them."""

# The worker's heartbeat states (supervisor.protocol.HB_*), spelled out: this module stays a leaf.
_HB_BUCKET = {
    "starting": "startup",
    "saving": "checkpoint",
    "evaluating": "evaluation",
    "waiting_for_disk": "disk_wait",
    "stopping": "stopping",
}
CLEAN_EXITS = frozenset({"completed", "interrupted", "disk_low", "standby_stale"})
"""Exit reasons (``protocol.REASON_*``) that are no fault: the worker's time after its last word is ``stopping``."""

WORKER = "worker"
"""The phase of a live worker: its time is split by its heartbeat."""
PHASES = frozenset({"startup", "backoff", "disk_wait", "stopping", WORKER})
"""What :meth:`Ledger.phase` accepts."""


def clean(raw: Mapping[str, Any] | None) -> dict[str, float]:
    """Bucket totals from a persisted record: unknown names and values that are not finite,
    non-negative numbers are dropped (a hand-edited or foreign ``state.json``); missing names are 0."""
    out = dict.fromkeys(BUCKETS, 0.0)
    for name, value in (raw or {}).items():
        if (
            name in out
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value >= 0
        ):
            out[name] = float(value)
    return out


def total(buckets: Mapping[str, float]) -> float:
    return sum(buckets.get(b, 0.0) for b in BUCKETS)


def fault_free_share(buckets: Mapping[str, float]) -> float | None:
    """1 - the :data:`LOST` buckets / total: what an uninterrupted run of the same work would
    take, as a share of this one (the figure to set beside "reference time / faulted time")."""
    whole = total(buckets)
    return 1.0 - sum(buckets.get(b, 0.0) for b in LOST) / whole if whole > 0 else None


def ratio(buckets: Mapping[str, float]) -> float | None:
    """Goodput: training / total; None before any time was booked."""
    whole = total(buckets)
    return buckets.get("training", 0.0) / whole if whole > 0 else None


def largest(buckets: Mapping[str, float], n: int = 3) -> list[tuple[str, float]]:
    """The ``n`` largest non-zero buckets, largest first (ties in :data:`BUCKETS` order)."""
    ranked = sorted((b for b in BUCKETS if buckets.get(b, 0.0) > 0), key=lambda b: -buckets[b])
    return [(b, buckets[b]) for b in ranked[:n]]


@dataclass
class _Open:
    """The interval being timed: since ``since``, in ``phase``; for a worker, what its heartbeat said then."""

    since: float
    phase: str
    hb_state: str | None = None
    step: int | None = None
    reason: str | None = None


@dataclass
class Ledger:
    """Seconds per bucket over a run's supervised wall time (see the module docstring).

    ``totals`` starts from a previous supervisor's figures; ``high_water`` is the highest
    step any attempt reached (a step at or below it is redone); ``restarting``: start-up
    time is ``restart``, not ``startup`` (set by every exit). Times are the supervisor's
    monotonic clock.
    """

    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(BUCKETS, 0.0))
    high_water: int = -1
    restarting: bool = False
    _open: _Open | None = None
    _stopping: bool = False  # a stop was requested of this worker: its remaining time is "stopping"
    _hung: bool = False  # a hang verdict: the worker's remaining time is "detection"

    def __post_init__(self) -> None:
        self.totals = clean(self.totals)

    # ------------------------------------------------------------------ what the daemon tells it

    def phase(self, now: float, name: str) -> None:
        """The supervisor entered a phase (one of :data:`PHASES`); the interval so far is booked."""
        if name not in PHASES:
            raise ValueError(f"unknown goodput phase {name!r}; one of {sorted(PHASES)}")
        self._close(now)
        self._stopping = self._hung = False
        self._open = _Open(now, name)

    def unsupervised(self, seconds: float) -> None:
        """Time no supervisor watched the run (a previous one died): booked as is, and the next
        start-up is a restart."""
        self._book("unsupervised", max(seconds, 0.0))
        self.restarting = True

    def observe(self, now: float, hb_state: str | None, step: int | None, reason: str | None = None) -> None:
        """A heartbeat of the live worker; books the interval since the last change when (state, step) changed."""
        o = self._open
        if o is None or o.phase != WORKER:
            return
        if (hb_state, step, reason) == (o.hb_state, o.step, o.reason):
            return
        self._close(now, step)
        if step is not None:
            self.high_water = max(self.high_water, step)
        self._open = _Open(now, WORKER, hb_state, step if step is not None else o.step, reason)

    def stop_requested(self, now: float) -> None:
        """The supervisor asked the worker to stop: its remaining time is ``stopping``."""
        self._close(now)
        self._stopping = True

    def hang(self, now: float) -> None:
        """The hang verdict: the time since the worker's last heartbeat change, and the rest
        of its life (the kill), are ``detection``."""
        o = self._open
        if o is None or o.phase != WORKER:
            return
        self._hung = True
        self._close(now)

    def exited(self, now: float, step: int | None = None, dead_for: float = 0.0) -> None:
        """The worker's exit was noticed at ``now``. ``step``: the step it reached (exit report or
        last heartbeat); ``dead_for``: seconds it had already been done (a failure's exit report ->
        now), booked as ``detection``. The next :meth:`phase` call opens the next interval."""
        o = self._open
        if o is None or o.phase != WORKER:
            return
        tail = min(max(dead_for, 0.0), max(now - o.since, 0.0))
        self._close(now - tail, step)
        if step is not None:
            self.high_water = max(self.high_water, step)
        self._book("detection", tail)
        self._open = _Open(now, WORKER, o.hb_state, o.step, o.reason)
        self.restarting = True

    def end(self, now: float) -> None:
        """The supervisor stops counting (a final state): everything is booked."""
        self._close(now)
        self._open = None

    # ------------------------------------------------------------------ what it tells

    def booked(self, now: float) -> dict[str, float]:
        """Totals to persist at ``now``: everything booked, plus a supervisor-only phase's
        time so far (its bucket can no longer change); never less than a previous call said."""
        out = dict(self.totals)
        o = self._open
        if o is not None and o.phase != WORKER and now > o.since:
            out[self._bucket_of(o.phase)] += now - o.since
        return out

    def unbooked(self, now: float) -> float:
        """Seconds of a live worker's time not yet booked (since its last heartbeat change)."""
        o = self._open
        return max(now - o.since, 0.0) if o is not None and o.phase == WORKER else 0.0

    # ------------------------------------------------------------------ booking

    def _book(self, bucket: str, seconds: float) -> None:
        if seconds > 0:
            self.totals[bucket] += seconds

    def _bucket_of(self, name: str) -> str:
        return "restart" if name == "startup" and self.restarting else name

    def _close(self, now: float, step: int | None = None) -> None:
        """Book the open interval up to ``now`` (and start the next one there, same phase)."""
        o = self._open
        if o is None:
            return
        dt = now - o.since
        o.since = max(o.since, now)
        if dt <= 0:
            return
        if o.phase != WORKER:
            self._book(self._bucket_of(o.phase), dt)
        elif self._hung:
            self._book("detection", dt)
        elif self._stopping:
            self._book("stopping", dt)
        elif o.hb_state == "training":
            self._book_steps(dt, o.step, step)
        elif o.hb_state == "exited":
            self._book("stopping" if o.reason in CLEAN_EXITS else "detection", dt)
        else:
            self._book(self._bucket_of(_HB_BUCKET.get(o.hb_state or "starting", "startup")), dt)

    def _book_steps(self, dt: float, start: int | None, end: int | None) -> None:
        """Training time from step ``start`` on: new steps vs steps at or below the high-water mark.

        ``end`` is the step reached (None: no later step known, the one in flight decides)."""
        if start is None:
            self._book(self._bucket_of("startup"), dt)
            return
        if end is None or end <= start:
            # No step completed in the interval: the step in flight decides.
            self._book("training" if start + 1 > self.high_water else "redo", dt)
            return
        n = end - start
        new = max(0, end - max(start, self.high_water))
        self._book("training", dt * new / n)
        self._book("redo", dt * (n - new) / n)
        self.high_water = max(self.high_water, end)
