"""End to end: the public CLI, the real worker, real signals. Tiny configs; each test well under 60 s."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import finish, read_json, wait_for
from tests.pacing import pacing_env

pytestmark = pytest.mark.e2e

PY = sys.executable
PR_SET_CHILD_SUBREAPER = 36
# ~150 steps: the fault comes at step 10-20; what follows only has to finish. Waits are bounded by
# progress, so a slow machine stretches the run rather than failing it.
LONGER = {"training": {"num_train_epochs": 8}}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_worker_sigkill_is_restarted_from_its_checkpoint_and_completes(
    tmp_path: Path, make_config: Any, new_run: Any
) -> None:
    # A cold restart; the standby's take-over after a SIGKILL is test_standby_e2e.py's first test.
    # Snapshots off: with them the restart resumes from a snapshot newer than any checkpoint
    # (test_snapshot_e2e.py); here the disk checkpoint is the subject.
    run = new_run(make_config({"training": {"num_train_epochs": 10}, "snapshot": {"every_steps": 0}}))
    sup = run.start()
    run.worker_at_step(20)
    victim = run.state()["worker_pid"]
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    resume_from = max(int(p.name.split("-")[1]) for p in run.out.glob("checkpoint-*"))
    hb = run.worker_at_step(resume_from, attempt=2)
    first_new_step = time.time()
    restart_s = first_new_step - killed_at
    print(
        f"\nworker SIGKILL -> restarted worker's first new step: {restart_s:.2f}s "
        f"(heartbeat time {hb['time'] - killed_at:.2f}s after the kill; resumed from step {resume_from})"
    )
    assert finish(sup, run) == 0, run.log()
    st = run.state()
    assert st["state"] == "completed" and st["restart_count"] == 1
    first, second = st["attempts"]
    assert first["reason"] == "crash" and first["exit"] == "killed by SIGKILL" and first["pid"] == victim
    assert "SIGKILL" in first["message"] and "-9" not in first["message"]
    assert second["step_start"] == resume_from and second["reason"] == "completed"
    assert second["standby"] is False and second["standby_fallback"] is None
    assert Path(first["log"]).name == "attempt-1.log" and Path(second["log"]).exists()
    r = run.cli("status", str(run.config))
    assert r.returncode == 3 and "completed" in r.stdout and "attempt 1: crash (killed by SIGKILL)" in r.stdout


def test_hung_worker_is_detected_killed_and_restarted(tmp_path: Path, make_config: Any, new_run: Any) -> None:
    run = new_run(make_config({**LONGER, "supervisor": {"hang_timeout_s": 2, "term_grace_s": 2}}))
    sup = run.start()
    run.worker_at_step(10)
    frozen = run.state()["worker_pid"]
    os.kill(frozen, signal.SIGSTOP)  # alive, silent: a hung collective looks like this
    try:
        run.worker_at_step(0, attempt=2)
        assert gone(frozen)
        assert finish(sup, run) == 0, run.log()
    finally:
        if not gone(frozen):
            os.kill(frozen, signal.SIGKILL)
    first = run.state()["attempts"][0]
    assert first["reason"] == "hang" and first["exit"] == "killed by SIGKILL"
    assert '"event": "hang"' in run.log() and "hang_timeout_s 2" in run.log()


def test_ctrl_c_checkpoints_and_stops_then_start_resumes_to_completion(
    tmp_path: Path, make_config: Any, new_run: Any
) -> None:
    run = new_run(make_config(LONGER))
    sup = run.start()
    run.worker_at_step(10)
    worker = run.state()["worker_pid"]
    sup.send_signal(signal.SIGINT)  # what Ctrl+C in the terminal delivers
    assert finish(sup, run) == 0, run.log()
    st = run.state()
    assert st["state"] == "stopped" and gone(worker)
    first = st["attempts"][0]
    assert first["reason"] == "stopped" and first["exit"] == "exit 3 (interrupted)"
    assert (run.out / f"checkpoint-{first['step_reached']}").is_dir()  # saved at the step it stopped on
    assert len(st["attempts"]) == 1  # nothing restarted
    again = run.start()
    assert finish(again, run) == 0, run.log()
    st = run.state()
    assert st["state"] == "completed" and st["attempts"][1]["step_start"] == first["step_reached"]


def test_detach_status_and_stop_commands_and_a_second_start_is_refused(
    tmp_path: Path, make_config: Any, new_run: Any
) -> None:
    # Paced (tests/pacing.py): the commands need a worker that keeps training, not its 1140 steps.
    run = new_run(make_config({"training": {"num_train_epochs": 60}}), **pacing_env(tmp_path, 0.2))
    r = run.cli("start", "--detach", str(run.config))
    assert r.returncode == 0, r.stderr
    assert "supervisor.log" in r.stdout and "attempt-N.log" in r.stdout
    sup_pid = run.state()["supervisor_pid"]
    try:
        second = run.cli("start", str(run.config))
        assert second.returncode == 4 and f"(pid {sup_pid}) is already running" in second.stderr
        run.worker_at_step(5)
        st = run.cli("status", str(run.config))
        assert st.returncode == 0 and "state:       running" in st.stdout and "progress:" in st.stdout
        listing = run.cli("status")
        assert listing.returncode == 0 and str(run.out) in listing.stdout
        stop = run.cli("stop", str(run.config))
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert "stopped at step" in stop.stdout
        assert run.cli("status", str(run.config)).returncode == 3
        assert (run.out / "run" / "logs" / "supervisor.log").read_text().count('"event": "state"') >= 3
    finally:
        if not gone(sup_pid):
            os.kill(sup_pid, signal.SIGKILL)


def test_crash_loop_gives_up_with_the_last_error(tmp_path: Path, make_config: Any, new_run: Any) -> None:
    run = new_run(make_config({"supervisor": {"max_failures_without_progress": 3, "backoff_initial_s": 0.1}}))
    sup = run.start()
    killed: list[int] = []

    def killer() -> None:  # every new worker dies before its first step: a real crash loop
        while sup.poll() is None:
            pid = run.state().get("worker_pid")
            if pid and pid not in killed:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                killed.append(pid)
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    assert finish(sup, run, timeout=30) == 3, run.log()
    t.join(5)
    st = run.state()
    assert st["state"] == "failed" and len(st["attempts"]) == 3 == len(killed)
    assert "gave up after 3 consecutive attempts without training progress" in st["last_error"]
    assert "SIGKILL" in st["last_error"]
    r = run.cli("status", str(run.config))
    assert r.returncode == 3 and "gave up" in r.stdout


def test_incompatible_checkpoint_fails_at_once_without_restart(tmp_path: Path, make_config: Any, new_run: Any) -> None:
    run = new_run(make_config({"training": {"num_train_epochs": 1}}))
    assert finish(run.start(), run) == 0, run.log()
    run.config = make_config({"training": {"num_train_epochs": 1}, "data": {"random_seed": 8}}, name="changed.yaml")
    assert finish(run.start(), run) == 3, run.log()
    st = run.state()
    assert st["state"] == "failed" and len(st["attempts"]) == 2
    assert st["attempts"][1]["reason"] == "user_error" and "random_seed" in st["last_error"]


def test_supervisor_sigkill_worker_stops_itself_and_next_start_recovers(
    tmp_path: Path, make_config: Any, new_run: Any
) -> None:
    # The orphaned worker is adopted by the nearest subreaper. Make that this test (as systemd or a
    # real init would be); this sandbox's pid 1 kills the orphans it adopts, which is no test of ours.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        run = new_run(make_config({"training": {"num_train_epochs": 10}}))
        sup = run.start()
        run.worker_at_step(10)
        orphan = run.state()["worker_pid"]
        sup.kill()  # SIGKILL: no handler, no cleanup
        sup.wait()
        again = run.start()  # at once, while the orphan may still be saving: must not start a second worker
        wait_for(lambda: gone(orphan), 30, "the orphaned worker to stop itself")
        _, status = os.waitpid(orphan, 0)  # adopted by us: reap it and see how it ended
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3  # interrupted: checkpoint committed
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    report = read_json(run.out / "run" / "exit-1.json")
    assert report and report["reason"] == "interrupted"  # a safe stop with a checkpoint, not a crash
    assert finish(again, run) == 0, run.log()
    st = run.state()
    assert st["state"] == "completed"
    first, second = st["attempts"]
    assert first["reason"] == "supervisor_died"
    assert second["start"] >= report["time"] - 0.5  # the new worker started only after the old one was done
    assert second["step_start"] >= report["step"]


def test_real_allocator_oom_lowers_batch_keeps_effective_batch_and_completes(
    tmp_path: Path, make_config: Any, new_run: Any
) -> None:
    # A wider model on 16x16 images: batch 128 needs more than 48 MiB of headroom, batch 64 fits.
    cfg = make_config(
        {
            "model": {"scratch": {"image_size": 16, "hidden_size": 64, "intermediate_size": 128}},
            "training": {"num_train_epochs": 1, "per_device_train_batch_size": 128, "per_device_eval_batch_size": 16},
        }
    )
    run = new_run(cfg, VIT_MEMORY_HEADROOM_MB="48")
    assert finish(run.start(), run, timeout=55) == 0, run.log()
    st = run.state()
    assert st["state"] == "completed"
    first, last = st["attempts"][0], st["attempts"][-1]
    assert first["reason"] == "oom" and "can't allocate memory" in first["message"]
    assert (first["per_device_train_batch_size"], first["gradient_accumulation_steps"]) == (128, 1)
    assert last["per_device_train_batch_size"] < 128
    assert last["per_device_train_batch_size"] * last["gradient_accumulation_steps"] == 128
    assert (st["per_device_train_batch_size"], st["gradient_accumulation_steps"]) == (
        last["per_device_train_batch_size"],
        last["gradient_accumulation_steps"],
    )
