"""The standby worker: hand-over after a kill, and every fallback to a cold start."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import finish, wait_for
from tests.pacing import pacing_env
from tests.test_worker_e2e import _digit_pngs, max_abs_diff, run_to_end, write_cfg

pytestmark = pytest.mark.e2e

# ~760 steps, and paced (tests/pacing.py): time for a standby to get ready, spent sleeping, not training.
LONG = {"training": {"num_train_epochs": 40, "save_steps": 20}, "supervisor": {"standby": True}}
PACE_S = 0.3
"""Seconds of sleep per training forward of a paced worker: at least 57 s for the 190 steps of the
hand-over run, while a standby gets ready in 5-20 s."""
HANDOVER = {"training": {"num_train_epochs": 10, "save_steps": 20}, "supervisor": {"standby": True}}


def ready_standby(run: Any) -> dict[str, Any]:
    return wait_for(lambda: (sb := run.state().get("standby") or {}).get("ready") and sb, 60, "a ready standby")


def test_standby_takes_over_after_sigkill_and_training_stays_exact(
    tmp_path: Path, make_config: Any, new_run: Any
) -> None:
    ref = write_cfg(tmp_path / "ref" / "c.yaml", HANDOVER)
    run_to_end(ref)
    full_speed = tmp_path / "full-speed"  # paced until the kill: the standby's attempt trains at full speed
    run = new_run(make_config(HANDOVER), **pacing_env(tmp_path, PACE_S, until=full_speed))
    sup = run.start()
    run.worker_at_step(5)
    sb = ready_standby(run)
    assert psutil.Process(sb["pid"]).name() == "vit-standby" and psutil.Process(sb["pid"]).nice() > 0
    victim = run.state()["worker_pid"]
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    full_speed.touch()
    run.worker_at_step(0, attempt=2)
    took_over = time.monotonic() - killed
    assert finish(sup, run, timeout=120) == 0, run.log()[-3000:]
    st = run.state()
    second = st["attempts"][1]
    assert second["standby"] is True and second["pid"] == sb["pid"] and second["reason"] == "completed"
    assert second["standby_fallback"] is None and st["attempts"][0]["exit"] == "killed by SIGKILL"
    assert Path(second["log"]).name.startswith("standby-")
    print(f"\nSIGKILL -> standby's first new step: {took_over:.2f}s")
    assert max_abs_diff(run.out / "checkpoint-190", ref.parent / "out" / "checkpoint-190") == 0.0


def test_a_standby_that_keeps_dying_is_replaced_then_given_up_for_a_cold_start(
    tmp_path: Path, make_config: Any, new_run: Any
) -> None:
    run = new_run(make_config(LONG), **pacing_env(tmp_path, PACE_S))
    sup = run.start()
    run.worker_at_step(5)
    killed: set[int] = set()
    for _ in range(3):
        sb = wait_for(
            lambda: (s := run.state().get("standby") or {}).get("pid") not in (None, *killed) and s, 60, "a new standby"
        )
        os.kill(sb["pid"], signal.SIGKILL)
        killed.add(sb["pid"])
    wait_for(
        lambda: (
            "exited while waiting" in run.log()
            and run.state().get("standby") is None
            and run.log().count("exited while waiting") >= 3
        ),
        30,
        "the supervisor to notice three deaths",
    )
    os.kill(run.state()["worker_pid"], signal.SIGKILL)
    run.worker_at_step(0, attempt=2)
    second = run.state()["attempts"][1]
    assert second["standby"] is False and "died 3 times" in second["standby_fallback"]
    assert run.state().get("standby") is None  # no fourth one
    os.kill(sup.pid, signal.SIGTERM)
    assert finish(sup, run) == 0


def test_cold_start_when_the_config_changed_since_the_standby_started(
    tmp_path: Path, make_config: Any, new_run: Any
) -> None:
    run = new_run(make_config(LONG), **pacing_env(tmp_path, PACE_S))
    sup = run.start()
    run.worker_at_step(5)
    sb = ready_standby(run)
    with open(run.config, "a") as f:
        f.write("# edited while training\n")
    os.kill(run.state()["worker_pid"], signal.SIGKILL)
    run.worker_at_step(0, attempt=2)
    second = run.state()["attempts"][1]
    assert second["standby"] is False and "config file changed" in second["standby_fallback"]
    wait_for(
        lambda: not psutil.pid_exists(sb["pid"]) or psutil.Process(sb["pid"]).status() == "zombie",
        30,
        "the dismissed standby to exit",
    )
    os.kill(sup.pid, signal.SIGTERM)
    assert finish(sup, run) == 0


def test_standby_refuses_changed_data_and_the_supervisor_starts_cold(
    tmp_path: Path, make_config: Any, new_run: Any
) -> None:
    _digit_pngs(tmp_path / "images", per_class=8)
    run = new_run(
        make_config(
            {
                "training": {"num_train_epochs": 300, "save_steps": 20},
                "data": {"source": "image_folder", "path": "images", "limit": None},
                "supervisor": {"standby": True},
            }
        ),
        **pacing_env(tmp_path, PACE_S),
    )
    sup = run.start()
    run.worker_at_step(5)
    ready_standby(run)
    # A committed checkpoint to refuse: a paced worker can still be before its first save when the
    # standby is ready, and with none (only a snapshot, which the new data's fingerprint invalidates)
    # a cold worker rightly starts from scratch.
    wait_for(lambda: any(run.out.glob("checkpoint-*")), 120, "a committed checkpoint")
    extra = tmp_path / "images" / "class_3" / "new.png"
    extra.write_bytes((tmp_path / "images" / "class_3" / "1.png").read_bytes())
    os.kill(run.state()["worker_pid"], signal.SIGKILL)
    code = finish(sup, run, timeout=90)
    st = run.state()
    second, third = st["attempts"][1], st["attempts"][2]
    assert second["standby"] is True and second["reason"] == "standby_stale" and "data changed" in second["message"]
    assert third["standby"] is False and third["standby_fallback"].startswith("standby unusable")
    # The cold worker then refuses to resume on changed data, as it must: the guard names the fingerprint.
    assert code == 3 and third["reason"] == "user_error" and "data_fingerprint" in third["message"]
