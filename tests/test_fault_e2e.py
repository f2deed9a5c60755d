"""The worker's fault contract end to end: real signals, real allocator failures, real disks."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import PYTHON, REPO, heartbeat, read_json, vit_train, wait_for, worker_env
from tests.test_worker_e2e import TIMEOUT, max_abs_diff, run_to_end, write_cfg

pytestmark = pytest.mark.e2e

# A wider model: saves take long enough (tens of ms) to be hit in the middle.
WIDE = {"model": {"scratch": {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4}}}


def report(out: Path) -> dict:
    r = read_json(out / "run" / "exit_report.json")
    assert r is not None, "no exit report"
    return r


def all_checkpoints_validate(out: Path) -> list[int]:
    from worker import checkpoint as ckpt

    steps = []
    for c in ckpt.list_checkpoints(out):
        ckpt.validate(c)
        steps.append(ckpt.step_of(c))
    return steps


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_commits_the_current_step_and_resume_continues_exactly(
    tmp_path: Path, sig: signal.Signals, reference_tiny: Path
) -> None:
    cfg = write_cfg(tmp_path / "c.yaml", {"training": {"save_steps": 100}})
    out = tmp_path / "out"
    p = vit_train(cfg)
    wait_for(lambda: (heartbeat(out).get("global_step") or 0) >= 7, TIMEOUT, "step 7", interval=0.005)
    sent = time.monotonic()
    p.send_signal(sig)
    log, _ = p.communicate(timeout=TIMEOUT)
    took = time.monotonic() - sent
    assert p.returncode == 3, log[-3000:]
    r = report(out)
    step = r["step"]
    assert r["reason"] == "interrupted" and r["last_checkpoint"] == str(out / f"checkpoint-{step}")
    assert all_checkpoints_validate(out) == [step]
    print(f"{sig.name}: signal to exit {took:.2f}s, report says {r['stop_to_exit_s']:.3f}s to the report")
    log = run_to_end(cfg, "--resume")
    assert f"global step {step}" in log
    assert max_abs_diff(out / "checkpoint-38", reference_tiny) == 0.0


def test_sigterm_to_the_process_group_with_dataloader_workers_still_checkpoints(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path / "c.yaml", {"training": {"dataloader_num_workers": 2, "save_steps": 100}})
    out = tmp_path / "out"
    p = vit_train(cfg)
    wait_for(lambda: (heartbeat(out).get("global_step") or 0) >= 5, TIMEOUT, "step 5", interval=0.005)
    assert len(psutil.Process(p.pid).children()) >= 2, "expected DataLoader worker processes"
    os.killpg(p.pid, signal.SIGTERM)  # what a terminal or a service manager does
    log, _ = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 3, log[-3000:]
    assert "killed by signal" not in log
    assert all_checkpoints_validate(out) == [report(out)["step"]]


def test_second_signal_while_saving_kills_without_corrupting(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path / "c.yaml", {**WIDE, "training": {"save_steps": 4}})
    out = tmp_path / "out"
    p = vit_train(cfg)
    wait_for(lambda: (heartbeat(out).get("global_step") or 0) >= 9, TIMEOUT, "step 9", interval=0.005)
    p.send_signal(signal.SIGTERM)
    wait_for(
        lambda: heartbeat(out).get("state") in ("saving", "exited") or p.poll() is not None,
        TIMEOUT,
        "the stop save",
        interval=0.001,
    )
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=TIMEOUT)
    assert p.returncode in (-signal.SIGTERM, 3)
    steps = all_checkpoints_validate(out)
    assert steps and steps[0] >= 8
    run_to_end(cfg, "--resume")
    assert not list(out.glob(".staging-*"))


def test_sigkill_in_the_middle_of_a_save_leaves_the_previous_good_checkpoint(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path / "c.yaml", {**WIDE, "training": {"save_steps": 3}})
    out = tmp_path / "out"
    p = vit_train(cfg)
    wait_for(
        lambda: (heartbeat(out).get("global_step") or 0) >= 6 and heartbeat(out).get("state") == "saving",
        TIMEOUT,
        "a save after step 6",
        interval=0.001,
    )
    p.kill()
    p.communicate()
    steps = all_checkpoints_validate(out)
    assert steps and steps[0] >= 3
    log = run_to_end(cfg, "--resume")
    assert "Removing uncommitted checkpoint staging folder" in log or not list(out.glob(".staging-*"))
    assert (out / "checkpoint-38").is_dir()


def test_real_allocator_oom_is_reported_with_batch_and_accumulation(tmp_path: Path) -> None:
    over = {
        "model": {"scratch": {"image_size": 32}},
        "data": {"limit": None},
        "training": {"per_device_train_batch_size": 1024, "gradient_accumulation_steps": 1, "max_steps": 4},
    }
    cfg = write_cfg(tmp_path / "c.yaml", over)
    out = tmp_path / "out"
    log = run_to_end(cfg, env=worker_env(VIT_MEMORY_HEADROOM_MB="400"), expect=4)
    # torch's allocator or, when the limit is met inside a CPU kernel, oneDNN's scratch buffer
    assert "DefaultCPUAllocator: can't allocate memory" in log or "could not create a primitive" in log
    r = report(out)
    assert r["reason"] == "oom" and r["exit_code"] == 4
    assert r["per_device_train_batch_size"] == 1024 and r["gradient_accumulation_steps"] == 1
    assert r["step"] == 0 and r["emergency_checkpoint"] is False
    # The same memory budget fits the lowered batch, with the same effective batch.
    run_to_end(
        cfg,
        "--per-device-train-batch-size",
        "64",
        "--gradient-accumulation-steps",
        "16",
        env=worker_env(VIT_MEMORY_HEADROOM_MB="400"),
    )
    assert report(out)["reason"] == "completed"


def test_real_allocator_oom_in_evaluation_commits_an_emergency_checkpoint(tmp_path: Path) -> None:
    over = {
        "model": {"scratch": {"image_size": 48}},
        "data": {"limit": None},
        "training": {
            "per_device_eval_batch_size": 1024,
            "eval_strategy": "steps",
            "eval_steps": 3,
            "save_steps": 100,
            "max_steps": 6,
        },
    }
    cfg = write_cfg(tmp_path / "c.yaml", over)
    out = tmp_path / "out"
    run_to_end(cfg, env=worker_env(VIT_MEMORY_HEADROOM_MB="300"), expect=4)
    r = report(out)
    assert r["reason"] == "oom" and r["emergency_checkpoint"] is True and r["step"] == 3
    assert all_checkpoints_validate(out) == [3]


def inject(fault: str, cfg: Path) -> subprocess.CompletedProcess[str]:
    """A real worker with a fault raised from a hook (tests/inject_worker.py)."""
    return subprocess.run(
        [PYTHON, str(REPO / "tests" / "inject_worker.py"), fault, str(cfg)],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def test_injected_cuda_oom_in_forward_loses_no_step(tmp_path: Path, reference_tiny: Path) -> None:
    cfg = write_cfg(tmp_path / "c.yaml", {"training": {"save_steps": 100}})
    out = tmp_path / "out"
    p = inject("oom-forward:12", cfg)
    assert p.returncode == 4, p.stderr[-3000:]
    r = report(out)
    assert r["reason"] == "oom" and r["exception_type"] == "OutOfMemoryError"
    assert r["emergency_checkpoint"] is True and r["step"] == 11
    assert all_checkpoints_validate(out) == [11]
    run_to_end(cfg, "--resume")
    assert max_abs_diff(out / "checkpoint-38", reference_tiny) == 0.0


def test_oom_inside_the_optimizer_step_makes_no_emergency_checkpoint(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path / "c.yaml", {"training": {"save_steps": 5}})
    out = tmp_path / "out"
    p = inject("oom-optimizer:8", cfg)
    assert p.returncode == 4, p.stderr[-3000:]
    r = report(out)
    assert r["emergency_checkpoint"] is False and r["phase"] == "optimizer"
    assert all_checkpoints_validate(out) == [5]


def test_crash_writes_a_report_with_the_traceback(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path / "c.yaml")
    out = tmp_path / "out"
    p = inject("crash:4", cfg)
    assert p.returncode == 1
    r = report(out)
    assert r["reason"] == "crash" and r["exception_type"] == "ValueError" and r["step"] == 3
    assert any("injected crash" in line for line in r["traceback"])


def test_worker_stops_safely_when_its_supervisor_dies(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path / "c.yaml", {"training": {"save_steps": 100}})
    out = tmp_path / "out"
    parent_code = (
        "import os, subprocess, sys\n"
        "env = dict(os.environ, VIT_SUPERVISOR_PID=str(os.getpid()))\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'worker', {str(cfg)!r}], env=env, cwd={str(REPO)!r},"
        f" stdout=open({str(tmp_path / 'w.log')!r}, 'w'), stderr=subprocess.STDOUT)\n"
        "print(p.pid, flush=True)\n"
        "p.wait()\n"
    )
    parent = subprocess.Popen([PYTHON, "-c", parent_code], stdout=subprocess.PIPE, text=True, env=worker_env())
    worker_pid = int(parent.stdout.readline())
    wait_for(lambda: (heartbeat(out).get("global_step") or 0) >= 4, TIMEOUT, "step 4", interval=0.005)
    parent.kill()
    parent.wait()
    wait_for(
        lambda: not psutil.pid_exists(worker_pid) or psutil.Process(worker_pid).status() == "zombie",
        TIMEOUT,
        "the orphaned worker to stop",
    )
    r = report(out)
    assert r["reason"] == "interrupted", (tmp_path / "w.log").read_text()[-2000:]
    assert all_checkpoints_validate(out) == [r["step"]]


def test_heartbeat_carries_progress_for_the_supervisor(tmp_path: Path) -> None:
    cfg = write_cfg(
        tmp_path / "c.yaml", {"training": {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 8}}
    )
    out = tmp_path / "out"
    p = vit_train(cfg)
    hb = wait_for(lambda: (h := heartbeat(out)).get("global_step", 0) >= 3 and h, TIMEOUT, "step 3")
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=TIMEOUT)
    for key in (
        "pid",
        "state",
        "global_step",
        "max_steps",
        "epoch",
        "loss",
        "samples_per_s",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "last_checkpoint",
        "time",
    ):
        assert key in hb, key
    assert hb["state"] in ("training", "saving") and hb["max_steps"] == 38 and hb["pid"] == p.pid
    assert hb["per_device_train_batch_size"] == 8 and hb["gradient_accumulation_steps"] == 2
    assert abs(hb["time"] - time.time()) < 60
    assert heartbeat(out)["state"] == "exited"


def test_reserve_larger_than_free_disk_stops_with_disk_low_and_writes_nothing(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path / "c.yaml", {"disk": {"reserve_mb": 1.0e9, "on_low": "stop"}})
    out = tmp_path / "out"
    run_to_end(cfg, expect=5)
    r = report(out)
    assert r["reason"] == "disk_low" and r["step"] == 5 and "MiB" in r["message"]
    assert not list(out.glob("checkpoint-*")) and not list(out.glob(".staging-*"))


@pytest.fixture
def small_fs(tmp_path: Path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_pauses_training_until_space_appears(tmp_path: Path, small_fs: Path) -> None:
    cfg = write_cfg(
        tmp_path / "c.yaml",
        {"training": {"output_dir": str(small_fs / "out")}, "disk": {"reserve_mb": 1, "on_low": "wait"}},
    )
    out = small_fs / "out"
    p = vit_train(cfg)
    wait_for(lambda: (out / "checkpoint-5").is_dir(), TIMEOUT, "the first checkpoint", interval=0.005)
    os.kill(p.pid, signal.SIGSTOP)  # fill the disk between two saves
    ballast = small_fs / "ballast"
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    ballast.write_bytes(b"\0" * max(0, free - 512 * 1024))
    os.kill(p.pid, signal.SIGCONT)
    hb = wait_for(lambda: (h := heartbeat(out)).get("state") == "waiting_for_disk" and h, TIMEOUT, "waiting_for_disk")
    assert hb["disk_needed_bytes"] > hb["disk_free_bytes"]
    step = hb["global_step"]
    time.sleep(0.5)  # nothing should move while paused
    assert heartbeat(out)["global_step"] == step and p.poll() is None
    ballast.unlink()
    log, _ = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, log[-3000:]
    assert "Low disk" in log and "Disk space available again" in log
    assert all_checkpoints_validate(out)[0] == 38
    assert not list(out.glob(".staging-*"))
