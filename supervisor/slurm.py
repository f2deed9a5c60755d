"""The supervisor inside a SLURM allocation: who the job is, and turning the time-limit signal into a requeue.

SLURM's most common "fault" is not a crash but the end of the allocation: the time limit, or
preemption. With ``#SBATCH --signal=B:USR1@N`` SLURM sends SIGUSR1 to the batch shell (the
supervisor, which the script ``exec``\\s) N seconds before it kills the job. The supervisor
turns that signal into the same safe stop as SIGTERM (the worker checkpoints at the end of its
step), then requeues the job with ``scontrol requeue`` (``ARRAYJOB_TASK`` for an array task:
the array's own id would requeue every task) and exits 0. The requeued job gets the same job
id, the same script and ``SLURM_RESTART_COUNT`` one higher; the supervisor there resumes the
run from the newest checkpoint like any restart (same output directory, tracker run id and
OOM-lowered batch, all from ``run/state.json``).

What stays as it was: a plain ``scancel`` (SIGTERM to the job's processes) stops without a
requeue, and a run that completes, fails or was stopped by SIGTERM never requeues.

Where the job cannot requeue itself (no ``scontrol`` in a container, a job submitted with
``--no-requeue``, a controller that refuses), the supervisor says so in one line and exits
:data:`EXIT_REQUEUE_NEEDED` (75, ``EX_TEMPFAIL``): a cluster's ``RequeueExit=75`` or the batch
script outside the container can requeue on it.

Everything here reads the environment defensively (a malformed variable is treated as absent)
and imports nothing beyond the standard library, like the rest of the supervisor.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

EXIT_REQUEUE_NEEDED = 75
"""``vit-supervisor start``'s exit code after a SLURM-signal stop that could not requeue the job
itself (``EX_TEMPFAIL`` from sysexits.h: try again later). The run is stopped at a committed
checkpoint; resubmitting or requeueing the job resumes it."""

REQUEUE_TIMEOUT_S = 60.0
"""How long ``scontrol requeue`` may take (a busy controller answers slowly, but it must answer
well inside the signal's lead time)."""

SIGNAL_NAMES = ("SIGUSR1", "SIGUSR2")
"""The signals ``slurm.requeue_signal`` may name (``#SBATCH --signal=B:USR1@N`` or ``USR2``)."""


@dataclass(frozen=True)
class SlurmJob:
    """The SLURM job this process runs in, from its environment (see :func:`from_env`)."""

    job_id: str
    """``SLURM_JOB_ID``: for an array task, the task's own job id."""
    array_job_id: str | None = None
    """``SLURM_ARRAY_JOB_ID``: the array's id (None outside an array)."""
    array_task_id: str | None = None
    """``SLURM_ARRAY_TASK_ID``."""
    restart_count: int = 0
    """``SLURM_RESTART_COUNT``: how often the job was requeued (0 on its first allocation)."""
    proc_id: int = 0
    """``SLURM_PROCID``: the task's rank in its step (0 for the batch script). Only task 0 requeues."""
    node: str | None = None
    """``SLURMD_NODENAME``: the node it runs on."""
    cluster: str | None = None
    """``SLURM_CLUSTER_NAME``."""

    @property
    def requeue_id(self) -> str:
        """The id ``scontrol requeue`` must get: ``ARRAYJOB_TASK`` for an array task (the bare
        ``SLURM_JOB_ID`` of a task is accepted too, but ``scontrol`` names tasks this way and a
        user reading the log recognises it), else the job id."""
        if self.array_job_id is not None and self.array_task_id is not None:
            return f"{self.array_job_id}_{self.array_task_id}"
        return self.job_id

    def describe(self) -> str:
        """``job 123`` / ``job 120_3 (id 123)``, with the restart count when requeued."""
        name = f"job {self.requeue_id}" + (f" (id {self.job_id})" if self.requeue_id != self.job_id else "")
        return name + (f", restart {self.restart_count}" if self.restart_count else "")


def _job_id(raw: str | None) -> str | None:
    """A SLURM job or task id: digits only (anything else is treated as absent)."""
    raw = (raw or "").strip()
    return raw if raw.isdigit() else None


def _count(raw: str | None) -> int:
    raw = (raw or "").strip()
    return int(raw) if raw.isdigit() else 0


def from_env(env: Mapping[str, str] | None = None) -> SlurmJob | None:
    """The job this process runs in; None outside SLURM (no usable ``SLURM_JOB_ID``).

    ``SLURM_JOBID`` (the older spelling) counts too. An array id without its task id (or the
    reverse) is dropped: the job then requeues by its own id, which SLURM also accepts.
    """
    env = os.environ if env is None else env
    job_id = _job_id(env.get("SLURM_JOB_ID")) or _job_id(env.get("SLURM_JOBID"))
    if job_id is None:
        return None
    array_job, array_task = _job_id(env.get("SLURM_ARRAY_JOB_ID")), _job_id(env.get("SLURM_ARRAY_TASK_ID"))
    if array_job is None or array_task is None:
        array_job = array_task = None
    return SlurmJob(
        job_id=job_id,
        array_job_id=array_job,
        array_task_id=array_task,
        restart_count=_count(env.get("SLURM_RESTART_COUNT")),
        proc_id=_count(env.get("SLURM_PROCID")),
        node=(env.get("SLURMD_NODENAME") or "").strip() or None,
        cluster=(env.get("SLURM_CLUSTER_NAME") or "").strip() or None,
    )


def signal_number(name: str) -> int:
    """``SIGUSR1``/``USR1`` -> its number (the schema has checked the name)."""
    name = name.upper()
    return int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])


def should_requeue(job: SlurmJob | None, *, signalled: bool, final_state: str) -> bool:
    """Whether the supervisor requeues its job as it exits: only inside SLURM, only after the
    requeue signal, only when the run ended ``stopped`` (a completed run is done; a failed one
    would fail again; a SIGTERM stop is a ``scancel``), and only from task 0 of the step (each
    node's supervisor gets the signal; one requeue is for the whole job)."""
    return job is not None and signalled and final_state == "stopped" and job.proc_id == 0


@dataclass(frozen=True)
class RequeueResult:
    """What ``scontrol requeue`` did: ``ok``, and one line saying so (or why not, and what to do)."""

    ok: bool
    message: str


Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def requeue(
    job: SlurmJob,
    *,
    which: Callable[[str], str | None] = shutil.which,
    run: Runner = subprocess.run,
    timeout: float = REQUEUE_TIMEOUT_S,
) -> RequeueResult:
    """Ask SLURM to requeue ``job`` (never raises)."""
    exe = which("scontrol")
    if exe is None:
        return RequeueResult(
            False,
            f"scontrol is not on PATH (inside a container?): {job.describe()} was not requeued; exiting "
            f"{EXIT_REQUEUE_NEEDED} so that a RequeueExit={EXIT_REQUEUE_NEEDED} policy or the batch script can "
            f"requeue it (`scontrol requeue {job.requeue_id}`)",
        )
    # The requeue ends the job's current allocation: SLURM then SIGTERMs every process of the job,
    # this scontrol included, sometimes before it has exited with the answer (seen as exit -15 although
    # the job was requeued). It is started with SIGTERM ignored (kept across exec) so it can answer.
    argv = ["/bin/sh", "-c", 'trap "" TERM; exec "$0" "$@"', exe, "requeue", job.requeue_id]
    try:
        done = run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        why = f"timed out after {timeout:.0f}s"
    except OSError as exc:
        why = str(exc)
    else:
        if done.returncode == 0:
            return RequeueResult(True, f"{job.describe()} requeued (`scontrol requeue {job.requeue_id}`)")
        out = " ".join((done.stderr or done.stdout or "").split())[:300]
        why = f"exit {done.returncode}" + (f": {out}" if out else "")
    return RequeueResult(
        False,
        f"`scontrol requeue {job.requeue_id}` failed ({why}); the run is stopped at its checkpoint; exiting "
        f"{EXIT_REQUEUE_NEEDED}: submit the job with --requeue (or requeue it by hand) to resume",
    )
