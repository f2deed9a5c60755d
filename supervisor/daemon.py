"""The supervisor loop: launch the worker, watch it, decide, repeat until completed, stopped or failed.

Shape (after torchelastic's agent and supervisord's process): the loop observes
(signals recorded by the handlers, the child's exit, the heartbeat, the clock),
asks :mod:`supervisor.policy` what to do, and changes state only through
:meth:`Supervisor._transition`, which logs the change and rewrites
``run/state.json`` (:mod:`supervisor.record`). Processes, signals, the clock
and disk space go through a :class:`~supervisor.host.Host` so tests drive the
whole machine, standby included, with a fake clock and fake children; the run
directory's files are read and written directly.

Jobs live in their own units: :mod:`supervisor.launch` builds argv/env,
:mod:`supervisor.standby_pool` owns the standby worker, :mod:`supervisor.record`
the persisted run record. A worker's exit is handled as observe
(:meth:`Supervisor._observe_exit`) -> classify and decide (:mod:`supervisor.policy`)
-> apply (:meth:`Supervisor._apply`).

Snapshot stores (:mod:`supervisor.shm`) are the supervisor's to clean up: removed when the run
completes, when it can no longer resume (the worker found the config changed:
``incompatible_checkpoint``), and when it is stopped and the newest disk checkpoint is at least
as new as every snapshot (a graceful stop commits one at the stopped step; after a forced stop a
newer snapshot is kept for the next ``start``). Kept when the supervisor gives up or dies: a
later ``start`` resumes from them. Before every launch the shared-memory file system's free
space is checked against what the stores need; when it is too small the worker runs disk-only
(``LaunchOrder.snapshots``) after one warning line.

Robustness rules: a failed state write (full disk) is logged and retried on
the next loop turn, never fatal; every run file is read defensively; a pid
from a state file is signalled only once proven to be our worker; an output
directory deleted under the run stops the worker and ends the run ``failed``
(exit 3), since a restart would silently train from scratch.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from supervisor import goodput, launch, logs, policy, protocol, record, runlock, shm
from supervisor import slurm as slurm_mod
from supervisor.host import Host, RealHost, RunDirWatch, install_signal_wakeup, self_create_time
from supervisor.notify import Notifier
from supervisor.record import AttemptRecord, RunRecord
from supervisor.schema import Config
from supervisor.standby_pool import StandbyPool
from supervisor.states import ACTIVE_STATES, FINAL_STATES, WORKER_STATES, State, check_transition

if TYPE_CHECKING:  # prometheus_client is imported only when metrics are on
    from supervisor.metrics import Exporter

# Exit codes of `vit-supervisor start` (listed in the README and in cli.py's docstring; the systemd
# unit's RestartPreventExitStatus lists the deliberate ones).
SUPERVISOR_OK = 0  # completed, or stopped on request
SUPERVISOR_ERROR = 1  # could not even begin (e.g. the lock file could not be created): systemd retries
SUPERVISOR_USAGE = 2  # bad config or command line: nothing was written
SUPERVISOR_FAILED = 3  # gave up, or a non-retryable worker error
SUPERVISOR_LOCKED = 4  # another supervisor holds this run directory
SUPERVISOR_REQUEUE_NEEDED = slurm_mod.EXIT_REQUEUE_NEEDED  # 75: stopped for SLURM's signal, could not requeue

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
"""A graceful stop; the same signal again forces it. SIGQUIT too: a daemon has no core to dump for the user."""
STATUS_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
"""Log one status line and carry on. Under SLURM, ``slurm.requeue_signal`` (SIGUSR1 by default) is
instead the time-limit signal: a graceful stop, then ``scontrol requeue`` (see :mod:`supervisor.slurm`)."""
IGNORED_SIGNALS = (signal.SIGHUP,)
"""Logged and ignored: a daemon has no terminal to lose, and the log needs no reopening (stderr or O_APPEND)."""
HANDLED_SIGNALS = (*STOP_SIGNALS, *STATUS_SIGNALS, *IGNORED_SIGNALS)
GOODPUT_REFRESH_S = 2.0
"""``state.json`` is rewritten at least this often while the supervisor lives: ``status`` sees the
goodput totals move, and a later start can tell how long no supervisor watched the run."""


@dataclass
class _Worker:
    """The live attempt, as the loop sees it."""

    pid: int
    create_time: float
    attempt: int
    launched: float  # monotonic
    launched_wall: float
    step_at_start: int
    report_path: Path
    oom_kills_before: int
    from_standby: bool = False
    stop_sent: bool = False
    hang_killed: bool = False
    kill_deadline: float | None = None  # monotonic: SIGKILL if still alive then
    sigkill_sent: bool = False
    hb_key: tuple[Any, ...] | None = None
    last_change: float = 0.0
    seen_step: bool = False
    step_reached: int | None = None
    max_steps: int | None = None


@dataclass
class _Orphan:
    """A previous supervisor's worker, still saving its checkpoint: waited for before any launch."""

    pid: int
    create_time: float
    deadline: float  # monotonic: SIGKILL then
    killed: bool = False


@dataclass
class _Observed:
    """Everything observed about one worker exit (the input of classify and decide)."""

    code: int
    report: protocol.ExitReport | None
    reached: int | None
    progressed: bool
    host_oom: bool


@dataclass
class Supervisor:
    cfg: Config
    host: Host
    log: Any = field(default_factory=logs.get)
    notifier: Notifier = field(default_factory=lambda: Notifier(env={}))
    python: str = sys.executable
    self_create_time: float | None = None
    log_file: str | None = None
    """The supervisor's own log file (``--detach``), recorded for ``status``."""
    slurm_job: slurm_mod.SlurmJob | None = field(default_factory=slurm_mod.from_env)
    """The SLURM job this supervisor runs in (None outside SLURM)."""
    requeuer: Callable[[slurm_mod.SlurmJob], slurm_mod.RequeueResult] = slurm_mod.requeue
    exporter: Exporter | None = None
    """Prometheus metrics (:mod:`supervisor.metrics`), when ``supervisor.metrics`` turns them on."""
    process_age_s: float = 0.0
    """How long this process had run when :meth:`run` began (booked as goodput ``startup``)."""

    def __post_init__(self) -> None:
        self.out = Path(self.cfg.training.output_dir)
        self.node_rank = self.cfg.node_rank
        self.run_dir = protocol.supervisor_dir(self.out, self.node_rank)
        self.state: State | None = None
        self.signals: list[int] = []  # appended by the handler, consumed by the loop
        self.stop_requested = False
        self.stop_why: str | None = None  # what the STOPPING state says (default: a plain stop request)
        self.force = False
        self.requeue_signal = (
            slurm_mod.signal_number(self.cfg.slurm.requeue_signal) if self.slurm_job is not None else None
        )
        self.requeue_asked = False  # SLURM's time-limit signal came: requeue the job once stopped
        self.abort_reason: str | None = None  # the run cannot go on (output dir deleted): ends FAILED
        self.worker: _Worker | None = None
        self.last_heartbeat: protocol.Heartbeat | None = None  # the newest one of a worker of ours (metrics)
        self.until: float | None = None  # monotonic end of BACKOFF / next disk check in WAITING
        self.disk_needed: int | None = None  # bytes a disk_low worker said one checkpoint needs
        self.orphan: _Orphan | None = None
        self.rec = RunRecord()
        self.ledger = goodput.Ledger()  # where the wall time goes (replaced by the previous totals on load)
        self.save_pending = False
        self.written_at = 0.0  # monotonic time of the last state write attempt
        self.out_identity: tuple[int, int] | None = None
        self.exit_code = SUPERVISOR_OK
        self.batch = self.cfg.training.per_device_train_batch_size
        self.accum = self.cfg.training.gradient_accumulation_steps
        self.shm_base = Path(self.cfg.snapshot.root or shm.DEFAULT_BASE)
        self.shm_short = False  # the last launch found too little shared memory for snapshots
        self.pool = StandbyPool(
            self.cfg,
            self.host,
            self.rec,
            save=self._write_state,
            log=self.log,
            python=self.python,
            environ=dict(os.environ),
            supervisor_pid=os.getpid(),
        )

    # ------------------------------------------------------------------ public

    def on_signal(self, signum: int, frame: FrameType | None = None) -> None:
        """Signal handler: only records (the loop logs and acts; no locks or I/O here)."""
        self.signals.append(signum)

    def run(self) -> int:
        self._load_previous()
        # The run's wall time is this process's: its own start-up (interpreter, imports, config) counts.
        self.ledger.phase(self.host.monotonic() - self.process_age_s, "startup")
        # None -> STARTING
        self._transition(State.STARTING, "supervisor started")
        self.out_identity = self.host.dir_identity(self.out)
        handlers = {
            State.STARTING: self._starting,
            State.WAITING: self._waiting,
            State.BACKOFF: self._backoff,
            State.RUNNING: self._supervise,
            State.STOPPING: self._supervise,
        }
        while self.state not in FINAL_STATES:
            self._take_signals()
            self._check_output_dir()
            before = self.state
            handler = handlers.get(self.state) if self.state is not None else None
            if handler is None:  # pragma: no cover - a state added without a handler
                raise RuntimeError(f"no handler for state {self.state}")
            handler()
            self.pool.check()
            if self.save_pending or self.host.monotonic() - self.written_at >= GOODPUT_REFRESH_S:
                # A write that failed (full disk) is tried again every turn; otherwise the goodput is refreshed.
                self._write_state()
            self.notifier.watchdog()  # only a loop that got here is healthy
            self._publish()
            if self.state == before and self.state not in FINAL_STATES:
                self.host.wait(self._timeout())
        self.pool.drain()
        self._slurm_requeue()
        self.ledger.end(self.host.monotonic())
        self._write_state()  # the final goodput totals, the wind-down included
        return self.exit_code

    # ------------------------------------------------------------------ the one place that changes state

    def _transition(self, new: State, why: str, **fields: Any) -> None:
        old = self.state
        check_transition(old, new)
        self.state = new
        for key, value in fields.items():
            setattr(self.rec, key, value)
        self.rec.state_reason = why
        self._account(new)
        self.log.info(
            "state",
            old=str(old) if old else None,
            new=str(new),
            why=why,
            attempt=self.worker.attempt if self.worker else self.rec.attempt,
        )
        self._write_state()
        self._publish(changed=True)
        status = f"{new}: {why}"
        if new in (State.RUNNING, State.WAITING):
            self.notifier.ready(status)  # READY once the service does its job (or waits for disk to do it)
        if new == State.STOPPING:
            self.notifier.stopping(status)
        else:
            self.notifier.status(status)

    def _account(self, new: State) -> None:
        """Tell the goodput ledger which phase the run is in now (:mod:`supervisor.goodput`)."""
        now = self.host.monotonic()
        if new in FINAL_STATES:
            self.ledger.phase(now, "stopping")  # the wind-down (a standby's exit): closed by run()
        elif new == State.STOPPING:
            self.ledger.stop_requested(now)
        elif new == State.STARTING and self.orphan is not None:
            self.ledger.phase(now, "stopping")  # the previous supervisor's worker saves and exits first
        else:
            self.ledger.phase(now, _PHASE_OF.get(new, goodput.WORKER))

    # ------------------------------------------------------------------ state handlers

    def _end_before_launch(self, where: str) -> bool:
        """A stop (or an abort) in a state without a worker ends the run at once."""
        if self.abort_reason is not None:
            self.exit_code = SUPERVISOR_FAILED
            self._end_snapshots(State.FAILED)
            # STARTING -> FAILED, WAITING -> FAILED, BACKOFF -> FAILED
            self._transition(State.FAILED, self.abort_reason, last_error=self.abort_reason)
            return True
        if self.stop_requested:
            self._end_snapshots(State.STOPPED)
            # STARTING -> STOPPED, WAITING -> STOPPED, BACKOFF -> STOPPED
            self._transition(State.STOPPED, f"stop requested {where}")
            return True
        return False

    def _disk_short(self) -> str | None:
        return policy.disk_shortfall(
            self.host.free_disk(self.out), self.cfg.disk.reserve_mb, needed_bytes=self.disk_needed
        )

    def _starting(self) -> None:
        if self._end_before_launch("before launch"):
            return
        if self.orphan is not None and not self._orphan_gone():
            return  # never two workers: wait (the loop sleeps) until the old one has exited
        short = self._disk_short()
        if short:
            self.until = self.host.monotonic() + self.cfg.disk.recheck_s
            # STARTING -> WAITING
            self._transition(State.WAITING, f"waiting for disk space: {short}", waiting_reason=short)
            return
        try:
            w = self._launch()
        except OSError as exc:
            self.exit_code = SUPERVISOR_FAILED
            # STARTING -> FAILED
            self._transition(State.FAILED, f"could not start the worker: {exc}", last_error=str(exc))
            return
        self.disk_needed = None
        # STARTING -> RUNNING
        self._transition(State.RUNNING, f"worker pid {w.pid} started (attempt {w.attempt})", waiting_reason=None)

    def _waiting(self) -> None:
        if self._end_before_launch("while waiting for disk space"):
            return
        if self.until is not None and self.host.monotonic() < self.until:
            return
        short = self._disk_short()
        if short:
            self.until = self.host.monotonic() + self.cfg.disk.recheck_s
            if short != self.rec.waiting_reason:
                self.rec.waiting_reason = short
                self._write_state()
            return
        # WAITING -> STARTING
        self._transition(State.STARTING, "disk space available again", waiting_reason=None)

    def _backoff(self) -> None:
        if self._end_before_launch("during backoff"):
            return
        if self.until is not None and self.host.monotonic() < self.until:
            return
        # BACKOFF -> STARTING
        self._transition(State.STARTING, "backoff over", backoff_until=None)

    def _supervise(self) -> None:
        w = self.worker
        if w is None:  # pragma: no cover - WORKER_STATES always have a worker
            raise RuntimeError(f"no worker in state {self.state}")
        code = self.host.exit_status(w.pid)
        if code is not None:
            self._on_exit(w, code)
            return
        now = self.host.monotonic()
        self._observe_heartbeat(w, now)
        if self.state == State.RUNNING and w.seen_step and not self.stop_requested:
            self.pool.maybe_start()
        if self.stop_requested and self.state == State.RUNNING:
            self._request_stop(w, now)
            return
        if self.state == State.RUNNING and not w.hang_killed:
            self._check_hang(w, now)
        if w.kill_deadline is not None and not w.sigkill_sent and (now >= w.kill_deadline or self.force):
            self.log.warning(
                "escalate", pid=w.pid, signal="SIGKILL", why="forced stop" if self.force else "grace period over"
            )
            w.sigkill_sent = True
            self.host.kill(w.pid, signal.SIGKILL, group=True)

    def _request_stop(self, w: _Worker, now: float) -> None:
        self.pool.dismiss("stop requested")
        # Only the worker, not its group: dataloader workers must not die under the step.
        if not w.hang_killed:
            self.host.kill(w.pid, signal.SIGTERM)
        w.stop_sent = True
        if w.kill_deadline is None:
            w.kill_deadline = now + self.cfg.supervisor.term_grace_s
        # RUNNING -> STOPPING
        self._transition(
            State.STOPPING, self.abort_reason or self.stop_why or "stop requested: worker saves a checkpoint and exits"
        )

    def _check_hang(self, w: _Worker, now: float) -> None:
        hung = policy.hang_check(
            hb_state=w.hb_key[0] if w.hb_key else None,
            seen_step=w.seen_step,
            since_change_s=now - w.last_change,
            since_launch_s=now - w.launched,
            cfg=self.cfg.supervisor,
        )
        if hung:
            self.ledger.hang(now)
            self.log.warning("hang", pid=w.pid, attempt=w.attempt, step=w.step_reached, why=hung)
            self.rec.last_error = f"worker hung: {hung}"
            w.hang_killed = True
            w.kill_deadline = now + self.cfg.supervisor.term_grace_s
            self.host.kill(w.pid, signal.SIGTERM)
            self._write_state()

    # ------------------------------------------------------------------ observing

    def _take_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            name = signal.Signals(signum).name
            if signum in IGNORED_SIGNALS:
                self.log.info("signal", signal=name, action="ignored (send SIGTERM to stop)")
            elif signum == self.requeue_signal:
                self._slurm_signal(name)
            elif signum in STATUS_SIGNALS:
                w = self.worker
                self.log.info(
                    "signal",
                    signal=name,
                    action="status",
                    state=str(self.state),
                    attempt=w.attempt if w else self.rec.attempt,
                    worker_pid=w.pid if w else None,
                    step=w.step_reached if w else None,
                    standby=self.pool.current.pid if self.pool.current else None,
                )
            elif not self.stop_requested:
                self.stop_requested = True
                self.log.info("signal", signal=name, action="graceful stop (send it again to force)")
            else:
                self.force = True
                self.log.warning("signal", signal=name, action="forced stop: the worker gets SIGKILL")

    def _slurm_signal(self, name: str) -> None:
        """SLURM's time-limit (or preemption) signal: stop as for SIGTERM, and requeue the job once stopped."""
        job = self.slurm_job
        if self.stop_requested:  # a second one, or a scancel before it: never a forced stop, never a requeue
            self.log.info("signal", signal=name, action="ignored: already stopping", requeue=self.requeue_asked)
            return
        self.stop_requested = self.requeue_asked = True
        self.stop_why = (
            f"SLURM {name} (time limit or preemption of {job.describe() if job else 'the job'}): the worker "
            "saves a checkpoint, then the job is requeued"
        )
        self.log.warning("signal", signal=name, action="checkpoint, requeue the SLURM job, exit", why=self.stop_why)

    def _slurm_requeue(self) -> None:
        """As the run ends: requeue the SLURM job if its time-limit signal stopped the run."""
        job = self.slurm_job
        if job is None or not slurm_mod.should_requeue(job, signalled=self.requeue_asked, final_state=str(self.state)):
            if self.requeue_asked:
                self.log.info("slurm", action="not requeued", state=str(self.state), task=job.proc_id if job else None)
            return
        result = self.requeuer(job)
        self.rec.slurm_requeued = result.ok
        self.rec.state_reason = (
            f"{self.rec.state_reason}; {result.message}" if self.rec.state_reason else result.message
        )
        if result.ok:
            self.log.info("slurm", action="requeued", job=job.requeue_id, why=result.message)
        else:
            self.exit_code = SUPERVISOR_REQUEUE_NEEDED
            self.log.error("slurm", action="not requeued", why=result.message, exit=self.exit_code)
        self._write_state()

    def _check_output_dir(self) -> None:
        """The output directory deleted (or replaced) under the run: stop, and end FAILED."""
        if self.abort_reason is not None or self.out_identity is None:
            return
        if self.host.dir_identity(self.out) == self.out_identity:
            return
        self.abort_reason = f"the output directory {self.out} was deleted or replaced while the run was in progress"
        self.log.error("output_dir", why=self.abort_reason, action="stopping the worker; not restarted")
        self.stop_requested = True

    def _heartbeat(self, w: _Worker) -> protocol.Heartbeat | None:
        """This attempt's heartbeat, or None (none yet, the previous attempt's, or unreadable)."""
        hb = protocol.read_record(protocol.Heartbeat, protocol.heartbeat_path(self.out))
        if hb is None:
            return None
        if self.cfg.launcher == "torchrun":
            # Rank 0 (on node 0) writes it; it belongs to this attempt if it is no older than the launch.
            if hb.attempt != w.attempt and (hb.time or 0) < w.launched_wall:
                return None
        elif hb.pid != w.pid:
            return None
        return hb

    def _observe_heartbeat(self, w: _Worker, now: float) -> None:
        hb = self._heartbeat(w)
        if hb is None:
            return
        self.last_heartbeat = hb
        step = hb.global_step
        self.ledger.observe(now, hb.state, step, hb.reason)
        key = (hb.state, step)
        if key != w.hb_key:
            w.hb_key = key
            w.last_change = now
        if hb.max_steps is not None:
            w.max_steps = hb.max_steps
        current = self.rec.current
        if hb.start_step is not None and current is not None and current.attempt == w.attempt:
            # The worker resumed from a snapshot newer than the disk checkpoint seen at launch:
            # the steps redone count from there.
            if hb.start_step > current.step_start:
                current.step_start = hb.start_step
                self._write_state()
            w.step_at_start = max(w.step_at_start, hb.start_step)
        if step is not None:
            w.step_reached = step if w.step_reached is None else max(w.step_reached, step)
            if hb.state == protocol.HB_TRAINING:
                w.seen_step = True
            if step > max(w.step_at_start, 0) and current is not None and not current.first_step_at:
                # The restart's real cost ends here: the first optimizer step this attempt added.
                current.first_step_at = hb.time or self.host.time()
                self._write_state()
        if hb.tracker_run_id and hb.tracker_run_id != self.rec.tracker_run_id:
            self.rec.tracker_run_id = hb.tracker_run_id
            self._write_state()

    def _timeout(self) -> float:
        now = self.host.monotonic()
        cap = 0.5 if self.state in WORKER_STATES else 1.0
        if self.save_pending:
            cap = 1.0 if cap > 1.0 else cap
        if self.notifier.interval:
            cap = min(cap, self.notifier.interval)
        deadlines = [self.until] if self.state in (State.BACKOFF, State.WAITING) else []
        if self.worker is not None and self.worker.kill_deadline is not None:
            deadlines.append(self.worker.kill_deadline)
        deadlines.append(self.pool.next_deadline())
        return max(0.0, min([cap] + [d - now for d in deadlines if d is not None]))

    # ------------------------------------------------------------------ launching

    def _launch(self) -> _Worker:
        attempt = len(self.rec.attempts) + 1
        report_path = self.run_dir / f"exit-{attempt}.json"
        report_path.unlink(missing_ok=True)  # a stale report must never explain a new exit
        for stale in self.run_dir.glob(f"exit-{attempt}.rank*.json"):
            stale.unlink(missing_ok=True)
        order = protocol.LaunchOrder(
            attempt=attempt,
            exit_report=str(report_path),
            supervisor_pid=os.getpid(),
            per_device_train_batch_size=self.batch,
            gradient_accumulation_steps=self.accum,
            snapshots=self._snapshots_fit(),
        )
        resume_step = protocol.newest_checkpoint_step(self.out)
        # Progress means a step no earlier attempt reached, not just past the checkpoint: a worker
        # that crashes at the same step after every resume is a crash loop.
        step_at_start = max(self.rec.step_high_water, resume_step)
        oom_before = self.host.oom_kills()
        used, fallback = self.pool.hand_over(order, first_launch=not self.rec.finished_attempts())
        if used is not None:
            pid, created, log_path = used.pid, used.create_time, used.log_path
            self.log.info("standby", pid=pid, attempt=attempt, action="took over")
        else:
            log_path = self.run_dir / protocol.LOGS_SUBDIR / f"attempt-{attempt}.log"
            cmd = launch.cold_start(order, self.cfg, python=self.python, environ=os.environ)
            pid, created = self.host.spawn(cmd.argv, cmd.env, log_path)
            if fallback:
                self.log.info("standby", attempt=attempt, action="cold start", why=fallback)
        now = self.host.monotonic()
        self.worker = _Worker(
            pid=pid,
            create_time=created,
            attempt=attempt,
            launched=now,
            launched_wall=self.host.time(),
            step_at_start=step_at_start,
            report_path=report_path,
            oom_kills_before=oom_before,
            from_standby=used is not None,
            last_change=now,
        )
        self.rec.attempts.append(
            AttemptRecord(
                attempt=attempt,
                pid=pid,
                start=self.host.time(),
                step_start=max(resume_step, 0),
                log=str(log_path),
                per_device_train_batch_size=self.batch,
                gradient_accumulation_steps=self.accum,
                standby=used is not None,
                standby_fallback=fallback,
            )
        )
        self.rec.worker_pid, self.rec.worker_create_time, self.rec.attempt = pid, created, attempt
        self.log.info("launch", pid=pid, attempt=attempt, batch=self.batch, accum=self.accum, log=str(log_path))
        return self.worker

    # ------------------------------------------------------------------ exits: observe -> classify -> decide -> apply

    def _read_report(self, w: _Worker) -> protocol.ExitReport | None:
        """The attempt's exit report; under torchrun, the root cause among the ranks' reports."""
        if self.cfg.launcher != "torchrun":
            report = protocol.read_record(protocol.ExitReport, w.report_path)
            if report is None or report.pid not in (None, w.pid):
                return None  # none, unreadable, or someone else's
            return report
        d = self.cfg.distributed
        ranks = range(d.node_rank * d.nproc_per_node, (d.node_rank + 1) * d.nproc_per_node)
        reports: dict[int, protocol.ExitReport | None] = {
            r: protocol.read_record(protocol.ExitReport, w.report_path.with_name(f"{w.report_path.stem}.rank{r}.json"))
            for r in ranks
        }
        return policy.root_cause(reports)

    def _observe_exit(self, w: _Worker, code: int) -> _Observed:
        self._observe_heartbeat(w, self.host.monotonic())
        report = self._read_report(w)
        host_oom = (
            protocol.signal_name(code) == "SIGKILL" and report is None and self.host.oom_kills() > w.oom_kills_before
        )
        reached = w.step_reached
        step = report.step if report is not None else None
        if step is not None:
            reached = step if reached is None else max(reached, step)
        return _Observed(code, report, reached, reached is not None and reached > w.step_at_start, host_oom)

    def _on_exit(self, w: _Worker, code: int) -> None:
        seen = self._observe_exit(w, code)
        outcome = policy.classify(
            policy.ExitInfo(
                code,
                seen.report,
                stop_sent=w.stop_sent,
                hang_killed=w.hang_killed,
                host_oom=seen.host_oom,
                max_steps=w.max_steps,
            )
        )
        decision = policy.decide(
            outcome,
            progressed=seen.progressed,
            failures_without_progress=self.rec.failures_without_progress,
            batch=self.batch,
            accum=self.accum,
            cfg=self.cfg.supervisor,
            stop_requested=self.stop_requested,
            disk_needed_bytes=_positive_int(seen.report.disk_needed_bytes if seen.report is not None else None),
        )
        self._account_exit(seen)
        self._record_exit(w, seen, outcome, decision)
        self._apply(outcome, decision, seen.report.reason if seen.report is not None else None)

    def _account_exit(self, seen: _Observed) -> None:
        """Close the worker's time in the ledger; a failure's time after its exit report is detection."""
        report = seen.report
        dead_for = 0.0
        if report is not None and report.time is not None and report.reason not in goodput.CLEAN_EXITS:
            dead_for = self.host.time() - report.time
        self.ledger.exited(self.host.monotonic(), seen.reached, dead_for)

    def _record_exit(self, w: _Worker, seen: _Observed, outcome: policy.Outcome, decision: policy.Decision) -> None:
        if seen.reached is not None:
            self.rec.step_high_water = max(self.rec.step_high_water, seen.reached)
        current = self.rec.current
        if current is not None:
            tail = seen.report.traceback if seen.report is not None else []
            current.end = self.host.time()
            current.reason = outcome.kind
            current.exit = outcome.exit
            current.message = outcome.message
            current.step_reached = seen.reached
            current.traceback_tail = tail[-3:]
        self.log.info(
            "exit",
            pid=w.pid,
            attempt=w.attempt,
            exit=outcome.exit,
            reason=outcome.kind,
            message=outcome.message,
            step_reached=seen.reached,
            progressed=seen.progressed,
            decision=decision.action,
        )
        batch = decision.per_device_train_batch_size or self.batch
        accum = decision.gradient_accumulation_steps or self.accum
        if (batch, accum) != (self.batch, self.accum):
            self.log.warning("batch", per_device=batch, accumulation=accum, attempt=w.attempt, why=decision.message)
        self.batch, self.accum = batch, accum
        self.rec.failures_without_progress = decision.failures_without_progress
        self.worker = None
        self.rec.worker_pid = self.rec.worker_create_time = None
        if outcome.kind not in ("completed", "stopped", "standby_stale"):
            self.rec.last_error = outcome.message

    def _apply(self, outcome: policy.Outcome, decision: policy.Decision, reason: str | None = None) -> None:
        """Act on a decision; ``reason`` is the exit report's (it tells an incompatible config from other user errors)."""
        if self.abort_reason is not None and decision.action != "complete":
            self.exit_code = SUPERVISOR_FAILED
            self._end_snapshots(State.FAILED)
            # RUNNING -> FAILED, STOPPING -> FAILED (the output directory is gone: nothing to restart into)
            self._transition(State.FAILED, self.abort_reason, last_error=self.abort_reason)
        elif decision.action == "complete":
            self.exit_code = SUPERVISOR_OK
            self._end_snapshots(State.COMPLETED)
            # RUNNING -> COMPLETED (or STOPPING -> COMPLETED: it finished before it saw the stop)
            self._transition(State.COMPLETED, decision.message)
        elif decision.action == "stop":
            self.exit_code = SUPERVISOR_OK
            self._end_snapshots(State.STOPPED)
            # RUNNING -> STOPPED, STOPPING -> STOPPED
            self._transition(State.STOPPED, decision.message)
        elif decision.action == "fail":
            self.exit_code = SUPERVISOR_FAILED
            self._end_snapshots(State.FAILED, reason)
            # RUNNING -> FAILED, STOPPING -> FAILED
            self._transition(State.FAILED, decision.message, last_error=decision.message)
        elif self.state != State.RUNNING:  # pragma: no cover - policy.decide lets a stop win over any relaunch
            raise RuntimeError(f"decision {decision.action!r} in state {self.state}")
        else:
            self._continue(outcome, decision)

    def _continue(self, outcome: policy.Outcome, decision: policy.Decision) -> None:
        """The decisions that keep the run going (only from RUNNING: a stop always ends it)."""
        if decision.action == "wait_disk":
            self.until = self.host.monotonic() + self.cfg.disk.recheck_s
            self.disk_needed = decision.disk_needed_bytes
            # RUNNING -> WAITING
            self._transition(
                State.WAITING, f"worker stopped for disk space: {decision.message}", waiting_reason=decision.message
            )
        elif decision.action == "replace_standby":
            self.pool.force_cold = f"standby unusable: {outcome.message}"
            # RUNNING -> STARTING (not a failure: nothing was trained or touched)
            self._transition(State.STARTING, f"standby unusable ({outcome.message}): cold start")
        elif decision.action == "restart":
            self._restart(decision)
        else:  # pragma: no cover - a new action without a branch
            raise RuntimeError(f"unknown decision {decision.action!r}")

    def _restart(self, decision: policy.Decision) -> None:
        self.rec.restart_count += 1
        if decision.delay_s > 0:
            self.until = self.host.monotonic() + decision.delay_s
            # RUNNING -> BACKOFF
            self._transition(
                State.BACKOFF,
                f"restart in {decision.delay_s:.1f}s after: {decision.message}",
                backoff_until=self.host.time() + decision.delay_s,
            )
        else:
            # RUNNING -> STARTING (an OOM restarts at once with the lower batch)
            self._transition(State.STARTING, f"restart now: {decision.message}")

    # ------------------------------------------------------------------ recovery after a previous supervisor

    def _load_previous(self) -> None:
        loaded = record.load(self.out, self.node_rank)
        prev = loaded or RunRecord()
        rec = self.rec  # the same object the standby pool holds
        rec.output_dir, rec.config = str(self.out), self.cfg.source_path
        rec.attempts = prev.attempts
        rec.restart_count = max(prev.restart_count, 0)
        rec.tracker_run_id, rec.last_error = prev.tracker_run_id, prev.last_error
        rec.effective_batch = self.cfg.training.effective_batch
        rec.supervisor_pid, rec.supervisor_create_time = os.getpid(), self.self_create_time
        rec.host, rec.slurm, rec.slurm_requeued = socket.gethostname(), self.slurm_job, False
        if self.slurm_job is not None:
            self.log.info(
                "slurm",
                job=self.slurm_job.describe(),
                requeue_signal=self.cfg.slurm.requeue_signal,
                resumes=prev.state is not None,
            )
        rec.log = self.log_file or prev.log
        rec.step_high_water = prev.step_high_water
        self.ledger = goodput.Ledger(totals=prev.goodput, high_water=prev.step_high_water)
        if loaded is not None and prev.state in _ACTIVE_NAMES and prev.updated is not None:
            self.ledger.unsupervised(self.host.time() - prev.updated)  # the previous supervisor died
        rec.standby_count = max(prev.standby_count, 0)
        for a in rec.attempts:
            if a.end is None:
                a.end = prev.updated
                a.reason = "supervisor_died"
                a.message = "the supervisor died while this attempt ran"
        self._restore_batch(prev)
        self._adopt_orphan(prev)

    def _restore_batch(self, prev: RunRecord) -> None:
        b, a = prev.per_device_train_batch_size, prev.gradient_accumulation_steps
        if b is not None and a is not None and b >= 1 and a >= 1 and b * a == self.cfg.training.effective_batch:
            if (b, a) != (self.batch, self.accum):
                self.log.info("batch", per_device=b, accumulation=a, why="kept from the previous run (after an OOM)")
            self.batch, self.accum = b, a
        elif b is not None and a is not None:
            self.log.warning(
                "batch",
                why="the config's effective batch changed (or the state file's values are invalid); "
                "using the config's values",
                previous=b * a,
                now=self.cfg.training.effective_batch,
            )

    def _adopt_orphan(self, prev: RunRecord) -> None:
        pid, created = prev.worker_pid, prev.worker_create_time
        if pid is None:
            return
        if created is None or not self.host.is_worker(pid, created):
            if self.host.alive(pid, created):
                # Pid reuse or a hand-edited file: never signal a process whose identity is not proven.
                self.log.warning(
                    "orphan", pid=pid, why="the state file names a process that is not our worker; ignored"
                )
            return
        # The previous supervisor died. Its worker got SIGUSR1 from PR_SET_PDEATHSIG (and checks its
        # parent at every step), so it is already saving a checkpoint. A SIGTERM on top would be
        # redundant at best: only wait, and SIGKILL after term_grace_s.
        self.orphan = _Orphan(pid, created, self.host.monotonic() + self.cfg.supervisor.term_grace_s)
        self.log.warning(
            "orphan", pid=pid, why="a worker of a previous supervisor is still alive; waiting for it to save and exit"
        )

    def _orphan_gone(self) -> bool:
        o = self.orphan
        if o is None:
            return True
        if not self.host.is_worker(o.pid, o.create_time):
            self.log.info("orphan", pid=o.pid, why="previous worker has exited")
            self.orphan = None
            self.ledger.phase(self.host.monotonic(), "startup")
            return True
        if self.host.monotonic() >= o.deadline and not o.killed:
            self.log.warning("escalate", pid=o.pid, signal="SIGKILL", why="previous worker did not exit in time")
            self.host.kill(o.pid, signal.SIGKILL, group=True)
            o.killed = True
        return False

    # ------------------------------------------------------------------ snapshot stores

    def _snapshots_fit(self) -> bool:
        """Whether the next attempt may take snapshots: the shared-memory file system must hold
        the run's stores (what this run's stores already hold counts as free: it is reused).
        One warning when they do not fit, one line when they fit again; never fatal."""
        if not shm.snapshots_on(self.cfg):
            return True  # the worker takes none anyway: nothing to check or say
        root = self.cfg.snapshot.root
        try:
            estimate = shm.estimate_state(self.cfg)
            needed = shm.run_needed_bytes(self.cfg, estimate)
            free = self.host.free_disk(self.shm_base) + sum(shm.store_bytes(r) for r in shm.run_stores(self.out, root))
            short = shm.shortfall(free, needed, self.shm_base, estimate)
        except OSError as exc:
            short = (
                f"the free space of {self.shm_base} cannot be read ({exc}); fix: point snapshot.root at a "
                "writable tmpfs, or set snapshot.every_steps: 0"
            )
        if short and not self.shm_short:
            self.log.warning("snapshots", action="off: disk checkpoints only", why=short)
        elif not short and self.shm_short:
            self.log.info("snapshots", action="on again", why=f"{self.shm_base} has room for them now")
        self.shm_short = bool(short)
        return not short

    def _end_snapshots(self, end: State, reason: str | None = None) -> None:
        """Remove or keep the run's snapshot stores as the run ends (see the module docstring)."""
        root = self.cfg.snapshot.root
        try:
            infos = [shm.read_store(r) for r in shm.run_stores(self.out, root)]
            if not infos:
                return
            steps = sorted({i.step for i in infos if i.step is not None})
            if end == State.COMPLETED:
                why = "the run completed"
            elif end == State.FAILED and reason == protocol.REASON_INCOMPATIBLE:
                why = "the run cannot resume from them (its config changed)"
            elif end == State.STOPPED:
                disk = protocol.newest_checkpoint_step(self.out)
                newer = [s for s in steps if s > disk]
                if newer:
                    self.log.info(
                        "snapshots",
                        action="kept",
                        why=f"the snapshot of step {newer[-1]} is newer than "
                        f"{f'checkpoint-{disk}' if disk >= 0 else 'any disk checkpoint'}; the next start resumes from it",
                        where=str(infos[0].root.parent),
                    )
                    return
                why = f"stopped, and checkpoint-{disk} holds the newest state" if disk >= 0 else "stopped"
            else:
                self.log.info("snapshots", action="kept", why="a later start resumes from them", steps=steps)
                return
            done = shm.remove_stores(self.out, root)
        except OSError as exc:  # never fatal: the stores only cost memory
            self.log.warning("snapshots", action="not removed", error=str(exc))
            return
        self.log.info(
            "snapshots",
            action="removed",
            why=why,
            stores=len(done.removed),
            freed=shm.human(done.freed_bytes),
            kept=done.kept or None,
        )

    def _publish(self, *, changed: bool = False) -> None:
        """Hand the metrics a consistent copy of what the loop knows (a scrape reads only that copy);
        the textfile is rewritten at once on a state change, else when it is due."""
        if self.exporter is not None:
            self.exporter.observe(self.rec, self.state, self.last_heartbeat, self.batch, self.accum, force=changed)
            self.exporter.refresh(force=changed)

    def _write_state(self) -> None:
        """The one save path. A failed write (full disk, read-only remount) never stops supervision:
        it is logged once and retried on every loop turn until it succeeds."""
        rec = self.rec
        rec.state = str(self.state) if self.state else None
        rec.updated = self.host.time()
        rec.per_device_train_batch_size, rec.gradient_accumulation_steps = self.batch, self.accum
        self.written_at = self.host.monotonic()
        rec.goodput = self.ledger.booked(self.written_at)
        rec.step_high_water = max(rec.step_high_water, self.ledger.high_water)
        if self.worker is not None:
            rec.worker_pid = self.worker.pid
        try:
            record.save(self.out, self.node_rank, rec)
        except OSError as exc:
            if not self.save_pending:
                self.log.warning("state_file", error=str(exc), action="keeps supervising; retries the write")
            self.save_pending = True
            return
        if self.save_pending:
            self.log.info("state_file", action="written again")
        self.save_pending = False


_ACTIVE_NAMES = frozenset(str(s) for s in ACTIVE_STATES)
_PHASE_OF = {State.STARTING: "startup", State.BACKOFF: "backoff", State.WAITING: "disk_wait"}
"""Goodput phase of each supervisor state without a worker (RUNNING: the worker's heartbeat decides)."""


def _positive_int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


# ----------------------------------------------------------------------------- the process around it


def process_age_s() -> float:
    """Seconds since this process started, to the clock tick (psutil's create_time is only as
    exact as the boot time's whole second); 0.0 where /proc cannot tell."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime: ticks since boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0
    return min(max(age, 0.0), 600.0)


def serve(cfg: Config, *, log_path: str | None = None) -> int:
    """Run one supervisor in this process until the run is completed, stopped or failed.

    Holds the run lock (:mod:`supervisor.runlock`) throughout; installs the signal
    handlers, the wake-up pipe, the run-directory watch and the systemd notifier;
    always cleans them up.
    """
    from supervisor import status as status_mod

    log = logs.get()
    try:
        lock = runlock.acquire(cfg.training.output_dir, "run", cfg.node_rank)
    except runlock.LockHeld as exc:
        print(f"vit-supervisor: {exc}", file=sys.stderr)
        return SUPERVISOR_LOCKED
    except OSError as exc:  # e.g. a full disk: nothing started yet, so systemd may simply try again
        print(f"vit-supervisor: error: cannot take the run lock in {cfg.training.output_dir}: {exc}", file=sys.stderr)
        return SUPERVISOR_ERROR
    exporter = None
    if cfg.supervisor.metrics.enabled:
        from supervisor import metrics

        exporter = metrics.Exporter(cfg, log)
        try:
            exporter.listen()  # after the lock (a second start still says "already running"), before all else
        except metrics.MetricsError as exc:
            print(f"vit-supervisor: error: {exc}", file=sys.stderr)
            lock.release()
            return SUPERVISOR_USAGE
    real = RealHost()
    sup = Supervisor(cfg, real, log=log, notifier=Notifier(), self_create_time=self_create_time(), log_file=log_path)
    sup.exporter = exporter
    sup.process_age_s = process_age_s()
    old_handlers = {s: signal.signal(s, sup.on_signal) for s in HANDLED_SIGNALS}
    install_signal_wakeup(real.wake_fd)
    watch = RunDirWatch(Path(cfg.training.output_dir), real.wake)
    watch.start()
    try:
        status_mod.register(Path(cfg.training.output_dir), cfg.source_path)
    except OSError as exc:  # a read-only state directory must not stop training
        log.warning("registry", error=str(exc))
    try:
        code = sup.run()
        log.info(
            "exit",
            state=str(sup.state),
            code=code,
            last_error=sup.rec.last_error if sup.state == State.FAILED else None,
        )
        return code
    finally:
        watch.stop()
        signal.set_wakeup_fd(-1)
        for s, h in old_handlers.items():
            signal.signal(s, h)
        real.close()
        if exporter is not None:
            exporter.close()
        lock.release()
