"""A standby that got its go is that attempt's worker; one that is stopped while preparing exits
at once and never outlives its supervisor (issue 11, bug 4)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from supervisor import protocol
from tests.conftest import PYTHON, REPO, TINY, deep_update, wait_for, worker_env

pytestmark = pytest.mark.e2e


def catches(pid: int, sig: int) -> bool:
    """Whether ``pid`` has a handler installed for ``sig`` (so a signal now is a request, not a kill)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(mask & (1 << (sig - 1)))


def config(tmp_path: Path) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(deep_update(TINY, {"training": {"num_train_epochs": 40}})))
    return cfg


def standby(cfg: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PYTHON, "-m", "worker", str(cfg), "--standby"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=worker_env(**env),
        cwd=REPO,
        start_new_session=True,
    )


def go(tmp_path: Path, attempt: int = 2) -> tuple[str, Path]:
    report = tmp_path / f"exit-{attempt}.json"
    order = protocol.LaunchOrder(
        attempt=attempt,
        exit_report=str(report),
        supervisor_pid=os.getpid(),
        per_device_train_batch_size=16,
        gradient_accumulation_steps=1,
    )
    return order.to_line() + "\n", report


def ready(out: Path, pid: int) -> bool:
    return protocol.standby_announcement(out, pid).exists()


def finish(p: subprocess.Popen[bytes], timeout: float = 120) -> tuple[int, str]:
    if p.stdin is not None and p.stdin.closed:
        p.stdin = None  # communicate() would flush it
    log, _ = p.communicate(timeout=timeout)
    return p.returncode, log.decode(errors="replace")


@pytest.mark.parametrize("when", ["preparing", "waiting"])
def test_a_stop_after_the_go_is_an_interrupted_attempt_with_its_exit_report(tmp_path: Path, when: str) -> None:
    cfg = config(tmp_path)
    p = standby(cfg)
    assert p.stdin is not None
    wait_for(lambda: catches(p.pid, signal.SIGTERM), 60, "the standby's signal handlers")
    if when == "waiting":
        wait_for(lambda: ready(tmp_path / "out", p.pid), 120, "the standby to be ready")
    line, report_path = go(tmp_path)
    p.stdin.write(line.encode())
    p.stdin.close()
    os.kill(p.pid, signal.SIGTERM)
    code, log = finish(p)
    assert code == protocol.EXIT_INTERRUPTED, log[-3000:]
    report: Any = json.loads(report_path.read_text())
    assert report["reason"] == "interrupted" and report["attempt"] == 2, report
    assert "Standby not needed" not in log


def test_eof_without_a_go_means_not_needed_exit_0_and_no_report(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    p = standby(cfg)
    assert p.stdin is not None
    wait_for(lambda: ready(tmp_path / "out", p.pid), 120, "the standby to be ready")
    p.stdin.close()
    code, log = finish(p)
    assert code == 0, log[-3000:]
    assert not list((tmp_path / "out" / "run").glob("exit*.json"))


def test_a_stop_while_preparing_exits_at_once_without_finishing_preparation(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    p = standby(cfg)
    wait_for(lambda: catches(p.pid, signal.SIGTERM), 60, "the standby's signal handlers")
    os.kill(p.pid, signal.SIGTERM)
    code, log = finish(p, timeout=60)
    assert code != 0 and "Standby ready" not in log, log[-3000:]
    assert not list((tmp_path / "out" / "run").glob("exit*.json")) if (tmp_path / "out").exists() else True


def test_a_malformed_go_is_a_crash_report_not_a_traceback(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    report_path = tmp_path / "exit-9.json"
    p = standby(cfg, VIT_EXIT_REPORT=str(report_path))
    assert p.stdin is not None
    wait_for(lambda: ready(tmp_path / "out", p.pid), 120, "the standby to be ready")
    p.stdin.write(b'{"attempt": "four"}\n')
    p.stdin.close()
    code, log = finish(p)
    assert code == protocol.EXIT_CRASH, log[-3000:]
    assert "Traceback" not in log
    report = json.loads(report_path.read_text())
    assert report["reason"] == "crash" and "malformed go" in report["message"]


def test_a_standby_never_outlives_its_supervisor_even_while_preparing(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    log = tmp_path / "standby.log"
    # A stand-in supervisor: starts the standby as its child, says its pid, then waits to be killed.
    parent = subprocess.Popen(
        [
            PYTHON,
            "-c",
            "import os, subprocess, sys, time\n"
            "env = dict(os.environ, VIT_SUPERVISOR_PID=str(os.getpid()))\n"
            f"c = subprocess.Popen([sys.executable, '-m', 'worker', {str(cfg)!r}, '--standby'],"
            f" stdin=subprocess.PIPE, stdout=open({str(log)!r}, 'w'), stderr=subprocess.STDOUT, env=env)\n"
            "print(c.pid, flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=worker_env(),
        cwd=REPO,
        start_new_session=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        wait_for(lambda: catches(child, signal.SIGUSR1), 60, "the standby to arm its parent-death signal")
        # Frozen from here until its parent is dead, so the death signal lands in the middle of the
        # preparation (a few seconds of imports) however slowly this test process is scheduled.
        os.kill(child, signal.SIGSTOP)
        parent.kill()
        parent.wait()
        os.kill(child, signal.SIGCONT)
        t0 = time.monotonic()
        wait_for(lambda: not _alive(child), 30, "the orphaned standby to exit")
        assert time.monotonic() - t0 < 30
        assert "Standby ready" not in log.read_text(), log.read_text()[-3000:]
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
            os.kill(child, signal.SIGCONT)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_standby_that_cannot_prepare_reports_to_the_go_it_already_got(tmp_path: Path) -> None:
    from tests.test_worker_e2e import _digit_pngs

    _digit_pngs(tmp_path / "images", per_class=4)
    cfg = tmp_path / "c.yaml"
    over = {"data": {"source": "image_folder", "path": "images", "limit": None}, "model": {"num_labels": 5}}
    cfg.write_text(yaml.safe_dump(deep_update(TINY, over)))
    p = standby(cfg)
    assert p.stdin is not None
    line, report_path = go(tmp_path)
    p.stdin.write(line.encode())  # the go reaches it while it is still preparing
    p.stdin.close()
    code, log = finish(p)
    assert code == 2, log[-3000:]
    report = json.loads(report_path.read_text())
    assert report["reason"] == "data_error" and "num_labels" in report["message"]


def test_a_standby_whose_stdin_is_dev_null_is_simply_not_needed(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    p = subprocess.run(
        [PYTHON, "-m", "worker", str(cfg), "--standby"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        # Nice 10 instead of SCHED_IDLE: the point is the EOF; at SCHED_IDLE a busy machine's other
        # work would hold the standby's preparation back for minutes.
        env=worker_env(VIT_STANDBY_PRIORITY="nice"),
        cwd=REPO,
        timeout=120,
    )
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "Standby not needed" in p.stderr
