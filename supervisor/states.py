"""The supervisor's states and the moves allowed between them (a leaf module: imports nothing of ours).

Lifecycle of one ``vit-supervisor start``::

    (new)    ─> STARTING
    STARTING ─> RUNNING   worker launched
             ─> WAITING   free disk below disk.reserve_mb
    RUNNING  ─> COMPLETED the step count was reached
             ─> STARTING  at once: OOM (lower batch), crash after progress, stale standby
             ─> BACKOFF   crash/hang/signal without progress, after a delay  ─> STARTING
             ─> WAITING   disk_low exit: until one checkpoint fits            ─> STARTING
             ─> STOPPING  stop (signal or `stop`): the worker saves           ─> STOPPED
             ─> STOPPED   an external signal not restarted
             ─> FAILED    non-retryable error, gave up, output dir deleted
    STARTING, WAITING, BACKOFF ─> STOPPED (stop) or FAILED; STOPPING ─> COMPLETED or FAILED too

STARTING checks free disk and launches the worker; RUNNING watches it (exit,
heartbeat, hang); BACKOFF waits before the next launch; WAITING re-checks disk
space periodically instead of launching into a full disk; STOPPING has asked
the worker to checkpoint and exit. STOPPED, COMPLETED and FAILED are final:
the supervisor process exits in them.

Every change goes through ``Supervisor._transition`` (supervisor/daemon.py),
which checks it against :data:`TRANSITIONS`; each call site is labelled
``# A -> B`` so ``grep -- '->' supervisor/daemon.py`` lists them all.
"""

from __future__ import annotations

from enum import Enum


class State(str, Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    WAITING = "waiting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    COMPLETED = "completed"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


FINAL_STATES = frozenset({State.STOPPED, State.COMPLETED, State.FAILED})
"""The supervisor exits in these; ``status`` reports them as not running (exit 3)."""

ACTIVE_STATES = frozenset(State) - FINAL_STATES
"""A live supervisor is in one of these; ``status`` reports them as running (exit 0)."""

WORKER_STATES = frozenset({State.RUNNING, State.STOPPING})
"""A worker process exists in these (and in no other)."""

# Stopping is reachable from every active state because a stop can arrive at any time;
# the pre-launch states go straight to STOPPED as there is no worker to wait for.
TRANSITIONS: dict[State | None, frozenset[State]] = {
    None: frozenset({State.STARTING, State.FAILED}),
    State.STARTING: frozenset({State.RUNNING, State.WAITING, State.STOPPED, State.FAILED}),
    State.WAITING: frozenset({State.STARTING, State.STOPPED, State.FAILED}),
    State.RUNNING: frozenset(
        {State.BACKOFF, State.STARTING, State.WAITING, State.STOPPING, State.STOPPED, State.COMPLETED, State.FAILED}
    ),
    State.BACKOFF: frozenset({State.STARTING, State.STOPPED, State.FAILED}),
    State.STOPPING: frozenset({State.STOPPED, State.COMPLETED, State.FAILED}),
    State.STOPPED: frozenset(),
    State.COMPLETED: frozenset(),
    State.FAILED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A move not in :data:`TRANSITIONS`: a bug in the supervisor, never a user error."""


def check_transition(old: State | None, new: State) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"illegal state change {old} -> {new}")
