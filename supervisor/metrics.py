"""Prometheus metrics of a supervised run: an HTTP endpoint and/or a textfile for node_exporter.

Both are off by default (``supervisor.metrics.listen``, ``supervisor.metrics.textfile``); the
daemon imports this module, and with it ``prometheus_client``, only when one of them is on, so a
plain ``start`` pays nothing for it. The worker runs no metrics server: everything here comes
from what the supervisor already knows (its run record, the worker's heartbeat and exit
reports, the config) and from the run directory.

A scrape never races the supervision loop. The loop hands over a frozen :class:`Facts`
(:meth:`Exporter.observe`) after every turn and at every state change; a scrape, in the HTTP
server's own thread, renders the newest one and never touches the loop's live objects. What
only the file system knows (free disk, the newest checkpoint, the snapshot stores) is read at
scrape time. A failed textfile write is logged once and retried; neither output can stop the
supervisor.

Every series carries a ``run`` label (``tracking.run_name``, default the output directory's
name), so several runs on one host are told apart. The metrics, their types and meaning are
listed in :data:`HELP` (and in the README's "Metrics" section).
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from supervisor import protocol, shm
from supervisor.goodput import BUCKETS
from supervisor.record import AttemptRecord, RunRecord
from supervisor.schema import Config
from supervisor.states import WORKER_STATES, State

PREFIX = "vit_supervisor"

HELP: dict[str, tuple[str, str]] = {
    "build_info": (
        "gauge",
        "Always 1; the labels name the vit-supervisor and Python versions and the output directory.",
    ),
    "start_time_seconds": ("gauge", "Unix time this supervisor process started."),
    "state": ("gauge", "1 for the supervisor's current state, 0 for the others (label state)."),
    "worker_state": (
        "gauge",
        "1 for the state the running worker's heartbeat reports (training, saving, evaluating, "
        "waiting_for_disk, ...), 0 for the others; absent while no worker runs.",
    ),
    "attempt": ("gauge", "Number of the current (or last) worker attempt, counted over the whole run."),
    "training_step": ("gauge", "Optimizer step of the newest heartbeat (global_step)."),
    "max_steps": ("gauge", "Optimizer steps the run trains in all."),
    "last_step_timestamp_seconds": (
        "gauge",
        "Unix time of the newest heartbeat whose step differed from the one before (this supervisor's start "
        "until the first): how long the run has made no progress.",
    ),
    "train_samples_per_second": ("gauge", "Training throughput the newest heartbeat reports."),
    "checkpoint_step": ("gauge", "Step of the newest committed checkpoint-N folder in the output directory."),
    "checkpoint_timestamp_seconds": ("gauge", "Unix time the newest checkpoint was committed (its folder's mtime)."),
    "restarts_total": (
        "counter",
        "Workers launched again after an attempt that ended other than completed or stopped, by how it ended "
        "(reason: crash, oom, host_oom, hang, device_error, external_signal, disk_low, supervisor_died, ...); "
        "counted over the whole run.",
    ),
    "steps_redone_total": ("counter", "Optimizer steps trained again because a fault lost them, over the whole run."),
    "failures_without_progress": (
        "gauge",
        "Consecutive failed attempts that trained no new step; the supervisor gives up at "
        "supervisor.max_failures_without_progress.",
    ),
    "last_recovery_seconds": (
        "gauge",
        "The newest restart's cost: from the failed attempt's end to the next attempt's first new optimizer step.",
    ),
    "heartbeat_age_seconds": ("gauge", "Seconds since the worker last wrote its heartbeat."),
    "per_device_train_batch_size": ("gauge", "Per-device batch in force (lowered after an out-of-memory)."),
    "gradient_accumulation_steps": ("gauge", "Gradient accumulation in force (raised after an out-of-memory)."),
    "effective_batch": ("gauge", "Samples per optimizer step and device: per-device batch times accumulation."),
    "standby_ready": ("gauge", "1 when a pre-warmed standby worker is ready to take over, else 0."),
    "snapshot_step": ("gauge", "Step of the newest shared-memory snapshot every rank holds; absent without stores."),
    "snapshot_timestamp_seconds": ("gauge", "Unix time that snapshot was taken."),
    "goodput_seconds_total": (
        "counter",
        "Wall time of the run by where it went (label bucket: training, redo, startup, checkpoint, evaluation, "
        "disk_wait, backoff, detection, stopping), over every attempt and supervisor start.",
    ),
    "goodput_ratio": ("gauge", "training / all goodput buckets: the share of wall time spent on new steps."),
    "disk_free_bytes": ("gauge", "Free bytes on the output directory's file system."),
}
"""Metric name (without the prefix) -> (type, help). The README's table follows this list."""

NOT_RESTARTS = frozenset({"completed", "stopped", "standby_stale"})
"""Attempt endings after which a new launch is not a restart: a finished run, a user's stop, and a
standby replaced before it trained anything."""

RESTART_REASONS: tuple[str, ...] = (
    "crash",
    "oom",
    "host_oom",
    "hang",
    "device_error",
    "external_signal",
    "disk_low",
    "supervisor_died",
)
"""Reasons exported at 0 before they first happen, so ``increase()`` sees the first restart."""


OBSERVE_INTERVAL_S = 0.2
"""Least time between two copies of the loop's facts (besides state changes): the loop turns at every
heartbeat write, a scrape comes every 15 s or so, and a run with a thousand attempts takes ~2 ms to copy."""


class MetricsError(Exception):
    """The metrics endpoint cannot start; one line naming the setting, the cause and the fix."""


@dataclass(frozen=True)
class Facts:
    """What the loop knew at one moment: the only input a scrape renders (besides the file system)."""

    state: str | None = None
    attempt: int | None = None
    step: int | None = None
    max_steps: int | None = None
    samples_per_s: float | None = None
    heartbeat_time: float | None = None
    worker_state: str | None = None
    """The heartbeat's state while a worker runs; None otherwise."""
    last_step_time: float | None = None
    batch: int | None = None
    accum: int | None = None
    standby_ready: bool = False
    restarts: tuple[tuple[str, int], ...] = ()
    steps_redone: int = 0
    failures_without_progress: int = 0
    last_recovery_s: float | None = None
    goodput: tuple[tuple[str, float], ...] = field(default_factory=lambda: tuple((b, 0.0) for b in BUCKETS))


def restarted(attempts: list[AttemptRecord], state: str | None) -> list[bool]:
    """Per attempt: whether a new worker was (or is being) launched after it ended other than
    completed or stopped. The last attempt counts once the supervisor is on its way to the next
    launch (backoff, starting, waiting for disk); a run that gave up has not restarted."""
    pending = state in (State.BACKOFF.value, State.STARTING.value, State.WAITING.value)
    out = []
    for i, a in enumerate(attempts):
        ended = a.end is not None and a.reason not in NOT_RESTARTS
        out.append(ended and (i + 1 < len(attempts) or pending))
    return out


def facts_of(
    rec: RunRecord,
    state: str | None,
    heartbeat: protocol.Heartbeat | None,
    batch: int | None,
    accum: int | None,
    *,
    last_step_time: float | None = None,
    config_max_steps: int | None = None,
) -> Facts:
    """The :class:`Facts` of a run record, the last heartbeat seen and the batch in force (pure)."""
    atts = rec.attempts
    again = restarted(atts, state)
    restarts = dict.fromkeys(RESTART_REASONS, 0)
    redone = 0
    recovery: float | None = None
    for i, a in enumerate(atts):
        if not again[i]:
            continue
        reason = a.reason or "unknown"
        restarts[reason] = restarts.get(reason, 0) + 1
        nxt = atts[i + 1] if i + 1 < len(atts) else None
        if nxt is None:
            continue
        if a.step_reached is not None:
            redone += max(0, a.step_reached - nxt.step_start)
        if nxt.first_step_at is not None and a.end is not None:
            recovery = max(0.0, nxt.first_step_at - a.end)
    hb = heartbeat
    goodput = tuple((b, _finite(rec.goodput.get(b))) for b in BUCKETS)
    return Facts(
        state=state,
        attempt=rec.attempt,
        step=hb.global_step if hb else None,
        max_steps=(hb.max_steps if hb and hb.max_steps else None) or config_max_steps,
        samples_per_s=hb.samples_per_s if hb else None,
        heartbeat_time=hb.time if hb else None,
        worker_state=hb.state if hb and state in {s.value for s in WORKER_STATES} else None,
        last_step_time=last_step_time,
        batch=batch,
        accum=accum,
        standby_ready=bool(rec.standby and rec.standby.ready),
        restarts=tuple(sorted(restarts.items())),
        steps_redone=redone,
        failures_without_progress=rec.failures_without_progress,
        last_recovery_s=recovery,
        goodput=goodput,
    )


def _finite(v: float | None) -> float:
    return float(v) if v is not None and math.isfinite(v) and v > 0 else 0.0


def run_label(cfg: Config) -> str:
    """The ``run`` label: the tracker's display name, by default the output directory's name."""
    return cfg.tracking.run_name or Path(cfg.training.output_dir).name


def _version() -> str:
    try:
        return metadata.version("vit-supervisor")
    except metadata.PackageNotFoundError:
        return "unknown"


class Exporter:
    """The metrics of one run: the latest :class:`Facts`, the HTTP endpoint and the textfile."""

    def __init__(self, cfg: Config, log: Any, *, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.mcfg = cfg.supervisor.metrics
        self.log = log
        self.clock = clock
        self.out = Path(cfg.training.output_dir)
        self.run = run_label(cfg)
        self.started = clock()
        self.version = _version()
        self._lock = threading.Lock()
        self._facts = Facts(last_step_time=self.started)
        self._prev_step: int | None = None
        self._step_time = self.started
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_RunCollector(self))
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.address: str | None = None
        """``host:port`` the endpoint listens on (the real port when the config said 0)."""
        self._observe_due = 0.0  # monotonic
        self._textfile_due = 0.0  # monotonic
        self._textfile_problem: str | None = None

    # ------------------------------------------------------------------ the loop's side

    def listen(self) -> None:
        """Start the HTTP endpoint if configured; :class:`MetricsError` when the address cannot be bound."""
        where = self.mcfg.address
        if where is None:
            return
        host, port = where
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise MetricsError(
                f"supervisor.metrics.listen {self.mcfg.listen}: cannot listen on {host} port {port}: {why}; "
                "choose a free port (another program or run may use this one) or an address of this machine"
            ) from None
        bound = self._server.server_address
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.address = f"{shown}:{bound[1]}"
        self.log.info("metrics", listen=self.address, path="/metrics", run=self.run)

    def observe(
        self,
        rec: RunRecord,
        state: State | None,
        heartbeat: protocol.Heartbeat | None,
        batch: int,
        accum: int,
        *,
        force: bool = False,
    ) -> None:
        """Take a consistent copy of what the loop knows now (called from the loop only): at once when
        ``force`` (a state change), else at most every :data:`OBSERVE_INTERVAL_S`."""
        now = time.monotonic()
        if not force and now < self._observe_due:
            return
        self._observe_due = now + OBSERVE_INTERVAL_S
        step = heartbeat.global_step if heartbeat is not None else None
        if step is not None and step != self._prev_step:
            self._prev_step = step
            self._step_time = heartbeat.time if heartbeat is not None and heartbeat.time else self.clock()
        max_steps = self.cfg.training.max_steps
        facts = facts_of(
            rec,
            str(state) if state is not None else None,
            heartbeat,
            batch,
            accum,
            last_step_time=self._step_time,
            config_max_steps=max_steps if max_steps > 0 else None,
        )
        with self._lock:
            self._facts = facts

    def facts(self) -> Facts:
        with self._lock:
            return self._facts

    def refresh(self, *, force: bool = False) -> None:
        """Rewrite the textfile when it is due (every ``textfile_interval_s``) or ``force`` (a state change)."""
        if self.mcfg.textfile is None:
            return
        now = time.monotonic()
        if not force and now < self._textfile_due:
            return
        self._textfile_due = now + self.mcfg.textfile_interval_s
        self.write_textfile()

    def write_textfile(self) -> None:
        """Write the textfile atomically (a temporary name node_exporter ignores, then a rename); a failure
        is logged once, with the error, and the next refresh tries again."""
        path = self.mcfg.textfile
        if path is None:
            return
        # node_exporter runs as another user: the file must be readable whatever the service's UMask=
        # (0027 in our unit). Only this thread creates files in this process, so the umask can be swapped.
        old_umask = os.umask(0o022)
        try:
            write_to_textfile(path, self.registry)
        except Exception as exc:  # never fatal: a full disk or a removed folder must not stop supervision
            problem = f"{type(exc).__name__}: {exc}"
            if problem != self._textfile_problem:
                self.log.warning("metrics", textfile=path, error=problem, action="keeps supervising; retries")
            self._textfile_problem = problem
            return
        finally:
            os.umask(old_umask)
        if self._textfile_problem is not None:
            self.log.info("metrics", textfile=path, action="written again")
        self._textfile_problem = None

    def close(self) -> None:
        """Stop the endpoint; write the textfile a last time (it keeps the final state for node_exporter)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = self._thread = None
        self.write_textfile()


class _RunCollector(Collector):
    """Builds every sample from the exporter's newest :class:`Facts` (and the run directory)."""

    def __init__(self, exporter: Exporter) -> None:
        self.x = exporter

    def collect(self) -> Iterator[Metric]:
        x = self.x
        f = x.facts()
        now = x.clock()
        run = x.run

        def gauge(name: str, value: float | None) -> Iterator[Metric]:
            if value is not None:
                g = GaugeMetricFamily(f"{PREFIX}_{name}", HELP[name][1], labels=["run"])
                g.add_metric([run], float(value))
                yield g

        info = InfoMetricFamily(f"{PREFIX}_build", HELP["build_info"][1], labels=["run"])
        info.add_metric(
            [run], {"version": x.version, "python_version": platform.python_version(), "output_dir": str(x.out)}
        )
        yield info
        yield from gauge("start_time_seconds", x.started)
        yield _one_hot("state", run, [s.value for s in State], f.state)
        if f.worker_state is not None:
            known = [
                protocol.HB_STARTING,
                protocol.HB_TRAINING,
                protocol.HB_SAVING,
                protocol.HB_EVALUATING,
                protocol.HB_WAITING_FOR_DISK,
                protocol.HB_STOPPING,
                protocol.HB_EXITED,
            ]
            yield _one_hot(
                "worker_state", run, known + [f.worker_state] * (f.worker_state not in known), f.worker_state
            )
        yield from gauge("attempt", f.attempt)
        yield from gauge("training_step", f.step)
        yield from gauge("max_steps", f.max_steps)
        yield from gauge("last_step_timestamp_seconds", f.last_step_time)
        yield from gauge("train_samples_per_second", f.samples_per_s)
        yield from self._checkpoint(gauge)
        restarts = CounterMetricFamily(f"{PREFIX}_restarts", HELP["restarts_total"][1], labels=["run", "reason"])
        for reason, n in f.restarts:
            restarts.add_metric([run, reason], n)
        yield restarts
        redone = CounterMetricFamily(f"{PREFIX}_steps_redone", HELP["steps_redone_total"][1], labels=["run"])
        redone.add_metric([run], f.steps_redone)
        yield redone
        yield from gauge("failures_without_progress", f.failures_without_progress)
        yield from gauge("last_recovery_seconds", f.last_recovery_s)
        yield from gauge("heartbeat_age_seconds", max(0.0, now - f.heartbeat_time) if f.heartbeat_time else None)
        yield from gauge("per_device_train_batch_size", f.batch)
        yield from gauge("gradient_accumulation_steps", f.accum)
        yield from gauge("effective_batch", f.batch * f.accum if f.batch and f.accum else None)
        yield from gauge("standby_ready", 1 if f.standby_ready else 0)
        yield from self._snapshot(gauge)
        buckets = CounterMetricFamily(
            f"{PREFIX}_goodput_seconds", HELP["goodput_seconds_total"][1], labels=["run", "bucket"]
        )
        for bucket, seconds in f.goodput:
            buckets.add_metric([run, bucket], seconds)
        yield buckets
        total = sum(s for _, s in f.goodput)
        if total > 0:  # no ratio (rather than NaN) before any time was accounted
            yield from gauge("goodput_ratio", dict(f.goodput).get("training", 0.0) / total)
        try:
            free: int | None = shutil.disk_usage(x.out).free
        except OSError:
            free = None
        yield from gauge("disk_free_bytes", free)

    def _checkpoint(self, gauge: Callable[[str, float | None], Iterator[Metric]]) -> Iterator[Metric]:
        step = protocol.newest_checkpoint_step(self.x.out)
        if step < 0:
            return
        yield from gauge("checkpoint_step", step)
        try:
            committed: float | None = os.stat(self.x.out / f"{protocol.CHECKPOINT_PREFIX}{step}").st_mtime
        except OSError:
            committed = None
        yield from gauge("checkpoint_timestamp_seconds", committed)

    def _snapshot(self, gauge: Callable[[str, float | None], Iterator[Metric]]) -> Iterator[Metric]:
        infos = [shm.read_store(r) for r in shm.run_stores(self.x.out, self.x.cfg.snapshot.root)]
        if not infos or any(i.problem for i in infos):
            return
        held = min(infos, key=lambda i: (i.step or 0, i.time or 0.0))  # a multi-rank resume takes the oldest
        yield from gauge("snapshot_step", held.step)
        yield from gauge("snapshot_timestamp_seconds", held.time)


def _one_hot(name: str, run: str, states: list[str], current: str | None) -> GaugeMetricFamily:
    g = GaugeMetricFamily(f"{PREFIX}_{name}", HELP[name][1], labels=["run", "state"])
    for s in states:
        g.add_metric([run, s], 1.0 if s == current else 0.0)
    return g
