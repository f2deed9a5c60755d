"""The supervisor loop driven through a fake OS seam: fake clock, fake children, real files in tmp_path.

No process is started and no time passes; a scripted world decides what each
"worker" does when it is spawned or signalled.
"""

from __future__ import annotations

import json
import os
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
    stdin_pipe: bool = False
    lines: list[str | None] = field(default_factory=list)
    """What the supervisor wrote to its stdin (None: it closed it)."""

    @property
    def standby(self) -> bool:
        return "--standby" in self.argv

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
        self.not_workers: set[int] = set()  # alive, but not a vit worker (pid reuse)
        self.dir_id: tuple[int, int] | None = (1, 1)
        self.standby_script: Callable[[FakeOS, FakeChild], None] = lambda fake, child: None
        self.go_hook: Callable[[FakeChild, str], None] = lambda child, line: None
        self.cfg_path = ""
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

    def spawn(
        self, argv: list[str], env: dict[str, str], log_path: Path, *, stdin_pipe: bool = False
    ) -> tuple[int, float]:
        child = FakeChild(1000 + len(self.children), argv, env, self.now, stdin_pipe=stdin_pipe)
        self.children.append(child)
        if child.standby:
            self.standby_script(self, child)
        else:
            self.script(self, child)
        return child.pid, self.time()

    def send_line(self, pid: int, line: str | None) -> bool:
        child = next(c for c in self.children if c.pid == pid)
        if not child.stdin_pipe or child.code is not None or (child.lines and child.lines[-1] is None):
            return False
        child.lines.append(line)
        if line is None:
            # Like worker/standby.py: stdin is read (EOF: "not needed", exit 0) only once prepared.
            if child.code is None and protocol.standby_announcement(self.out, child.pid).exists():
                self.at(0.1, lambda: setattr(child, "code", 0) if child.code is None else None)
            return False
        child.lines.append(None)
        order = protocol.LaunchOrder.from_line(line)
        if order is not None:  # the standby now is that attempt's worker
            child.env.update(order.env())
        self.go_hook(child, line)
        return True

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

    def is_worker(self, pid: int, create_time: float | None) -> bool:
        return pid in self.foreign_alive and pid not in self.not_workers and create_time is not None

    def dir_identity(self, path: Path) -> tuple[int, int] | None:
        return self.dir_id

    def free_disk(self, path: Path) -> int:
        return self.free

    def oom_kills(self) -> int:
        return self.ooms

    # helpers for scripts
    def at(self, delay: float, fn: Callable[[], None]) -> None:
        self.events.append((self.now + delay, fn))

    def heartbeat(
        self, child: FakeChild, step: int | None, state: str = "training", start_step: int | None = None
    ) -> None:
        hb = {"pid": child.pid, "state": state, "global_step": step, "max_steps": 100, "tracker_run_id": "abc123"}
        if start_step is not None:
            hb["start_step"] = start_step
        protocol.atomic_write_json(protocol.heartbeat_path(self.out), hb, durable=False)

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
                protocol.record_dict(
                    protocol.ExitReport(reason, exit_code=code, step=step, message=message, pid=child.pid, **extra)
                ),
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
            protocol.record_dict(
                protocol.ExitReport("interrupted", exit_code=3, pid=child.pid, message="stopped at step")
            ),
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


def test_an_attempt_resumed_from_a_newer_snapshot_records_its_own_start_step(tmp_path: Path) -> None:
    """The supervisor launches knowing only the disk checkpoints; a worker that resumed from a newer
    shared-memory snapshot says so in its heartbeat, and the steps redone count from there."""

    def resumes_from_snapshot(fake: FakeOS, child: FakeChild) -> None:
        fake.at(1, lambda: fake.heartbeat(child, 37, start_step=37))
        fake.at(4, lambda: fake.heartbeat(child, 60))
        fake.at(10, lambda: fake.exit(child, 0, "completed", step=100, message="completed 100 steps"))

    sup, fake, _, code = run(tmp_path, script_of(crashes_after(38), resumes_from_snapshot))
    assert code == SUPERVISOR_OK and len(fake.children) == 2
    second = state_file(sup)["attempts"][1]
    assert second["step_start"] == 37  # not 0: no disk checkpoint existed at the launch
    assert second["first_step_at"] - second["start"] == pytest.approx(4)  # step 60, not the resumed 37


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


# Which states each handler runs in (a method reached from several is checked for each).
_HANDLER_STATES: dict[str, set[str | None]] = {
    "run": {None},
    "_starting": {"STARTING"},
    "_waiting": {"WAITING"},
    "_backoff": {"BACKOFF"},
    "_end_before_launch": {"STARTING", "WAITING", "BACKOFF"},
    "_request_stop": {"RUNNING"},
    "_apply": {"RUNNING", "STOPPING"},
    "_continue": {"RUNNING"},
    "_restart": {"RUNNING"},
}


def _transition_calls() -> list[tuple[str, int, str, set[str]]]:
    """(enclosing method, line, target state, labelled sources) for every ``_transition(State.X, ...)`` call."""
    import ast
    import re

    path = Path(__file__).resolve().parents[1] / "supervisor" / "daemon.py"
    src = path.read_text()
    lines = src.splitlines()
    found = []
    for fn in ast.walk(ast.parse(src)):
        if not isinstance(fn, ast.FunctionDef):
            continue
        for node in ast.walk(fn):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "_transition"
                and fn.name != "_transition"
            ):
                target = node.args[0]
                assert isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name), ast.dump(target)
                assert target.value.id == "State", f"line {node.lineno}: _transition needs a literal State.X"
                label = lines[node.lineno - 2].strip()  # the `# A -> B` comment right above the call
                pairs = re.findall(r"(None|[A-Z]+) -> ([A-Z]+)", label)
                assert pairs, f"line {node.lineno}: the call has no `# A -> B` label above it"
                assert all(new == target.attr for _, new in pairs), f"line {node.lineno}: label {label!r}"
                found.append((fn.name, node.lineno, target.attr, {old for old, _ in pairs}))
    return found


def test_every_transition_call_is_declared_and_labelled() -> None:
    """Checks the calls themselves (AST), not only the comments: the label above each call must
    name its real target, and every state the enclosing handler runs in must allow that move."""
    calls = _transition_calls()
    assert len(calls) >= 15
    for method, line, new, labelled in calls:
        assert method in _HANDLER_STATES, f"line {line}: _transition in {method}: add it to _HANDLER_STATES"
        for old in _HANDLER_STATES[method]:
            source = None if old is None else State[old]
            assert State[new] in TRANSITIONS[source], f"{method} line {line}: {old} -> {new} is not allowed"
            assert (old or "None") in labelled, f"{method} line {line}: label does not mention {old} -> {new}"


# ----------------------------------------------------------------------------- the standby, through the fake host


def standby_cfg(tmp_path: Path, **sup: Any) -> Config:
    cfg = make_cfg(tmp_path, standby=True, **sup)
    Path(cfg.source_path).write_text("model: {num_labels: 10}\n")
    return cfg


def prepares(delay: float = 1.0) -> Callable[[FakeOS, FakeChild], None]:
    """A standby that announces itself ready ``delay`` seconds after it is spawned."""

    def behaviour(fake: FakeOS, child: FakeChild) -> None:
        def ready() -> None:
            protocol.atomic_write_json(
                protocol.standby_announcement(fake.out, child.pid),
                {"pid": child.pid, "config_sha256": protocol.config_sha(fake.cfg_path)},
            )

        fake.at(delay, ready)

    return behaviour


def trains_then_completes(fake: FakeOS, child: FakeChild) -> None:
    """What a standby does with the go: report steps, then complete."""
    fake.at(1, lambda: fake.heartbeat(child, 60))
    fake.at(4, lambda: fake.exit(child, 0, "completed", step=100, message="completed 100 steps"))


def run_with_standby(
    tmp_path: Path,
    script: Callable[[FakeOS, FakeChild], None],
    *,
    standby: Callable[[FakeOS, FakeChild], None] | None = None,
    go: Callable[[FakeOS, FakeChild, str], None] | None = None,
    setup: Callable[[FakeOS, Supervisor], None] | None = None,
    **sup: Any,
) -> tuple[Supervisor, FakeOS, RecordingLog, int]:
    cfg = standby_cfg(tmp_path, **sup)
    fake = FakeOS(Path(cfg.training.output_dir), script)
    fake.cfg_path = cfg.source_path
    fake.standby_script = standby or prepares()
    fake.go_hook = lambda child, line: (go or (lambda f, c, ln: trains_then_completes(f, c)))(fake, child, line)
    log = RecordingLog()
    s = Supervisor(cfg, fake, log=log)
    if setup:
        setup(fake, s)
    return s, fake, log, s.run()


def trains_then_crashes(fake: FakeOS, child: FakeChild) -> None:
    fake.at(1, lambda: fake.heartbeat(child, 10))
    fake.at(20, lambda: fake.exit(child, 1, "crash", step=30, message="ValueError: boom"))


def standbys(fake: FakeOS) -> list[FakeChild]:
    return [c for c in fake.children if c.standby]


def test_standby_starts_only_once_the_worker_trains_and_takes_over_after_a_crash(tmp_path: Path) -> None:
    sup, fake, log, code = run_with_standby(tmp_path, script_of(trains_then_crashes))
    assert code == SUPERVISOR_OK and sup.state == State.COMPLETED
    sb = standbys(fake)[0]  # (the new worker starts a standby of its own once it trains)
    assert sb.stdin_pipe and sb.spawned_at >= fake.children[0].spawned_at + 1  # after the first step
    order = protocol.LaunchOrder.from_line(str(sb.lines[0]))
    assert order is not None and order.attempt == 2 and order.exit_report == str(sup.run_dir / "exit-2.json")
    st = state_file(sup)
    assert st["attempts"][1]["standby"] is True and st["attempts"][1]["pid"] == sb.pid
    assert ("standby", {"pid": sb.pid, "action": "ready"}) in log.events
    assert len([c for c in fake.children if not c.standby]) == 1  # no cold start


def test_a_stale_standby_is_replaced_by_a_cold_start(tmp_path: Path) -> None:
    def stale(fake: FakeOS, child: FakeChild, line: str) -> None:
        fake.at(1, lambda: fake.exit(child, 6, "standby_stale", message="the data changed"))

    sup, _fake, log, code = run_with_standby(tmp_path, script_of(trains_then_crashes, completes), go=stale)
    assert code == SUPERVISOR_OK and sup.state == State.COMPLETED
    st = state_file(sup)
    assert [a["reason"] for a in st["attempts"]] == ["crash", "standby_stale", "completed"]
    assert st["attempts"][2]["standby"] is False and "standby unusable" in st["attempts"][2]["standby_fallback"]
    assert ("running", "starting") in log.transitions()


def test_stop_while_a_stale_standby_is_replaced_ends_stopped_not_in_a_traceback(tmp_path: Path) -> None:
    """Bug 1: exit 6 went to STARTING without looking at the stop; STOPPING -> STARTING is illegal."""

    def stale_after_the_stop(fake: FakeOS, child: FakeChild, line: str) -> None:
        fake.at(0.5, lambda: holder["sup"].on_signal(signal.SIGTERM))
        fake.at(2, lambda: fake.exit(child, 6, "standby_stale", message="the data changed"))

    holder: dict[str, Supervisor] = {}
    fake_kill = lambda child, sig: None  # noqa: E731 - the standby is busy finding out it is stale
    sup, fake, log, code = run_with_standby(
        tmp_path,
        script_of(trains_then_crashes),
        go=stale_after_the_stop,
        setup=lambda f, s: (holder.update(sup=s), setattr(f, "kill_hook", fake_kill)),
    )
    assert code == SUPERVISOR_OK and sup.state == State.STOPPED
    assert log.transitions()[-2:] == [("running", "stopping"), ("stopping", "stopped")]
    assert state_file(sup)["state"] == "stopped"
    assert len([c for c in fake.children if not c.standby]) == 1  # nothing relaunched


def test_stop_after_the_go_to_a_preparing_standby_is_not_recorded_as_completed(tmp_path: Path) -> None:
    """Bug 4: the standby saw the stop before the go and exited 0 with no report."""
    holder: dict[str, Supervisor] = {}

    def never_ready(fake: FakeOS, child: FakeChild) -> None:
        pass

    def stop_then_bare_exit_0(fake: FakeOS, child: FakeChild, line: str) -> None:
        fake.at(0.5, lambda: holder["sup"].on_signal(signal.SIGTERM))

    def exits_0_on_sigterm(child: FakeChild, sig: int) -> None:
        if child.code is None:
            child.code = 0 if child.standby else (-9 if sig == signal.SIGKILL else 3)

    sup, _fake, _log, code = run_with_standby(
        tmp_path,
        script_of(trains_then_crashes),
        standby=never_ready,
        go=stop_then_bare_exit_0,
        setup=lambda f, s: (holder.update(sup=s), setattr(f, "kill_hook", exits_0_on_sigterm)),
    )
    assert sup.state == State.STOPPED and code == SUPERVISOR_OK
    st = state_file(sup)
    assert st["state"] == "stopped" and st["attempts"][-1]["reason"] == "stopped"


def test_bare_exit_0_before_the_last_step_is_a_crash_not_completion(tmp_path: Path) -> None:
    def returns_early(fake: FakeOS, child: FakeChild) -> None:
        fake.at(1, lambda: fake.heartbeat(child, 5))
        fake.at(2, lambda: setattr(child, "code", 0))

    sup, fake, _, code = run(tmp_path, script_of(returns_early, completes))
    assert code == SUPERVISOR_OK and len(fake.children) == 2
    assert state_file(sup)["attempts"][0]["reason"] == "crash"


def test_a_dead_standby_means_a_cold_start_and_three_deaths_give_it_up(tmp_path: Path) -> None:
    def dies(fake: FakeOS, child: FakeChild) -> None:
        fake.at(0.5, lambda: setattr(child, "code", 1))

    def long_then_crash(fake: FakeOS, child: FakeChild) -> None:
        fake.at(1, lambda: fake.heartbeat(child, 10))
        fake.at(30, lambda: fake.exit(child, 1, "crash", step=30, message="boom"))

    sup, fake, _, code = run_with_standby(tmp_path, script_of(long_then_crash, completes), standby=dies)
    assert code == SUPERVISOR_OK
    assert len(standbys(fake)) == 3  # replaced twice, then given up
    fallback = state_file(sup)["attempts"][1]["standby_fallback"]
    assert "given up after it died 3 times" in fallback


def test_a_changed_config_dismisses_the_standby_for_a_cold_start(tmp_path: Path) -> None:
    def edit_config_then_crash(fake: FakeOS, child: FakeChild) -> None:
        fake.at(1, lambda: fake.heartbeat(child, 10))
        fake.at(10, lambda: Path(fake.cfg_path).write_text("model: {num_labels: 11}\n"))
        fake.at(20, lambda: fake.exit(child, 1, "crash", step=30, message="boom"))

    sup, fake, _log, code = run_with_standby(tmp_path, script_of(edit_config_then_crash, completes))
    assert code == SUPERVISOR_OK
    sb = standbys(fake)[0]
    assert sb.lines == [None]  # dismissed (EOF), never given the go
    assert "config file changed" in state_file(sup)["attempts"][1]["standby_fallback"]


@pytest.mark.parametrize("ready", [True, False], ids=["ready", "preparing"])
def test_standby_is_dismissed_on_completion_and_a_preparing_one_gets_sigterm(tmp_path: Path, ready: bool) -> None:
    """Bug 8e: EOF is read only once prepared, so a preparing standby would outlive the supervisor."""

    def trains_long(fake: FakeOS, child: FakeChild) -> None:
        fake.at(1, lambda: fake.heartbeat(child, 10))
        fake.at(20, lambda: fake.exit(child, 0, "completed", step=100))

    def ignores_eof_until_prepared(fake: FakeOS, child: FakeChild) -> None:
        if ready:
            prepares(1)(fake, child)

    def term_ends_it(child: FakeChild, sig: int) -> None:
        if child.code is None:
            child.code = -sig

    sup, fake, _, code = run_with_standby(
        tmp_path,
        script_of(trains_long),
        standby=ignores_eof_until_prepared,
        setup=lambda f, s: setattr(f, "kill_hook", term_ends_it),
    )
    assert code == SUPERVISOR_OK and sup.state == State.COMPLETED
    (sb,) = standbys(fake)
    assert sb.lines == [None] and sb.code is not None  # gone before run() returned
    assert [s for s, _, _ in sb.signals] == ([] if ready else [signal.SIGTERM])


def test_a_dismissed_standby_that_ignores_sigterm_is_killed_before_the_supervisor_exits(tmp_path: Path) -> None:
    def trains_long(fake: FakeOS, child: FakeChild) -> None:
        fake.at(1, lambda: fake.heartbeat(child, 10))
        fake.at(20, lambda: fake.exit(child, 0, "completed", step=100))

    def only_sigkill(child: FakeChild, sig: int) -> None:
        if sig == signal.SIGKILL and child.code is None:
            child.code = -9

    _sup, fake, _, code = run_with_standby(
        tmp_path,
        script_of(trains_long),
        standby=lambda f, c: None,
        setup=lambda f, s: setattr(f, "kill_hook", only_sigkill),
    )
    assert code == SUPERVISOR_OK
    (sb,) = standbys(fake)
    assert [s for s, _, _ in sb.signals] == [signal.SIGTERM, signal.SIGKILL] and sb.code == -9


# ----------------------------------------------------------------------------- surviving what it supervises


def test_the_supervisors_log_file_reaches_the_state_file_of_a_first_run(tmp_path: Path) -> None:
    """Bug 2: serve() set record["log"], then run() -> _load_previous replaced the record."""
    cfg = make_cfg(tmp_path)
    fake = FakeOS(Path(cfg.training.output_dir), script_of(completes))
    sup = Supervisor(cfg, fake, log=RecordingLog(), log_file="/var/log/sup.log")
    sup.run()
    assert state_file(sup)["log"] == "/var/log/sup.log"


def test_disk_low_exit_waits_for_one_checkpoint_of_space_not_only_the_reserve(tmp_path: Path) -> None:
    """Bug 9: free above reserve_mb but below one checkpoint relaunched forever."""

    def disk_low(fake: FakeOS, child: FakeChild) -> None:
        fake.at(1, lambda: fake.heartbeat(child, 10))
        fake.at(2, lambda: fake.exit(child, 5, "disk_low", step=10, message="no room", disk_needed_bytes=500 * 2**20))

    def setup(fake: FakeOS) -> None:
        fake.free = 100 * 2**20  # above reserve_mb (1), below one checkpoint
        fake.at(60, lambda: setattr(fake, "free", 10 * 2**30))

    _sup, fake, log, code = run(tmp_path, script_of(disk_low, completes), setup=setup)
    assert code == SUPERVISOR_OK and len(fake.children) == 2
    assert fake.children[1].spawned_at >= 60
    assert ("running", "waiting") in log.transitions()


def test_a_full_disk_while_writing_state_is_logged_and_retried_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug 8a: ENOSPC from the state write was a traceback, state left `running`."""
    import errno

    from supervisor import record as record_mod

    real_save = record_mod.save
    full = {"on": False}

    def save(*a: Any) -> None:
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(*a)

    def disk_fills(fake: FakeOS, child: FakeChild) -> None:
        fake.at(1, lambda: full.update(on=True))
        fake.at(2, lambda: fake.heartbeat(child, 50))
        fake.at(5, lambda: full.update(on=False))
        fake.at(10, lambda: fake.exit(child, 0, "completed", step=100))

    monkeypatch.setattr(record_mod, "save", save)
    sup, _fake, log, code = run(tmp_path, script_of(disk_fills))
    assert code == SUPERVISOR_OK and sup.state == State.COMPLETED
    assert state_file(sup)["state"] == "completed" and state_file(sup)["tracker_run_id"] == "abc123"
    assert any(e == "state_file" and "No space" in kw.get("error", "") for e, kw in log.events)


HOSTILE: list[tuple[str, bytes | None]] = [
    ("list", b"[1, 2, 3]"),
    ("wrong_types", b'{"state": 5, "attempts": {"a": 1}, "worker_pid": "12", "restart_count": "x", "log": 3}'),
    ("attempts_garbage", b'{"attempts": [1, "x", null, {"attempt": "one"}, {"attempt": 1, "end": "yesterday"}]}'),
    ("huge_numbers", b'{"worker_pid": 1' + b"0" * 400 + b', "worker_create_time": 1e308, "step_high_water": 1e999}'),
    ("nan", b'{"per_device_train_batch_size": NaN, "gradient_accumulation_steps": Infinity, "updated": NaN}'),
    ("negative_batch", b'{"per_device_train_batch_size": -4, "gradient_accumulation_steps": -4}'),
    ("binary", bytes(range(256)) * 4),
    ("ten_mb", b'{"log": "' + b"x" * (10 * 2**20) + b'"}'),
    ("truncated", b'{"state": "running", "attempts": [{"attem'),
    ("deep", b"[" * 100_000),
    ("directory", None),
]


def _plant(path: Path, content: bytes | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)


@pytest.mark.parametrize("name, content", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_run_files_never_crash_load_observe_or_status(tmp_path: Path, name: str, content: bytes | None) -> None:
    """Bug 8b: every run file the supervisor reads, planted with hostile content."""
    from supervisor import record, status

    cfg = make_cfg(tmp_path, max_failures_without_progress=1)
    out = Path(cfg.training.output_dir)
    _plant(protocol.state_path(out), content)
    record.load(out)
    v = status.view(out)
    status.render(v)

    def hostile_worker(fake: FakeOS, child: FakeChild) -> None:
        def plant_all() -> None:
            _plant(protocol.heartbeat_path(out), content)
            _plant(Path(child.env[protocol.ENV_EXIT_REPORT]), content)
            _plant(protocol.standby_announcement(out, child.pid), content)

        fake.at(1, plant_all)
        fake.at(3, lambda: setattr(child, "code", 1))

    # (A directory where state.json goes: the supervisor cannot write it at all, and carries on.)
    sup, fake, _, code = run(tmp_path, script_of(hostile_worker), cfg=cfg)
    status.render(status.view(out))
    assert sup.state == State.FAILED and code == SUPERVISOR_FAILED and len(fake.children) == 1


def test_a_state_file_naming_an_unrelated_process_is_never_signalled(tmp_path: Path) -> None:
    """Bug 8d: pid reuse or a hand-edited pid; proven with a real `sleep` and the real identity check."""
    import subprocess

    import psutil

    from supervisor import host

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        created = psutil.Process(sleeper.pid).create_time()
        assert host.process_alive(sleeper.pid, created) and not host.is_worker_process(sleeper.pid, created)
        cfg = make_cfg(tmp_path)
        out = Path(cfg.training.output_dir)
        protocol.atomic_write_json(
            protocol.state_path(out),
            {"state": "running", "worker_pid": sleeper.pid, "worker_create_time": created, "attempts": []},
        )

        def setup(fake: FakeOS) -> None:
            fake.foreign_alive.add(sleeper.pid)
            fake.is_worker = host.is_worker_process  # type: ignore[method-assign]

        _sup, fake, log, code = run(tmp_path, script_of(completes), setup=setup, cfg=cfg)
        assert code == SUPERVISOR_OK and fake.children[0].spawned_at == 0  # not waited for either
        assert sleeper.poll() is None
        assert any(e == "orphan" and "not our worker" in kw["why"] for e, kw in log.events)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_output_dir_deleted_under_the_run_stops_the_worker_and_ends_failed(tmp_path: Path) -> None:
    def trains(fake: FakeOS, child: FakeChild) -> None:
        fake.at(1, lambda: fake.heartbeat(child, 10))
        fake.at(5, lambda: setattr(fake, "dir_id", (1, 2)))

    sup, fake, _log, code = run(tmp_path, script_of(trains))
    assert code == SUPERVISOR_FAILED and sup.state == State.FAILED and len(fake.children) == 1
    assert fake.children[0].signals[0][0] == signal.SIGTERM
    assert "deleted or replaced" in (state_file(sup)["last_error"] or "")


# ----------------------------------------------------------------------------- snapshot stores (supervisor/shm.py)


def snap_cfg(tmp_path: Path, **sup: Any) -> Config:
    cfg = make_cfg(tmp_path, **sup)
    cfg.snapshot.every_steps, cfg.snapshot.root = 1, str(tmp_path / "shm")
    return cfg


def with_store(step: int, ranks: tuple[int, ...] = (0,)) -> Callable[[FakeOS], None]:
    """A setup that leaves the run's stores (as a worker would) with their newest snapshot at ``step``."""
    from tests.test_shm import header, make_store

    def setup(fake: FakeOS) -> None:
        for r in ranks:
            make_store(fake.out, fake.out.parent / "shm", r, header(step=step))

    return setup


def stores(tmp_path: Path) -> list[Path]:
    from supervisor import shm

    return shm.run_stores(tmp_path / "out", tmp_path / "shm")


def snapshot_events(log: RecordingLog) -> list[dict[str, Any]]:
    return [kw for e, kw in log.events if e == "snapshots"]


def test_snapshot_stores_are_removed_when_the_run_completes(tmp_path: Path) -> None:
    _sup, _fake, log, code = run(tmp_path, script_of(completes), setup=with_store(99, (0, 1)), cfg=snap_cfg(tmp_path))
    assert code == SUPERVISOR_OK and stores(tmp_path) == []
    [event] = snapshot_events(log)
    assert event["action"] == "removed" and event["why"] == "the run completed" and event["stores"] == 2
    assert (tmp_path / "shm" / f"vit-supervisor-{os.getuid()}").is_dir()  # shared by every run of the user: kept


def test_snapshot_stores_are_removed_when_the_config_changed_under_the_run(tmp_path: Path) -> None:
    def incompatible(fake: FakeOS, child: FakeChild) -> None:
        fake.at(1, lambda: fake.exit(child, 2, "incompatible_checkpoint", message="model_name: 'a' -> 'b'"))

    _sup, _fake, log, code = run(tmp_path, script_of(incompatible), setup=with_store(40), cfg=snap_cfg(tmp_path))
    assert code == SUPERVISOR_FAILED and stores(tmp_path) == []
    assert [e["action"] for e in snapshot_events(log)] == ["removed"]
    assert "config changed" in snapshot_events(log)[0]["why"]


def config_error(fake: FakeOS, child: FakeChild) -> None:
    fake.at(1, lambda: fake.exit(child, 2, "config_error", message="model.model_name 'x' cannot be loaded"))


@pytest.mark.parametrize("ending", ["crash_loop", "config_error"])
def test_snapshot_stores_are_kept_when_the_supervisor_gives_up(tmp_path: Path, ending: str) -> None:
    # A crash loop or a fixable config error: a later `start` resumes from the snapshot.
    script = script_of(crashes_after(None)) if ending == "crash_loop" else script_of(config_error)
    cfg = snap_cfg(tmp_path, max_failures_without_progress=2)
    _sup, _fake, log, code = run(tmp_path, script, setup=with_store(40), cfg=cfg)
    assert code == SUPERVISOR_FAILED and len(stores(tmp_path)) == 1
    assert (stores(tmp_path)[0] / "slot-0").exists()
    assert [e["action"] for e in snapshot_events(log)] == ["kept"]


@pytest.mark.parametrize(("disk_step", "removed"), [(40, True), (55, True), (30, False), (None, False)])
def test_a_stop_removes_the_stores_only_when_a_disk_checkpoint_holds_their_step(
    tmp_path: Path, disk_step: int | None, removed: bool
) -> None:
    holder: dict[str, Supervisor] = {}

    def trains(fake: FakeOS, child: FakeChild) -> None:
        fake.at(2, lambda: fake.heartbeat(child, 40))
        fake.at(3, lambda: holder["sup"].on_signal(signal.SIGTERM))

    cfg = snap_cfg(tmp_path)
    fake = FakeOS(Path(cfg.training.output_dir), script_of(trains))
    with_store(40)(fake)
    if disk_step is not None:  # what the worker's stop checkpoint left (or an older one: a forced stop)
        (fake.out / f"checkpoint-{disk_step}").mkdir(parents=True)
    log = RecordingLog()
    sup = holder["sup"] = Supervisor(cfg, fake, log=log)
    assert sup.run() == SUPERVISOR_OK and sup.state == State.STOPPED
    assert (stores(tmp_path) == []) is removed
    [event] = snapshot_events(log)
    assert event["action"] == ("removed" if removed else "kept")
    if not removed:
        assert "snapshot of step 40 is newer than" in event["why"]


def test_a_stop_during_backoff_applies_the_same_rule(tmp_path: Path) -> None:
    holder: dict[str, Supervisor] = {}

    def crash_then_stop(fake: FakeOS, child: FakeChild) -> None:
        crashes_after(None)(fake, child)
        fake.at(3.5, lambda: holder["sup"].on_signal(signal.SIGTERM))  # during the 1 s back-off

    cfg = snap_cfg(tmp_path)
    fake = FakeOS(Path(cfg.training.output_dir), script_of(crash_then_stop))
    with_store(40)(fake)
    log = RecordingLog()
    sup = holder["sup"] = Supervisor(cfg, fake, log=log)
    assert sup.run() == SUPERVISOR_OK and ("backoff", "stopped") in log.transitions()
    assert len(stores(tmp_path)) == 1 and [e["action"] for e in snapshot_events(log)] == ["kept"]


class SmallShmOS(FakeOS):
    """Plenty of disk, ``shm_free`` bytes in the snapshot root's file system."""

    shm_free = 32 << 20
    shm_path: Path | None = None

    def free_disk(self, path: Path) -> int:
        return self.shm_free if path == self.shm_path else self.free


def test_too_little_shared_memory_warns_once_and_every_launch_runs_disk_only(tmp_path: Path) -> None:
    cfg = snap_cfg(tmp_path)
    fake = SmallShmOS(Path(cfg.training.output_dir), script_of(crashes_after(10), crashes_after(20), completes))
    fake.shm_path = tmp_path / "shm"
    log = RecordingLog()
    sup = Supervisor(cfg, fake, log=log)
    assert sup.run() == SUPERVISOR_OK and len(fake.children) == 3
    assert all("--no-snapshots" in c.argv for c in fake.children)
    [warning] = snapshot_events(log)  # one line, not one per launch
    assert warning["action"] == "off: disk checkpoints only"
    # ViT-B/16 from scratch (make_cfg's model): ~1 GiB of weights and AdamW moments, twice.
    for part in (f"{tmp_path / 'shm'} has 32.0 MiB free", "need 1.9 GiB", "model.scratch", "--shm-size=3g"):
        assert part in warning["why"], warning["why"]
    assert not any(t[1] == "waiting" for t in log.transitions())  # the disk was never short


def test_shared_memory_freed_later_turns_snapshots_back_on_with_one_line(tmp_path: Path) -> None:
    cfg = snap_cfg(tmp_path)

    def crash_and_free(fake: FakeOS, child: FakeChild) -> None:
        crashes_after(10)(fake, child)
        fake.at(2, lambda: setattr(fake, "shm_free", 10 << 30))

    fake = SmallShmOS(Path(cfg.training.output_dir), script_of(crash_and_free, completes))
    fake.shm_path = tmp_path / "shm"
    log = RecordingLog()
    assert Supervisor(cfg, fake, log=log).run() == SUPERVISOR_OK
    assert ["--no-snapshots" in c.argv for c in fake.children] == [True, False]
    assert [e["action"] for e in snapshot_events(log)] == ["off: disk checkpoints only", "on again"]


def test_enough_shared_memory_or_snapshots_off_means_no_flag_and_no_warning(tmp_path: Path) -> None:
    for every, free in ((1, 10 << 30), (0, 0)):
        d = tmp_path / f"{every}"
        cfg = snap_cfg(d)
        cfg.snapshot.every_steps = every
        fake = SmallShmOS(Path(cfg.training.output_dir), script_of(completes))
        fake.shm_free, fake.shm_path = free, d / "shm"
        log = RecordingLog()
        assert Supervisor(cfg, fake, log=log).run() == SUPERVISOR_OK
        assert "--no-snapshots" not in fake.children[0].argv and snapshot_events(log) == []


def test_the_run_stores_own_space_counts_as_free_for_the_next_attempt(tmp_path: Path) -> None:
    """A store of the run already in the file system is overwritten in place, so it is not a shortfall."""
    from supervisor import shm

    cfg = snap_cfg(tmp_path)
    cfg.model.scratch.hidden_size, cfg.model.scratch.intermediate_size = 96, 96  # a ~1 MiB model
    cfg.model.scratch.num_attention_heads = 2
    needed = shm.run_needed_bytes(cfg, shm.estimate_state(cfg))
    fake = SmallShmOS(Path(cfg.training.output_dir), script_of(completes))
    fake.shm_path, fake.shm_free = tmp_path / "shm", needed - 9000  # the store below holds 9000 + header
    with_store(5)(fake)
    log = RecordingLog()
    assert Supervisor(cfg, fake, log=log).run() == SUPERVISOR_OK
    assert "--no-snapshots" not in fake.children[0].argv


def test_the_go_line_tells_a_standby_to_run_disk_only(tmp_path: Path) -> None:
    def setup(fake: FakeOS, s: Supervisor) -> None:
        s.cfg.snapshot.every_steps = 1
        big = fake.free
        fake.free_disk = lambda path: (1 << 20) if path == s.shm_base else big  # type: ignore[method-assign]

    _sup, fake, _log, code = run_with_standby(tmp_path, script_of(trains_then_crashes), setup=setup)
    assert code == SUPERVISOR_OK
    sb = standbys(fake)[0]
    order = protocol.LaunchOrder.from_line(str(sb.lines[0]))
    assert order is not None and order.snapshots is False
    assert "--no-snapshots" in order.argv() and "--no-snapshots" in fake.children[0].argv
