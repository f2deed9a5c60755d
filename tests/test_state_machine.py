"""The supervisor loop driven through a fake OS seam: fake clock, fake children, real files in tmp_path.

No process is started and no time passes; a scripted world decides what each
"worker" does when it is spawned or signalled.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from supervisor import protocol
from supervisor.daemon import SUPERVISOR_FAILED, SUPERVISOR_OK, Supervisor
from supervisor.schema import Config, from_dict
from supervisor.states import TRANSITIONS, State


@dataclass
class FakeChild:
    pid: int
    argv: list[str]
    env: dict[str, str]
    spawned_at: float
    code: int | None = None
    signals: list[tuple[int, bool, float]] = field(default_factory=list)

    @property
    def batch(self) -> tuple[int, int]:
        a = self.argv
        return (
            int(a[a.index("--per-device-train-batch-size") + 1]),
            int(a[a.index("--gradient-accumulation-steps") + 1]),
        )


class FakeOS:
    """Time moves only in ``wait``; scheduled events fire as the clock passes them."""

    def __init__(self, out: Path, script: Callable[[FakeOS, FakeChild], None]) -> None:
        self.out = out
        self.script = script
        self.now = 0.0
        self.children: list[FakeChild] = []
        self.events: list[tuple[float, Callable[[], None]]] = []
        self.free = 10 * 2**30
        self.ooms = 0
        self.foreign_alive: set[int] = set()
        self.kill_hook: Callable[[FakeChild, int], None] = default_kill
        self.waits = 0

    # seam
    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now

    def wait(self, timeout: float) -> None:
        self.waits += 1
        if self.waits > 10_000:
            raise AssertionError("supervisor loop did not finish")
        target = self.now + timeout
        due = sorted((e for e in self.events if e[0] <= target), key=lambda e: e[0])
        if due:  # like a wake-up from the pipe: return at the first event
            when, fn = due[0]
            self.events.remove(due[0])
            self.now = max(self.now, when)
            fn()
        else:
            self.now = target

    def spawn(self, argv: list[str], env: dict[str, str], log_path: Path) -> tuple[int, float]:
        child = FakeChild(1000 + len(self.children), argv, env, self.now)
        self.children.append(child)
        self.script(self, child)
        return child.pid, self.time()

    def exit_status(self, pid: int) -> int | None:
        return next(c.code for c in self.children if c.pid == pid)

    def kill(self, pid: int, sig: int, *, group: bool = False) -> bool:
        if pid in self.foreign_alive:
            return True
        child = next(c for c in self.children if c.pid == pid)
        if child.code is not None:
            return False
        child.signals.append((sig, group, self.now))
        self.kill_hook(child, sig)
        return True

    def alive(self, pid: int, create_time: float | None) -> bool:
        return pid in self.foreign_alive

    def free_disk(self, path: Path) -> int:
        return self.free

    def oom_kills(self) -> int:
        return self.ooms

    # helpers for scripts
    def at(self, delay: float, fn: Callable[[], None]) -> None:
        self.events.append((self.now + delay, fn))

    def heartbeat(self, child: FakeChild, step: int | None, state: str = "training") -> None:
        protocol.atomic_write_json(
            protocol.heartbeat_path(self.out),
            {"pid": child.pid, "state": state, "global_step": step, "max_steps": 100, "tracker_run_id": "abc123"},
            durable=False,
        )

    def exit(
        self,
        child: FakeChild,
        code: int,
        reason: str | None = None,
        step: int | None = None,
        message: str = "",
        **extra: Any,
    ) -> None:
        if reason is not None:
            protocol.atomic_write_json(
                child.env[protocol.ENV_EXIT_REPORT],
                {"reason": reason, "exit_code": code, "step": step, "message": message, "pid": child.pid, **extra},
            )
        child.code = code


def default_kill(child: FakeChild, sig: int) -> None:
    """A well-behaved worker: SIGTERM -> checkpoint and exit 3; SIGKILL -> dies."""
    if child.code is not None:
        return
    if sig == signal.SIGKILL:
        child.code = -9
    elif sig == signal.SIGTERM:
        protocol.atomic_write_json(
            child.env[protocol.ENV_EXIT_REPORT],
            {"reason": "interrupted", "exit_code": 3, "pid": child.pid, "message": "stopped at step"},
        )
        child.code = 3


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _rec(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))

    info = warning = error = _rec

    def transitions(self) -> list[tuple[str | None, str]]:
        return [(kw["old"], kw["new"]) for e, kw in self.events if e == "state"]


def make_cfg(tmp_path: Path, **sup: Any) -> Config:
    cfg = from_dict(
        {
            "model": {"num_labels": 10},
            "training": {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 16},
            "disk": {"reserve_mb": 1, "recheck_s": 5},
            "supervisor": {
                "backoff_initial_s": 1,
                "backoff_factor": 2,
                "backoff_max_s": 60,
                "hang_timeout_s": 30,
                "startup_timeout_s": 100,
                "eval_timeout_s": 200,
                "term_grace_s": 10,
                "standby": False,
                **sup,
            },
        }
    )
    cfg.source_path = str(tmp_path / "config.yaml")
    return cfg


def run(
    tmp_path: Path,
    script: Callable[[FakeOS, FakeChild], None],
    *,
    setup: Callable[[FakeOS], None] | None = None,
    cfg: Config | None = None,
    **sup: Any,
) -> tuple[Supervisor, FakeOS, RecordingLog, int]:
    cfg = cfg or make_cfg(tmp_path, **sup)
    fake = FakeOS(Path(cfg.training.output_dir), script)
    if setup:
        setup(fake)
    log = RecordingLog()
    sup_ = Supervisor(cfg, fake, log=log)
    code = sup_.run()
    return sup_, fake, log, code


def state_file(sup: Supervisor) -> dict[str, Any]:
    return json.loads(protocol.state_path(sup.out).read_text())


def script_of(*behaviours: Callable[[FakeOS, FakeChild], None]) -> Callable[[FakeOS, FakeChild], None]:
    def script(fake: FakeOS, child: FakeChild) -> None:
        behaviours[min(len(fake.children), len(behaviours)) - 1](fake, child)

    return script


def completes(fake: FakeOS, child: FakeChild) -> None:
    fake.at(5, lambda: fake.heartbeat(child, 50))
    fake.at(10, lambda: fake.exit(child, 0, "completed", step=100, message="completed 100 steps"))


def crashes_after(step: int | None) -> Callable[[FakeOS, FakeChild], None]:
    def behaviour(fake: FakeOS, child: FakeChild) -> None:
        if step is not None:
            fake.at(2, lambda: fake.heartbeat(child, step))
        fake.at(3, lambda: fake.exit(child, 1, "crash", step=step, message="ValueError: boom"))

    return behaviour


# ----------------------------------------------------------------------------- tests


def test_completed_run_ends_completed_with_exit_0_and_nothing_relaunched(tmp_path: Path) -> None:
    sup, fake, log, code = run(tmp_path, script_of(completes))
    assert code == SUPERVISOR_OK and sup.state == State.COMPLETED
    assert len(fake.children) == 1
    assert log.transitions() == [(None, "starting"), ("starting", "running"), ("running", "completed")]
    st = state_file(sup)
    assert st["state"] == "completed" and st["attempts"][0]["reason"] == "completed"
    assert st["attempts"][0]["step_reached"] == 100 and st["tracker_run_id"] == "abc123"


def test_worker_is_launched_with_resume_batch_flags_and_seam_environment(tmp_path: Path) -> None:
    sup, fake, _, _ = run(tmp_path, script_of(completes))
    child = fake.children[0]
    assert child.argv[1:4] == ["-m", "worker", str(tmp_path / "config.yaml")] and "--resume" in child.argv
    assert child.batch == (16, 1)
    assert child.env[protocol.ENV_ATTEMPT] == "1"
    assert child.env[protocol.ENV_EXIT_REPORT] == str(sup.run_dir / "exit-1.json")
    assert child.env[protocol.ENV_SUPERVISOR_PID].isdigit()


def test_crash_after_progress_restarts_at_once_then_completes(tmp_path: Path) -> None:
    sup, fake, log, code = run(tmp_path, script_of(crashes_after(10), completes))
    assert code == SUPERVISOR_OK and len(fake.children) == 2
    assert ("running", "starting") in log.transitions() and ("running", "backoff") not in log.transitions()
    crashed_at = fake.children[0].spawned_at + 3
    assert fake.children[1].spawned_at == pytest.approx(crashed_at)  # progress: no back-off
    st = state_file(sup)
    assert st["restart_count"] == 1
    assert st["attempts"][0]["reason"] == "crash" and st["attempts"][0]["message"] == "ValueError: boom"
    assert fake.children[1].env[protocol.ENV_ATTEMPT] == "2"


def test_backoff_to_failed_after_retries_without_progress(tmp_path: Path) -> None:
    sup, fake, _log, code = run(tmp_path, script_of(crashes_after(None)), max_failures_without_progress=3)
    assert code == SUPERVISOR_FAILED and sup.state == State.FAILED
    assert len(fake.children) == 3
    gaps = [b.spawned_at - (a.spawned_at + 3) for a, b in zip(fake.children, fake.children[1:], strict=False)]
    assert gaps == [pytest.approx(1.0), pytest.approx(2.0)]  # exponential
    st = state_file(sup)
    assert "gave up after 3 consecutive attempts" in st["last_error"] and "ValueError: boom" in st["last_error"]


def test_progress_resets_the_crash_loop_count(tmp_path: Path) -> None:
    # Each attempt crashes, but each gets further than any before: that is progress, keep going.
    behaviours = [crashes_after(10 * (i + 1)) for i in range(5)] + [completes]
    _sup, fake, _, code = run(tmp_path, script_of(*behaviours), max_failures_without_progress=2)
    assert code == SUPERVISOR_OK and len(fake.children) == 6


def test_repeating_the_same_crash_step_is_not_progress(tmp_path: Path) -> None:
    # Resumed from an older checkpoint and crashed at the same step again: no new ground.
    _sup, fake, _, code = run(tmp_path, script_of(crashes_after(40)), max_failures_without_progress=2)
    assert code == SUPERVISOR_FAILED and len(fake.children) == 3  # 1 with progress, then 2 without


def oom(fake: FakeOS, child: FakeChild) -> None:
    fake.at(2, lambda: fake.exit(child, 4, "oom", step=0, message="DefaultCPUAllocator: can't allocate memory"))


def test_oom_halves_batch_and_doubles_accumulation_and_keeps_it_across_supervisor_restart(tmp_path: Path) -> None:
    sup, fake, log, code = run(tmp_path, script_of(oom, oom, completes))
    assert code == SUPERVISOR_OK
    assert [c.batch for c in fake.children] == [(16, 1), (8, 2), (4, 4)]
    assert ("running", "starting") in log.transitions()  # no backoff for an OOM
    st = state_file(sup)
    assert (st["per_device_train_batch_size"], st["gradient_accumulation_steps"]) == (4, 4)
    # A new supervisor on the same run starts from the lowered values.
    _sup2, fake2, _, _ = run(tmp_path, script_of(completes))
    assert fake2.children[0].batch == (4, 4)
    assert fake2.children[0].env[protocol.ENV_ATTEMPT] == "4"  # attempts keep counting


def test_oom_at_minimum_batch_fails_with_clear_message(tmp_path: Path) -> None:
    sup, fake, _, code = run(tmp_path, script_of(oom), min_per_device_batch=8)
    assert code == SUPERVISOR_FAILED and len(fake.children) == 2
    assert "min_per_device_batch is 8" in state_file(sup)["last_error"]


def test_non_retryable_exit_fails_at_once_with_workers_message(tmp_path: Path) -> None:
    def incompatible(fake: FakeOS, child: FakeChild) -> None:
        fake.at(1, lambda: fake.exit(child, 2, "incompatible_checkpoint", message="model_name: 'a' -> 'b'"))

    sup, fake, _, code = run(tmp_path, script_of(incompatible))
    assert code == SUPERVISOR_FAILED and len(fake.children) == 1
    assert "model_name: 'a' -> 'b'" in state_file(sup)["last_error"]


def hangs_at(step: int) -> Callable[[FakeOS, FakeChild], None]:
    def behaviour(fake: FakeOS, child: FakeChild) -> None:
        fake.at(2, lambda: fake.heartbeat(child, step))

    return behaviour


def test_hang_gets_sigterm_then_sigkill_after_grace_then_restart(tmp_path: Path) -> None:
    def frozen(child: FakeChild, sig: int) -> None:  # a SIGSTOPped worker: only SIGKILL works
        if sig == signal.SIGKILL:
            child.code = -9

    sup, fake, _log, code = run(
        tmp_path, script_of(hangs_at(7), completes), setup=lambda f: setattr(f, "kill_hook", frozen)
    )
    assert code == SUPERVISOR_OK and len(fake.children) == 2
    sigs = fake.children[0].signals
    assert [(s, g) for s, g, _ in sigs] == [(signal.SIGTERM, False), (signal.SIGKILL, True)]
    last_step_at = fake.children[0].spawned_at + 2
    assert sigs[0][2] == pytest.approx(last_step_at + 30, abs=0.6)  # hang_timeout_s
    assert sigs[1][2] - sigs[0][2] == pytest.approx(10, abs=0.6)  # term_grace_s
    st = state_file(sup)
    assert st["attempts"][0]["reason"] == "hang" and st["attempts"][0]["exit"] == "killed by SIGKILL"


def test_startup_gets_its_own_longer_allowance(tmp_path: Path) -> None:
    never_starts = lambda fake, child: None  # noqa: E731
    _sup, fake, _, _ = run(tmp_path, script_of(never_starts, completes))
    first_signal = fake.children[0].signals[0]
    assert first_signal[0] == signal.SIGTERM
    assert first_signal[2] == pytest.approx(100, abs=0.6)  # startup_timeout_s, not hang_timeout_s


def test_waiting_for_disk_in_the_worker_is_never_a_hang(tmp_path: Path) -> None:
    def waits_then_completes(fake: FakeOS, child: FakeChild) -> None:
        fake.at(1, lambda: fake.heartbeat(child, 5, protocol.HB_WAITING_FOR_DISK))
        fake.at(5000, lambda: fake.exit(child, 0, "completed", step=100))

    _sup, fake, _, code = run(tmp_path, script_of(waits_then_completes))
    assert code == SUPERVISOR_OK and fake.children[0].signals == []


def test_stop_signal_forwards_sigterm_to_worker_only_and_ends_stopped(tmp_path: Path) -> None:
    holder: dict[str, Supervisor] = {}

    def trains(fake: FakeOS, child: FakeChild) -> None:
        fake.at(2, lambda: fake.heartbeat(child, 20))
        fake.at(3, lambda: holder["sup"].on_signal(signal.SIGINT))

    cfg = make_cfg(tmp_path)
    fake = FakeOS(Path(cfg.training.output_dir), script_of(trains))
    log = RecordingLog()
    sup = holder["sup"] = Supervisor(cfg, fake, log=log)
    assert sup.run() == SUPERVISOR_OK
    assert sup.state == State.STOPPED and len(fake.children) == 1
    assert fake.children[0].signals[0][:2] == (signal.SIGTERM, False)
    assert log.transitions()[-2:] == [("running", "stopping"), ("stopping", "stopped")]


def test_second_signal_forces_sigkill(tmp_path: Path) -> None:
    holder: dict[str, Supervisor] = {}

    def slow_to_stop(fake: FakeOS, child: FakeChild) -> None:
        fake.at(2, lambda: holder["sup"].on_signal(signal.SIGTERM))
        fake.at(3, lambda: holder["sup"].on_signal(signal.SIGTERM))

    cfg = make_cfg(tmp_path)
    fake = FakeOS(Path(cfg.training.output_dir), script_of(slow_to_stop))
    fake.kill_hook = lambda child, sig: setattr(child, "code", -9) if sig == signal.SIGKILL else None
    sup = holder["sup"] = Supervisor(cfg, fake, log=RecordingLog())
    assert sup.run() == SUPERVISOR_OK and sup.state == State.STOPPED
    sigs = fake.children[0].signals
    assert [s for s, _, _ in sigs] == [signal.SIGTERM, signal.SIGKILL]
    assert sigs[1][2] < 5  # long before term_grace_s


def test_worker_killed_by_foreign_sigterm_is_restarted_unless_configured(tmp_path: Path) -> None:
    def external(fake: FakeOS, child: FakeChild) -> None:
        fake.at(2, lambda: fake.exit(child, -15))

    _, fake, _, code = run(tmp_path / "a", script_of(external, completes))
    assert code == SUPERVISOR_OK and len(fake.children) == 2
    sup, fake, _, code = run(tmp_path / "b", script_of(external), restart_on_external_signal=False)
    assert code == SUPERVISOR_OK and sup.state == State.STOPPED and len(fake.children) == 1


def test_low_disk_waits_and_rechecks_before_launching(tmp_path: Path) -> None:
    def setup(fake: FakeOS) -> None:
        fake.free = 0
        fake.at(12, lambda: setattr(fake, "free", 10 * 2**30))

    _sup, fake, log, code = run(tmp_path, script_of(completes), setup=setup)
    assert code == SUPERVISOR_OK and len(fake.children) == 1
    assert fake.children[0].spawned_at == pytest.approx(15, abs=1.1)  # re-checked every recheck_s (5)
    assert log.transitions()[:3] == [(None, "starting"), ("starting", "waiting"), ("waiting", "starting")]


def test_sigkill_with_moved_oom_counter_is_a_host_oom(tmp_path: Path) -> None:
    def host_oom(fake: FakeOS, child: FakeChild) -> None:
        def die() -> None:
            fake.ooms += 1
            child.code = -9

        fake.at(2, die)

    sup, _fake, _, _ = run(tmp_path, script_of(host_oom, completes))
    a = state_file(sup)["attempts"][0]
    assert a["reason"] == "host_oom" and "host OOM" in a["message"]


def test_previous_workers_survivor_is_waited_for_before_launch(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    out = Path(cfg.training.output_dir)
    protocol.atomic_write_json(
        protocol.state_path(out),
        {
            "state": "running",
            "worker_pid": 4242,
            "worker_create_time": 1.0,
            "supervisor_pid": 1,
            "attempts": [{"attempt": 1, "end": None}],
        },
    )

    def setup(fake: FakeOS) -> None:
        fake.foreign_alive.add(4242)
        fake.at(7, lambda: fake.foreign_alive.discard(4242))

    sup, fake, _, code = run(tmp_path, script_of(completes), setup=setup, cfg=cfg)
    assert code == SUPERVISOR_OK
    assert fake.children[0].spawned_at >= 7  # never two workers at once
    st = state_file(sup)
    assert st["attempts"][0]["reason"] == "supervisor_died" and st["attempts"][1]["attempt"] == 2


def test_every_transition_in_the_code_is_declared() -> None:
    import re

    src = (Path(__file__).resolve().parents[1] / "supervisor" / "daemon.py").read_text()
    labelled = re.findall(r"# (None|[A-Z]+) -> ([A-Z]+)", src)
    assert labelled
    for old, new in labelled:
        assert State[new] in TRANSITIONS[None if old == "None" else State[old]], f"{old} -> {new}"
