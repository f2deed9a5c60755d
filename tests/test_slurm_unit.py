"""SLURM awareness without SLURM: the environment, the requeue decision and command, the supervisor
loop's handling of the time-limit signal (fake OS), ``status`` of a run on another host, and the
worker's one-request rule for a stop signal delivered twice."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from supervisor import protocol, record, runlock, slurm, status
from supervisor.daemon import SUPERVISOR_OK, SUPERVISOR_REQUEUE_NEEDED, Supervisor
from supervisor.record import RunRecord
from supervisor.states import State
from tests.test_state_machine import FakeChild, FakeOS, RecordingLog, completes, make_cfg, script_of

JOB = slurm.SlurmJob(job_id="4242", restart_count=0)
TASK = slurm.SlurmJob(job_id="4250", array_job_id="4242", array_task_id="3", restart_count=2)

# ----------------------------------------------------------------------------- the environment


def test_no_job_id_means_not_under_slurm() -> None:
    assert slurm.from_env({}) is None
    assert slurm.from_env({"SLURM_JOB_ID": "", "SLURM_RESTART_COUNT": "1"}) is None
    assert slurm.from_env({"SLURM_JOB_ID": "12; rm -rf /"}) is None


def test_plain_job_reads_its_id_restart_count_and_node() -> None:
    job = slurm.from_env(
        {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "3", "SLURMD_NODENAME": "gpu07", "SLURM_CLUSTER_NAME": "c"}
    )
    assert job == slurm.SlurmJob(job_id="77", restart_count=3, node="gpu07", cluster="c")
    assert job.requeue_id == "77" and job.describe() == "job 77, restart 3"
    assert slurm.from_env({"SLURM_JOBID": "78"}) == slurm.SlurmJob(job_id="78")  # the older spelling


def test_array_task_requeues_by_array_and_task_id() -> None:
    job = slurm.from_env({"SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "3"})
    assert job is not None and job.requeue_id == "4242_3"
    assert job.describe() == "job 4242_3 (id 4250)"


@pytest.mark.parametrize(
    "env",
    [
        {"SLURM_ARRAY_JOB_ID": "4242"},  # no task id
        {"SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "x"},
        {"SLURM_ARRAY_TASK_ID": "3"},
    ],
)
def test_half_an_array_id_falls_back_to_the_job_id(env: dict[str, str]) -> None:
    job = slurm.from_env({"SLURM_JOB_ID": "4250", **env})
    assert job is not None and job.requeue_id == "4250"


def test_malformed_counts_read_as_zero() -> None:
    job = slurm.from_env({"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "-1", "SLURM_PROCID": "two"})
    assert job is not None and (job.restart_count, job.proc_id) == (0, 0)


# ----------------------------------------------------------------------------- the requeue decision


@pytest.mark.parametrize(
    ("job", "signalled", "final", "expected"),
    [
        (JOB, True, "stopped", True),
        (TASK, True, "stopped", True),
        (JOB, False, "stopped", False),  # scancel / SIGTERM
        (JOB, True, "completed", False),  # finished before the stop took effect
        (JOB, True, "failed", False),  # would only fail again
        (None, True, "stopped", False),  # not under SLURM
        (slurm.SlurmJob(job_id="9", proc_id=1), True, "stopped", False),  # another node's supervisor
    ],
)
def test_requeue_only_after_the_signal_for_a_stopped_run_from_task_0(
    job: slurm.SlurmJob | None, signalled: bool, final: str, expected: bool
) -> None:
    assert slurm.should_requeue(job, signalled=signalled, final_state=final) is expected


def test_requeue_runs_scontrol_with_the_array_task_id() -> None:
    calls: list[list[str]] = []

    def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    result = slurm.requeue(TASK, which=lambda name: f"/usr/bin/{name}", run=run)
    assert result.ok and len(calls) == 1 and calls[0][-3:] == ["/usr/bin/scontrol", "requeue", "4242_3"]


def test_scontrol_outlives_the_sigterm_its_own_requeue_brings(tmp_path: Path) -> None:
    """The requeue ends the allocation and SLURM SIGTERMs every process of the job, scontrol too,
    sometimes before it exits with its answer: it runs with SIGTERM ignored (a stand-in scontrol that
    gets SIGTERM in the middle of its work, as the real one did, must still answer 0)."""
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\nkill -TERM $$\necho "$@" > "$0.args"\n')
    fake.chmod(0o755)
    result = slurm.requeue(TASK, which=lambda name: str(fake))
    assert result.ok, result.message
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242_3"]


def test_no_scontrol_says_so_and_names_the_exit_code() -> None:
    result = slurm.requeue(JOB, which=lambda name: None)
    assert not result.ok
    assert "scontrol is not on PATH" in result.message and "RequeueExit=75" in result.message
    assert "scontrol requeue 4242" in result.message


def test_a_refused_or_slow_requeue_is_reported_not_raised() -> None:
    def refused(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 1, "", "scontrol: error: Requested operation is presently disabled\n")

    def slow(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(argv, kw["timeout"])

    result = slurm.requeue(JOB, which=lambda name: "scontrol", run=refused)
    assert not result.ok and "presently disabled" in result.message and "--requeue" in result.message
    result = slurm.requeue(JOB, which=lambda name: "scontrol", run=slow, timeout=3)
    assert not result.ok and "timed out after 3s" in result.message


# ----------------------------------------------------------------------------- the supervisor loop


def _supervise(
    tmp_path: Path,
    signals: list[int],
    job: slurm.SlurmJob | None,
    *,
    requeue_ok: bool = True,
    finishes_first: bool = False,
    **cfg_over: Any,
) -> tuple[Supervisor, FakeOS, list[slurm.SlurmJob], int]:
    holder: dict[str, Supervisor] = {}
    asked: list[slurm.SlurmJob] = []

    def trains(fake: FakeOS, child: FakeChild) -> None:
        fake.at(2, lambda: fake.heartbeat(child, 20))
        for i, sig in enumerate(signals):
            fake.at(3 + i, lambda sig=sig: holder["sup"].on_signal(sig))
        if finishes_first:
            completes(fake, child)

    def requeuer(j: slurm.SlurmJob) -> slurm.RequeueResult:
        asked.append(j)
        return slurm.RequeueResult(requeue_ok, "requeued" if requeue_ok else "scontrol is not on PATH")

    cfg = make_cfg(tmp_path)
    if cfg_over:
        cfg.slurm.requeue_signal = cfg_over["requeue_signal"]
    fake = FakeOS(Path(cfg.training.output_dir), script_of(trains))
    sup = holder["sup"] = Supervisor(cfg, fake, log=RecordingLog(), slurm_job=job, requeuer=requeuer)
    return sup, fake, asked, sup.run()


def _state(sup: Supervisor) -> RunRecord:
    rec = record.load(sup.out)
    assert rec is not None
    return rec


def test_slurm_signal_stops_the_worker_then_requeues_and_exits_0(tmp_path: Path) -> None:
    sup, fake, asked, code = _supervise(tmp_path, [signal.SIGUSR1], JOB)
    assert code == SUPERVISOR_OK and sup.state == State.STOPPED
    assert [s for s, _, _ in fake.children[0].signals] == [signal.SIGTERM]  # the usual safe stop
    assert asked == [JOB]
    rec = _state(sup)
    assert rec.slurm_requeued and rec.slurm == JOB and rec.host == socket.gethostname()
    assert "requeued" in (rec.state_reason or "")


def test_slurm_signal_without_a_requeue_exits_75(tmp_path: Path) -> None:
    sup, _, asked, code = _supervise(tmp_path, [signal.SIGUSR1], JOB, requeue_ok=False)
    assert code == SUPERVISOR_REQUEUE_NEEDED == 75 and asked == [JOB]
    rec = _state(sup)
    assert rec.state == "stopped" and not rec.slurm_requeued
    assert "scontrol is not on PATH" in (rec.state_reason or "")


def test_sigterm_under_slurm_stops_without_requeue(tmp_path: Path) -> None:
    sup, _, asked, code = _supervise(tmp_path, [signal.SIGTERM], JOB)
    assert code == SUPERVISOR_OK and sup.state == State.STOPPED and asked == []


def test_a_scancel_before_the_signal_wins_and_a_repeated_signal_does_not_force(tmp_path: Path) -> None:
    _, fake, asked, _ = _supervise(tmp_path, [signal.SIGTERM, signal.SIGUSR1], JOB)
    assert asked == [] and [s for s, _, _ in fake.children[0].signals] == [signal.SIGTERM]
    _, fake, asked, _ = _supervise(tmp_path / "again", [signal.SIGUSR1, signal.SIGUSR1], JOB)
    assert asked == [JOB] and [s for s, _, _ in fake.children[0].signals] == [signal.SIGTERM]


def test_a_run_that_completes_is_not_requeued(tmp_path: Path) -> None:
    sup, _, asked, code = _supervise(tmp_path, [], JOB, finishes_first=True)
    assert code == SUPERVISOR_OK and sup.state == State.COMPLETED and asked == []


def test_outside_slurm_sigusr1_only_logs_status(tmp_path: Path) -> None:
    sup, fake, asked, _ = _supervise(tmp_path, [signal.SIGUSR1], None, finishes_first=True)
    assert sup.state == State.COMPLETED and asked == [] and fake.children[0].signals == []
    assert _state(sup).slurm is None


def test_the_requeue_signal_can_be_sigusr2(tmp_path: Path) -> None:
    sup, _, asked, _ = _supervise(tmp_path, [signal.SIGUSR1], JOB, finishes_first=True, requeue_signal="USR2")
    assert sup.state == State.COMPLETED and asked == []  # USR1 is a status signal now
    sup, _, asked, _ = _supervise(tmp_path / "b", [signal.SIGUSR2], JOB, requeue_signal="USR2")
    assert sup.state == State.STOPPED and asked == [JOB]


# ----------------------------------------------------------------------------- status from another host


def _write_state(out: Path, **fields: Any) -> None:
    rec = RunRecord(state="running", supervisor_pid=999_999_99, supervisor_create_time=1.0, **fields)
    record.save(out, 0, rec)
    hb = protocol.Heartbeat(pid=1, state="training", global_step=7, max_steps=38, time=1.0)
    protocol.atomic_write_json(protocol.heartbeat_path(out), protocol.record_dict(hb), durable=False)


def test_status_trusts_a_supervisor_on_another_host_and_shows_its_job(tmp_path: Path) -> None:
    _write_state(tmp_path, host="gpu-node-17", slurm=TASK)
    v = status.view(tmp_path)
    assert v["running"] and v["status_code"] == status.STATUS_RUNNING and v["supervisor_alive"] is None
    assert v["note"].startswith("running on gpu-node-17 (not checked from here); heartbeat ")
    text = status.render(v)
    assert "running on gpu-node-17 (not checked from here)" in text and "warning:" not in text
    assert "slurm:       job 4242_3 (id 4250), restart 2" in text


def test_status_on_the_same_host_still_calls_a_dead_supervisor_dead(tmp_path: Path) -> None:
    _write_state(tmp_path, host=socket.gethostname())
    v = status.view(tmp_path)
    assert not v["running"] and v["note"] == "supervisor not running (pid 99999999 died)"
    assert "warning:" in status.render(v)


def test_lock_message_names_the_holders_host(tmp_path: Path) -> None:
    lock = runlock.acquire(tmp_path, "run")
    try:
        path = runlock.lock_dir(tmp_path) / "supervisor.lock"
        assert path.read_text().split() == [str(os.getpid()), socket.gethostname()]
        path.write_text("4321 login-node-2\n")
        with pytest.raises(runlock.LockHeld, match=r"pid 4321 on host login-node-2"):
            runlock.acquire(tmp_path, "run")
        path.write_text("4321\n")  # written by an older version
        with pytest.raises(runlock.LockHeld, match=r"\(pid 4321\)"):
            runlock.acquire(tmp_path, "run")
    finally:
        lock.release()


# ----------------------------------------------------------------------------- the worker


def test_the_same_stop_signal_twice_before_the_step_end_is_one_request(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import fault

    killed: list[int] = []
    monkeypatch.setattr(fault.os, "kill", lambda pid, sig: killed.append(sig))
    monkeypatch.setattr(fault.signal, "signal", lambda sig, handler: None)
    stop = fault.StopRequest()
    stop._handle(signal.SIGTERM, None)  # SLURM's, to every process of the job
    stop._handle(signal.SIGTERM, None)  # the supervisor's, a moment later
    assert stop.requested and killed == []
    stop.take()  # the step ended: the worker saves now
    stop._handle(signal.SIGTERM, None)  # a real second request forces
    assert killed == [signal.SIGTERM]
    other = fault.StopRequest()
    other._handle(signal.SIGTERM, None)
    other._handle(signal.SIGINT, None)  # a different signal is a second request, as before
    assert killed == [signal.SIGTERM, signal.SIGINT]


def test_stop_from_another_host_points_at_the_host_and_the_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from supervisor import cli

    _write_state(tmp_path, host="gpu-node-17", slurm=TASK)
    assert cli.main(["stop", "--run-dir", str(tmp_path)]) == 1
    assert "the supervisor runs on gpu-node-17: stop it there, or `scancel 4242_3`" in capsys.readouterr().err
