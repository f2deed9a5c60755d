"""``vit-supervisor status``: read the state file (and heartbeat) of a run and say where it is.

Reads files only, so it works when the supervisor is dead (and says so), and
imports nothing heavy, so it answers in well under a second.

A small registry of runs lets ``status`` with no argument list every run on this
machine: one file per run directory in ``$STATE_DIRECTORY`` (set by systemd's
``StateDirectory=``) or ``$XDG_STATE_HOME/vit-supervisor/runs`` (default
``~/.local/state``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from supervisor import goodput, protocol, record, shm
from supervisor.host import process_alive
from supervisor.schema import load_config
from supervisor.states import ACTIVE_STATES, State

# LSB / supervisorctl status codes, so scripts and systemd can branch on them.
STATUS_RUNNING = 0
STATUS_NOT_RUNNING = 3
STATUS_UNKNOWN = 4


def registry_dir(env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ) if env is None else env
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0]) / "runs"
    base = Path(env["XDG_STATE_HOME"]) if env.get("XDG_STATE_HOME") else Path.home() / ".local" / "state"
    return base / "vit-supervisor" / "runs"


def register(output_dir: Path, config_path: str) -> Path:
    """Record a run directory in the registry (idempotent: one file per run directory)."""
    key = hashlib.sha256(str(output_dir).encode()).hexdigest()[:16]
    path = registry_dir() / f"{key}.json"
    protocol.atomic_write_json(
        path, {"output_dir": str(output_dir), "config": config_path, "registered": time.time()}, durable=False
    )
    return path


def registered_runs() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    d = registry_dir()
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        entry = protocol.read_json(p)
        if entry and isinstance(entry.get("output_dir"), str) and entry["output_dir"]:
            out.append(entry)
    return out


def supervisor_alive(pid: Any, create_time: Any) -> bool:
    return process_alive(pid, create_time)


_HB_FIELDS = (
    "state",
    "global_step",
    "max_steps",
    "epoch",
    "loss",
    "samples_per_s",
    "last_checkpoint",
    "time",
    "disk_free_bytes",
    "disk_needed_bytes",
)
_ACTIVE = frozenset(s.value for s in ACTIVE_STATES)


def view(output_dir: Path, node_rank: int = 0) -> dict[str, Any]:
    """Everything ``status`` shows about one run, as plain data (this is also ``--json``).

    Never raises on run-directory content: the record and heartbeat are read defensively."""
    output_dir = Path(output_dir)
    rec = record.load(output_dir, node_rank)
    v: dict[str, Any] = {"output_dir": str(output_dir), "known": rec is not None}
    if rec is None:
        v.update(
            state="unknown",
            running=False,
            status_code=STATUS_UNKNOWN,
            note=f"no supervisor state in {protocol.state_path(output_dir, node_rank)}",
        )
        return v
    active = rec.state in _ACTIVE
    hb = protocol.read_record(protocol.Heartbeat, protocol.heartbeat_path(output_dir))
    hb_age = max(0.0, time.time() - hb.time) if hb is not None and hb.time is not None else None
    remote = rec.host is not None and rec.host != socket.gethostname()
    if remote:
        # Its pids mean nothing here (a login node looking at shared storage): trust the record, show the ages.
        alive: bool | None = None
        running = active
        note = f"running on {rec.host} (not checked from here)" if active else None
        if note and hb_age is not None:
            note += f"; heartbeat {_duration(hb_age)} ago"
    else:
        alive = supervisor_alive(rec.supervisor_pid, rec.supervisor_create_time)
        running = active and alive
        note = f"supervisor not running (pid {rec.supervisor_pid} died)" if active and not alive else None
    try:
        free: int | None = shutil.disk_usage(output_dir).free
    except OSError:
        free = None
    hb_current = hb is not None and (
        hb.pid == rec.worker_pid or not running or (hb.attempt is not None and hb.attempt == rec.attempt)
    )
    attempts = [protocol.record_dict(a) for a in rec.attempts]
    v.update(
        state=rec.state,
        running=running,
        status_code=STATUS_RUNNING if running else STATUS_NOT_RUNNING,
        note=note,
        state_reason=rec.state_reason,
        config=rec.config,
        supervisor_pid=rec.supervisor_pid,
        supervisor_alive=alive,
        host=rec.host,
        remote=remote,
        heartbeat_age_s=hb_age,
        slurm=_slurm_view(rec),
        worker_pid=rec.worker_pid if running else None,
        attempt=rec.attempt or len(attempts),
        restart_count=rec.restart_count,
        restarts=[
            {k: a.get(k) for k in ("attempt", "reason", "exit", "message", "step_reached")}
            for a in attempts
            if a.get("end") is not None
        ],
        per_device_train_batch_size=rec.per_device_train_batch_size,
        gradient_accumulation_steps=rec.gradient_accumulation_steps,
        effective_batch=rec.effective_batch,
        last_error=rec.last_error,
        waiting_reason=rec.waiting_reason,
        backoff_until=rec.backoff_until,
        tracker_run_id=_tracker(output_dir, rec, hb),
        free_disk_bytes=free,
        updated=rec.updated,
        log=rec.log,
        attempts=attempts,
        standby=protocol.record_dict(rec.standby) if running and rec.standby else None,
        heartbeat={k: getattr(hb, k) for k in _HB_FIELDS} if hb is not None and hb_current else None,
        snapshot=snapshot_view(output_dir, rec.config),
        goodput=goodput_view(rec.goodput),
    )
    v["eta_s"] = eta_seconds(v["heartbeat"], v["per_device_train_batch_size"], v["gradient_accumulation_steps"])
    return v


def _slurm_view(rec: record.RunRecord) -> dict[str, Any] | None:
    job = rec.slurm
    if job is None:
        return None
    return {
        "job_id": job.requeue_id,
        "restart_count": job.restart_count,
        "node": job.node,
        "requeued": rec.slurm_requeued,
        "text": job.describe() + (", requeued" if rec.slurm_requeued else ""),
    }


def goodput_view(raw: dict[str, float]) -> dict[str, Any] | None:
    """Where the run's supervised wall time went (:mod:`supervisor.goodput`): every bucket in
    seconds, their total, goodput = training / total and the share not lost to faults
    (:func:`supervisor.goodput.fault_free_share`); None before anything was booked."""
    buckets = goodput.clean(raw)
    whole = goodput.total(buckets)
    if whole <= 0:
        return None
    return {
        "ratio": goodput.ratio(buckets),
        "fault_free_share": goodput.fault_free_share(buckets),
        "total_s": whole,
        "buckets": buckets,
    }


def snapshot_view(output_dir: Path, config_path: str | None, now: float | None = None) -> dict[str, Any] | None:
    """The run's newest shared-memory snapshot as its stores' headers tell it (the slots are
    not read); None when the run has no store. ``step``/``age_s`` are the step every rank holds;
    ``problem`` says why a store is unreadable. Never raises on what the stores contain."""
    base = _snapshot_root(config_path)
    infos = [shm.read_store(r) for r in shm.run_stores(output_dir, base)]
    if not infos:
        return None
    now = time.time() if now is None else now
    v: dict[str, Any] = {
        "where": str(infos[0].root.parent),
        "used_bytes": sum(i.used_bytes for i in infos),
        "stores": [
            {"rank": i.rank, "step": i.step, "time": i.time, "size": i.size, "problem": i.problem} for i in infos
        ],
        "step": None,
        "time": None,
        "age_s": None,
        "size": None,
        "problem": next((f"rank {i.rank}: {i.problem}" for i in infos if i.problem), None),
    }
    if v["problem"] is None:
        held = min(infos, key=lambda i: (i.step or 0, i.time or 0.0))  # a multi-rank resume takes the oldest
        v.update(
            step=held.step,
            time=held.time,
            age_s=max(0.0, now - (held.time or now)),
            size=sum(i.size or 0 for i in infos),
        )
    return v


def _snapshot_root(config_path: str | None) -> str | None:
    """``snapshot.root`` of the run's config; None (``/dev/shm``) when the config cannot be read."""
    if not config_path:
        return None
    try:
        return load_config(config_path, check_paths=False).snapshot.root
    except Exception:  # a config edited into anything at all must not break status
        return None


def _tracker(output_dir: Path, rec: record.RunRecord, hb: protocol.Heartbeat | None) -> str | None:
    tracker = rec.tracker_run_id or (hb.tracker_run_id if hb else None)
    if tracker:
        return tracker
    try:
        with open(protocol.run_dir(output_dir) / protocol.TRACKER_ID, "rb") as f:
            return f.read(256).decode("utf-8", "replace").strip() or None
    except OSError:
        return None


def eta_seconds(hb: dict[str, Any] | None, batch: Any, accum: Any) -> float | None:
    if not hb:
        return None
    step, total, sps = hb.get("global_step"), hb.get("max_steps"), hb.get("samples_per_s")
    if not (isinstance(step, int) and isinstance(total, int) and isinstance(sps, (int, float)) and sps > 0):
        return None
    if not (isinstance(batch, int) and isinstance(accum, int)):
        return None
    return max(total - step, 0) * batch * accum / sps


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def _bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return "?"  # pragma: no cover


def progress_bar(step: Any, total: Any, width: int = 30) -> str:
    if not (isinstance(step, int) and isinstance(total, int) and total > 0):
        return "[" + "?" * width + "]"
    filled = min(width, int(width * step / total))
    return "[" + "#" * filled + "-" * (width - filled) + f"] {step}/{total} ({100 * step / total:.0f}%)"


def render(v: dict[str, Any]) -> str:
    """The human view of one run."""
    lines = [f"{v['output_dir']}"]
    if not v.get("known"):
        lines.append(f"  state:       unknown ({v.get('note')})")
        return "\n".join(lines)
    state = v["state"]
    who = f"supervisor pid {v['supervisor_pid']}" if v.get("supervisor_alive") else (v.get("note") or "")
    if v.get("supervisor_alive") and v.get("host"):
        who += f" on {v['host']}"
    lines.append(
        f"  state:       {state}"
        + (f" ({who})" if who and state in {s.value for s in ACTIVE_STATES} else "")
        + (f": {v['state_reason']}" if v.get("state_reason") else "")
    )
    if v.get("slurm"):
        lines.append(f"  slurm:       {v['slurm']['text']}")
    if v.get("note") and v.get("supervisor_alive") is False and state in {s.value for s in ACTIVE_STATES}:
        lines.append(f"  warning:     {v['note']}; run `vit-supervisor start {v.get('config') or 'CONFIG'}` to resume")
    if v.get("worker_pid"):
        lines.append(f"  worker:      pid {v['worker_pid']}, attempt {v.get('attempt')}")
    lines.append(f"  restarts:    {v.get('restart_count', 0)}")
    for r in v.get("restarts", [])[-5:]:
        lines.append(
            f"    attempt {r['attempt']}: {r['reason']} ({r['exit']}) at step {r['step_reached']}: "
            f"{(r['message'] or '')[:100]}"
        )
    hb = v.get("heartbeat") or {}
    if hb:
        extra = []
        if hb.get("epoch") is not None:
            extra.append(f"epoch {hb['epoch']:.2f}")
        if hb.get("samples_per_s"):
            extra.append(f"{hb['samples_per_s']:.1f} samples/s")
        if v.get("eta_s") is not None and state == State.RUNNING.value:
            extra.append(f"ETA {_duration(v['eta_s'])}")
        if hb.get("loss") is not None:
            extra.append(f"loss {hb['loss']:.4f}")
        lines.append(
            f"  progress:    {progress_bar(hb.get('global_step'), hb.get('max_steps'))}"
            + (f"  {', '.join(extra)}" if extra else "")
        )
        if hb.get("state"):
            lines.append(f"  worker says: {hb['state']}")
    lines.append(
        f"  batch:       per-device {v.get('per_device_train_batch_size')} x accumulation "
        f"{v.get('gradient_accumulation_steps')} = {v.get('effective_batch')}"
    )
    lines.append(f"  checkpoint:  {hb.get('last_checkpoint') or _newest_checkpoint(v['output_dir']) or 'none yet'}")
    lines.append(f"  free disk:   {_bytes(v.get('free_disk_bytes'))}")
    snap = v.get("snapshot")
    if snap:
        if snap.get("problem"):
            lines.append(f"  snapshot:    unreadable ({snap['problem']})")
        else:
            lines.append(
                f"  snapshot:    step {snap['step']}, {_duration(snap['age_s'])} ago, {_bytes(snap['size'])} "
                f"({_bytes(snap['used_bytes'])} in {snap['where']})"
            )
    gp = v.get("goodput")
    if gp:
        lines.append(f"  goodput:     {goodput_line(gp)}")
    if v.get("waiting_reason"):
        lines.append(f"  waiting:     {v['waiting_reason']}")
    if v.get("tracker_run_id"):
        lines.append(f"  tracker run: {v['tracker_run_id']}")
    if v.get("running"):
        sb = v.get("standby")
        lines.append(
            "  standby:     " + (f"{'ready' if sb.get('ready') else 'preparing'} (pid {sb['pid']})" if sb else "none")
        )
    if v.get("last_error"):
        lines.append(f"  last error:  {v['last_error']}")
    if v.get("log"):
        lines.append(f"  log:         {v['log']}")
    return "\n".join(lines)


def goodput_line(gp: dict[str, Any]) -> str:
    """'87.0% of 12m30s; startup 45s, checkpoint 30s, redo 12s': the ratio and the largest other buckets."""
    others = [(b, s) for b, s in goodput.largest(gp["buckets"], 4) if b != "training"][:3]
    spent = ", ".join(f"{b} {_short(s)}" for b, s in others)
    return f"{100 * gp['ratio']:.1f}% training of {_short(gp['total_s'])} supervised" + (f"; {spent}" if spent else "")


def _short(s: float) -> str:
    """Seconds, compactly: '0.4s', '45s', '12m30s', '3h05m'."""
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    return _duration(s)


def _newest_checkpoint(output_dir: str) -> str | None:
    step = protocol.newest_checkpoint_step(output_dir)
    return str(Path(output_dir) / f"checkpoint-{step}") if step >= 0 else None
