"""End to end: what a running supervisor does with each signal, and with its output directory deleted.

Real supervisor, real worker, real signals. One test at a time (they train).
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import finish, wait_for
from tests.pacing import pacing_env

pytestmark = pytest.mark.e2e

LONGER = {"training": {"num_train_epochs": 40}, "supervisor": {"standby": False}}
PACE_S = 0.2
"""The first two tests' workers sleep this long in each training forward (tests/pacing.py): they only
need a worker that keeps training while signals and deletions come, not its steps."""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_hup_usr1_usr2_are_survived_and_sigquit_stops_gracefully(
    tmp_path: Path, make_config: Any, new_run: Any
) -> None:
    """Bug 8c: these four signals killed a foreground supervisor and left state `running`."""
    run = new_run(make_config(LONGER), **pacing_env(tmp_path, PACE_S))
    sup = run.start()
    run.worker_at_step(3)
    worker = run.state()["worker_pid"]
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        os.kill(sup.pid, sig)
        wait_for(lambda s=sig: f'"signal": "{s.name}"' in run.log(), 30, f"{sig.name} logged")  # type: ignore[misc]
    assert sup.poll() is None and alive(worker) and run.state()["state"] == "running"
    assert '"action": "status"' in run.log() and "ignored" in run.log()
    os.kill(sup.pid, signal.SIGQUIT)
    assert finish(sup, run, timeout=120) == 0, run.log()
    st = run.state()
    assert st["state"] == "stopped" and st["attempts"][0]["reason"] == "stopped"
    assert not alive(worker)


def test_second_start_after_the_output_dir_was_deleted_is_refused(
    tmp_path: Path, make_config: Any, new_run: Any
) -> None:
    """Bug 7: deleting the output directory freed the flock, so a second supervisor ran beside the first."""
    run = new_run(make_config(LONGER), **pacing_env(tmp_path, PACE_S))
    sup = run.start()
    run.worker_at_step(3)
    original = os.stat(run.out).st_ino

    def deleted() -> bool:
        # The live worker keeps writing its heartbeat (recreating run/): retry until the directory went.
        shutil.rmtree(run.out, ignore_errors=True)
        return not run.out.exists() or os.stat(run.out).st_ino != original

    # Frozen while the second start runs: a live first supervisor notices the deletion within a
    # loop turn and ends, which frees its lock; on a loaded machine that can come before the
    # second start has even imported. Frozen, it holds the lock the way a busy one would.
    os.kill(sup.pid, signal.SIGSTOP)
    try:
        wait_for(deleted, 30, "output directory deleted")
        second = run.cli("start", str(run.config))
    finally:
        os.kill(sup.pid, signal.SIGCONT)
    assert second.returncode == 4, second.stdout + second.stderr
    # (The pid cannot be named: it was recorded in the deleted lock file.)
    assert "is already running" in second.stderr
    # The first one notices, stops its worker and ends failed (a restart would train from scratch).
    assert finish(sup, run, timeout=120) == 3, run.log()
    assert "Traceback" not in run.log()
    assert "deleted or replaced" in run.log()


def test_status_shows_the_log_file_of_a_first_detached_run(make_config: Any, new_run: Any, tmp_path: Path) -> None:
    """Bug 2: the --detach log path never reached state.json."""
    run = new_run(make_config(LONGER))
    r = run.cli("start", "--detach", str(run.config))
    assert r.returncode == 0, r.stderr
    sup_pid = run.state()["supervisor_pid"]
    try:
        st = run.cli("status", str(run.config))
        assert f"log:         {run.out / 'run' / 'logs' / 'supervisor.log'}" in st.stdout, st.stdout
    finally:
        run.cli("stop", "--force", str(run.config))
        wait_for(lambda: not alive(sup_pid), 60, "detached supervisor gone")
