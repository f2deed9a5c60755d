"""The worker under torchrun: 2 CPU ranks over gloo, a real kill, exact resume.

Stop signals and OOMs under torchrun are tested through the supervisor
(tests/test_distributed_supervisor_e2e.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from bench.common import run_progress
from tests.conftest import REPO, heartbeat, tail, wait_exit, wait_for, worker_env
from tests.test_worker_e2e import max_abs_diff, write_cfg

pytestmark = pytest.mark.e2e

TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node=2",
    "--max-restarts=0",
    "-m",
    "worker",
]
# A stall limit: waits restart it whenever the job's heartbeat moves. Generous because
# three processes importing torch on a loaded 2-core machine show no progress for a while.
STALL = 120
# 2 ranks x 16 = 32 samples per step: 10 steps per epoch, 4 epochs.
TWO_RANKS = {"training": {"num_train_epochs": 4, "save_steps": 5}}


def torchrun(cfg: Path, *extra: str, env: dict | None = None) -> subprocess.Popen[str]:
    """torchrun in its own session, output appended to ``torchrun.log`` beside the config."""
    with open(cfg.parent / "torchrun.log", "a") as log:
        return subprocess.Popen(
            [*TORCHRUN, str(cfg), *extra],
            cwd=REPO,
            env=env or worker_env(),
            text=True,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(p: subprocess.Popen[str], cfg: Path) -> str:
    """Wait for torchrun to exit while its job makes progress; return the log's tail."""
    log = cfg.parent / "torchrun.log"
    wait_exit(
        p, STALL, "torchrun to exit", progress=lambda: run_progress(cfg.parent / "out"), context=lambda: tail(log)
    )
    return tail(log)


def rank_reports(out: Path) -> dict[int, dict]:
    reports = {}
    for f in (out / "run").glob("exit_report.rank*.json"):
        r = json.loads(f.read_text())
        reports[r["rank"]] = r
    return reports


def rank_pids(launcher_pid: int) -> list[int]:
    return [c.pid for c in psutil.Process(launcher_pid).children() if "worker" in " ".join(c.cmdline())]


@pytest.fixture(scope="module")
def two_rank_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ref2")
    cfg = write_cfg(d / "c.yaml", TWO_RANKS)
    p = torchrun(cfg)
    log = finish(p, cfg)
    assert p.returncode == 0, log
    return d / "out" / "checkpoint-40"


def test_two_ranks_killed_and_resumed_end_bit_identical(tmp_path: Path, two_rank_reference: Path) -> None:
    cfg = write_cfg(tmp_path / "c.yaml", TWO_RANKS)
    out = tmp_path / "out"
    p = torchrun(cfg)
    wait_for(
        lambda: (heartbeat(out).get("global_step") or 0) >= 12,
        STALL,
        "step 12",
        interval=0.005,
        progress=lambda: run_progress(out),
    )
    victim = max(rank_pids(p.pid))
    psutil.Process(victim).kill()  # SIGKILL one rank: the whole job must go down
    finish(p, cfg)
    assert p.returncode != 0 and not (out / "checkpoint-40").exists()
    ckpt_dir = max(out.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {f.name for f in ckpt_dir.iterdir()}
    p = torchrun(cfg, "--resume")
    log = finish(p, cfg)
    assert p.returncode == 0, log
    assert max_abs_diff(out / "checkpoint-40", two_rank_reference) == 0.0
