"""Never two writers on one run: the worker's side of :mod:`supervisor.runlock`.

A worker launched by a supervisor takes the worker lock (its supervisor holds
the run lock); a ``vit-train`` started by hand is its own driver and takes
both; a standby takes them only after its go. All of it happens before the
worker touches anything in the output directory, so a refused process
deletes nothing (no staging clean-up, no heartbeat, no report in the run).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from supervisor import protocol, runlock
from supervisor.schema import Config
from worker import fault

log = logging.getLogger("vit_train")


class StoppedWhileWaitingForLock(Exception):
    """A stop arrived while waiting for a previous worker to let go of the run."""


LOCK_SETTLE_S = 10.0
"""How long a worker waits for a lock holder whose heartbeat does not (yet) say it is finishing:
an orphan that just lost its supervisor reports "stopping" only at the end of its current step."""


def take(cfg: Config, stop: Any) -> list[runlock.RunLock]:
    """Take the run's locks before anything is touched; [] on ranks that do not take them.

    A worker launched by a supervisor takes the worker lock (its supervisor holds the run
    lock); a ``vit-train`` started by hand is its own driver and takes both. Under torchrun
    the first rank of each node takes them for the node.
    """
    if os.environ.get("LOCAL_RANK", "0") not in ("", "0"):
        return []
    raw = os.environ.get("GROUP_RANK", "")  # torchrun's node rank
    node = int(raw) if raw.isdigit() else cfg.node_rank
    locks: list[runlock.RunLock] = []
    try:
        if not os.environ.get(protocol.ENV_SUPERVISOR_PID):
            locks.append(runlock.acquire(cfg.output_dir, "run", node))
        locks.append(_worker_lock(cfg, node, stop))
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks


def _worker_lock(cfg: Config, node: int, stop: Any) -> runlock.RunLock:
    """The worker lock, waiting up to ``supervisor.term_grace_s`` for a previous worker that is
    finishing its last save (the orphan of a supervisor that died)."""
    start = time.monotonic()
    announced = False
    while True:
        try:
            return runlock.acquire(cfg.output_dir, "worker", node)
        except runlock.LockHeld as exc:
            waited = time.monotonic() - start
            finishing = _holder_is_finishing(cfg.output_dir, exc.pid)
            if waited >= cfg.supervisor.term_grace_s or (not finishing and waited >= LOCK_SETTLE_S):
                raise
            if stop.requested:
                raise StoppedWhileWaitingForLock(
                    f"stopped while waiting for the previous worker (pid {exc.pid}) to finish; nothing was trained"
                ) from None
            if not announced:
                log.warning(
                    "Another worker (pid %s) still holds %s; waiting up to %.0fs for it to finish saving",
                    exc.pid,
                    cfg.output_dir,
                    cfg.supervisor.term_grace_s,
                )
                announced = True
            time.sleep(0.2)


def _holder_is_finishing(output_dir: Path, pid: int | None) -> bool:
    hb = protocol.read_record(protocol.Heartbeat, protocol.heartbeat_path(output_dir))
    if hb is None or (pid is not None and hb.pid != pid):
        return False
    return hb.state in (protocol.HB_SAVING, protocol.HB_STOPPING, protocol.HB_EXITED)


def refused(exc: Exception) -> int:
    """Another process owns the run: say so in one line and leave every file of the run alone.

    The exit report goes only to a path this process was given ($VIT_EXIT_REPORT): the
    run's default report belongs to the process that holds the run.
    """
    stopped = isinstance(exc, StoppedWhileWaitingForLock)
    reason = protocol.REASON_INTERRUPTED if stopped else protocol.REASON_CONFIG_ERROR
    log.error("%s", exc)
    if os.environ.get(protocol.ENV_EXIT_REPORT):
        return fault.write_exit_report(None, reason, str(exc))
    return protocol.EXIT_CODES[reason]
