"""A 2-"node" torchrun job placed by a real SLURM (tests/slurm_cluster.py), cut by its time limit and requeued.

One job from the shipped multi-node template (systemd/vit-supervisor-multinode.sbatch), with two
tasks on this one machine: ``srun`` starts one ``vit-supervisor start`` per task, each a torchrun
"node" of one CPU rank (gloo) with ``distributed.from_slurm: true``: the node rank comes from
SLURM_PROCID (both tasks have SLURM_NODEID 0), the rendezvous from the node list. SLURM's
time-limit signal (``--signal=USR1@60``, no ``B:``) reaches every process of the step; both
supervisors stop their ranks at the same step, node 0 requeues the job, and the next allocation
resumes both nodes and completes. The final weights must equal an uninterrupted 2-rank run's, bit
for bit.

Timing the cut. SLURM checks time limits every 30 s and sends the signal at the first check where
the time left is at most N + 30 s (measured on SLURM 22.05: ``--time=2 --signal=USR1@20`` signals
95-98 s in, ``--time=1 --signal=USR1@20`` 11-26 s in). So the job starts with a 10-minute limit and,
once both nodes train, the test lowers it to leave 30-90 s: the signal comes at the next check,
mid-training, and the kill no earlier than 30 s after it. The first allocation is paced (a
sitecustomize sleeps in each training forward while ``SLURM_RESTART_COUNT`` is 0; sleeping changes
no number) so that training outlasts that wait; while the requeued job waits to start again (about
11 s with the fixture's credential lifetime), the test raises the limit again. It takes 100-145 s on
this 2-core machine at load 4-8, most of it waiting: the reference run trains meanwhile (from the
first paced steps on, so that it does not slow the job's start).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.common import TINY, deep_update, run_progress
from supervisor.protocol import read_json
from tests.conftest import PYTHON, REPO, tail, wait_exit, wait_for, worker_env
from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401 - the fixture
from tests.test_worker_e2e import max_abs_diff

pytestmark = pytest.mark.e2e

TEMPLATE = REPO / "systemd" / "vit-supervisor-multinode.sbatch"
PACE_S = 3.0
"""Seconds of sleep per training step in the first allocation: 18 steps after step 2 take 54 s, past the
next time-limit check (at most 30 s after the limit is lowered)."""
ON_ONE_MACHINE = ("--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1")
"""The template's one task per node, as two tasks on this machine's one node."""
LIMIT = ("--time=10", "--signal=USR1@60")
"""No signal before the test lowers the limit (SLURM signals when at most 60 + 30 s are left)."""
CUT_AT_STEP = 2
"""Lower the limit once node 0's heartbeat is past this step (both nodes train in lockstep)."""
TORCHRUN_2 = (
    PYTHON,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node=2",
    "--max-restarts=0",
    "-m",
    "worker",
)
"""The reference: 2 ranks on one node, no SLURM, no supervisor."""
STEPS = 20
"""2 ranks x 16 samples per step over 300 training images, 2 epochs."""
FINAL = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"})
STALL_S = 150.0
"""Nothing moved (SLURM's job state, the heartbeat, either node's state.json) for this long: stuck."""

TWO_NODES = {
    "launcher": "torchrun",
    "distributed": {"from_slurm": True},  # nproc_per_node 1: the config's (no GPUs in SLURM)
    "training": {"num_train_epochs": 2, "save_steps": 5},
    "supervisor": {"standby": False, "startup_timeout_s": 120},
}


def _config(d: Path, overrides: dict[str, Any]) -> Path:
    raw = deep_update(TINY, {"training": {"output_dir": str(d / "out")}, "snapshot": {"root": str(d / "shm")}})
    d.mkdir(parents=True, exist_ok=True)
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(deep_update(raw, overrides), sort_keys=False))
    return path


def _reference(d: Path) -> subprocess.Popen[bytes]:
    """The uninterrupted 2-rank run (torchrun on one node, no SLURM), in the background."""
    cfg = _config(d, {"launcher": "torchrun", "distributed": {"nproc_per_node": 2}, "training": TWO_NODES["training"]})
    with open(d / "torchrun.log", "wb") as log:
        return subprocess.Popen(
            [*TORCHRUN_2, str(cfg)],
            cwd=REPO,
            env=worker_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _seconds(runtime: str) -> int:
    """``scontrol``'s ``RunTime`` ([D-]HH:MM:SS) in seconds."""
    days, _, hms = runtime.rpartition("-")
    h, m, sec = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + sec


def _state(out: Path, node: int) -> dict[str, Any]:
    return read_json(out / "run" / ("state.json" if node == 0 else f"node-{node}/state.json")) or {}


@pytest.fixture
def refs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Background reference runs; a failed test must not leave one training behind."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # its own session: torchrun and its ranks
            p.wait()


def _leading_json(line: str) -> dict[str, Any] | None:
    """The JSON object a log line starts with (anything after it ignored), or None."""
    if not line.startswith("{"):
        return None
    try:
        obj = json.JSONDecoder().raw_decode(line)[0]
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def test_two_node_torchrun_job_is_cut_by_the_time_limit_requeued_and_resumes_bit_identical(
    slurm_cluster: SlurmCluster,  # noqa: F811 - the fixture
    refs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    env = slurm_cluster.job_env(tmp_path, PACE_S)
    cfg = _config(tmp_path / "job", TWO_NODES)
    out = tmp_path / "job" / "out"
    job = slurm_cluster.sbatch(
        TEMPLATE,
        *ON_ONE_MACHINE,
        *LIMIT,
        f"--chdir={tmp_path}",
        f"--output={tmp_path}/slurm-%j.out",
        args=[str(cfg)],
        env=env,
    )
    log = tmp_path / f"slurm-{job}.out"
    info: dict[str, str] = {}
    raised = [0]  # requeues after which the test raised the time limit again
    lowered: list[int] = []  # the step at which the test lowered the time limit

    def describe() -> str:
        logs = "\n".join(
            f"--- {p.relative_to(out)}\n{tail(p, 2500)}" for p in sorted((out / "run").glob("**/logs/*.log"))
        )
        return f"job {job}: {info}\nnode 0 {_state(out, 0)}\nnode 1 {_state(out, 1)}\n{tail(log, 5000)}\n{logs}"

    def ended() -> bool:
        info.clear()
        info.update(slurm_cluster.job(job))
        restarts = int(info.get("Restarts", "0") or 0)
        hb = read_json(out / "run" / "heartbeat.json") or {}
        if not lowered and restarts == 0 and hb.get("state") == "training" and hb["global_step"] >= CUT_AT_STEP:
            # 30-90 s left: SLURM signals at its next check (time left <= 60 + 30), kills >= 30 s later.
            minutes = math.ceil((_seconds(info["RunTime"]) + 30) / 60)
            slurm_cluster.run("scontrol", "update", f"JobId={job}", f"TimeLimit={minutes}")
            lowered.append(hb["global_step"])
            refs.append(_reference(ref_dir))  # now: the job's paced ranks leave the CPU free
        if restarts > raised[0]:
            # The next allocation trains to the end: SLURM holds a requeued job back ~11 s (the
            # fixture's credential lifetime), time enough to raise the limit before it starts again.
            slurm_cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
            raised[0] = restarts
        return info.get("JobState") in FINAL

    def progress() -> object:
        return (info.get("JobState"), info.get("Restarts"), run_progress(out), _state(out, 1).get("state"))

    wait_for(
        ended,
        STALL_S,
        "the SLURM job to end",
        interval=0.5,
        progress=progress,
        cap=600,
        context=lambda: describe() + "\n" + slurm_cluster.logs(),
    )
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", describe()
    text = log.read_text()
    # --open-mode=append: both allocations in one log; each task found its node from SLURM_PROCID.
    assert text.count("vit-supervisor-multinode.sbatch: job") == 2, describe()
    for node in (0, 1):
        assert text.count(f"node {node} of 2 (from SLURM_PROCID: several tasks per node)") == 2, describe()

    s0, s1 = _state(out, 0), _state(out, 1)
    assert s0.get("state") == "completed" and s1.get("state") == "completed", describe()
    cut, resumed = s0["attempts"][0], s0["attempts"][-1]
    assert len(s0["attempts"]) == 2 and cut["reason"] == "stopped", describe()
    assert lowered and lowered[0] <= cut["step_reached"] < STEPS, f"the signal did not cut training: {describe()}"
    # slurmstepd writes into the same job log and can land on the end of one of our lines: each
    # line's leading JSON object, whatever follows it.
    events = [e for e in map(_leading_json, text.splitlines()) if e is not None]
    # SLURM's signal reached both supervisors (not the batch shell: nothing else passes it on).
    assert sum(e.get("event") == "signal" and e.get("signal") == "SIGUSR1" for e in events) >= 2, describe()
    # Both nodes' ranks took the signal as one stop and saved the same step (the checkpoint the next
    # allocation resumed from; rotated out by the end of the run).
    reports = [json.loads(p.read_text()) for p in (out / "run").glob("**/exit-1.rank*.json")]
    assert sorted(r["rank"] for r in reports) == [0, 1], describe()
    assert {(r["reason"], r["step"]) for r in reports} == {("interrupted", cut["step_reached"])}, describe()
    # 0 steps lost: the next allocation starts from the very step the cut reached, on both nodes.
    assert resumed["step_start"] == cut["step_reached"] == s1["attempts"][-1]["step_start"], describe()
    # Only node 0 requeued the job (one requeue for the whole job, after its checkpoint); node 1 did not.
    assert s0["slurm"]["restart_count"] == 1 and f"scontrol requeue {job}" in text, describe()
    slurm_events = [e for e in events if e.get("event") == "slurm" and "action" in e]
    assert [e.get("task") for e in slurm_events if e["action"] == "not requeued"] == [1], (
        f"node 0 did not report its requeue as done: {slurm_events}"
    )
    assert [e["action"] for e in slurm_events].count("requeued") == 1, slurm_events

    code = wait_exit(refs[0], STALL_S, "the reference run", progress=lambda: run_progress(ref_dir / "out"))
    assert code == 0, tail(ref_dir / "torchrun.log")
    assert max_abs_diff(out / f"checkpoint-{STEPS}", ref_dir / "out" / f"checkpoint-{STEPS}") == 0.0
