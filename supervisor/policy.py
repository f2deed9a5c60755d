"""Decisions: pure functions of (what happened, history, config). No processes, no clock, no files.

The daemon observes (exit code, exit report, heartbeat, counters) and hands the
facts to these functions; what they return is what it does. That keeps every
rule here testable in microseconds (tests/test_policy.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from supervisor import protocol
from supervisor.schema import SupervisorConfig

# ----------------------------------------------------------------------------- classifying an exit

Kind = Literal[
    "completed",
    "stopped",
    "oom",
    "host_oom",
    "disk_low",
    "user_error",
    "crash",
    "device_error",
    "hang",
    "external_signal",
    "standby_stale",
]


@dataclass(frozen=True)
class ExitInfo:
    """Everything observed about one worker exit."""

    returncode: int
    """Popen's return code: negative for death by signal."""
    report: protocol.ExitReport | None
    """The worker's exit report for this attempt, if it wrote one."""
    stop_sent: bool = False
    """The supervisor asked this worker to stop (a user stop)."""
    hang_killed: bool = False
    """The supervisor killed this worker because it hung."""
    host_oom: bool = False
    """The kernel or cgroup OOM-kill counter moved while this worker ran."""
    max_steps: int | None = None
    """The run's step count from this worker's heartbeat (the report's own wins)."""


@dataclass(frozen=True)
class Outcome:
    """A typed failure (or success): what kind of exit, in words a user can act on."""

    kind: Kind
    message: str
    exit: str
    """The return code in words: 'exit 1 (crash)', 'killed by SIGKILL'."""


_STOP_SIGNALS = ("SIGTERM", "SIGINT")

# A rank whose peer died fails inside a collective with one of these: a consequence, not a cause.
_PEER_GONE = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
    "ProcessGroupNCCL",
    "Socket Timeout",
    "connection refused",
)


def root_cause(reports: dict[int, protocol.ExitReport | None]) -> protocol.ExitReport | None:
    """One report for a torchrun attempt from its ranks' reports (rank -> report or None).

    An OOM anywhere is the cause (the batch is lowered for all ranks). Then a rank that
    left no report at all (killed by a signal): the others only saw their peer vanish.
    Then a non-retryable error, then a rank whose own device failed (not a collective), then
    the earliest crash that is not a lost peer. All
    ranks agreeing (completed, interrupted) is the attempt's outcome.
    """
    got = {r: rep for r, rep in reports.items() if rep is not None}
    if not got:
        return None

    def tagged(rank: int, rep: protocol.ExitReport) -> protocol.ExitReport:
        return dataclasses.replace(rep, rank=rank, message=f"rank {rank}: {rep.message}")

    by_time = sorted(got.items(), key=lambda kv: kv[1].time or 0)
    for r, rep in by_time:
        if rep.reason == protocol.REASON_OOM:
            return tagged(r, rep)
    missing = sorted(r for r, rep in reports.items() if rep is None)
    if missing:
        # A rank that wrote nothing was killed by a signal (SIGKILL, the kernel's OOM killer, a
        # segfault); the others only saw their peer vanish.
        steps = [rep.step for rep in got.values() if rep.step is not None]
        return protocol.ExitReport(
            reason=protocol.REASON_CRASH,
            exit_code=protocol.EXIT_CRASH,
            rank=missing[0],
            step=max(steps) if steps else None,
            message=f"rank {', '.join(map(str, missing))} died without an exit report (killed by a signal?)",
        )
    reasons = {rep.reason for rep in got.values()}
    if len(reasons) == 1 and reasons <= {protocol.REASON_COMPLETED, protocol.REASON_INTERRUPTED}:
        r, rep = by_time[0]
        return tagged(r, rep)
    for r, rep in by_time:
        if rep.reason in protocol.NON_RETRYABLE_REASONS:
            return tagged(r, rep)
    for r, rep in by_time:
        # A rank whose own GPU failed is the cause; its peers' NCCL errors and watchdog timeouts
        # (device errors too: their communicator is gone) are what its silence did to them.
        if rep.reason == protocol.REASON_DEVICE_ERROR and not _is_collective_failure(rep.message):
            return tagged(r, rep)
    causes = [
        (r, rep)
        for r, rep in by_time
        if rep.reason not in (protocol.REASON_INTERRUPTED, protocol.REASON_COMPLETED)
        and not any(s in rep.message for s in _PEER_GONE)
    ]
    r, rep = (causes or [x for x in by_time if x[1].reason != protocol.REASON_COMPLETED] or by_time)[0]
    return tagged(r, rep)


def _is_collective_failure(message: str) -> bool:
    low = message.lower()
    return "nccl" in low or "watchdog" in low or "collective" in low or any(s in message for s in _PEER_GONE)


def classify(info: ExitInfo) -> Outcome:
    """The exit report first (the worker knows best why it stopped), then the code or the signal."""
    rc = info.returncode
    described = protocol.describe_exit(rc)
    sig = protocol.signal_name(rc)
    report = info.report
    reason = report.reason if report is not None else None
    message = report.message if report is not None else ""

    def interrupted(how: str) -> Outcome:
        if info.stop_sent:
            return Outcome("stopped", f"stopped on request ({how})", described)
        if info.hang_killed:
            return Outcome("hang", f"hung worker was killed ({how})", described)
        return Outcome("external_signal", f"worker stopped by a signal the supervisor did not send ({how})", described)

    if reason == protocol.REASON_STANDBY_STALE or (reason is None and rc == protocol.EXIT_STANDBY_STALE):
        return Outcome("standby_stale", message or "the standby found its prepared state out of date", described)
    if reason == protocol.REASON_COMPLETED or (reason is None and rc == protocol.EXIT_COMPLETED):
        done = _completed_steps(report, info.max_steps)
        if done is not None:
            return Outcome("completed", message or f"training completed ({done})", described)
        # The step count, not the exit code, says a run is done: a standby told to stop before it
        # trained, or a worker that returned early, exits 0 without reaching max_steps.
        if info.stop_sent:
            return Outcome("stopped", f"stopped on request ({described} before the last step)", described)
        return Outcome("crash", f"worker exited ({described}) without a completed report at its last step", described)
    if reason == protocol.REASON_INTERRUPTED or (
        reason is None and (sig in _STOP_SIGNALS or rc == protocol.EXIT_INTERRUPTED)
    ):
        return interrupted(message or described)
    if info.hang_killed:
        # Killed by our SIGKILL escalation after the grace period: the report (if any) is stale news.
        return Outcome("hang", f"hung worker was killed ({described})", described)
    if info.stop_sent and sig == "SIGKILL":
        return Outcome("stopped", "worker killed on a forced stop", described)
    if reason in protocol.NON_RETRYABLE_REASONS or (reason is None and rc == protocol.EXIT_USER_ERROR):
        return Outcome("user_error", message or f"worker reported a user error ({described})", described)
    if reason == protocol.REASON_OOM or (reason is None and rc == protocol.EXIT_OOM):
        return Outcome("oom", message or "out of memory", described)
    if reason == protocol.REASON_DISK_LOW or (reason is None and rc == protocol.EXIT_DISK_LOW):
        return Outcome("disk_low", message or "too little free disk", described)
    if reason == protocol.REASON_DEVICE_ERROR or (reason is None and rc == protocol.EXIT_DEVICE_ERROR):
        # The worker saved nothing from the failed device; the restart resumes from the newest
        # snapshot or checkpoint. Restarted like a crash, so a GPU that fails every attempt ends
        # in ``failed`` after max_failures_without_progress instead of a restart loop.
        return Outcome("device_error", message or "the accelerator failed (device error)", described)
    if sig == "SIGKILL" and info.host_oom:
        return Outcome("host_oom", "killed by SIGKILL and the kernel OOM-kill counter moved: host OOM", described)
    if message:
        return Outcome("crash", message, described)
    return Outcome("crash", f"worker {described} without an exit report", described)


def _completed_steps(report: protocol.ExitReport | None, hb_max_steps: int | None) -> str | None:
    """'step N of M' when a completed report's step reached the run's step count, else None."""
    if report is None or report.reason != protocol.REASON_COMPLETED:
        return None
    step = report.step
    total = report.max_steps if report.max_steps is not None else hb_max_steps
    if step is not None and total is not None and step >= total:
        return f"step {step} of {total}"
    return None


# ----------------------------------------------------------------------------- OOM: lower the batch


@dataclass(frozen=True)
class BatchChoice:
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    note: str = ""


def lower_batch(
    current: int, effective: int, *, factor: float, minimum: int, allow_effective_batch_change: bool = False
) -> BatchChoice | str:
    """The next per-device batch after an OOM, or a one-line reason why there is none.

    The new batch is the largest divisor ``d`` of the effective batch with
    ``minimum <= d <= floor(current * factor)``; accumulation becomes
    ``effective / d`` so per-device batch × accumulation is exactly what the
    config asked for (the loss curve stays comparable across the restart).
    """
    target = math.floor(current * factor)
    if target >= current:  # factor close to 1 with a small batch: still make progress downwards
        target = current - 1
    for d in range(target, minimum - 1, -1):
        if d >= 1 and effective % d == 0:
            return BatchChoice(d, effective // d)
    if target < minimum or target < 1:
        return (
            f"out of memory at per_device_train_batch_size {current}, and supervisor.min_per_device_batch "
            f"is {minimum}: cannot lower it further (use a smaller model, images or a bigger device)"
        )
    if allow_effective_batch_change:
        accum = max(1, round(effective / target))
        return BatchChoice(
            target,
            accum,
            note=f"effective batch changed from {effective} to {target * accum} "
            "(supervisor.allow_effective_batch_change)",
        )
    return (
        f"out of memory at per_device_train_batch_size {current}: no batch between {minimum} and {target} "
        f"divides the effective batch {effective}; set supervisor.allow_effective_batch_change: true "
        "or choose an effective batch with more divisors"
    )


# ----------------------------------------------------------------------------- restarts


def backoff_delay(failures: int, cfg: SupervisorConfig) -> float:
    """initial × factor^(failures-1), capped; the first failure waits ``backoff_initial_s``."""
    n = max(failures, 1)
    try:
        delay = cfg.backoff_initial_s * cfg.backoff_factor ** (n - 1)
    except OverflowError:
        delay = math.inf
    return min(delay, cfg.backoff_max_s)


Action = Literal["complete", "stop", "restart", "replace_standby", "wait_disk", "fail"]


@dataclass(frozen=True)
class Decision:
    action: Action
    message: str
    delay_s: float = 0.0
    per_device_train_batch_size: int = 0
    gradient_accumulation_steps: int = 0
    failures_without_progress: int = 0
    disk_needed_bytes: int | None = None
    """With ``wait_disk``: free bytes one checkpoint needs (the worker measured it), if known."""


def decide(
    outcome: Outcome,
    *,
    progressed: bool,
    failures_without_progress: int,
    batch: int,
    accum: int,
    cfg: SupervisorConfig,
    stop_requested: bool = False,
    disk_needed_bytes: int | None = None,
) -> Decision:
    """What to do after a worker exit.

    ``progressed``: the attempt trained a step no earlier attempt had reached.
    ``failures_without_progress``: consecutive failed attempts before this one
    that made no progress. ``disk_needed_bytes``: what a ``disk_low`` worker
    said one checkpoint needs (the wait lasts until that much is free).
    """
    keep = dict(
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        failures_without_progress=failures_without_progress,
    )
    if outcome.kind == "completed":
        return Decision("complete", outcome.message, **keep)
    if stop_requested or outcome.kind == "stopped":
        return Decision("stop", outcome.message, **keep)
    if outcome.kind == "user_error":
        return Decision("fail", f"not retried: {outcome.message}", **keep)
    if outcome.kind == "standby_stale":
        # Not a failure (nothing was trained or touched) and not a restart: launch again, cold.
        return Decision("replace_standby", outcome.message, **keep)
    if outcome.kind == "disk_low":
        return Decision("wait_disk", outcome.message, disk_needed_bytes=disk_needed_bytes, **keep)
    if outcome.kind == "external_signal" and not cfg.restart_on_external_signal:
        return Decision(
            "stop", f"{outcome.message}; not restarted (supervisor.restart_on_external_signal is false)", **keep
        )
    if outcome.kind == "oom":
        # Not counted as a crash: the lowering itself is bounded by min_per_device_batch.
        choice = lower_batch(
            batch,
            batch * accum,
            factor=cfg.oom_batch_factor,
            minimum=cfg.min_per_device_batch,
            allow_effective_batch_change=cfg.allow_effective_batch_change,
        )
        if isinstance(choice, str):
            return Decision("fail", choice, **keep)
        note = f"; {choice.note}" if choice.note else ""
        return Decision(
            "restart",
            f"out of memory: per-device batch {batch} -> "
            f"{choice.per_device_train_batch_size}, accumulation {accum} -> "
            f"{choice.gradient_accumulation_steps}{note}",
            0.0,
            choice.per_device_train_batch_size,
            choice.gradient_accumulation_steps,
            failures_without_progress,
        )
    # crash, device_error, hang, host_oom, external_signal: retry with backoff until too many in a row
    # made no progress.
    failures = 0 if progressed else failures_without_progress + 1
    if failures >= cfg.max_failures_without_progress:
        return Decision(
            "fail",
            f"gave up after {failures} consecutive attempts without training progress; last: {outcome.message}",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accum,
            failures_without_progress=failures,
        )
    # An attempt that trained new steps restarts at once: back-off is for crash loops, and a job
    # that dies after hours of progress should lose no time on top of the crash itself.
    delay = backoff_delay(failures, cfg) if failures else 0.0
    return Decision("restart", outcome.message, delay, batch, accum, failures)


# ----------------------------------------------------------------------------- hangs and disk


def hang_check(
    *, hb_state: str | None, seen_step: bool, since_change_s: float, since_launch_s: float, cfg: SupervisorConfig
) -> str | None:
    """A one-line reason if the worker counts as hung, else None.

    ``hb_state`` is this worker's latest heartbeat state (None: none yet);
    ``seen_step`` whether it has reported a training step; ``since_change_s``
    seconds since its step or state last changed; ``since_launch_s`` since launch.
    """
    if hb_state == protocol.HB_WAITING_FOR_DISK:
        return None  # the worker is waiting on purpose; the disk check has its own loop
    if hb_state in (protocol.HB_EVALUATING, protocol.HB_SAVING, protocol.HB_STOPPING):
        if since_change_s > cfg.eval_timeout_s:
            return f"no progress for {since_change_s:.0f}s while {hb_state} (eval_timeout_s {cfg.eval_timeout_s:g})"
        return None
    if not seen_step:
        if since_launch_s > cfg.startup_timeout_s:
            return f"no first step {since_launch_s:.0f}s after launch (startup_timeout_s {cfg.startup_timeout_s:g})"
        return None
    if since_change_s > cfg.hang_timeout_s:
        return f"no new step for {since_change_s:.0f}s (hang_timeout_s {cfg.hang_timeout_s:g})"
    return None


def disk_shortfall(free_bytes: int, reserve_mb: float, *, needed_bytes: int | None = None) -> str | None:
    """Why a launch must wait for disk space, or None if there is enough.

    ``needed_bytes``: after a ``disk_low`` exit, what one checkpoint needs. Relaunching with
    less would only fail the next save again (an endless loop when it is above the reserve).
    """
    need = int(reserve_mb * 2**20)
    if free_bytes < need:
        return f"{free_bytes / 2**20:.0f} MiB free on the output directory, disk.reserve_mb is {reserve_mb:g}"
    if needed_bytes is not None and free_bytes < needed_bytes:
        return (
            f"{free_bytes / 2**20:.0f} MiB free on the output directory, "
            f"one checkpoint needs {needed_bytes / 2**20:.0f} MiB"
        )
    return None
