"""Pacing real workers: each training forward sleeps, so that a run lasts while a test acts on it
(a standby gets ready, SLURM's time limit comes) without spending CPU on steps nobody needs.
Sleeping changes no number: a paced run's weights equal an unpaced one's.

The hook is a ``sitecustomize`` on the workers' ``PYTHONPATH`` (:func:`pacing_env`), so it reaches
every worker a supervisor, torchrun or SLURM starts. It paces only:

- processes running ``-m worker`` (not the supervisor, nor the tests' own Python);
- outside SLURM, or in a job's first allocation (``SLURM_RESTART_COUNT`` 0): a requeued job runs at
  full speed;
- until the file ``VIT_TEST_PACE_UNTIL`` names exists, if it names one: a test ends the pacing when
  the rest of the run may go at full speed.

With ``VIT_TEST_OOM_ARRAY_TASK`` set, that SLURM array task's first worker also runs out of memory
in its first forward (tests/inject_worker.py).
"""

from __future__ import annotations

from pathlib import Path

SITECUSTOMIZE = """\
import os, sys
argv = sys.orig_argv
if (
    any(a == "-m" and b == "worker" for a, b in zip(argv, argv[1:]))
    and os.environ.get("VIT_TEST_PACE_S")
    and os.environ.get("SLURM_RESTART_COUNT", "0") in ("", "0")
):
    import time
    oom_task = os.environ.get("VIT_TEST_OOM_ARRAY_TASK")
    if oom_task and os.environ.get("SLURM_ARRAY_TASK_ID") == oom_task and os.environ.get("VIT_ATTEMPT") == "1":
        from tests.inject_worker import install

        install("oom-forward", 1)  # the supervisor halves the batch; the requeued job must keep it
    from worker import model as _model

    _build, _pace = _model.build, float(os.environ["VIT_TEST_PACE_S"])
    _until = os.environ.get("VIT_TEST_PACE_UNTIL")

    def _sleep(mod, args):
        if mod.training and not (_until and os.path.exists(_until)):
            time.sleep(_pace)

    def _paced_build(cfg, names):
        m = _build(cfg, names)
        m.register_forward_pre_hook(_sleep)
        return m

    _model.build = _paced_build
"""


def pacing_env(
    base: Path, pace_s: float, *, until: Path | None = None, oom_array_task: int | None = None
) -> dict[str, str]:
    """The environment variables that pace the workers started with them (merge them into a child's
    environment): the hook written under ``base/site``, first on ``PYTHONPATH`` before the checkout."""
    from tests.conftest import REPO

    site = base / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {"PYTHONPATH": f"{site}:{REPO}", "VIT_TEST_PACE_S": str(pace_s)}
    if until is not None:
        env["VIT_TEST_PACE_UNTIL"] = str(until)
    if oom_array_task is not None:
        env["VIT_TEST_OOM_ARRAY_TASK"] = str(oom_array_task)
    return env
