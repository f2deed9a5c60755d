"""Standby worker: imported, configured and prepared ahead of time, waiting for a go.

A restart's cost is almost all start-up: importing torch and transformers,
reading the data, building the model. The supervisor keeps one process that
has done all of that and waits on its stdin. When the active worker dies, the
supervisor writes one line, the go: a :class:`protocol.LaunchOrder`
(:meth:`~protocol.LaunchOrder.to_line`), the same order a cold start receives
as flags and environment. The standby then continues exactly as a cold
``vit-train --resume`` would from that point (same checkpoint choice, guard,
locks, fault contract).

From the moment a go is on its stdin the standby *is* that attempt's worker: a
stop then ends it with exit 3 (interrupted) and an exit report at the order's
path, even if the stop arrived before it read the go. EOF on stdin without a
go means "not needed": exit 0, no report. A stop without a go (the standby was
never a worker) exits 3 without a report, so that nothing reads it as a
completed run. While preparing, a stop (or its supervisor's death, through
PR_SET_PDEATHSIG) interrupts the preparation at once: there is nothing to save.

While it waits it never touches the GPU (no CUDA context, no device memory;
the model and data live in host memory) and runs at a lower CPU priority. It
announces itself in ``run/standby-PID.json`` (:class:`protocol.StandbyReady`):
the SHA-256 of the config file it read and the data fingerprint, so the
supervisor can tell a stale standby from a usable one. If the data changed
between start-up and the go (fingerprint differs), it exits with code 6
(reason ``standby_stale``) without touching anything, and the supervisor starts
a cold worker instead.

Everything that does not depend on the checkpoint happens before the go: besides
the imports, data and model, the tracker's imports and service process
(:func:`tracking.warm`), and a watch on the data's folders from before the scan
(worker/datawatch.py), so that the go rescans the data only if something there
changed. After the go it only applies the order, takes the locks, chooses and
loads the checkpoint and calls ``wandb.init`` for the run's id.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from supervisor import protocol
from supervisor.schema import Config
from worker import launch, tracking
from worker.datawatch import DataWatch
from worker.datawatch import covers as watch_covers
from worker.fault import ParentWatch, StopRequest, set_process_name, write_exit_report

if TYPE_CHECKING:  # the real import is deferred: it pulls in torch, which a stop may interrupt
    from worker.train import Prepared

log = logging.getLogger("vit_train")

EXIT_STANDBY_STALE = protocol.EXIT_STANDBY_STALE
STANDBY_NICE = 10
ENV_PRIORITY = "VIT_STANDBY_PRIORITY"
"""``idle`` (default): SCHED_IDLE and nice 10 until the go; ``nice``: nice 10 only (for benchmarks)."""


class _Stopped(BaseException):
    """A stop arrived while the standby was preparing (a BaseException, like KeyboardInterrupt,
    so that library code catching Exception during imports does not swallow it)."""


def serve(cfg: Config, stop: StopRequest) -> int:
    """Prepare, announce, wait for the go on stdin, then train (or exit if not needed)."""
    t0 = time.monotonic()
    lower_priority()
    parent = ParentWatch()
    parent.arm()  # the supervisor's death becomes a stop, even while importing
    if parent.parent_gone():  # it died before the kernel was told to signal it
        stop.request("the supervisor process is gone")
    watch = DataWatch.start(cfg)  # before the scan: a change during it counts too
    try:
        with _stops_interrupt(stop):
            prepared = _prepare(cfg)
            if not isinstance(prepared, tuple):
                tracking.warm(cfg)
                _rehearse(cfg, prepared)
    except _Stopped:
        watch.stop()
        return _stopped_before_training(cfg, stop, _read_pending())
    if stop.requested:  # an interruption that some library caught and swallowed
        watch.stop()
        return _stopped_before_training(cfg, stop, _read_pending())
    if isinstance(prepared, tuple):
        watch.stop()
        return _cannot_prepare(cfg, *prepared)
    if not watch_covers(cfg, _files(prepared)):
        watch.mark("some of the data's files lie outside the watched folders")
    announce = protocol.standby_announcement(cfg.output_dir, os.getpid())
    ready = protocol.StandbyReady(
        pid=os.getpid(),
        config_sha256=protocol.config_sha(cfg.source_path),
        fingerprint=prepared.splits.fingerprint,
        prepared_s=round(time.monotonic() - t0, 3),
        time=time.time(),
        rss_bytes=_rss(),
    )
    protocol.atomic_write_json(announce, protocol.record_dict(ready))
    log.info("Standby ready in %.2fs (pid %d); waiting for a go", ready.prepared_s or 0.0, os.getpid())
    try:
        line = _wait_for_go(stop)
    finally:
        try:
            announce.unlink()
        except FileNotFoundError:
            pass
    if stop.requested or line is None:
        watch.stop()
        return _stopped_before_training(cfg, stop, line)
    return _take_over(cfg, stop, line, prepared, watch)


def _prepare(cfg: Config) -> Prepared | tuple[str, str]:
    """The prepared run, or (reason, message) of a user error that makes this standby useless."""
    from worker import startup

    with startup.imports_without_gc():  # as a cold worker imports them (worker/startup.py)
        from worker import data as data_mod
        from worker import model as model_mod
        from worker.train import prepare

    try:
        return prepare(cfg)
    except data_mod.DataError as exc:
        return protocol.REASON_DATA_ERROR, str(exc)
    except model_mod.ModelUnavailable as exc:
        return protocol.REASON_CONFIG_ERROR, str(exc)


def _rehearse(cfg: Config, prepared: Prepared) -> None:
    """What the first moments after the go would otherwise pay, paid now.

    - The first ``from_pretrained`` of a process compiles a regular expression per weight
      name (transformers' key renamings), about 0.1 s for the demo's model; later loads
      find them in ``re``'s cache. Rehearsed by loading the newest checkpoint into a
      throwaway model (ours stays as built: a go may still mean "start from scratch"),
      after validating it as the go will (the first ``torch.load`` of a process is slower too).
    - The Trainer's accelerator runs a full ``gc.collect()`` when training starts: 0.5-0.6 s
      over the heap of torch, transformers and wandb objects. Collected once here and then
      frozen (``gc.freeze``), those live objects are never traversed again, so that collection
      and every later automatic full one take milliseconds. What is frozen is what every
      attempt keeps alive anyway: modules, the model, the data.
    """
    import gc

    from worker import checkpoint as ckpt

    found = ckpt.list_checkpoints(cfg.output_dir)
    model: Any = prepared.model  # a transformers PreTrainedModel
    if found:
        try:
            ckpt.validate(found[0])  # reads every payload (torch.load, safetensors): read-only
            type(model).from_pretrained(str(found[0]))
        except Exception as exc:  # a rehearsal (the checkpoint may be rotated away meanwhile)
            log.info("Standby could not rehearse a checkpoint load: %s", exc)
    gc.collect()
    gc.freeze()


def _cannot_prepare(cfg: Config, reason: str, message: str) -> int:
    """A user error while preparing; reported at the go's path if a go already came (a cold
    worker would fail the same way, so the supervisor must hear it as that attempt's outcome)."""
    log.error("Standby cannot prepare: %s", message)
    line = _read_pending()
    if line is not None and _become_worker(cfg, line) is not None:
        return write_exit_report(cfg.output_dir, reason, message)
    return protocol.EXIT_USER_ERROR


def _take_over(cfg: Config, stop: StopRequest, line: str, prepared: Prepared, watch: DataWatch) -> int:
    """Become the worker of the attempt the go names."""
    from worker.train import run

    t_go = time.monotonic()
    log.info("Standby got a go")
    order = _become_worker(cfg, line)
    if order is None:
        watch.stop()
        return _malformed_go(cfg, line)
    restore_priority()  # first: the watch's thread too, so that it is not behind
    changed = watch.changed
    watch.stop()
    if stop.requested:
        return _interrupted_before_training(cfg, stop)
    if changed is not None:
        stale = _stale(cfg, prepared, changed)
        if stale is not None:
            return stale
    log.info("Standby taking over as attempt %s (go handled in %.3fs)", order.attempt, time.monotonic() - t_go)
    return run(cfg, resume=order.resume, checkpoint=None, stop=stop, prepared=prepared)


def _stale(cfg: Config, prepared: Prepared, changed: str) -> int | None:
    """Rescan the data the watch cannot vouch for: the exit code of a stale standby, or None
    if the fingerprint is unchanged."""
    from worker import data as data_mod

    t0 = time.monotonic()
    try:
        fresh = data_mod.build(cfg).fingerprint
    except data_mod.DataError as exc:
        return write_exit_report(cfg.output_dir, protocol.REASON_DATA_ERROR, str(exc))
    log.info("Standby rescanned the data in %.2fs (%s)", time.monotonic() - t0, changed)
    if fresh != prepared.splits.fingerprint:
        msg = f"the data changed since the standby started (fingerprint {prepared.splits.fingerprint} -> {fresh})"
        log.warning("Standby unusable: %s", msg)
        return write_exit_report(cfg.output_dir, protocol.REASON_STANDBY_STALE, msg)
    return None


def _files(prepared: Prepared) -> list[Path]:
    """The image files of the prepared data (none for in-memory data such as the digits)."""
    found: list[Path] = []
    for ds in (prepared.splits.train, prepared.splits.eval):
        found += [p for ab in getattr(ds, "pairs", None) or () for p in ab]
        found += [Path(p) for p in getattr(ds, "items", None) or ()]
    return found


def _become_worker(cfg: Config, line: str) -> protocol.LaunchOrder | None:
    """Apply the go's order (batch, accumulation, environment); None if it is not an order."""
    order = protocol.LaunchOrder.from_line(line)
    if order is None:
        return None
    set_process_name("vit-train")
    launch.apply(cfg, order)
    if not order.snapshots:
        cfg.snapshot.every_steps = 0  # as a cold worker's --no-snapshots
        log.warning("Snapshots off for this run (the go says so): disk checkpoints only")
    return order


def _stopped_before_training(cfg: Config, stop: StopRequest, line: str | None) -> int:
    """A stop or EOF before training: the go, if one arrived, makes this an interrupted attempt."""
    if line is not None:
        if _become_worker(cfg, line) is None:
            return _malformed_go(cfg, line)
        return _interrupted_before_training(cfg, stop)
    if not stop.requested:
        log.info("Standby not needed; exiting")
        return protocol.EXIT_COMPLETED
    log.info("Standby %s before any go; exiting", stop.describe().replace("stop requested", "stopped"))
    return protocol.EXIT_INTERRUPTED


def _interrupted_before_training(cfg: Config, stop: StopRequest) -> int:
    msg = f"{stop.describe()} before the standby began training; no step was trained"
    log.warning("%s", msg)
    return write_exit_report(cfg.output_dir, protocol.REASON_INTERRUPTED, msg)


def _malformed_go(cfg: Config, line: str) -> int:
    """Report a go that is not a launch order where the order meant it to go, if it says."""
    try:
        raw = json.loads(line)
    except ValueError:
        raw = None
    if isinstance(raw, dict) and isinstance(raw.get("exit_report"), str):
        os.environ[protocol.ENV_EXIT_REPORT] = raw["exit_report"]
    msg = f"standby got a malformed go (not a launch order): {line[:200]!r}"
    log.error("%s", msg)
    return write_exit_report(cfg.output_dir, protocol.REASON_CRASH, msg)


@contextmanager
def _stops_interrupt(stop: StopRequest) -> Iterator[None]:
    """While preparing there is nothing to save: a stop (or the supervisor's death) is
    recorded as usual and then interrupts the preparation instead of waiting for its end."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        if signum == ParentWatch.DEATH_SIGNAL:
            stop.request("the supervisor process is gone")
        else:
            stop.signum, stop.received_at = signum, time.monotonic()
        raise _Stopped

    if stop.requested:
        raise _Stopped
    for sig in (signal.SIGTERM, signal.SIGINT, ParentWatch.DEATH_SIGNAL):
        signal.signal(sig, interrupt)
    try:
        yield
    finally:
        stop.install()


def _wait_for_go(stop: StopRequest) -> str | None:
    """The go line from stdin; None on EOF without one. A stop (or the supervisor's death)
    ends the wait, but a go already in the pipe still counts: the supervisor writes the go
    before it may send a stop, so a go that was sent is there by the time the stop is seen."""
    parent = ParentWatch()
    reader = _LineReader(sys.stdin.fileno())
    while not stop.requested and not reader.done:
        if parent.parent_gone():
            stop.request("the supervisor process is gone")
            break
        reader.read(timeout=0.5)
    reader.read(timeout=0)
    return reader.line()


def _read_pending() -> str | None:
    """The go already waiting on stdin, without blocking; None if there is none."""
    reader = _LineReader(sys.stdin.fileno())
    reader.read(timeout=0)
    return reader.line()


class _LineReader:
    """The first line of a file descriptor, never blocking past a timeout.

    ``select`` rather than a selector: epoll refuses regular files and /dev/null, which is
    what stdin is for a standby started by hand or by a service manager.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.eof = False

    @property
    def done(self) -> bool:
        return self.eof or b"\n" in self.buf

    def read(self, timeout: float) -> None:
        while not self.done and select.select([self.fd], [], [], timeout)[0]:
            chunk = os.read(self.fd, 4096)
            self.eof = not chunk
            self.buf += chunk
            timeout = 0

    def line(self) -> str | None:
        text = self.buf.split(b"\n", 1)[0].decode(errors="replace").strip()
        return text or None


def _rss() -> int | None:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return None


def lower_priority() -> None:
    """Prepare only on CPU time that training leaves idle (called before any thread starts).

    A standby starts right after a restart's first step and imports torch and transformers
    again: about 4.4 s of CPU. At nice 10 that still takes about a tenth of a busy CPU from
    training (CFS weight 110 against 1024); SCHED_IDLE (weight 3) takes almost nothing while
    training keeps the cores busy, and once it is ready the standby sleeps on its stdin
    either way. If the worker dies first, the standby gets the go and is promoted at once.
    """
    idle = os.environ.get(ENV_PRIORITY, "idle") == "idle" and hasattr(os, "SCHED_IDLE")
    # Every thread that already exists (an import may have started one), not only the calling one:
    # on Linux both settings belong to a thread; threads started later inherit them.
    for tid in _thread_ids("self"):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, STANDBY_NICE)
            if idle:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except OSError:  # gone meanwhile, or not allowed: prepare at the priority it has
            pass


def restore_priority() -> None:
    """Every thread back to normal CPU priority (SCHED_OTHER, nice 0) for training, and every
    thread of the processes the standby started while preparing (wandb's ``wandb-core``,
    which the attempt's tracker talks to).

    On Linux a nice value and a scheduling policy belong to a thread: setpriority on the
    process id changes only the calling thread, and torch's intra-op pool (started while
    waiting) would train at nice 10 (or SCHED_IDLE) for the whole attempt. Threads started
    later inherit their creator's value, so once every existing thread is at 0, so are
    they; the loop catches a thread started while it runs.
    """
    failed = _restore_threads("self")
    for child in _children():
        failed |= _restore_threads(str(child))
    if failed:
        log.warning(
            "Standby could not restore normal CPU priority (needs CAP_SYS_NICE); training at nice %d", STANDBY_NICE
        )


def _restore_threads(proc: str) -> bool:
    """Restore every thread of /proc/``proc``; whether any refused."""
    done: set[int] = set()
    failed = False
    while True:
        todo = _thread_ids(proc) - done
        if not todo:
            break
        for tid in todo:
            try:
                if hasattr(os, "SCHED_IDLE") and os.sched_getscheduler(tid) == os.SCHED_IDLE:
                    os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
                os.setpriority(os.PRIO_PROCESS, tid, 0)
            except ProcessLookupError:
                pass  # the thread ended meanwhile
            except OSError:
                failed = True
            done.add(tid)
    return failed


def _children() -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process().children(recursive=True)]
    except Exception:  # psutil missing or a child gone: nothing to restore there
        return []


def _thread_ids(proc: str = "self") -> set[int]:
    try:
        return {int(t) for t in os.listdir(f"/proc/{proc}/task")}
    except OSError:  # not Linux (the process's priority is the threads' priority), or the process is gone
        return {0} if proc == "self" else set()
