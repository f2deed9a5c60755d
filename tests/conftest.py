"""Shared fixtures: small real configs, real processes, deadlines instead of sleeps."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# configs/tiny.yaml: a tiny from-scratch ViT on a slice of the digits. A worker process reaches its
# first step in a few seconds (mostly imports) and trains ~20 steps a second on 2 cores.
TINY: dict[str, Any] = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
TINY["training"]["output_dir"] = "out"  # relative to each copy's own folder


def deep_update(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = v
    return out


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a tiny config into tmp_path (with overrides merged in) and return its path."""

    def _make(overrides: dict[str, Any] | None = None, name: str = "config.yaml") -> Path:
        cfg = deep_update(TINY, overrides or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return _make


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "WANDB_SILENT": "true",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
        }
    )
    env.update(extra)
    return env


def vit_train(*args: str | os.PathLike[str], env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen[str]:
    """Start a real worker process (``python -m worker``) in its own session."""
    return subprocess.Popen(
        [PYTHON, "-m", "worker", *map(str, args)],
        env=env or worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        cwd=REPO,
        **popen,
    )


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def heartbeat(out: Path) -> dict[str, Any]:
    return read_json(out / "run" / "heartbeat.json") or {}


@pytest.fixture(scope="session")
def reference_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The final checkpoint of an uninterrupted TINY run: what every exact resume must reproduce."""
    d = tmp_path_factory.mktemp("reference")
    cfg = d / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    p = vit_train(cfg)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    final = d / "out" / "checkpoint-38"
    assert final.is_dir()
    return final


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

    def worker_at_step(self, step: int, attempt: int | None = None) -> dict[str, Any]:
        """Wait until the current worker has trained past ``step``; return its heartbeat."""

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

        return wait_for(ok, 45, f"worker past step {step}")

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
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(
            f"supervisor did not exit in {timeout}s; state {run.state()}\n{run.log()[-3000:]}"
        ) from None
