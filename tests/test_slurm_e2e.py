"""vit-supervisor under a real SLURM (tests/slurm_cluster.py): the time limit as checkpoint-and-requeue.

One module fixture submits every job at once through the shipped template
(systemd/vit-supervisor.sbatch) and drives them to their ends; the tests then read what
happened. The jobs mostly wait, so they share the node:

- ``limit``: a 2-minute job with ``--signal=B:USR1@50`` whose training needs longer: SLURM's
  signal cuts it, it checkpoints, requeues itself, and the next allocation completes the run;
- ``array``: the same as a two-task job array, each task its own run (config ``{task}``); task 1's
  first worker runs out of memory first, and the batch the supervisor lowered must survive the requeue;
- ``cancel``: a job that ``scancel`` stops mid-training.

The training is paced in the first allocation only (a sitecustomize sleeps in each training
forward while ``SLURM_RESTART_COUNT`` is 0): sleeping changes no number, so the final weights
must still equal an uninterrupted run's, and the requeued allocation runs at full speed.

SLURM acts on time limits every 30 s and counts them in minutes, so this module takes about
2 minutes whatever the machine (mostly sleeping); everything in it runs at the same time.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from filelock import FileLock

from bench.common import TINY, deep_update, run_progress
from supervisor.protocol import read_json
from tests.conftest import REPO, tail, wait_for
from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401 - the fixture, asked for by name

pytestmark = pytest.mark.e2e

TEMPLATE = REPO / "systemd" / "vit-supervisor.sbatch"
PACE_S = 2.5
"""Seconds of sleep per training forward in a first allocation: 38 steps take 95 s, past the signal."""
LIMIT = ("--time=2", "--signal=B:USR1@50")
"""SLURM looks at time limits every 30 s and sends the signal at the first look within 30 s of the
warning time: here 40-70 s into the job (after the worker's start-up, which took up to 35 s with
four jobs starting at once on a loaded machine), and kills at the first look past the limit, at
least 50 s after the signal."""
FINAL = frozenset(
    {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)
STALL_S = 150.0
"""No job moved (SLURM state, heartbeat, state.json) for this long: something is stuck."""


@dataclass
class Run:
    """One supervised run submitted as (part of) a SLURM job."""

    name: str
    job: str
    """The id to ask SLURM about: the job id, or ``ARRAYJOB_TASK``."""
    dir: Path
    log: Path
    info: dict[str, str] = field(default_factory=dict)
    """``scontrol show job`` at the end."""
    cancelled_at_step: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "dir": str(self.dir), "log": str(self.log)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Run:
        return cls(**{**raw, "dir": Path(raw["dir"]), "log": Path(raw["log"])})

    @property
    def out(self) -> Path:
        return self.dir / "out"

    def state(self) -> dict[str, Any]:
        return read_json(self.out / "run" / "state.json") or {}

    def describe(self) -> str:
        logs = "\n".join(tail(p, 2500) for p in sorted((self.out / "run" / "logs").glob("*.log")))
        return f"--- {self.name} ({self.job}): {self.info}\nstate {self.state()}\n{tail(self.log, 4000)}\n{logs}"


def _config(d: Path, overrides: dict[str, Any] | None = None) -> Path:
    raw = deep_update(
        TINY,
        {
            "training": {"output_dir": str(d / "out")},
            "supervisor": {"standby": False},
            "snapshot": {"root": str(d / "shm")},
        },
    )
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(deep_update(raw, overrides or {}), sort_keys=False))
    return path


def _drive(cluster: SlurmCluster, runs: list[Run], cancel: Run) -> None:
    """scancel ``cancel`` once it trains, and wait until every job has ended (a requeued job starts
    again by itself after the cluster's short credential lifetime, tests/slurm_cluster.py)."""

    def step() -> bool:
        for r in runs:
            r.info = cluster.job(r.job)
        hb = read_json(cancel.out / "run" / "heartbeat.json") or {}
        if cancel.cancelled_at_step is None and hb.get("state") == "training" and (hb.get("global_step") or 0) >= 2:
            cancel.cancelled_at_step = hb["global_step"]
            cluster.run("scancel", cancel.job)
        return all(r.info.get("JobState") in FINAL for r in runs)

    def progress() -> object:
        return tuple((r.info.get("JobState"), r.info.get("Restarts"), run_progress(r.out)) for r in runs)

    wait_for(
        step,
        STALL_S,
        "every SLURM job to end",
        interval=0.5,
        progress=progress,
        cap=600,
        context=lambda: "\n".join(r.describe() for r in runs) + "\n" + cluster.logs(),
    )


@pytest.fixture(scope="module")
def slurm_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, worker_id: str
) -> dict[str, Any]:
    """Every job's end, once per test session: under xdist the first process to get here starts the
    cluster and runs the jobs, the other reads its record (worksteal may spread the tests over both,
    and twice the jobs at once would slow every start-up past the signal)."""
    if worker_id == "master":
        raw = _run_all(request.getfixturevalue("slurm_cluster"), tmp_path_factory.mktemp("slurm-runs"))
    else:
        shared = tmp_path_factory.getbasetemp().parent / "slurm-runs"
        with FileLock(str(shared) + ".lock"):
            done = shared / "runs.json"
            if not done.is_file():
                shutil.rmtree(shared, ignore_errors=True)  # a half-done one from a process that failed
                shared.mkdir()
                done.write_text(json.dumps(_run_all(request.getfixturevalue("slurm_cluster"), shared)))
            raw = json.loads(done.read_text())
    return {
        "limit": Run.from_json(raw["limit"]),
        "tasks": [Run.from_json(t) for t in raw["tasks"]],
        "array_id": raw["array_id"],
        "cancel": Run.from_json(raw["cancel"]),
    }


def _run_all(cluster: SlurmCluster, base: Path) -> dict[str, Any]:
    """Submit every job through the template, drive them to their ends; what happened, as JSON."""
    env = cluster.job_env(base, PACE_S, oom_array_task=1)

    def submit(name: str, config: Path, *args: str) -> str:
        return cluster.sbatch(
            TEMPLATE, *args, f"--chdir={base}", "--cpus-per-task=1", f"--job-name={name}", args=[str(config)], env=env
        )

    # The time-limited job: wandb offline, so that "one tracker run" is checked too.
    limit_dir = base / "limit"
    limit_dir.mkdir()
    cfg = _config(limit_dir, {"tracking": {"backend": "wandb", "mode": "offline", "project": "slurm"}})
    job = submit("limit", cfg, *LIMIT, f"--output={limit_dir}/slurm-%j.out")
    limit = Run("limit", job, limit_dir, limit_dir / f"slurm-{job}.out")

    # A two-task array: each task's config (and so output directory) comes from its task id.
    for task in (0, 1):
        (base / f"task-{task}").mkdir()
        _config(base / f"task-{task}")
    array_id = submit(
        "array", base / "task-{task}" / "config.yaml", *LIMIT, "--array=0-1", f"--output={base}/task-%a/slurm-%A_%a.out"
    )
    tasks = [
        Run(f"task {t}", f"{array_id}_{t}", base / f"task-{t}", base / f"task-{t}" / f"slurm-{array_id}_{t}.out")
        for t in (0, 1)
    ]

    cancel_dir = base / "cancel"
    cancel_dir.mkdir()
    job = submit("cancel", _config(cancel_dir), "--time=5", f"--output={cancel_dir}/slurm-%j.out")
    cancel = Run("cancel", job, cancel_dir, cancel_dir / f"slurm-{job}.out")

    started = time.monotonic()
    runs = [limit, *tasks, cancel]
    _drive(cluster, runs, cancel)
    return {
        "limit": limit.to_json(),
        "tasks": [t.to_json() for t in tasks],
        "array_id": array_id,
        "cancel": cancel.to_json(),
        "wall_s": time.monotonic() - started,
    }


def _stop_then_resume(r: Run) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's record after it completed, and its attempts; checks the shape every requeued run shares."""
    st = r.state()
    assert r.info.get("JobState") == "COMPLETED", r.describe()
    assert st.get("state") == "completed", r.describe()
    attempts = st["attempts"]
    assert len(attempts) >= 2 and attempts[-1]["reason"] == "completed", r.describe()
    assert any(a["reason"] == "stopped" for a in attempts), r.describe()
    assert int(r.info["Restarts"]) >= 1 and st["slurm"]["restart_count"] == int(r.info["Restarts"]), r.describe()
    log = r.log.read_text()
    # --open-mode=append: every allocation's lines are in the one job log.
    assert log.count("vit-supervisor.sbatch: job") == int(r.info["Restarts"]) + 1, r.describe()
    return st, attempts


def test_time_limit_signal_checkpoints_requeues_and_resumes_bit_identical(
    slurm_runs: dict[str, Any], reference_tiny: Path
) -> None:
    from safetensors.torch import load_file

    r: Run = slurm_runs["limit"]
    st, attempts = _stop_then_resume(r)
    cut = attempts[0]
    assert cut["reason"] == "stopped", r.describe()
    assert cut["step_reached"] is not None and 1 <= cut["step_reached"] < 38, (
        f"the signal did not cut training: {r.describe()}"
    )
    # 0 steps lost: the next allocation starts from the very step the cut reached.
    assert attempts[1]["step_start"] == cut["step_reached"], r.describe()
    assert f"scontrol requeue {r.job}" in r.log.read_text(), r.describe()
    final = load_file(str(r.out / "checkpoint-38" / "model.safetensors"))
    ref = load_file(str(reference_tiny / "model.safetensors"))
    assert final.keys() == ref.keys()
    differ = [k for k in ref if not (final[k] == ref[k]).all()]
    assert not differ, f"weights differ from the uninterrupted run in {differ[:5]}"
    run_id = st["tracker_run_id"]
    wandb_runs = sorted((r.out / "run" / "wandb").glob("offline-run-*"))
    assert run_id and len(wandb_runs) == len(attempts), r.describe()
    assert all(w.name.endswith(run_id) for w in wandb_runs), wandb_runs


def test_array_tasks_requeue_under_their_own_ids_complete_and_keep_a_lowered_batch(slurm_runs: dict[str, Any]) -> None:
    array_id = slurm_runs["array_id"]
    outs = set()
    for task, r in enumerate(slurm_runs["tasks"]):
        st, _ = _stop_then_resume(r)
        assert (st["slurm"]["array_job_id"], st["slurm"]["array_task_id"]) == (array_id, str(task)), r.describe()
        assert f"scontrol requeue {array_id}_{task}" in r.log.read_text(), r.describe()
        assert (r.out / "checkpoint-38").is_dir(), r.describe()
        outs.add(st["output_dir"])
    assert len(outs) == 2
    oom_task = slurm_runs["tasks"][1].state()
    assert oom_task["attempts"][0]["reason"] == "oom", slurm_runs["tasks"][1].describe()
    # The lowered batch came back with the requeued job (from run/state.json), not the config's 16 x 1.
    assert [(a["per_device_train_batch_size"], a["gradient_accumulation_steps"]) for a in oom_task["attempts"]] == [
        (16, 1),
        *[(8, 2)] * (len(oom_task["attempts"]) - 1),
    ], slurm_runs["tasks"][1].describe()


def test_scancel_stops_at_a_checkpoint_without_requeue(slurm_runs: dict[str, Any]) -> None:
    r: Run = slurm_runs["cancel"]
    st = r.state()
    assert r.cancelled_at_step is not None, r.describe()
    assert r.info.get("JobState") == "CANCELLED" and r.info.get("Restarts") == "0", r.describe()
    assert st.get("state") == "stopped" and not st.get("slurm_requeued"), r.describe()
    last = st["attempts"][-1]
    assert len(st["attempts"]) == 1 and last["reason"] == "stopped", r.describe()
    # SLURM signalled the worker and the supervisor forwarded the stop: one request, saved at the step end.
    assert "SIGTERM" not in (last["exit"] or ""), r.describe()
    steps = sorted(int(p.name.split("-")[1]) for p in r.out.glob("checkpoint-*"))
    assert steps and steps[-1] == last["step_reached"] >= r.cancelled_at_step, r.describe()
    assert "scontrol requeue" not in r.log.read_text(), r.describe()
