"""Never two writers on one run: vit-train takes the run's locks before it touches anything
(issue 11, bug 7)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from supervisor import protocol, runlock
from tests.conftest import TINY, deep_update, heartbeat, vit_train, wait_for, worker_env
from tests.pacing import pacing_env

pytestmark = pytest.mark.e2e

LONG = {"training": {"num_train_epochs": 40}}


def config(tmp_path: Path, over: dict | None = None) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(deep_update(TINY, over or LONG)))
    return cfg


def live_files(out: Path) -> Path:
    """What a live run has on disk mid-save: a staging folder, a heartbeat, an exit report."""
    staging = out / ".staging-checkpoint-7"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"half-written")
    protocol.run_dir(out).mkdir(exist_ok=True)
    return staging


def supervised_env(report: Path) -> dict[str, str]:
    return worker_env(VIT_SUPERVISOR_PID=str(os.getpid()), VIT_ATTEMPT="2", VIT_EXIT_REPORT=str(report))


def run(cfg: Path, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str, float]:
    t0 = time.monotonic()
    p = vit_train(cfg, env=env)
    log, _ = p.communicate(timeout=timeout)
    return p.returncode, log, time.monotonic() - t0


def test_vit_train_by_hand_beside_a_supervised_run_exits_2_and_touches_nothing(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    out = tmp_path / "out"
    staging = live_files(out)
    protocol.atomic_write_json(protocol.heartbeat_path(out), {"pid": os.getpid(), "state": "training"})
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with runlock.acquire(out, "run"):  # the supervisor of the live run
        code, log, _ = run(cfg)
    assert code == 2, log[-3000:]
    assert f"pid {os.getpid()}" in log and "already running" in log
    assert (staging / "model.safetensors").read_bytes() == b"half-written"
    after = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name not in ("supervisor.lock",))
    assert after == [p for p in before if not p.endswith("supervisor.lock")]
    assert not (protocol.exit_report_path(out)).exists()  # a refused writer writes nothing into the run


def test_a_supervised_worker_beside_a_live_worker_is_refused_with_a_report(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    out = tmp_path / "out"
    staging = live_files(out)
    protocol.atomic_write_json(protocol.heartbeat_path(out), {"pid": os.getpid(), "state": "training"})
    report = tmp_path / "exit-2.json"
    with runlock.acquire(out, "worker"):
        code, log, _ = run(cfg, supervised_env(report))
    assert code == 2, log[-3000:]
    assert staging.exists() and (staging / "model.safetensors").read_bytes() == b"half-written"
    rep = json.loads(report.read_text())
    assert rep["reason"] == "config_error" and "another worker" in rep["message"] and "\n" not in rep["message"]


def test_a_second_vit_train_by_hand_is_refused_while_the_first_trains_on(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    out = tmp_path / "out"
    first = vit_train(cfg, env=worker_env(**pacing_env(tmp_path, 0.2)))  # it only has to keep training
    try:
        wait_for(lambda: (heartbeat(out).get("global_step") or 0) >= 3, 120, "the first run to train")
        assert runlock.held(out, "run") and runlock.held(out, "worker")
        code, log, _ = run(cfg)
        assert code == 2 and f"pid {first.pid}" in log, log[-3000:]
        step = heartbeat(out).get("global_step") or 0
        wait_for(lambda: (heartbeat(out).get("global_step") or 0) > step, 60, "the first run to keep training")
    finally:
        os.kill(first.pid, signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 3


def test_a_worker_waits_for_an_orphan_that_is_still_saving_then_trains(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"training": {"max_steps": 6}})
    out = tmp_path / "out"
    staging = live_files(out)
    lock = runlock.acquire(out, "worker")  # the orphan of a dead supervisor, saving its last step
    protocol.atomic_write_json(protocol.heartbeat_path(out), {"pid": os.getpid(), "state": "saving"})
    p = vit_train(cfg, env=supervised_env(tmp_path / "exit-2.json"))
    lines: list[str] = []
    assert p.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_for(lambda: any("waiting" in line and "worker" in line for line in lines), 60, "the worker to wait")
        assert p.poll() is None and staging.exists()  # nothing touched while it waits
    finally:
        lock.release()
    assert p.wait(timeout=120) == 0, "".join(lines)[-3000:]
    reader.join(timeout=10)
    assert not staging.exists()  # the orphan is gone: its unfinished save is cleaned up
    assert (out / "checkpoint-6").is_dir()


def test_standalone_torchrun_style_ranks_lock_once_per_node(tmp_path: Path) -> None:
    """Only LOCAL_RANK 0 takes the locks; other ranks of the node do not contend for them."""
    from worker import locks

    cfg_path = config(tmp_path)
    from supervisor.schema import load_config

    cfg = load_config(cfg_path)
    env = {"LOCAL_RANK": "1", "GROUP_RANK": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with runlock.acquire(cfg.output_dir, "worker"):
            assert locks.take(cfg, stop=_NoStop()) == []
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _NoStop:
    requested = False
