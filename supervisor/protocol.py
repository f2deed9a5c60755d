"""The protocol between supervisor and worker: files, exit codes, environment.

Both sides import this module; it imports only the standard library.

Worker → supervisor
    ``run/heartbeat.json``   progress, rewritten atomically at least every step
    ``$VIT_EXIT_REPORT``     why the worker exited (default ``run/exit_report.json``)
    exit code                see :data:`EXIT_CODES`
Supervisor → worker
    flags ``--resume``, ``--per-device-train-batch-size``, ``--gradient-accumulation-steps``
    env  ``VIT_SUPERVISOR_PID``, ``VIT_ATTEMPT``, ``VIT_EXIT_REPORT``
Supervisor → anyone
    ``run/state.json``       what ``vit-supervisor status`` reads

Every file is written with :func:`atomic_write_json`: a temporary file in the
same directory, fsync, rename. A reader sees the old content or the new one,
never half of either.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------- exit codes

EXIT_COMPLETED = 0
EXIT_CRASH = 1
EXIT_USER_ERROR = 2  # config_error, incompatible_checkpoint, data_error: never retried
EXIT_INTERRUPTED = 3  # stop signal honoured: checkpoint committed, resume continues at the next step
EXIT_OOM = 4
EXIT_DISK_LOW = 5
EXIT_STANDBY_STALE = 6  # a standby found the data changed since it prepared: start a cold worker instead

REASON_COMPLETED = "completed"
REASON_INTERRUPTED = "interrupted"
REASON_OOM = "oom"
REASON_DISK_LOW = "disk_low"
REASON_CONFIG_ERROR = "config_error"
REASON_INCOMPATIBLE = "incompatible_checkpoint"
REASON_DATA_ERROR = "data_error"
REASON_CRASH = "crash"
REASON_STANDBY_STALE = "standby_stale"

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

    ``durable`` also fsyncs the directory so the rename survives a power loss; the
    heartbeat skips that (it is rewritten every second anyway).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
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


def newest_checkpoint_step(output_dir: str | os.PathLike[str]) -> int:
    """Step of the newest ``checkpoint-N`` folder, -1 if none (the worker decides which one is good)."""
    best = -1
    try:
        for entry in os.scandir(output_dir):
            if entry.name.startswith("checkpoint-") and entry.is_dir():
                tail = entry.name[len("checkpoint-") :]
                if tail.isdigit():
                    best = max(best, int(tail))
    except OSError:
        pass
    return best


def standby_announcement(output_dir: str | os.PathLike[str], pid: int) -> Path:
    """Where a standby worker says it is ready (written by the worker, read by the supervisor)."""
    return run_dir(output_dir) / f"standby-{pid}.json"
