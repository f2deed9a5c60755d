"""The protocol between supervisor and worker: files, exit codes, environment.

Both sides import this module; it imports only the standard library.

Worker → supervisor
    ``run/heartbeat.json``   progress, rewritten atomically at least every step
    ``$VIT_EXIT_REPORT``     why the worker exited (default ``run/exit_report.json``)
    exit code                see :data:`EXIT_CODES`
    ``run/standby-PID.json`` a standby worker is prepared (:class:`StandbyReady`)
    ``run/metrics.jsonl``    every attempt's logged metrics, appended (the run report draws it)
Supervisor → worker
    a :class:`LaunchOrder`: flags and environment for a cold start, or the same
    order as one JSON line on a standby's stdin (the "go")
Supervisor → anyone
    ``run/state.json``       what ``vit-supervisor status`` reads

The records that cross the boundary are typed (:class:`Heartbeat`,
:class:`ExitReport`, :class:`LaunchOrder`, :class:`StandbyReady`): both sides
share the type, not string keys. Reading is defensive: a file in the run
directory may be truncated, hand-edited or hostile, so a record parses into
its type with every wrong-typed field dropped to its default, and a file that
is not a JSON object at all reads as None. Nothing a worker writes can crash
the supervisor.

Every file is written with :func:`atomic_write_json`: a temporary file in the
same directory, fsync, rename. A reader sees the old content or the new one,
never half of either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import signal
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

# ----------------------------------------------------------------------------- exit codes

EXIT_COMPLETED = 0
EXIT_CRASH = 1
EXIT_USER_ERROR = 2  # config_error, incompatible_checkpoint, data_error: never retried
EXIT_INTERRUPTED = 3  # stop signal honoured: checkpoint committed, resume continues at the next step
EXIT_OOM = 4
EXIT_DISK_LOW = 5
EXIT_STANDBY_STALE = 6  # a standby found the data changed since it prepared: start a cold worker instead
EXIT_DEVICE_ERROR = 7  # the accelerator failed (CUDA context lost, NCCL abort): nothing saved from it, restart

REASON_COMPLETED = "completed"
REASON_INTERRUPTED = "interrupted"
REASON_OOM = "oom"
REASON_DISK_LOW = "disk_low"
REASON_CONFIG_ERROR = "config_error"
REASON_INCOMPATIBLE = "incompatible_checkpoint"
REASON_DATA_ERROR = "data_error"
REASON_CRASH = "crash"
REASON_STANDBY_STALE = "standby_stale"
REASON_DEVICE_ERROR = "device_error"

EXIT_CODES: dict[str, int] = {
    REASON_COMPLETED: EXIT_COMPLETED,
    REASON_CRASH: EXIT_CRASH,
    REASON_CONFIG_ERROR: EXIT_USER_ERROR,
    REASON_INCOMPATIBLE: EXIT_USER_ERROR,
    REASON_DATA_ERROR: EXIT_USER_ERROR,
    REASON_INTERRUPTED: EXIT_INTERRUPTED,
    REASON_OOM: EXIT_OOM,
    REASON_DISK_LOW: EXIT_DISK_LOW,
    REASON_STANDBY_STALE: EXIT_STANDBY_STALE,
    REASON_DEVICE_ERROR: EXIT_DEVICE_ERROR,
}
"""Reason → exit code. The exit report names the reason; the code is the fallback."""

NON_RETRYABLE_REASONS = frozenset({REASON_CONFIG_ERROR, REASON_INCOMPATIBLE, REASON_DATA_ERROR})

REASON_BY_CODE: dict[int, str] = {
    EXIT_COMPLETED: REASON_COMPLETED,
    EXIT_CRASH: REASON_CRASH,
    EXIT_USER_ERROR: REASON_CONFIG_ERROR,
    EXIT_INTERRUPTED: REASON_INTERRUPTED,
    EXIT_OOM: REASON_OOM,
    EXIT_DISK_LOW: REASON_DISK_LOW,
    EXIT_STANDBY_STALE: REASON_STANDBY_STALE,
    EXIT_DEVICE_ERROR: REASON_DEVICE_ERROR,
}

# ----------------------------------------------------------------------------- files

RUN_SUBDIR = "run"
HEARTBEAT = "heartbeat.json"
EXIT_REPORT = "exit_report.json"
STATE = "state.json"
GUARD = "guard.json"
TRACKER_ID = "tracker_run_id"
LOCK = "supervisor.lock"
LOGS_SUBDIR = "logs"
METRICS = "metrics.jsonl"
CHECKPOINT_PREFIX = "checkpoint-"

# Heartbeat states
HB_STARTING = "starting"
HB_TRAINING = "training"
HB_SAVING = "saving"
HB_EVALUATING = "evaluating"
HB_WAITING_FOR_DISK = "waiting_for_disk"
HB_STOPPING = "stopping"
HB_EXITED = "exited"

# ----------------------------------------------------------------------------- environment

ENV_SUPERVISOR_PID = "VIT_SUPERVISOR_PID"
ENV_ATTEMPT = "VIT_ATTEMPT"
ENV_EXIT_REPORT = "VIT_EXIT_REPORT"


def run_dir(output_dir: str | os.PathLike[str]) -> Path:
    """The folder inside the output directory that holds the protocol's files."""
    return Path(output_dir) / RUN_SUBDIR


def supervisor_dir(output_dir: str | os.PathLike[str], node_rank: int = 0) -> Path:
    """The supervisor's own files (lock, state, logs, exit reports): one folder per node, because
    every node's supervisor of a multi-node job shares the output directory."""
    base = run_dir(output_dir)
    return base if node_rank == 0 else base / f"node-{node_rank}"


def heartbeat_path(output_dir: str | os.PathLike[str]) -> Path:
    return run_dir(output_dir) / HEARTBEAT


def exit_report_path(output_dir: str | os.PathLike[str]) -> Path:
    return run_dir(output_dir) / EXIT_REPORT


def state_path(output_dir: str | os.PathLike[str], node_rank: int = 0) -> Path:
    return supervisor_dir(output_dir, node_rank) / STATE


# ----------------------------------------------------------------------------- atomic I/O


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so readers see all of the old or all of the new.

    ``durable`` fsyncs the file before the rename and the directory after it,
    so the new content survives a power loss. Without it the rename is still
    atomic for readers; only a host crash may bring back the old content. The
    heartbeat, rewritten every step, skips both fsyncs (milliseconds each on
    a busy disk).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, durable: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode(), durable=durable)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_MAX_READ = 4 << 20  # a run file is a few KiB; a huge one is not ours, and must not eat the supervisor's memory


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if it is missing, unreadable, too large or not an object."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_READ + 1)
        if len(raw) > _MAX_READ:
            return None
        obj = json.loads(raw)
    except (OSError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


# ----------------------------------------------------------------------------- names


def signal_name(returncode: int) -> str | None:
    """SIGKILL for -9; None for a normal exit."""
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def describe_exit(returncode: int) -> str:
    """A human name for a return code: 'exit 3 (interrupted)' or 'killed by SIGKILL'."""
    name = signal_name(returncode)
    if name:
        return f"killed by {name}"
    reason = REASON_BY_CODE.get(returncode)
    return f"exit {returncode}" + (f" ({reason})" if reason else "")


# ----------------------------------------------------------------------------- checkpoints (supervisor's view)


_CHECKPOINT_NAME = re.compile(r"checkpoint-([0-9]+)")


def checkpoint_step(name: str | os.PathLike[str]) -> int | None:
    """N for a folder named exactly ``checkpoint-N`` (a path's last part), else None.

    ``checkpoint-10.bak`` or ``checkpoint-x`` are not ours: None.
    """
    m = _CHECKPOINT_NAME.fullmatch(Path(name).name)
    return int(m.group(1)) if m else None


def newest_checkpoint_step(output_dir: str | os.PathLike[str]) -> int:
    """Step of the newest ``checkpoint-N`` folder, -1 if none (the worker decides which one is good)."""
    best = -1
    try:
        for entry in os.scandir(output_dir):
            step = checkpoint_step(entry.name)
            if step is not None and entry.is_dir():
                best = max(best, step)
    except OSError:
        pass
    return best


def config_sha(path: str | os.PathLike[str]) -> str | None:
    """SHA-256 of a config file's bytes (how a standby proves it read the config in force); None if unreadable."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def metrics_path(output_dir: str | os.PathLike[str]) -> Path:
    return run_dir(output_dir) / METRICS


def standby_announcement(output_dir: str | os.PathLike[str], pid: int) -> Path:
    """Where a standby worker says it is ready (written by the worker, read by the supervisor)."""
    return run_dir(output_dir) / f"standby-{pid}.json"


# ----------------------------------------------------------------------------- typed records

R = TypeVar("R")
_HINTS: dict[type, dict[str, Any]] = {}


def _accepts(tp: Any, value: Any) -> bool:
    """Whether a JSON value fits a field's annotation (bool is not an int here; NaN is not a number)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_accepts(arg, v) for v in value)
    if origin is dict:
        _, varg = typing.get_args(tp) or (str, Any)
        return isinstance(value, dict) and all(isinstance(k, str) and _accepts(varg, v) for k, v in value.items())
    return False


def parse_record(cls: type[R], raw: Any) -> R | None:
    """``raw`` (a decoded JSON value) as a ``cls`` record: unknown keys ignored, wrong-typed
    values replaced by the field's default. None when ``raw`` is not an object, or when a
    field without a default is missing or wrong-typed."""
    if not isinstance(raw, dict):
        return None
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in raw and _accepts(hints[f.name], raw[f.name]):
            value = raw[f.name]
            kwargs[f.name] = float(value) if hints[f.name] in (float, float | None) and value is not None else value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            return None
    return cls(**kwargs)


def read_record(cls: type[R], path: str | os.PathLike[str]) -> R | None:
    """The record in ``path``; None if the file is missing, unreadable or not a usable ``cls``."""
    return parse_record(cls, read_json(path))


def record_dict(record: Any) -> dict[str, Any]:
    return dataclasses.asdict(record)


@dataclass(frozen=True)
class Heartbeat:
    """``run/heartbeat.json``: the worker's progress, rewritten at least every
    ``supervisor.heartbeat_interval_s`` and at every state change. Rank 0 writes it for the job."""

    pid: int
    """The worker process (under torchrun: rank 0)."""
    state: str = HB_STARTING
    """One of the ``HB_*`` states."""
    time: float | None = None
    """Wall-clock time of this write."""
    attempt: int | None = None
    global_step: int | None = None
    start_step: int | None = None
    """The step this attempt resumed from (set when training begins): a snapshot newer than the
    newest disk checkpoint the supervisor saw at launch moves it past that checkpoint's step."""
    max_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    samples_per_s: float | None = None
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    world_size: int | None = None
    last_checkpoint: str | None = None
    tracker_run_id: str | None = None
    reason: str | None = None
    """With state ``exited``: the exit report's reason."""
    disk_needed_bytes: int | None = None
    disk_free_bytes: int | None = None
    gpu_mem_peak_bytes: int | None = None


@dataclass(frozen=True)
class ExitReport:
    """Why a worker exited (``$VIT_EXIT_REPORT``; one per rank under torchrun). Modelled on
    torchelastic's error file: the worker knows best why it stopped."""

    reason: str
    """A ``REASON_*``; :data:`EXIT_CODES` maps it to the exit code."""
    message: str = ""
    exit_code: int | None = None
    pid: int | None = None
    attempt: int | None = None
    rank: int | None = None
    world_size: int | None = None
    time: float | None = None
    step: int | None = None
    max_steps: int | None = None
    last_checkpoint: str | None = None
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    exception_type: str | None = None
    traceback: list[str] = field(default_factory=list)
    """The last lines of the traceback, for crashes and OOMs."""
    phase: str | None = None
    """Where in the step an OOM hit: forward, optimizer, boundary."""
    emergency_checkpoint: bool = False
    tracker_run_id: str | None = None
    checkpoint_bytes: int | None = None
    save_seconds: list[float] = field(default_factory=list)
    gpu_mem_peak_bytes: int | None = None
    disk_needed_bytes: int | None = None
    disk_free_bytes: int | None = None
    stop_to_exit_s: float | None = None
    skipped_images: int | None = None
    """Unreadable samples replaced in this attempt (``data.on_corrupt_image: skip``; None when off)."""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def known_reason(self) -> bool:
        return self.reason in EXIT_CODES


@dataclass(frozen=True)
class LaunchOrder:
    """What the supervisor tells a worker for one attempt.

    A cold start receives it as flags and environment (:meth:`argv`, :meth:`env`);
    a standby receives the same order as one JSON line on stdin (:meth:`to_line`).
    """

    attempt: int
    exit_report: str
    supervisor_pid: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    resume: bool = True
    snapshots: bool = True
    """False: no shared-memory snapshots in this attempt (the supervisor found too little room for them)."""

    def argv(self) -> list[str]:
        """The worker's command-line flags (after the config path)."""
        flags = ["--resume"] if self.resume else []
        if not self.snapshots:
            flags.append("--no-snapshots")
        return [
            *flags,
            "--per-device-train-batch-size",
            str(self.per_device_train_batch_size),
            "--gradient-accumulation-steps",
            str(self.gradient_accumulation_steps),
        ]

    def env(self) -> dict[str, str]:
        return {
            ENV_SUPERVISOR_PID: str(self.supervisor_pid),
            ENV_ATTEMPT: str(self.attempt),
            ENV_EXIT_REPORT: self.exit_report,
        }

    def to_line(self) -> str:
        return json.dumps(record_dict(self), sort_keys=True)

    @classmethod
    def from_line(cls, line: str) -> LaunchOrder | None:
        """The order in a go line; None when it is not one (the standby then refuses it)."""
        try:
            raw = json.loads(line)
        except ValueError:
            return None
        order = parse_record(cls, raw)
        if (
            order is None
            or min(order.attempt, order.per_device_train_batch_size, order.gradient_accumulation_steps) < 1
        ):
            return None
        return order


@dataclass(frozen=True)
class StandbyReady:
    """``run/standby-PID.json``: a standby worker has imported, read the data and built the model."""

    pid: int
    config_sha256: str | None = None
    """Of the config file it read: a config changed since then makes it unusable."""
    fingerprint: str | None = None
    """The data set's fingerprint when it prepared."""
    prepared_s: float | None = None
    time: float | None = None
    rss_bytes: int | None = None
