"""End to end: the goodput accounting of a real supervised run with a real SIGKILL of its worker."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from supervisor.goodput import BUCKETS
from tests.conftest import finish

pytestmark = pytest.mark.e2e


def test_buckets_of_a_killed_and_restarted_run_add_up_to_its_wall_time(
    tmp_path: Path, make_config: Any, new_run: Any
) -> None:
    # Snapshots off and a checkpoint every 40 steps: the restart resumes from an older step, so steps are
    # redone (unless the kill lands just after a save, which the restart check below still covers).
    # A heartbeat every 0.2 s, not at every step (the tiny model makes about 8 steps in between): the
    # accounting must not need one per step. With the default 1 s an idle machine can redo the lost steps
    # (< 0.5 s) inside one heartbeat interval of the restart, and they were once booked as restart.
    cfg = make_config(
        {
            "training": {"num_train_epochs": 5, "save_steps": 40},
            "snapshot": {"every_steps": 0},
            "supervisor": {"heartbeat_interval_s": 0.2},
        }
    )
    run = new_run(cfg)
    t0 = time.monotonic()
    sup = run.start()
    run.worker_at_step(12)
    before = run.state()["goodput"]
    victim = run.state()["worker_pid"]
    os.kill(victim, signal.SIGKILL)
    assert finish(sup, run) == 0, run.log()
    wall = time.monotonic() - t0

    st = run.state()
    assert st["state"] == "completed" and st["restart_count"] == 1 and len(st["attempts"]) == 2
    b = st["goodput"]
    assert set(b) == set(BUCKETS)
    total = sum(b.values())
    print(f"\ngoodput buckets {json.dumps({k: round(v, 2) for k, v in b.items()})}; sum {total:.2f}s, wall {wall:.2f}s")
    # The supervisor's lifetime, from its process start to its final state; the test's clock also holds
    # the fork/exec before it, the interpreter's exit after it and the polling that sees the exit
    # (0.05-0.12 s here): 1 % of this short run, plus that.
    assert total == pytest.approx(wall, rel=0.01, abs=0.25)
    assert b["training"] > 0  # (the tiny model trains in seconds: start-ups are most of this run)
    assert before["restart"] == 0 and b["restart"] > 0  # the second attempt's start-up
    first, second = st["attempts"]
    assert b["redo"] > 0 or second["step_start"] >= first["step_reached"]  # steps lost are steps redone
    assert b["startup"] > 0 and b["detection"] < 1.0  # a SIGKILL is noticed at once
    assert b["backoff"] == 0  # it had made progress: restarted at once

    r = run.cli("status", "--json", "--run-dir", str(run.out))
    v = json.loads(r.stdout)
    assert v["goodput"]["buckets"] == pytest.approx(b)
    assert v["goodput"]["ratio"] == pytest.approx(b["training"] / total)
    human = run.cli("status", "--run-dir", str(run.out)).stdout
    assert f"goodput:     {100 * b['training'] / total:.1f}% training" in human
