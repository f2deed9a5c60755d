"""The public CLI without a worker: status rendering and codes, the lock, config errors, imports, systemd unit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor import protocol, runlock, status
from supervisor.daemon import SUPERVISOR_LOCKED

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "supervisor.cli", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )


def env_with(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "xdg"), **extra)
    env.pop("STATE_DIRECTORY", None)
    return env


def write_state(out: Path, **fields: Any) -> None:
    me = psutil.Process()
    base = {
        "state": "running",
        "supervisor_pid": me.pid,
        "supervisor_create_time": me.create_time(),
        "worker_pid": me.pid,
        "attempt": 2,
        "restart_count": 1,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 4,
        "effective_batch": 32,
        "tracker_run_id": "run-xyz",
        "config": str(out.parent / "config.yaml"),
        "updated": time.time(),
        "attempts": [
            {
                "attempt": 1,
                "end": 1.0,
                "reason": "oom",
                "exit": "exit 4 (oom)",
                "message": "DefaultCPUAllocator: can't allocate memory",
                "step_reached": 0,
            },
            {"attempt": 2, "end": None},
        ],
    }
    base.update(fields)
    protocol.atomic_write_json(protocol.state_path(out), base)
    protocol.atomic_write_json(
        protocol.heartbeat_path(out),
        {
            "pid": base["worker_pid"],
            "state": "training",
            "global_step": 30,
            "max_steps": 120,
            "epoch": 0.5,
            "loss": 1.25,
            "samples_per_s": 64.0,
            "last_checkpoint": str(out / "checkpoint-25"),
            "time": time.time(),
        },
    )


def test_supervisor_package_never_imports_torch_transformers_or_wandb() -> None:
    code = (
        "import supervisor.cli, supervisor.daemon, supervisor.status, supervisor.policy, supervisor.states, "
        "supervisor.host, supervisor.notify, supervisor.logs, supervisor.schema, supervisor.protocol; import sys; "
        "bad = [m for m in ('torch', 'transformers', 'wandb') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([PY, "-c", code], check=True, cwd=REPO, timeout=30)


def test_status_imports_nothing_heavy(tmp_path: Path) -> None:
    """What keeps `status` quick: none of the heavy or optional modules is imported to answer. Its latency
    itself is a figure of bench/footprint.py (a timed assertion here would fail on a busy machine)."""
    write_state(tmp_path / "out")
    r = subprocess.run(
        [PY, "-X", "importtime", "-m", "supervisor.cli", "status", "--run-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "supervisor.status" in imported  # the probe sees our own modules
    heavy = ("torch", "transformers", "wandb", "numpy", "prometheus_client", "logging_journald", "watchdog")
    assert not imported & set(heavy), sorted(imported & set(heavy))


def test_status_of_a_running_run_shows_progress_batch_checkpoint_disk_tracker_and_restarts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_state(out)
    r = cli("status", "--run-dir", str(out))
    assert r.returncode == status.STATUS_RUNNING
    text = r.stdout
    for piece in (
        "state:       running",
        f"worker:      pid {os.getpid()}, attempt 2",
        "restarts:    1",
        "attempt 1: oom (exit 4 (oom))",
        "30/120 (25%)",
        "epoch 0.50",
        "64.0 samples/s",
        "ETA",
        "per-device 8 x accumulation 4 = 32",
        "checkpoint-25",
        "free disk:",
        "tracker run: run-xyz",
    ):
        assert piece in text, f"{piece!r} missing from:\n{text}"


def test_status_json_is_machine_readable(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_state(out)
    r = cli("status", "--run-dir", str(out), "--json")
    v = json.loads(r.stdout)
    assert v["state"] == "running" and v["running"] is True and v["heartbeat"]["global_step"] == 30
    assert v["eta_s"] == pytest.approx(90 * 32 / 64.0)


def test_status_says_when_the_supervisor_died_and_exits_3(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    write_state(out, supervisor_pid=dead.pid, supervisor_create_time=None)
    r = cli("status", "--run-dir", str(out))
    assert r.returncode == status.STATUS_NOT_RUNNING
    assert f"supervisor not running (pid {dead.pid} died)" in r.stdout


@pytest.mark.parametrize("state", ["stopped", "completed", "failed"])
def test_status_of_a_finished_run_exits_3(tmp_path: Path, state: str) -> None:
    write_state(tmp_path / "out", state=state, last_error="gave up" if state == "failed" else None)
    r = cli("status", "--run-dir", str(tmp_path / "out"))
    assert r.returncode == status.STATUS_NOT_RUNNING and f"state:       {state}" in r.stdout


def test_status_of_an_unknown_run_exits_4(tmp_path: Path) -> None:
    r = cli("status", "--run-dir", str(tmp_path / "nothing"))
    assert r.returncode == status.STATUS_UNKNOWN and "unknown" in r.stdout


def test_status_without_argument_lists_every_registered_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    for name, st in (("a", "running"), ("b", "completed")):
        write_state(tmp_path / name, state=st)
        status.register(tmp_path / name, str(tmp_path / f"{name}.yaml"))
    assert len(list((tmp_path / "xdg" / "vit-supervisor" / "runs").glob("*.json"))) == 2
    r = cli("status", env=env_with(tmp_path))
    assert r.returncode == 0 and str(tmp_path / "a") in r.stdout and str(tmp_path / "b") in r.stdout
    r = cli("status", "--json", env=env_with(tmp_path))
    assert sorted(v["state"] for v in json.loads(r.stdout)) == ["completed", "running"]
    assert cli("status", env=env_with(tmp_path / "empty")).returncode == status.STATUS_UNKNOWN


def test_registry_uses_systemd_state_directory_when_set(tmp_path: Path) -> None:
    assert (
        status.registry_dir({"STATE_DIRECTORY": str(tmp_path / "sd"), "XDG_STATE_HOME": "/x"})
        == tmp_path / "sd" / "runs"
    )
    assert status.registry_dir({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "vit-supervisor" / "runs"


def test_bad_config_fails_at_once_with_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("training:\n  output_dir: out\n  per_device_train_batch_sise: 4\n")
    t = time.monotonic()
    r = cli("start", str(cfg), env=env_with(tmp_path))
    assert r.returncode == 2
    assert r.stderr.startswith("vit-supervisor: error: unknown config key 'training.per_device_train_batch_sise'")
    assert "did you mean 'training.per_device_train_batch_size'" in r.stderr
    assert time.monotonic() - t < 5
    assert not (tmp_path / "out").exists() and not (tmp_path / "xdg").exists()


def test_second_start_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  num_labels: 10\ntraining:\n  output_dir: out\n")
    lock = runlock.acquire(tmp_path / "out", "run")
    try:
        r = cli("start", str(cfg), env=env_with(tmp_path))
        assert r.returncode == SUPERVISOR_LOCKED
        assert f"another supervisor or vit-train (pid {os.getpid()}) is already running" in r.stderr
        r = cli("start", "--detach", str(cfg), env=env_with(tmp_path))
        assert r.returncode == SUPERVISOR_LOCKED and f"pid {os.getpid()}" in r.stderr
    finally:
        lock.release()


def test_stop_of_a_run_that_is_not_running_says_so(tmp_path: Path) -> None:
    write_state(tmp_path / "out", state="completed", supervisor_pid=999999)
    r = cli("stop", "--run-dir", str(tmp_path / "out"))
    assert r.returncode == 0 and "not running (state completed)" in r.stdout


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    unit = (REPO / "systemd" / "vit-supervisor@.service").read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "KillMode=mixed",
        "TimeoutStopSec=",
        "Restart=on-failure",
        "RestartPreventExitStatus=2 3 4",
        "User=vit",
        "StateDirectory=vit-supervisor",
        "ProtectSystem=strict",
        "ReadWritePaths=",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "RemoveIPC=no",  # snapshots in /dev/shm must survive a restart of the unit
        "ExecStart=/opt/vit-supervisor/.venv/bin/vit-supervisor start /etc/vit-supervisor/%i.yaml",
    ):
        assert line in unit
    # verify checks that ExecStart exists; point it at a stub, everything else is the real file.
    stub = tmp_path / "vit-supervisor"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    (tmp_path / "vit-supervisor@.service").write_text(
        unit.replace("/opt/vit-supervisor/.venv/bin/vit-supervisor", str(stub))
    )
    r = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / "vit-supervisor@demo.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr + r.stdout


def test_status_node_names_one_node_of_a_multi_node_run(tmp_path: Path) -> None:
    """Each node of a multi-node run keeps its own state (run/node-K/); ``--node K`` reads node K's,
    which a ``from_slurm`` config cannot name outside its job."""
    out = tmp_path / "out"
    protocol.atomic_write_json(protocol.state_path(out, 1), {"state": "completed", "restart_count": 3})
    node1 = cli("status", "--run-dir", str(out), "--node", "1", "--json")
    assert node1.returncode == status.STATUS_NOT_RUNNING, node1.stderr
    assert json.loads(node1.stdout)["restart_count"] == 3
    node0 = cli("status", "--run-dir", str(out), "--json")  # node 0 has no state here
    assert node0.returncode == status.STATUS_UNKNOWN and json.loads(node0.stdout).get("restart_count") != 3
    bad = cli("status", "--run-dir", str(out), "--node", "-1")
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].endswith("it must be 0 or more")
