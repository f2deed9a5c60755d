"""Standby worker: imported, configured and prepared ahead of time, waiting for a go.

A restart's cost is almost all start-up: importing torch and transformers,
reading the data, building the model. The supervisor keeps one process that
has done all of that and waits on its stdin. When the active worker dies, the
supervisor writes one JSON line, the go::

    {"attempt": 4, "resume": true, "per_device_train_batch_size": 16,
     "gradient_accumulation_steps": 2, "exit_report": "/…/run/exit-4.json"}

and the standby continues exactly as a cold ``vit-train --resume`` would from
that point (same checkpoint choice, guard, fault contract). EOF on stdin
without a go means "not needed": it exits 0.

While it waits it never touches the GPU (no CUDA context, no device memory;
the model and data live in host memory) and runs at a lower CPU priority.
It announces itself in ``run/standby.json``: pid, the SHA-256 of the config
file it read and the data fingerprint, so the supervisor can tell a stale
standby from a usable one. If the data changed between start-up and the go
(fingerprint differs), it exits with code 6 (reason ``standby_stale``) without
touching anything, and the supervisor starts a cold worker instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from supervisor import protocol
from supervisor.schema import Config
from worker.fault import StopRequest, set_process_name, write_exit_report

log = logging.getLogger("vit_train")

EXIT_STANDBY_STALE = protocol.EXIT_STANDBY_STALE
STANDBY_NICE = 10


def config_sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def standby_path(output_dir: Path, pid: int | None = None) -> Path:
    return protocol.standby_announcement(output_dir, pid or os.getpid())


def serve(cfg: Config, stop: StopRequest) -> int:
    """Prepare, announce, wait for the go on stdin, then train (or exit if not needed)."""
    t0 = time.monotonic()
    try:
        os.nice(STANDBY_NICE)
    except OSError:
        pass
    from worker import data as data_mod
    from worker.train import prepare, run

    try:
        prepared = prepare(cfg)
    except data_mod.DataError as exc:
        log.error("Standby cannot prepare: %s", exc)
        return protocol.EXIT_USER_ERROR
    announce = standby_path(cfg.output_dir)
    info: dict[str, Any] = {
        "pid": os.getpid(),
        "ready": True,
        "config_sha256": config_sha(cfg.source_path),
        "fingerprint": prepared.splits.fingerprint,
        "prepared_s": round(time.monotonic() - t0, 3),
        "time": time.time(),
    }
    try:
        import psutil

        info["rss_bytes"] = psutil.Process().memory_info().rss
    except Exception:
        pass
    protocol.atomic_write_json(announce, info)
    log.info("Standby ready in %.2fs (pid %d); waiting for a go", info["prepared_s"], os.getpid())
    try:
        line = _wait_for_go(stop)
    finally:
        try:
            announce.unlink()
        except FileNotFoundError:
            pass
    if line is None:
        log.info("Standby not needed; exiting")
        return 0
    try:
        go = json.loads(line)
    except ValueError:
        log.error("Standby got a malformed go: %r", line[:200])
        return protocol.EXIT_CRASH
    set_process_name("vit-train")
    _apply_go(cfg, go)
    restore_priority()
    fresh = data_mod.build(cfg).fingerprint
    if fresh != prepared.splits.fingerprint:
        msg = f"the data changed since the standby started (fingerprint {prepared.splits.fingerprint} -> {fresh})"
        log.warning("Standby unusable: %s", msg)
        return write_exit_report(cfg.output_dir, protocol.REASON_STANDBY_STALE, msg)
    log.info("Standby taking over as attempt %s", go.get("attempt"))
    return run(cfg, resume=bool(go.get("resume", True)), checkpoint=None, stop=stop, prepared=prepared)


def restore_priority() -> None:
    """Every thread back to normal CPU priority for training.

    On Linux a nice value belongs to a thread: setpriority on the process id changes only
    the calling thread, and torch's intra-op pool (started while waiting) would train at
    nice 10 for the whole attempt. Threads started later inherit their creator's value, so
    once every existing thread is at 0, so are they; the loop catches a thread started
    while it runs.
    """
    done: set[int] = set()
    failed = False
    while True:
        todo = _thread_ids() - done
        if not todo:
            break
        for tid in todo:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, 0)
            except ProcessLookupError:
                pass  # the thread ended meanwhile
            except OSError:
                failed = True
            done.add(tid)
    if failed:
        log.warning(
            "Standby could not restore normal CPU priority (needs CAP_SYS_NICE); training at nice %d", STANDBY_NICE
        )


def _thread_ids() -> set[int]:
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:  # not Linux: the process's priority is the threads' priority
        return {0}


def _wait_for_go(stop: StopRequest) -> str | None:
    """One line from stdin; None on EOF or a stop signal while waiting."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(sys.stdin, selectors.EVENT_READ)
    buf = b""
    fd = sys.stdin.fileno()
    while not stop.requested:
        if not sel.select(timeout=0.5):
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        buf += chunk
        if b"\n" in buf:
            return buf.split(b"\n", 1)[0].decode()
    return None


def _apply_go(cfg: Config, go: dict[str, Any]) -> None:
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if go.get(key):
            setattr(cfg.training, key, int(go[key]))
    env = {
        protocol.ENV_ATTEMPT: go.get("attempt"),
        protocol.ENV_EXIT_REPORT: go.get("exit_report"),
        protocol.ENV_SUPERVISOR_PID: go.get("supervisor_pid"),
    }
    for k, v in env.items():
        if v is not None:
            os.environ[k] = str(v)
