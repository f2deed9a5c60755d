"""The supervisor owns the snapshot stores (issue 12, lifecycle): real supervisor, real worker,
real files. A completed run leaves no store behind and `status` shows the snapshot while the run
lives; a graceful stop leaves none either; a too small shared-memory file system gives one
warning and a disk-only run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from supervisor import shm
from tests.conftest import PYTHON, REPO, Run, finish, note_real_process

pytestmark = pytest.mark.e2e

STALL = 60  # stall limit (restarts while the run moves); sized for two cores shared by many


def snapshot_config(make_config: Any, shm_root: Path, **extra: Any) -> Path:
    over = {"snapshot": {"every_steps": 1, "root": str(shm_root)}, **extra}
    return Path(make_config(over))


def store_header(out: Path, base: Path) -> dict[str, Any]:
    """The rank-0 store's header ({} while there is none or it does not parse)."""
    try:
        return dict(json.loads((shm.default_root(out, 0, base) / "header.json").read_bytes()))
    except (OSError, ValueError):
        return {}


def test_a_completed_run_leaves_no_store_and_status_showed_the_snapshot_while_it_ran(
    tmp_path: Path, make_config: Any, new_run: Any
) -> None:
    base = tmp_path / "shm"
    run: Run = new_run(snapshot_config(make_config, base))
    proc = run.start()
    step = run.wait_for(lambda: store_header(run.out, base).get("step", 0) >= 5, STALL, "a snapshot of step 5")
    assert step
    # Freeze the worker so that the snapshot status reads is the one on disk now.
    pid = run.state()["worker_pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        held = store_header(run.out, base)["step"]
        r = run.cli("status", "--run-dir", str(run.out), "--json")
        human = run.cli("status", "--run-dir", str(run.out))
    finally:
        os.kill(pid, signal.SIGCONT)
    assert r.returncode == 0, r.stderr
    snap = json.loads(r.stdout)["snapshot"]
    assert snap["step"] == held and snap["problem"] is None and snap["size"] > 0 and snap["age_s"] < 600
    assert f"snapshot:    step {held}," in human.stdout, human.stdout
    assert finish(proc, run, STALL) == 0, run.describe()
    assert run.state()["state"] == "completed"
    assert shm.run_stores(run.out, base) == [], "a completed run left its snapshot store behind"
    # The worker removes its own store when it completes (a `vit-train` by hand has no supervisor);
    # the supervisor's removal covers what a worker could not (tests/test_state_machine.py).
    after = run.cli("status", "--run-dir", str(run.out), "--json")
    assert json.loads(after.stdout)["snapshot"] is None


def test_a_graceful_stop_leaves_no_store_because_the_checkpoint_holds_the_step(
    tmp_path: Path, make_config: Any, new_run: Any
) -> None:
    base = tmp_path / "shm"
    # save_steps 1000: only the stop's own checkpoint can cover the snapshot.
    run: Run = new_run(snapshot_config(make_config, base, training={"save_steps": 1000, "num_train_epochs": 20}))
    proc = run.start()
    run.wait_for(lambda: store_header(run.out, base).get("step", 0) >= 5, STALL, "a snapshot of step 5")
    # `stop` waits for the supervisor's pid to go, so it runs beside us while we reap the supervisor.
    stopper = subprocess.Popen(
        [PYTHON, "-m", "supervisor.cli", "stop", str(run.config)],
        env=run.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    assert finish(proc, run, STALL) == 0, run.describe()
    said, _ = stopper.communicate(timeout=300)
    assert stopper.returncode == 0, said
    assert run.state()["state"] == "stopped"
    assert list(run.out.glob("checkpoint-*")), "the stop committed no checkpoint"
    assert shm.run_stores(run.out, base) == [], run.log()[-2000:]
    assert "holds the newest state" in run.log()


def _can_mount_a_private_tmpfs(where: Path) -> str | None:
    """Why a private tmpfs cannot be mounted here (None when it can): needs unshare and either
    root or unprivileged user namespaces (Docker's default seccomp profile forbids both)."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    where.mkdir(exist_ok=True)
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$1"', "sh", str(where)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a private namespace: {probe.stderr.strip()}"


def test_a_too_small_shared_memory_gives_one_warning_and_a_disk_only_run(
    tmp_path: Path, make_config: Any, new_run: Any
) -> None:
    """snapshot.root on a real 64 KiB tmpfs (Docker's /dev/shm is 64 MB; the tiny model needs ~2.5 MB),
    mounted in a private mount namespace so that neither root nor the host's mounts are involved."""
    base = tmp_path / "shm"
    why = _can_mount_a_private_tmpfs(base)
    if why:
        pytest.skip(why)
    run: Run = new_run(snapshot_config(make_config, base))
    listing = tmp_path / "tmpfs-after-run.txt"
    note_real_process("supervisor")
    run.n += 1
    script = (
        'mount -t tmpfs -o size=64k tmpfs "$1" || exit 90; '
        '"$2" -m supervisor.cli start "$3"; rc=$?; ls -A "$1" > "$4"; exit $rc'
    )
    with open(tmp_path / f"supervisor-{run.n}.log", "w") as log:
        proc = subprocess.Popen(
            ["unshare", "-rm", "sh", "-c", script, "sh", str(base), PYTHON, str(run.config), str(listing)],
            env=run.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
    run.procs.append(proc)
    assert finish(proc, run, STALL) == 0, run.describe()
    assert run.state()["state"] == "completed"
    warnings = [ln for ln in run.log().splitlines() if '"snapshots"' in ln]
    assert len(warnings) == 1, warnings
    line = json.loads(warnings[0])
    assert line["level"] == "warning" and line["action"] == "off: disk checkpoints only"
    for part in ("has 64.0 KiB free", "need", "--shm-size=", "snapshot.root", "snapshot.every_steps: 0"):
        assert part in line["why"], line["why"]
    worker_log = (run.out / "run" / "logs" / "attempt-1.log").read_text()
    assert "Snapshots off for this run (--no-snapshots)" in worker_log
    assert list(run.out.glob("checkpoint-*")), "the disk-only run wrote no checkpoint"
    assert listing.read_text() == "", f"the worker wrote into the too small tmpfs: {listing.read_text()}"
