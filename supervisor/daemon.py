"""The supervisor loop: launch the worker, watch it, decide, repeat until completed, stopped or failed.

Shape (after torchelastic's agent and supervisord's process): the loop observes
(signals recorded by the handlers, the child's exit, the heartbeat, the clock),
asks :mod:`supervisor.policy` what to do, and changes state only through
:meth:`Supervisor._transition`, which logs the change and rewrites
``run/state.json`` atomically. Everything that touches the OS goes through an
:class:`~supervisor.host.Host` object so tests can drive the whole machine with
a fake clock and fake children.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from supervisor import logs, policy, protocol
from supervisor.host import Host, RealHost, RunDirWatch, install_signal_wakeup, self_create_time
from supervisor.notify import Notifier
from supervisor.schema import Config
from supervisor.states import FINAL_STATES, State, check_transition

# Exit codes of `vit-supervisor start` (documented in docs/supervisor.md; the systemd unit's
# RestartPreventExitStatus lists the deliberate ones).
SUPERVISOR_OK = 0  # completed, or stopped on request
SUPERVISOR_USAGE = 2  # bad config or command line: nothing was written
SUPERVISOR_FAILED = 3  # gave up, or a non-retryable worker error
SUPERVISOR_LOCKED = 4  # another supervisor holds this run directory

_CLEAN_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
"""systemd's variables are for the supervisor alone; a worker must never answer in its name."""


# ----------------------------------------------------------------------------- the run-directory lock


class LockHeld(Exception):
    def __init__(self, pid: int | None, path: Path) -> None:
        self.pid = pid
        self.path = path
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"another supervisor ({who}) is already running this run directory ({path.parent.parent})")


def acquire_lock(run_dir: Path) -> int:
    """An exclusive ``flock`` on ``run/supervisor.lock``; the kernel drops it when we die, however we die."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / protocol.LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        try:
            raw = os.pread(fd, 32, 0).decode().strip()
        except OSError:
            raw = ""
        os.close(fd)
        raise LockHeld(int(raw) if raw.isdigit() else None, path) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# ----------------------------------------------------------------------------- the machine


@dataclass
class _Worker:
    """The live attempt, as the loop sees it."""

    pid: int
    create_time: float
    attempt: int
    launched: float  # monotonic
    step_at_start: int
    report_path: Path
    oom_kills_before: int
    stop_sent: bool = False
    hang_killed: bool = False
    kill_deadline: float | None = None  # monotonic: SIGKILL if still alive then
    sigkill_sent: bool = False
    hb_key: tuple[Any, ...] | None = None
    last_change: float = 0.0
    seen_step: bool = False
    step_reached: int | None = None


@dataclass
class _Standby:
    """A pre-warmed worker waiting on its stdin for a go (worker/standby.py)."""

    pid: int
    create_time: float
    log_path: Path
    config_sha: str | None  # of the config file when it was spawned


@dataclass
class Supervisor:
    cfg: Config
    os: Host
    log: Any = field(default_factory=logs.get)
    notifier: Notifier = field(default_factory=lambda: Notifier(env={}))
    python: str = sys.executable
    self_create_time: float | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.cfg.training.output_dir)
        self.node_rank = self.cfg.node_rank
        self.run_dir = protocol.supervisor_dir(self.out, self.node_rank)
        self.state: State | None = None
        self.signals: list[int] = []  # appended by the handler, consumed by the loop
        self.stop_requested = False
        self.force = False
        self.worker: _Worker | None = None
        self.until: float | None = None  # monotonic end of BACKOFF / next disk check in WAITING
        self.orphan: dict[str, Any] | None = None
        self.record: dict[str, Any] = {}
        self.exit_code = SUPERVISOR_OK
        self.batch = self.cfg.training.per_device_train_batch_size
        self.accum = self.cfg.training.gradient_accumulation_steps
        self.failures_without_progress = 0
        self.high_water = -1  # highest step any attempt reached: "progress" means going past it
        self.standby: _Standby | None = None
        self.standby_deaths = 0
        self.force_cold: str | None = None  # why the next launch must not use a standby

    # ------------------------------------------------------------------ public

    def on_signal(self, signum: int, frame: FrameType | None = None) -> None:
        """Signal handler: only records (the loop logs and acts; no locks or I/O here)."""
        self.signals.append(signum)

    def run(self) -> int:
        self._load_previous()
        # None -> STARTING
        self._transition(State.STARTING, "supervisor started")
        while self.state not in FINAL_STATES:
            self._take_signals()
            before = self.state
            handler = {
                State.STARTING: self._starting,
                State.WAITING: self._waiting,
                State.BACKOFF: self._backoff,
                State.RUNNING: self._supervise,
                State.STOPPING: self._supervise,
            }.get(self.state)
            if handler is None:  # pragma: no cover - a state added without a handler
                raise RuntimeError(f"no handler for state {self.state}")
            handler()
            self._check_standby()
            self.notifier.watchdog()  # only a loop that got here is healthy
            if self.state == before and self.state not in FINAL_STATES:
                self.os.wait(self._timeout())
        self._dismiss_standby("the run is over")
        return self.exit_code

    # ------------------------------------------------------------------ the one place that changes state

    def _transition(self, new: State, why: str, **fields: Any) -> None:
        old = self.state
        check_transition(old, new)
        self.state = new
        self.record.update(fields)
        self.record["state_reason"] = why
        self.log.info(
            "state",
            old=str(old) if old else None,
            new=str(new),
            why=why,
            attempt=self.worker.attempt if self.worker else self.record.get("attempt"),
        )
        self._write_state()
        status = f"{new}: {why}"
        if new in (State.RUNNING, State.WAITING):
            self.notifier.ready(status)  # READY once the service does its job (or waits for disk to do it)
        if new == State.STOPPING:
            self.notifier.stopping(status)
        else:
            self.notifier.status(status)

    # ------------------------------------------------------------------ state handlers

    def _starting(self) -> None:
        if self.stop_requested:
            # STARTING -> STOPPED
            self._transition(State.STOPPED, "stop requested before launch")
            return
        if self.orphan is not None and not self._orphan_gone():
            return  # never two workers: wait (the loop sleeps) until the old one has exited
        short = policy.disk_shortfall(self.os.free_disk(self.out), self.cfg.disk.reserve_mb)
        if short:
            self.until = self.os.monotonic() + self.cfg.disk.recheck_s
            # STARTING -> WAITING
            self._transition(State.WAITING, f"waiting for disk space: {short}", waiting_reason=short)
            return
        try:
            self._launch()
        except OSError as exc:
            self.exit_code = SUPERVISOR_FAILED
            # STARTING -> FAILED
            self._transition(State.FAILED, f"could not start the worker: {exc}", last_error=str(exc))
            return
        # STARTING -> RUNNING
        self._transition(
            State.RUNNING, f"worker pid {self.worker.pid} started (attempt {self.worker.attempt})", waiting_reason=None
        )

    def _waiting(self) -> None:
        if self.stop_requested:
            # WAITING -> STOPPED
            self._transition(State.STOPPED, "stop requested while waiting for disk space")
            return
        if self.until is not None and self.os.monotonic() < self.until:
            return
        short = policy.disk_shortfall(self.os.free_disk(self.out), self.cfg.disk.reserve_mb)
        if short:
            self.until = self.os.monotonic() + self.cfg.disk.recheck_s
            if short != self.record.get("waiting_reason"):
                self.record["waiting_reason"] = short
                self._write_state()
            return
        # WAITING -> STARTING
        self._transition(State.STARTING, "disk space available again", waiting_reason=None)

    def _backoff(self) -> None:
        if self.stop_requested:
            # BACKOFF -> STOPPED
            self._transition(State.STOPPED, "stop requested during backoff")
            return
        if self.until is not None and self.os.monotonic() < self.until:
            return
        # BACKOFF -> STARTING
        self._transition(State.STARTING, "backoff over", backoff_until=None)

    def _supervise(self) -> None:
        w = self.worker
        assert w is not None  # RUNNING and STOPPING always have a worker (WORKER_STATES)
        code = self.os.exit_status(w.pid)
        if code is not None:
            self._on_exit(code)
            return
        now = self.os.monotonic()
        self._observe_heartbeat(now)
        if self.state == State.RUNNING and w.seen_step and not self.stop_requested:
            self._maybe_start_standby()
        if self.stop_requested and self.state == State.RUNNING:
            self._dismiss_standby("stop requested")
            # Only the worker, not its group: dataloader workers must not die under the step.
            if not w.hang_killed:
                self.os.kill(w.pid, signal.SIGTERM)
            w.stop_sent = True
            if w.kill_deadline is None:
                w.kill_deadline = now + self.cfg.supervisor.term_grace_s
            # RUNNING -> STOPPING
            self._transition(State.STOPPING, "stop requested: worker saves a checkpoint and exits")
            return
        if self.state == State.RUNNING and not w.hang_killed:
            hung = policy.hang_check(
                hb_state=w.hb_key[0] if w.hb_key else None,
                seen_step=w.seen_step,
                since_change_s=now - w.last_change,
                since_launch_s=now - w.launched,
                cfg=self.cfg.supervisor,
            )
            if hung:
                self.log.warning("hang", pid=w.pid, why=hung)
                self.record["last_error"] = f"worker hung: {hung}"
                w.hang_killed = True
                w.kill_deadline = now + self.cfg.supervisor.term_grace_s
                self.os.kill(w.pid, signal.SIGTERM)
                self._write_state()
        if w.kill_deadline is not None and not w.sigkill_sent and (now >= w.kill_deadline or self.force):
            self.log.warning(
                "escalate", pid=w.pid, signal="SIGKILL", why="forced stop" if self.force else "grace period over"
            )
            w.sigkill_sent = True
            self.os.kill(w.pid, signal.SIGKILL, group=True)

    # ------------------------------------------------------------------ observing

    def _take_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            name = signal.Signals(signum).name
            if not self.stop_requested:
                self.stop_requested = True
                self.log.info("signal", signal=name, action="graceful stop (send it again to force)")
            else:
                self.force = True
                self.log.warning("signal", signal=name, action="forced stop: the worker gets SIGKILL")

    def _observe_heartbeat(self, now: float) -> None:
        w = self.worker
        if w is None:
            return
        hb = protocol.read_json(protocol.heartbeat_path(self.out))
        if not hb:
            return
        if self.cfg.launcher == "torchrun":
            # Rank 0 (on node 0) writes it; it belongs to this attempt if it is no older than the launch.
            if hb.get("attempt") != w.attempt and hb.get("time", 0) < self.record["attempts"][-1]["start"]:
                return
        elif hb.get("pid") != w.pid:
            return  # none yet, or the previous attempt's
        step = hb.get("global_step")
        key = (hb.get("state"), step)
        if key != w.hb_key:
            w.hb_key = key
            w.last_change = now
        if isinstance(step, int):
            w.step_reached = step if w.step_reached is None else max(w.step_reached, step)
            if hb.get("state") == protocol.HB_TRAINING:
                w.seen_step = True
            if step > max(w.step_at_start, 0) and not self.record["attempts"][-1].get("first_step_at"):
                # The restart's real cost ends here: the first optimizer step this attempt added.
                self.record["attempts"][-1]["first_step_at"] = hb.get("time") or self.os.time()
                self._write_state()
        if hb.get("tracker_run_id") and hb["tracker_run_id"] != self.record.get("tracker_run_id"):
            self.record["tracker_run_id"] = hb["tracker_run_id"]
            self._write_state()

    def _timeout(self) -> float:
        now = self.os.monotonic()
        cap = 0.5 if self.state in (State.RUNNING, State.STOPPING) else 1.0
        if self.notifier.interval:
            cap = min(cap, self.notifier.interval)
        deadlines = [self.until] if self.state in (State.BACKOFF, State.WAITING) else []
        if self.worker is not None and self.worker.kill_deadline is not None:
            deadlines.append(self.worker.kill_deadline)
        return max(0.0, min([cap] + [d - now for d in deadlines if d is not None]))

    # ------------------------------------------------------------------ launching and exits

    def _launch(self) -> None:
        attempts = self.record.setdefault("attempts", [])
        attempt = len(attempts) + 1
        report_path = self.run_dir / f"exit-{attempt}.json"
        report_path.unlink(missing_ok=True)  # a stale report must never explain a new exit
        for stale in self.run_dir.glob(f"exit-{attempt}.rank*.json"):
            stale.unlink(missing_ok=True)
        log_path = self.run_dir / protocol.LOGS_SUBDIR / f"attempt-{attempt}.log"
        env = {k: v for k, v in os.environ.items() if k not in _CLEAN_ENV}
        env.update(
            {
                protocol.ENV_SUPERVISOR_PID: str(os.getpid()),
                protocol.ENV_ATTEMPT: str(attempt),
                protocol.ENV_EXIT_REPORT: str(report_path),
                "PYTHONUNBUFFERED": "1",
            }
        )
        argv = [
            *self._launcher_argv(),
            self.cfg.source_path,
            "--resume",
            "--per-device-train-batch-size",
            str(self.batch),
            "--gradient-accumulation-steps",
            str(self.accum),
        ]
        resume_step = protocol.newest_checkpoint_step(self.out)
        # Progress means a step no earlier attempt reached, not just past the checkpoint: a worker
        # that crashes at the same step after every resume is a crash loop.
        step_at_start = max(self.high_water, resume_step)
        oom_before = self.os.oom_kills()
        used, fallback = self._hand_over(attempt, report_path)
        if used is not None:
            pid, created, log_path = used.pid, used.create_time, used.log_path
            self.log.info("standby", pid=pid, attempt=attempt, action="took over")
        else:
            pid, created = self.os.spawn(argv, env, log_path)
            if fallback:
                self.log.info("standby", attempt=attempt, action="cold start", why=fallback)
        now = self.os.monotonic()
        self.worker = _Worker(
            pid=pid,
            create_time=created,
            attempt=attempt,
            launched=now,
            step_at_start=step_at_start,
            report_path=report_path,
            oom_kills_before=oom_before,
            last_change=now,
        )
        attempts.append(
            {
                "attempt": attempt,
                "pid": pid,
                "start": self.os.time(),
                "end": None,
                "reason": None,
                "exit": None,
                "message": None,
                "step_start": max(resume_step, 0),
                "step_reached": None,
                "log": str(log_path),
                "per_device_train_batch_size": self.batch,
                "gradient_accumulation_steps": self.accum,
                "standby": used is not None,
                "standby_fallback": fallback,
            }
        )
        self.record.update(worker_pid=pid, worker_create_time=created, attempt=attempt)
        self.log.info("launch", pid=pid, attempt=attempt, batch=self.batch, accum=self.accum, log=str(log_path))

    def _launcher_argv(self) -> list[str]:
        """``python -m worker``, or torchrun around it with its own restarts off (one policy decides)."""
        if self.cfg.launcher != "torchrun":
            return [self.python, "-m", "worker"]
        d = self.cfg.distributed
        argv = [
            self.python,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={d.nproc_per_node}",
            "--max-restarts=0",
            "--monitor-interval=0.5",
        ]
        if d.nnodes == 1:
            argv.append("--standalone")  # a free local port: several jobs may share the machine
        else:
            host, _, port = d.rdzv_endpoint.rpartition(":")
            # Static rendezvous: node ranks are the configured ones, so node 0 always holds rank 0.
            argv += [
                f"--nnodes={d.nnodes}",
                f"--node_rank={d.node_rank}",
                f"--master_addr={host}",
                f"--master_port={port}",
                f"--rdzv_id={d.rdzv_id or self.out.name}",
            ]
        return [*argv, "-m", "worker"]

    def _read_report(self, w: _Worker) -> dict[str, Any] | None:
        """The attempt's exit report; under torchrun, the root cause among the ranks' reports."""
        if self.cfg.launcher != "torchrun":
            report = protocol.read_json(w.report_path)
            if report is not None and report.get("pid") not in (None, w.pid):
                return None  # someone else's report
            return report
        d = self.cfg.distributed
        ranks = range(d.node_rank * d.nproc_per_node, (d.node_rank + 1) * d.nproc_per_node)
        reports = {r: protocol.read_json(w.report_path.with_name(f"{w.report_path.stem}.rank{r}.json")) for r in ranks}
        return policy.root_cause(reports)

    def _on_exit(self, code: int) -> None:
        w = self.worker
        assert w is not None
        self._observe_heartbeat(self.os.monotonic())
        report = self._read_report(w)
        if code == protocol.EXIT_STANDBY_STALE and self.record["attempts"][-1].get("standby"):
            why = (report or {}).get("message") or "the standby found its prepared state out of date"
            self.record["attempts"][-1].update(
                end=self.os.time(),
                reason=protocol.REASON_STANDBY_STALE,
                exit=protocol.describe_exit(code),
                message=why,
                step_reached=None,
            )
            self.worker = None
            self.force_cold = f"standby unusable: {why}"
            # RUNNING -> STARTING (not a failure: nothing was trained or touched)
            self._transition(State.STARTING, f"standby unusable ({why}): cold start", worker_pid=None)
            return
        host_oom = (
            protocol.signal_name(code) == "SIGKILL" and report is None and self.os.oom_kills() > w.oom_kills_before
        )
        outcome = policy.classify(
            policy.ExitInfo(code, report, stop_sent=w.stop_sent, hang_killed=w.hang_killed, host_oom=host_oom)
        )
        reached = w.step_reached
        if report is not None and isinstance(report.get("step"), int):
            reached = report["step"] if reached is None else max(reached, report["step"])
        progressed = reached is not None and reached > w.step_at_start
        decision = policy.decide(
            outcome,
            progressed=progressed,
            failures_without_progress=self.failures_without_progress,
            batch=self.batch,
            accum=self.accum,
            cfg=self.cfg.supervisor,
            stop_requested=self.stop_requested,
        )
        if reached is not None:
            self.high_water = max(self.high_water, reached)
        self.record["attempts"][-1].update(
            end=self.os.time(),
            reason=outcome.kind,
            exit=outcome.exit,
            message=outcome.message,
            step_reached=reached,
            traceback_tail=(report or {}).get("traceback", [])[-3:],
        )
        self.log.info(
            "exit",
            pid=w.pid,
            attempt=w.attempt,
            exit=outcome.exit,
            reason=outcome.kind,
            message=outcome.message,
            step_reached=reached,
            progressed=progressed,
            decision=decision.action,
        )
        self.batch = decision.per_device_train_batch_size or self.batch
        self.accum = decision.gradient_accumulation_steps or self.accum
        self.failures_without_progress = decision.failures_without_progress
        self.worker = None
        common: dict[str, Any] = dict(
            worker_pid=None,
            worker_create_time=None,
            per_device_train_batch_size=self.batch,
            gradient_accumulation_steps=self.accum,
            failures_without_progress=self.failures_without_progress,
            step_high_water=self.high_water,
        )
        if outcome.kind not in ("completed", "stopped"):
            common["last_error"] = outcome.message
        if decision.action == "complete":
            self.exit_code = SUPERVISOR_OK
            # RUNNING -> COMPLETED (or STOPPING -> COMPLETED: it finished before it saw the stop)
            self._transition(State.COMPLETED, decision.message, **common)
        elif decision.action == "stop":
            self.exit_code = SUPERVISOR_OK
            # RUNNING -> STOPPED, STOPPING -> STOPPED
            self._transition(State.STOPPED, decision.message, **common)
        elif decision.action == "fail":
            self.exit_code = SUPERVISOR_FAILED
            common["last_error"] = decision.message
            # RUNNING -> FAILED, STOPPING -> FAILED
            self._transition(State.FAILED, decision.message, **common)
        elif decision.action == "wait_disk":
            self.until = self.os.monotonic() + self.cfg.disk.recheck_s
            # RUNNING -> WAITING
            self._transition(
                State.WAITING,
                f"worker stopped for disk space: {decision.message}",
                waiting_reason=decision.message,
                **common,
            )
        elif decision.action == "restart":
            self.record["restart_count"] = int(self.record.get("restart_count") or 0) + 1
            if decision.delay_s > 0:
                self.until = self.os.monotonic() + decision.delay_s
                # RUNNING -> BACKOFF
                self._transition(
                    State.BACKOFF,
                    f"restart in {decision.delay_s:.1f}s after: {decision.message}",
                    backoff_until=self.os.time() + decision.delay_s,
                    **common,
                )
            else:
                # RUNNING -> STARTING (an OOM restarts at once with the lower batch)
                self._transition(State.STARTING, f"restart now: {decision.message}", **common)
        else:  # pragma: no cover - a new action without a branch
            raise RuntimeError(f"unknown decision {decision.action!r}")

    # ------------------------------------------------------------------ the standby worker

    @property
    def standby_enabled(self) -> bool:
        # Under torchrun the ranks are torchrun's children, not ours to pre-warm.
        return self.cfg.supervisor.standby and self.cfg.launcher == "python" and self.standby_deaths < 3

    def _config_sha(self) -> str | None:
        try:
            return hashlib.sha256(Path(self.cfg.source_path).read_bytes()).hexdigest()
        except OSError:
            return None

    def _maybe_start_standby(self) -> None:
        """One standby at a time, started once the active worker trains (so that it never
        competes with a restart's own start-up for the CPU)."""
        if not self.standby_enabled or self.standby is not None:
            return
        n = int(self.record.get("standby_count") or 0) + 1
        self.record["standby_count"] = n
        log_path = self.run_dir / protocol.LOGS_SUBDIR / f"standby-{n}.log"
        env = {k: v for k, v in os.environ.items() if k not in _CLEAN_ENV}
        env.update({protocol.ENV_SUPERVISOR_PID: str(os.getpid()), "PYTHONUNBUFFERED": "1"})
        argv = [self.python, "-m", "worker", self.cfg.source_path, "--standby"]
        try:
            pid, created = self.os.spawn(argv, env, log_path, stdin_pipe=True)
        except OSError as exc:
            self.log.warning("standby", action="not started", error=str(exc))
            self.standby_deaths += 1
            return
        self.standby = _Standby(pid=pid, create_time=created, log_path=log_path, config_sha=self._config_sha())
        self.record["standby"] = {"pid": pid, "ready": False, "log": str(log_path)}
        self.log.info("standby", pid=pid, action="started", log=str(log_path))
        self._write_state()

    def _check_standby(self) -> None:
        sb = self.standby
        if sb is None:
            return
        code = self.os.exit_status(sb.pid)
        if code is not None:
            self.standby = None
            self.standby_deaths += 1
            self.record["standby"] = None
            self.log.warning(
                "standby",
                pid=sb.pid,
                action="exited while waiting",
                exit=protocol.describe_exit(code),
                log=str(sb.log_path),
            )
            self._write_state()
            return
        rec = self.record.get("standby") or {}
        if not rec.get("ready") and protocol.standby_announcement(self.out, sb.pid).exists():
            rec["ready"] = True
            self.record["standby"] = rec
            self.log.info("standby", pid=sb.pid, action="ready")
            self._write_state()

    def _hand_over(self, attempt: int, report_path: Path) -> tuple[_Standby | None, str | None]:
        """Give the go to the standby; (None, why) when a cold start must be made instead."""
        if self.force_cold is not None:
            why, self.force_cold = self.force_cold, None
            self._dismiss_standby(why)
            return None, why
        sb = self.standby
        if sb is None:
            if self.cfg.supervisor.standby and self.standby_deaths >= 3:
                return None, f"standby given up after it died {self.standby_deaths} times (see logs/standby-*.log)"
            # Only a restart can miss a standby: the first launch never has one.
            first = not any(a.get("end") for a in self.record.get("attempts") or [])
            return None, ("no standby was running yet" if self.standby_enabled and not first else None)
        if self.os.exit_status(sb.pid) is not None:
            self._check_standby()
            return None, "the standby had died"
        announced = protocol.read_json(protocol.standby_announcement(self.out, sb.pid)) or {}
        spawned_with = announced.get("config_sha256") or sb.config_sha
        if self._config_sha() != spawned_with:
            self._dismiss_standby("config changed")
            return None, "the config file changed since the standby started"
        # A standby still preparing gets the go too: it reads it as soon as it is ready, which is
        # sooner than a cold start that has not even begun importing.
        go = {
            "attempt": attempt,
            "resume": True,
            "per_device_train_batch_size": self.batch,
            "gradient_accumulation_steps": self.accum,
            "exit_report": str(report_path),
            "supervisor_pid": os.getpid(),
        }
        self.standby = None
        self.record["standby"] = None
        if not self.os.send_line(sb.pid, json.dumps(go)):
            return None, "the standby did not take the go"
        return sb, None

    def _dismiss_standby(self, why: str) -> None:
        sb = self.standby
        if sb is None:
            return
        self.standby = None
        self.record["standby"] = None
        self.os.send_line(sb.pid, None)  # EOF: "not needed", it exits 0
        self.log.info("standby", pid=sb.pid, action="dismissed", why=why)

    # ------------------------------------------------------------------ recovery after a previous supervisor

    def _load_previous(self) -> None:
        prev = protocol.read_json(protocol.state_path(self.out, self.node_rank)) or {}
        self.record = {
            "output_dir": str(self.out),
            "config": self.cfg.source_path,
            "attempts": list(prev.get("attempts") or []),
            "restart_count": int(prev.get("restart_count") or 0),
            "tracker_run_id": prev.get("tracker_run_id"),
            "last_error": prev.get("last_error"),
            "effective_batch": self.cfg.training.effective_batch,
            "supervisor_pid": os.getpid(),
            "supervisor_create_time": self.self_create_time,
            "worker_pid": None,
            "worker_create_time": None,
            "attempt": None,
            "backoff_until": None,
            "waiting_reason": None,
            "log": prev.get("log"),
        }
        for a in self.record["attempts"]:
            if a.get("end") is None:
                a.update(
                    end=prev.get("updated"),
                    reason="supervisor_died",
                    message="the supervisor died while this attempt ran",
                )
        self.high_water = int(prev.get("step_high_water", -1) if prev.get("step_high_water") is not None else -1)
        b, a = prev.get("per_device_train_batch_size"), prev.get("gradient_accumulation_steps")
        if isinstance(b, int) and isinstance(a, int) and b * a == self.cfg.training.effective_batch:
            if (b, a) != (self.batch, self.accum):
                self.log.info("batch", per_device=b, accumulation=a, why="kept from the previous run (after an OOM)")
            self.batch, self.accum = b, a
        elif isinstance(b, int) and isinstance(a, int):
            self.log.warning(
                "batch",
                why="the config's effective batch changed; using the config's values",
                previous=b * a,
                now=self.cfg.training.effective_batch,
            )
        self.record.update(per_device_train_batch_size=self.batch, gradient_accumulation_steps=self.accum)
        pid, created = prev.get("worker_pid"), prev.get("worker_create_time")
        if isinstance(pid, int) and self.os.alive(pid, created):
            # The previous supervisor died. Its worker got SIGUSR1 from PR_SET_PDEATHSIG (and checks its
            # parent at every step), so it is already saving a checkpoint. A SIGTERM on top would be
            # redundant at best: only wait, and SIGKILL after term_grace_s.
            self.orphan = {
                "pid": pid,
                "create_time": created,
                "deadline": self.os.monotonic() + self.cfg.supervisor.term_grace_s,
                "killed": False,
            }
            self.log.warning(
                "orphan",
                pid=pid,
                why="a worker of a previous supervisor is still alive; waiting for it to save and exit",
            )

    def _orphan_gone(self) -> bool:
        o = self.orphan
        assert o is not None
        if not self.os.alive(o["pid"], o["create_time"]):
            self.log.info("orphan", pid=o["pid"], why="previous worker has exited")
            self.orphan = None
            return True
        if self.os.monotonic() >= o["deadline"] and not o["killed"]:
            self.log.warning("escalate", pid=o["pid"], signal="SIGKILL", why="previous worker did not exit in time")
            self.os.kill(o["pid"], signal.SIGKILL, group=True)
            o["killed"] = True
        return False

    def _write_state(self) -> None:
        self.record.update(
            state=str(self.state),
            updated=self.os.time(),
            per_device_train_batch_size=self.batch,
            gradient_accumulation_steps=self.accum,
        )
        if self.worker is not None:
            self.record["worker_pid"] = self.worker.pid
        protocol.atomic_write_json(protocol.state_path(self.out, self.node_rank), self.record)


# ----------------------------------------------------------------------------- the process around it


def serve(cfg: Config, *, log_path: str | None = None) -> int:
    """Run one supervisor in this process until the run is completed, stopped or failed.

    Holds the run-directory lock throughout; installs the signal handlers, the
    wake-up pipe, the run-directory watch and the systemd notifier; always
    cleans them up.
    """
    from supervisor import status as status_mod

    log = logs.get()
    run_dir = protocol.supervisor_dir(cfg.training.output_dir, cfg.node_rank)
    try:
        lock_fd = acquire_lock(run_dir)
    except LockHeld as exc:
        print(f"vit-supervisor: {exc}", file=sys.stderr)
        return SUPERVISOR_LOCKED
    real = RealHost()
    sup = Supervisor(cfg, real, log=log, notifier=Notifier(), self_create_time=self_create_time())
    if log_path:
        sup.record["log"] = log_path
    old_handlers = {s: signal.signal(s, sup.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    install_signal_wakeup(real.wake_fd)
    watch = RunDirWatch(Path(cfg.training.output_dir), real.wake)
    watch.start()
    try:
        status_mod.register(Path(cfg.training.output_dir), cfg.source_path)
    except OSError as exc:  # a read-only state directory must not stop training
        log.warning("registry", error=str(exc))
    try:
        code = sup.run()
        if log_path:
            sup.record["log"] = log_path
        log.info(
            "exit",
            state=str(sup.state),
            code=code,
            last_error=sup.record.get("last_error") if sup.state == State.FAILED else None,
        )
        return code
    finally:
        watch.stop()
        signal.set_wakeup_fd(-1)
        for s, h in old_handlers.items():
            signal.signal(s, h)
        real.close()
        os.close(lock_fd)
