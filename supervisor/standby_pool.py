"""The standby pool: one pre-warmed worker waiting on its stdin for a go (worker/standby.py).

Lifecycle, decided here and driven by the daemon's loop:

- **start**: once the active worker trains (so it never competes with a
  restart's own start-up for the CPU); one at a time; never under torchrun
  (the ranks are torchrun's children, not ours to pre-warm).
- **ready**: its ``run/standby-PID.json`` announcement appeared.
- **hand over**: the next launch sends it the :class:`~supervisor.protocol.LaunchOrder`
  as one line; a standby still preparing gets it too (it reads it as soon as
  it is ready, sooner than a cold start that has not begun importing).
- **cold start instead** when there is none, it died, the config file changed
  since it started, or the previous hand-over found it stale.
- **given up** after :data:`MAX_DEATHS` deaths: every launch is then cold.
- **dismiss**: EOF on its stdin ("not needed", it exits 0). A standby still
  preparing reads stdin only once prepared, so it also gets SIGTERM, and
  SIGKILL after :data:`DISMISS_GRACE_S`: a dismissed standby never outlives
  the supervisor (:meth:`StandbyPool.drain`).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from supervisor import launch, protocol
from supervisor.host import Host
from supervisor.record import RunRecord, StandbyRecord
from supervisor.schema import Config

MAX_DEATHS = 3
IDLE_PREPARE_S = 20.0
"""A standby still preparing after this long leaves SCHED_IDLE for plain nice 10 (worker/standby.py):
on a machine kept busy by other work an idle-class process hardly progresses at all."""
STANDBY_NICE = 10
DISMISS_GRACE_S = 5.0
"""A dismissed standby that has not exited by then gets SIGKILL (it has written nothing yet)."""


@dataclass
class Standby:
    pid: int
    create_time: float
    log_path: Path
    config_sha: str | None
    """Of the config file when it was spawned."""
    started: float = 0.0
    """Monotonic time of the spawn."""
    softened: bool = False
    """Moved from SCHED_IDLE to nice 10 after :data:`IDLE_PREPARE_S` of preparation."""


@dataclass
class _Dismissed:
    pid: int
    deadline: float  # monotonic
    killed: bool = False


class StandbyPool:
    def __init__(
        self,
        cfg: Config,
        host: Host,
        rec: RunRecord,
        *,
        save: Callable[[], None],
        log: Any,
        python: str,
        environ: dict[str, str],
        supervisor_pid: int,
    ) -> None:
        self.cfg = cfg
        self.host = host
        self.rec = rec
        self.save = save
        self.log = log
        self.python = python
        self.environ = environ
        self.supervisor_pid = supervisor_pid
        self.out = Path(cfg.training.output_dir)
        self.run_dir = protocol.supervisor_dir(self.out, cfg.node_rank)
        self.current: Standby | None = None
        self.deaths = 0
        self.force_cold: str | None = None
        """Why the next launch must not use a standby (the last one was stale)."""
        self.dismissed: list[_Dismissed] = []

    @property
    def enabled(self) -> bool:
        return self.cfg.supervisor.standby and self.cfg.launcher == "python" and self.deaths < MAX_DEATHS

    # ------------------------------------------------------------------ start and watch

    def maybe_start(self) -> None:
        """Start one if enabled and none runs (the caller checks that the worker trains)."""
        if not self.enabled or self.current is not None:
            return
        self.rec.standby_count += 1
        log_path = self.run_dir / protocol.LOGS_SUBDIR / f"standby-{self.rec.standby_count}.log"
        cmd = launch.standby(self.cfg, python=self.python, environ=self.environ, supervisor_pid=self.supervisor_pid)
        try:
            pid, created = self.host.spawn(cmd.argv, cmd.env, log_path, stdin_pipe=True)
        except OSError as exc:
            self.log.warning("standby", action="not started", error=str(exc))
            self.deaths += 1
            return
        self.current = Standby(
            pid, created, log_path, protocol.config_sha(self.cfg.source_path), started=self.host.monotonic()
        )
        self.rec.standby = StandbyRecord(pid=pid, ready=False, log=str(log_path))
        self.log.info("standby", pid=pid, action="started", log=str(log_path))
        self.save()

    def check(self) -> None:
        """Count a death, notice readiness, escalate on dismissed ones; once per loop turn."""
        self._escalate_dismissed()
        sb = self.current
        if sb is None:
            return
        code = self.host.exit_status(sb.pid)
        if code is not None:
            self.current = None
            self.deaths += 1
            self.rec.standby = None
            self.log.warning(
                "standby",
                pid=sb.pid,
                action="exited while waiting",
                exit=protocol.describe_exit(code),
                log=str(sb.log_path),
            )
            self.save()
            return
        if self.rec.standby is not None and not self.rec.standby.ready and self._announced(sb) is not None:
            self.rec.standby.ready = True
            self.log.info("standby", pid=sb.pid, action="ready")
            self.save()
        elif not sb.softened and self.host.monotonic() - sb.started >= IDLE_PREPARE_S:
            sb.softened = True
            if self.rec.standby is not None and not self.rec.standby.ready:
                _promote(sb, STANDBY_NICE)
                self.log.info("standby", pid=sb.pid, action="still preparing: now at nice 10 instead of SCHED_IDLE")

    def _announced(self, sb: Standby) -> protocol.StandbyReady | None:
        ready = protocol.read_record(protocol.StandbyReady, protocol.standby_announcement(self.out, sb.pid))
        return ready if ready is not None and ready.pid == sb.pid else None

    # ------------------------------------------------------------------ hand-over

    def hand_over(self, order: protocol.LaunchOrder, *, first_launch: bool) -> tuple[Standby | None, str | None]:
        """Give ``order`` to the standby: (it, None), or (None, why a cold start is made; None: no standbys)."""
        if self.force_cold is not None:
            why, self.force_cold = self.force_cold, None
            self.dismiss(why)
            return None, why
        sb = self.current
        if sb is None:
            if self.cfg.supervisor.standby and self.deaths >= MAX_DEATHS:
                return None, f"standby given up after it died {self.deaths} times (see logs/standby-*.log)"
            # Only a restart can miss a standby: the first launch never has one.
            return None, ("no standby was running yet" if self.enabled and not first_launch else None)
        if self.host.exit_status(sb.pid) is not None:
            self.check()
            return None, "the standby had died"
        announced = self._announced(sb)
        spawned_with = (announced.config_sha256 if announced else None) or sb.config_sha
        if protocol.config_sha(self.cfg.source_path) != spawned_with:
            self.dismiss("config changed")
            return None, "the config file changed since the standby started"
        ready = self.rec.standby is not None and self.rec.standby.ready
        self.current = None
        self.rec.standby = None
        if not self.host.send_line(sb.pid, order.to_line()):
            self._dismissed_pid(sb.pid)
            return None, "the standby did not take the go"
        if not ready:
            _promote(sb, 0)
        return sb, None

    # ------------------------------------------------------------------ dismissal

    def dismiss(self, why: str) -> None:
        sb = self.current
        if sb is None:
            return
        ready = self.rec.standby is not None and self.rec.standby.ready
        self.current = None
        self.rec.standby = None
        self.host.send_line(sb.pid, None)  # EOF: "not needed", it exits 0
        if not ready:
            # Still importing: it reads stdin only once prepared, so EOF alone could take minutes.
            self.host.kill(sb.pid, signal.SIGTERM)
        self._dismissed_pid(sb.pid)
        self.log.info("standby", pid=sb.pid, action="dismissed", why=why)

    def _dismissed_pid(self, pid: int) -> None:
        self.dismissed.append(_Dismissed(pid, self.host.monotonic() + DISMISS_GRACE_S))

    def _escalate_dismissed(self) -> None:
        now = self.host.monotonic()
        for d in list(self.dismissed):
            if self.host.exit_status(d.pid) is not None:
                self.dismissed.remove(d)
            elif now >= d.deadline and not d.killed:
                self.log.warning("standby", pid=d.pid, action="killed", why="dismissed but still running")
                self.host.kill(d.pid, signal.SIGKILL, group=True)
                d.killed = True

    def next_deadline(self) -> float | None:
        pending = [d.deadline for d in self.dismissed if not d.killed]
        return min(pending) if pending else None

    def drain(self) -> None:
        """At supervisor exit: dismiss the standby and wait (bounded) until every dismissed one is gone."""
        self.dismiss("the run is over")
        while self.dismissed:
            self._escalate_dismissed()
            if not self.dismissed:
                return
            if all(d.killed for d in self.dismissed):
                # SIGKILL sent; the reaper reports the exit promptly. Do not wait forever on a zombie.
                deadline = max(d.deadline for d in self.dismissed) + DISMISS_GRACE_S
                if self.host.monotonic() >= deadline:
                    return
            self.host.wait(0.1)


def _promote(sb: Standby, nice: int) -> None:
    """A standby still preparing prepares at SCHED_OTHER and ``nice`` from now on: 0 once its go
    is written, :data:`STANDBY_NICE` once it has prepared for :data:`IDLE_PREPARE_S`.

    It prepares at SCHED_IDLE (worker/standby.py) and restores every thread's priority itself
    once it reads the go, but it reads stdin only once prepared; on a machine kept busy by
    other work an idle-class process would barely progress, and the restart would then be
    slower than a cold one. Its main thread (which does the importing) is promoted here;
    best effort (another user's process, no CAP_SYS_NICE): the standby then simply goes on.
    """
    try:
        if psutil.Process(sb.pid).create_time() != sb.create_time:
            return  # not our child any more (or not a real process: a test's fake host)
        if hasattr(os, "SCHED_IDLE") and os.sched_getscheduler(sb.pid) == os.SCHED_IDLE:
            os.sched_setscheduler(sb.pid, os.SCHED_OTHER, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, sb.pid, nice)
    except (psutil.Error, OSError):
        pass
