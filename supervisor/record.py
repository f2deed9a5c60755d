"""The run record: what ``run/state.json`` holds, as types (one save path, one load path).

The supervisor keeps one :class:`RunRecord` in memory and rewrites the file
with :func:`save` after every change; ``status``, ``report`` and ``stop`` read
it back with :func:`load`. The file lives in a directory anyone can write to
and may come from an older supervisor, a hand edit or a disk that filled up
mid-write, so :func:`load` never raises: every wrong-typed field drops to its
default, a malformed attempt is skipped, and a file that is not a JSON object
reads as None.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from supervisor import protocol
from supervisor.slurm import SlurmJob


@dataclass
class AttemptRecord:
    """One worker launch and how it ended (``end`` None: still running)."""

    attempt: int
    pid: int | None = None
    start: float | None = None
    end: float | None = None
    reason: str | None = None
    exit: str | None = None
    """The return code in words ('exit 1 (crash)', 'killed by SIGKILL')."""
    message: str | None = None
    step_start: int = 0
    """The newest checkpoint's step when it was launched (what it resumed from)."""
    step_reached: int | None = None
    first_step_at: float | None = None
    """Wall-clock time of the first optimizer step this attempt added: the restart's real cost ends here."""
    log: str | None = None
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    standby: bool = False
    """A pre-warmed standby took the go (instead of a cold start)."""
    standby_fallback: str | None = None
    """Why a cold start was made although standbys are on."""
    traceback_tail: list[str] = field(default_factory=list)


@dataclass
class StandbyRecord:
    """The standby worker now waiting for a go (shown by ``status``)."""

    pid: int
    ready: bool = False
    log: str | None = None


@dataclass
class RunRecord:
    """``run/state.json``. Field names are the file's keys (scripts and benchmarks read them)."""

    state: str | None = None
    state_reason: str | None = None
    updated: float | None = None
    output_dir: str | None = None
    config: str | None = None
    supervisor_pid: int | None = None
    supervisor_create_time: float | None = None
    host: str | None = None
    """The supervisor's host name: its pids mean something only there (a run on shared storage
    is looked at from other machines too, e.g. a cluster's login node)."""
    slurm: SlurmJob | None = None
    """The SLURM job the supervisor runs in (None outside SLURM)."""
    slurm_requeued: bool = False
    """The supervisor requeued its SLURM job as it stopped (the time-limit signal)."""
    log: str | None = None
    """The supervisor's own log file (``--detach``); None: stderr / the journal."""
    worker_pid: int | None = None
    worker_create_time: float | None = None
    attempt: int | None = None
    attempts: list[AttemptRecord] = field(default_factory=list)
    restart_count: int = 0
    failures_without_progress: int = 0
    step_high_water: int = -1
    """The highest step any attempt reached: "progress" means going past it."""
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    effective_batch: int | None = None
    tracker_run_id: str | None = None
    last_error: str | None = None
    waiting_reason: str | None = None
    backoff_until: float | None = None
    standby: StandbyRecord | None = None
    standby_count: int = 0
    goodput: dict[str, float] = field(default_factory=dict)
    """Seconds of wall time per :data:`supervisor.goodput.BUCKETS` name, over every attempt and supervisor start."""

    @property
    def current(self) -> AttemptRecord | None:
        return self.attempts[-1] if self.attempts else None

    def finished_attempts(self) -> list[AttemptRecord]:
        return [a for a in self.attempts if a.end is not None]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_NESTED = ("attempts", "standby", "slurm")


def from_dict(raw: Any) -> RunRecord | None:
    """A record from a decoded ``state.json``; None when it is not a JSON object."""
    if not isinstance(raw, dict):
        return None
    flat = {k: v for k, v in raw.items() if k not in _NESTED}
    rec = protocol.parse_record(RunRecord, flat) or RunRecord()
    attempts = raw.get("attempts")
    if isinstance(attempts, list):
        rec.attempts = [a for a in (protocol.parse_record(AttemptRecord, x) for x in attempts) if a is not None]
    rec.standby = protocol.parse_record(StandbyRecord, raw.get("standby"))
    rec.slurm = protocol.parse_record(SlurmJob, raw.get("slurm"))
    return rec


def load(output_dir: str | os.PathLike[str], node_rank: int = 0) -> RunRecord | None:
    """The run's record; None if there is none or it is not a JSON object (never raises)."""
    return from_dict(protocol.read_json(protocol.state_path(output_dir, node_rank)))


def save(output_dir: str | os.PathLike[str], node_rank: int, rec: RunRecord) -> None:
    """Rewrite ``state.json`` atomically (raises OSError, e.g. on a full disk: the caller retries)."""
    protocol.atomic_write_json(protocol.state_path(output_dir, node_rank), rec.to_dict())
