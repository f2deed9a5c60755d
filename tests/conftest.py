"""Shared fixtures: small real configs, real processes, waits bounded by progress instead of sleeps.

A fixed number of seconds assumes an idle machine. The waits on a run here take a
*stall* limit instead: it restarts whenever the run visibly moves (the heartbeat's
step, state or pid; ``state.json``'s state or attempt), so a loaded machine is
waited for and a stuck run is not. A hard cap of ``HARD_CAP`` stall limits still
fails a livelock (say a crash loop whose attempt number keeps changing).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from filelock import FileLock

# One home each, shared with the benchmarks; the tests keep importing them from here.
from bench.common import TINY, deep_update, run_progress
from bench.common import env as _child_env
from supervisor.host import poll_until
from supervisor.protocol import read_json

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# A wait bounded by progress still gives up after this many stall limits in all.
HARD_CAP = 10

# Fixtures that start real worker or supervisor processes: a test using one is end-to-end.
E2E_FIXTURES = frozenset({"new_run", "reference_tiny", "short_run", "good_checkpoint"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Safety net for ``-m "not e2e"``: a test that starts real processes through a fixture is e2e."""
    for item in items:
        if E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())) and not item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.e2e)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Remove the snapshot stores of this session's runs whose config left ``snapshot.root`` unset.

    Those land in ``/dev/shm`` under a name hashed from the run's output folder
    (worker.snapshot.default_root), so each folder under this session's temporary root names
    its possible store exactly; other sessions' stores (other checkouts testing at the same
    time) are not touched. ``make_config`` puts its stores under the test's folder anyway.
    """
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    try:
        base = factory.getbasetemp()
    except (OSError, ValueError):
        return
    from worker.snapshot import default_root

    for folder, _, _ in os.walk(base):
        for rank in range(8):  # the torchrun tests' other ranks have stores of their own
            store = default_root(folder, rank)
            if store.is_dir():
                shutil.rmtree(store, ignore_errors=True)


_running: list[pytest.Item] = []  # the test being set up or run (fixtures of any scope included)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _running[:] = [item]


def note_real_process(what: str) -> None:
    """Warn when a test not marked e2e starts a real worker or supervisor: ``-m "not e2e"`` must take seconds."""
    if _running and not _running[0].get_closest_marker("e2e"):
        warnings.warn(
            f"{_running[0].nodeid} starts a real {what} but is not marked e2e", pytest.PytestWarning, stacklevel=3
        )


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a tiny config into tmp_path (with overrides merged in) and return its path.

    Snapshot stores go under ``tmp_path / "shm"`` unless a test sets ``snapshot.root``.
    The standby is off unless a test turns it on: a standby is a second full worker start-up
    (torch, transformers, the data, the model) per supervised run, about a quarter of the suite's
    CPU, and it is the subject of its own tests (test_standby_e2e.py, the chaos run, the
    parametrised restart test), which run it with the product's default (on).
    """

    def _make(overrides: dict[str, Any] | None = None, name: str = "config.yaml") -> Path:
        # Snapshots are on by default: their stores go into the test's own folder, not /dev/shm.
        base = deep_update(TINY, {"supervisor": {"standby": False}, "snapshot": {"root": str(tmp_path / "shm")}})
        cfg = deep_update(base, overrides or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return _make


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of every child: quiet, offline, one BLAS thread per process."""
    return _child_env(**extra)


def vit_train(*args: str | os.PathLike[str], env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen[str]:
    """Start a real worker process (``python -m worker``) in its own session; output to a pipe
    unless ``popen`` says otherwise (e.g. ``stdout=log_file``)."""
    note_real_process("worker")
    kw: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, **popen}
    return subprocess.Popen(
        [PYTHON, "-m", "worker", *map(str, args)],
        env=env or worker_env(),
        text=True,
        start_new_session=True,
        cwd=REPO,
        **kw,
    )


class _Capped(Exception):
    """The hard cap of a progress-bounded wait passed while the run was still moving."""


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.05,
    *,
    progress: Callable[[], object] | None = None,
    cap: float | None = None,
    context: Callable[[], str] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Without ``progress``, ``timeout`` is a plain deadline. With it (e.g. ``run.progress``),
    ``timeout`` is a stall limit that restarts whenever ``progress()`` changes, and ``cap``
    (default ``HARD_CAP * timeout``) bounds the whole wait. Fails with an AssertionError
    "timed out after Ns waiting for WHAT", the last progress seen and ``context()``.
    """
    start = time.monotonic()
    limit = HARD_CAP * timeout if cap is None else cap
    last: list[object] = [None]

    def watched() -> object:
        last[0] = progress() if progress is not None else None
        return last[0]

    def check() -> Any:
        value = predicate()
        if not value and progress is not None and time.monotonic() - start > limit:
            raise _Capped
        return value

    try:
        value = poll_until(check, timeout, interval=interval, progress=watched if progress is not None else None)
        if value:
            return value
        why = "" if progress is None else f": no progress for {timeout:.0f}s, {time.monotonic() - start:.0f}s in all"
        message = f"timed out after {timeout:.0f}s waiting for {what}{why}"
    except _Capped:
        message = f"timed out after {limit:.0f}s waiting for {what}: still moving at the hard cap (a livelock?)"
    if progress is not None:
        message += f"; last progress {last[0]}"
    if context is not None:
        message += f"\n{context()}"
    raise AssertionError(message)


def wait_exit(
    proc: subprocess.Popen[Any],
    timeout: float,
    what: str,
    *,
    progress: Callable[[], object] | None = None,
    context: Callable[[], str] | None = None,
) -> int:
    """``proc``'s exit code, waited for like :func:`wait_for`; on a timeout ``proc`` (and its
    session, if it leads one) is SIGKILLed before the AssertionError."""
    try:
        wait_for(lambda: proc.poll() is not None, timeout, what, progress=progress, context=context)
    except AssertionError:
        try:
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.kill()
        proc.wait()
        raise
    return proc.returncode


def heartbeat(out: Path) -> dict[str, Any]:
    return read_json(out / "run" / "heartbeat.json") or {}


def tail(path: Path, n: int = 3000) -> str:
    """The last ``n`` characters of a log file ("" if there is none)."""
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _session_run(
    tmp_path_factory: pytest.TempPathFactory, worker_id: str, name: str, overrides: dict[str, Any]
) -> Path:
    """The output folder of one completed TINY run (``overrides`` merged in), built once per test
    session, not once per xdist process: the processes share the base temporary folder's parent, and a
    file lock makes the others wait for the first one's run."""
    if worker_id == "master":  # not under xdist
        return _build_run(tmp_path_factory.mktemp(name), name, overrides)
    shared = tmp_path_factory.getbasetemp().parent / name
    with FileLock(str(shared) + ".lock"):
        if not (shared / "completed").exists():
            shutil.rmtree(shared, ignore_errors=True)  # a half-built one from a process that failed
            shared.mkdir()
            _build_run(shared, name, overrides)
        return shared / "out"


def _build_run(d: Path, name: str, overrides: dict[str, Any]) -> Path:
    cfg = d / "c.yaml"
    cfg.write_text(yaml.safe_dump(deep_update(deep_update(TINY, {"snapshot": {"root": str(d / "shm")}}), overrides)))
    log = d / "worker.log"
    with open(log, "w") as f:
        p = vit_train(cfg, stdout=f)
    code = wait_exit(p, 120, f"the {name} run", progress=lambda: run_progress(d / "out"), context=lambda: tail(log))
    assert code == 0, tail(log)
    (d / "completed").touch()
    return d / "out"


@pytest.fixture(scope="session")
def reference_tiny(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The final checkpoint of an uninterrupted TINY run: what every exact resume must reproduce."""
    final = _session_run(tmp_path_factory, worker_id, "reference-tiny", {}) / "checkpoint-38"
    assert final.is_dir()
    return final


@pytest.fixture(scope="session")
def short_run(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The output folder of a completed 5-step TINY run (``training.max_steps: 5``): its committed
    ``checkpoint-5``, final model and run records. Shared by the whole session, so read only: a test
    that resumes it or changes anything in it works on :func:`copy_run_dir`'s copy."""
    return _session_run(tmp_path_factory, worker_id, "short-run", {"training": {"max_steps": 5}})


def copy_run_dir(src: Path, dst: Path) -> Path:
    """A copy of the output folder ``src`` at ``dst`` (file times kept), as a user moving a run would make."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


# ----------------------------------------------------------------------------- supervised runs


class Run:
    """One run directory driven through `python -m supervisor.cli`."""

    def __init__(self, tmp_path: Path, config: Path, **env: str) -> None:
        self.tmp = tmp_path
        self.config = config
        self.out = tmp_path / "out"
        self.env = worker_env(XDG_STATE_HOME=str(tmp_path / "xdg"), **env)
        self.env.pop("STATE_DIRECTORY", None)
        self.n = 0
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *extra: str) -> subprocess.Popen[str]:
        note_real_process("supervisor")
        self.n += 1
        log = open(self.tmp / f"supervisor-{self.n}.log", "w")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(
            [PYTHON, "-m", "supervisor.cli", "start", str(self.config), *extra],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        """A failed test must not leave a supervisor or worker behind to slow down the next one."""
        pids = [p.pid for p in self.procs if p.poll() is None]
        st = self.state()
        pids += [pid for pid in (st.get("supervisor_pid"), st.get("worker_pid")) if isinstance(pid, int)]
        for pid in pids:
            try:
                if psutil.Process(pid).cmdline()[1:3] in (["-m", "supervisor.cli"], ["-m", "worker"]):
                    os.kill(pid, signal.SIGKILL)
            except (psutil.Error, IndexError, ProcessLookupError):
                pass

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "supervisor.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )

    def state(self) -> dict[str, Any]:
        return read_json(self.out / "run" / "state.json") or {}

    def progress(self) -> tuple[object, ...]:
        """The heartbeat's (step, state, pid) and ``state.json``'s (state, attempt): what moves while the run lives."""
        return run_progress(self.out)

    def describe(self) -> str:
        """What a failed wait shows: the run's state and the tail of the supervisor logs."""
        return f"state {self.state()}\n{self.log()[-3000:]}"

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
        """:func:`wait_for` with ``timeout`` as a stall limit on this run's progress."""
        return wait_for(predicate, timeout, what, interval, progress=self.progress, context=self.describe)

    def worker_at_step(self, step: int, attempt: int | None = None, timeout: float = 45) -> dict[str, Any]:
        """Wait until the current worker has trained past ``step``; return its heartbeat.
        ``timeout`` is a stall limit: it restarts while the run moves."""

        def ok() -> dict[str, Any] | None:
            hb, st = heartbeat(self.out), self.state()
            if (
                hb.get("state") == "training"
                and (hb.get("global_step") or 0) > step
                and hb.get("pid") == st.get("worker_pid")
                and (attempt is None or st.get("attempt") == attempt)
            ):
                return hb
            return None

        return self.wait_for(ok, timeout, f"worker past step {step}" + (f" in attempt {attempt}" if attempt else ""))

    def log(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.tmp.glob("supervisor-*.log")))


@pytest.fixture
def new_run(tmp_path: Path) -> Any:
    made: list[Run] = []

    def make(config: Path, **env: str) -> Run:
        made.append(Run(tmp_path, config, **env))
        return made[-1]

    yield make
    for run in made:
        run.cleanup()


def finish(proc: subprocess.Popen[str], run: Run, timeout: float = 45) -> int:
    """The supervisor's exit code. ``timeout`` is a stall limit: it restarts while ``run`` moves
    (up to ``HARD_CAP`` times), so a slow machine finishing a long run is not a failure."""
    return wait_exit(proc, timeout, f"supervisor pid {proc.pid} to exit", progress=run.progress, context=run.describe)


RESUMED = re.compile(
    r"Training will resume from (?:snapshot step (\d+)|checkpoint: \S*checkpoint-(\d+))|No checkpoint found"
)


def resumed_from(log: str) -> tuple[str, int]:
    """('snapshot' | 'checkpoint' | 'scratch', step) of the first resume line in a worker's log."""
    m = RESUMED.search(log)
    assert m, f"no resume line in the log:\n{log[-3000:]}"
    if m.group(1):
        return "snapshot", int(m.group(1))
    if m.group(2):
        return "checkpoint", int(m.group(2))
    return "scratch", 0
