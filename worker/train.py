"""The training job's orchestration: lock, prepare, choose the checkpoint, train, report.

One attempt ends in exactly one :class:`protocol.ExitReport`, built in
:func:`exit_report` from the attempt's :class:`Outcome` and written in
:func:`run`; the exit code is the report's reason's code. The pieces live in
their own modules: the Trainer subclass and its callback (worker/trainer.py),
the tracker (worker/tracking.py), collectives (worker/dist.py), checkpoints
(worker/checkpoint.py) and the fault contract (worker/fault.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import set_seed

from supervisor import protocol, runlock
from supervisor.schema import Config
from worker import checkpoint as ckpt
from worker import data as data_mod
from worker import fault, guard, locks, snapshot, tracking
from worker import model as model_mod
from worker.augment import EpochCallback
from worker.disk import DiskGuard, DiskLow, StoppedWhileWaiting
from worker.dist import all_gather, barrier, broadcast_from_main, gather_to_main
from worker.fault import HeartbeatWriter, ParentWatch, StopRequest, is_device_fatal, is_oom
from worker.trainer import (
    RunContext,
    Snapshots,
    SupervisedTrainer,
    SupervisionCallback,
    compute_metrics,
    emergency_checkpoint,
    training_arguments,
)

__all__ = ["Prepared", "compute_metrics", "prepare", "run", "training_arguments"]

log = logging.getLogger("vit_train")


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended; :func:`exit_report` turns it into the attempt's one exit report."""

    reason: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)
    """Further :class:`protocol.ExitReport` fields (step, traceback, metrics, ...)."""


@dataclass
class Prepared:
    """Everything that depends neither on the checkpoint nor on the batch size."""

    splits: data_mod.Splits
    model: torch.nn.Module


def prepare(cfg: Config) -> Prepared:
    """Read the data and build a freshly initialised model (raises DataError)."""
    set_seed(cfg.training.seed)
    splits = data_mod.build(cfg)
    return Prepared(splits=splits, model=model_mod.build(cfg, splits.class_names))


def snapshot_store(cfg: Config, fingerprint: str) -> snapshot.SnapshotStore | None:
    """This rank's snapshot store, or None when snapshots are off.

    Under torchrun every rank has its own store (rank 0 holds the whole state, every other
    rank its own part; see :func:`common_snapshot`). The identity is what must match for a
    snapshot to be resumed: the resume guard's settings and data fingerprint, the world size
    and rank, and the per-device batch and accumulation in force (the data position of a
    step depends on them; after an OOM the supervisor changes the batch, and the snapshot of
    the old batch is then rightly ignored).
    """
    if not cfg.snapshot.enabled:
        return None
    t = cfg.training
    identity = {
        **guard.current(cfg, fingerprint),
        "world_size": fault.world_size(),
        "rank": fault.rank(),
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
    }
    return snapshot.SnapshotStore(snapshot.default_root(cfg.output_dir, fault.rank(), cfg.snapshot.root), identity)


def common_snapshot(store: snapshot.SnapshotStore | None) -> snapshot.Snapshot | None:
    """Under torchrun (a collective: every rank calls it): the newest snapshot step that every
    rank's store holds valid, as one snapshot holding every rank's part, on rank 0; None on the
    other ranks, and on rank 0 when there is no such step (with a line saying why).

    Each rank offers the steps its header lists (newest and previous) and reads only the one
    agreed on; a rank whose read fails withdraws that step and the ranks agree again. The
    parts of the other ranks (their RNG files, a few KiB) travel to rank 0, which writes and
    commits the checkpoint alone (:func:`snapshot.materialize`, in :func:`choose_checkpoint`):
    one writer makes the commit all-or-nothing without barriers around a shared staging
    folder, and reuses the single-process path, validation included.
    """
    rank = fault.rank()
    offered = store.listed_steps() if store is not None else []
    snap = None
    while snap is None:
        offers = all_gather(offered)
        common = set(offers[0]).intersection(*offers[1:])
        if not common:
            if rank == 0 and any(offers):
                held = "; ".join(f"rank {r}: {', '.join(map(str, steps)) or 'none'}" for r, steps in enumerate(offers))
                log.info("No snapshot step is held by every rank (%s); the disk checkpoint stands", held)
            return None
        step = max(common)
        mine = store.read_step(step) if store is not None else None
        if all(all_gather(mine is not None)):
            snap = mine  # every rank read its part of this step
        elif mine is None:
            offered = [s for s in offered if s != step]  # the others keep theirs: one step fewer each round
    part = {n: b for n, b in snap.files.items() if n != "trainer_state.json"} if rank else {}
    parts = gather_to_main(part)
    if parts is None:
        return None
    files = dict(snap.files)
    for p in parts[1:]:
        files.update(p)
    return dataclasses.replace(snap, files=files)


def choose_checkpoint(
    cfg: Config,
    fingerprint: str,
    *,
    resume: bool,
    checkpoint: Path | None,
    store: snapshot.SnapshotStore | None = None,
    newest: Callable[[], snapshot.Snapshot | None] | None = None,
) -> tuple[Path | None, str | None, str]:
    """Which checkpoint to resume, after validation and the resume guard (rank 0 only).

    Without ``--checkpoint``, the newest valid snapshot in ``store`` (or the one ``newest()``
    returns: under torchrun, :func:`common_snapshot`) wins over the newest good disk
    checkpoint when its step is newer; it is then committed as a normal ``checkpoint-N`` and
    resumed like one. A start from scratch removes ``store``.

    Returns (checkpoint or None, error reason or None, message).
    """
    out = cfg.output_dir
    target: Path | None
    snap: snapshot.Snapshot | None = None
    if checkpoint is not None:
        try:
            ckpt.validate(checkpoint)
        except ckpt.CheckpointInvalid as exc:
            return None, protocol.REASON_CONFIG_ERROR, f"checkpoint {checkpoint} is not usable: {exc}"
        target = checkpoint
        log.info("Training will resume from checkpoint: %s", target)
    else:
        target = ckpt.newest_good(out)
        # A run folder without a guard was never started (or was emptied): a snapshot of the same
        # path and settings would be a previous run's, not this one's.
        if newest is None and store is not None:
            newest = store.read_newest
        if newest is not None and guard.path(out).exists():
            snap = newest()
            disk_step = (ckpt.step_of(target) or 0) if target is not None else 0
            if snap is not None and snap.step <= disk_step:
                log.info("Snapshot of step %d ignored: %s is as new", snap.step, target.name if target else "-")
                snap = None
        if snap is None:  # else the resume line is logged once the snapshot is committed, below
            if target is not None:
                what = "Training will resume from checkpoint" if resume else "Auto-detected checkpoint"
                log.info("%s: %s", what, target)
            else:
                log.info("No checkpoint found, starting from scratch")
    try:
        if target is not None or snap is not None:
            guard.check(out, cfg, fingerprint)
        else:
            guard.record(out, cfg, fingerprint)
            if store is not None:
                # A start from scratch owns no earlier state: a leftover store (same path and
                # settings, run folder emptied) must not be resumed after a kill before our first snapshot.
                store.remove()
    except guard.IncompatibleCheckpoint as exc:
        return None, protocol.REASON_INCOMPATIBLE, str(exc)
    if snap is not None:
        try:
            committed = snapshot.materialize(snap, out)
        except (ckpt.CheckpointInvalid, OSError) as exc:
            # The disk checkpoint stands; a snapshot is never worth failing the attempt for.
            log.warning("Snapshot of step %d could not be committed (%s); using the disk checkpoint", snap.step, exc)
            if target is not None:
                log.info("Training will resume from checkpoint: %s", target)
            else:
                log.info("No checkpoint found, starting from scratch")
        else:
            log.info(
                "Training will resume from snapshot step %d (newer than %s)",
                snap.step,
                target.name if target is not None else "any disk checkpoint",
            )
            target = committed
    return target, None, ""


def run(
    cfg: Config, *, resume: bool, checkpoint: Path | None, stop: StopRequest, prepared: Prepared | None = None
) -> int:
    """Train to the end or to a stop; write the exit report; return its exit code."""
    try:
        held = locks.take(cfg, stop)
    except (runlock.LockHeld, locks.StoppedWhileWaitingForLock) as exc:
        return locks.refused(exc)
    try:
        ctx = open_context(cfg, stop)
        try:
            outcome = run_attempt(ctx, resume=resume, checkpoint=checkpoint, prepared=prepared)
        except Exception as exc:  # anything not classified is a crash, reported like every other outcome
            log.exception("Crashed")
            # A device lost while setting up (moving the model, joining NCCL) is named as such too.
            reason = protocol.REASON_DEVICE_ERROR if is_device_fatal(exc) else protocol.REASON_CRASH
            outcome = Outcome(reason, f"{type(exc).__name__}: {_first_line(exc)}", _exception_fields(exc, 25))
        report = exit_report(ctx, outcome)
        code = fault.save_exit_report(cfg.output_dir, report)
        ctx.heartbeat.update(state=protocol.HB_EXITED, reason=report.reason, force=True)
        tracking.finish(code)
        return code
    finally:
        for lock in reversed(held):  # only now: the exit report is on disk before a successor may start
            lock.release()


def open_context(cfg: Config, stop: StopRequest) -> RunContext:
    """The run folder, the parent watch, the first heartbeat and the disk guard."""
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    protocol.run_dir(out).mkdir(exist_ok=True)
    parent = ParentWatch()
    parent.arm()
    t = cfg.training
    hb = HeartbeatWriter(
        out,
        cfg.supervisor.heartbeat_interval_s,
        attempt=fault.attempt(),
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        global_step=0,
        world_size=fault.world_size(),
    )
    hb.update(force=True)
    disk = DiskGuard(
        out,
        int(cfg.disk.reserve_mb * 2**20),
        cfg.disk.on_low,
        cfg.disk.recheck_s,
        stop_requested=lambda: stop.requested or parent.parent_gone(),
        on_wait=lambda need, free: hb.update(
            state=protocol.HB_WAITING_FOR_DISK, disk_needed_bytes=need, disk_free_bytes=free, force=True
        ),
    )
    return RunContext(cfg=cfg, output_dir=out, stop=stop, parent=parent, heartbeat=hb, disk=disk)


def exit_report(ctx: RunContext, outcome: Outcome) -> protocol.ExitReport:
    """The one place an attempt's exit report is built."""
    t = ctx.cfg.training
    return fault.exit_report(
        outcome.reason,
        outcome.message,
        last_checkpoint=str(ctx.last_checkpoint) if ctx.last_checkpoint else None,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        tracker_run_id=ctx.tracker_run_id,
        # Not after a device error: the dead context may fail this call too, and lose the report.
        gpu_mem_peak_bytes=torch.cuda.max_memory_allocated()
        if torch.cuda.is_available() and outcome.reason != protocol.REASON_DEVICE_ERROR
        else None,
        checkpoint_bytes=ctx.last_ckpt_bytes,
        save_seconds=ctx.save_seconds,
        skipped_images=data_mod.skipped_images(),
        **outcome.fields,
    )


def run_attempt(ctx: RunContext, *, resume: bool, checkpoint: Path | None, prepared: Prepared | None) -> Outcome:
    """Prepare, choose the checkpoint, train: how this attempt ended."""
    cfg, out, main = ctx.cfg, ctx.output_dir, fault.rank() == 0
    if main:
        ckpt.clean_staging(out)
    try:
        prepared = prepared or prepare(cfg)
    except data_mod.DataError as exc:
        log.error("%s", exc)
        return Outcome(protocol.REASON_DATA_ERROR, str(exc))
    except model_mod.ModelUnavailable as exc:
        log.error("%s", exc)
        return Outcome(protocol.REASON_CONFIG_ERROR, str(exc))
    # Under torchrun this also joins the process group.
    args = training_arguments(cfg, ["wandb"] if tracking.enabled(cfg) and main else [])
    decision: tuple[str | None, str | None, str] = (None, None, "")
    store = snapshot_store(cfg, prepared.splits.fingerprint)
    # Every rank takes part in the agreement, with a store or without one (the condition must be
    # the same on every rank, or the collectives would not pair up); rank 0 gets the result.
    agree = fault.world_size() > 1 and checkpoint is None
    common = common_snapshot(store) if agree else None
    if main:
        target, reason, message = choose_checkpoint(
            cfg,
            prepared.splits.fingerprint,
            resume=resume,
            checkpoint=checkpoint,
            store=store,
            newest=(lambda: common) if agree else None,
        )
        decision = (str(target) if target else None, reason, message)
    target_s, reason, message = broadcast_from_main(decision)
    if reason is not None:
        log.error("%s", message)
        return Outcome(reason, message)
    target = Path(target_s) if target_s else None
    if target is None and store is not None and not main:
        store.remove()  # a start from scratch owns no earlier state (rank 0's went in choose_checkpoint)
    if store is not None:
        ctx.snapshots = Snapshots(store, cfg.snapshot.every_steps)
    ctx.last_checkpoint = target
    if target is not None:
        ctx.last_ckpt_bytes = ckpt.dir_bytes(target)
    ctx.heartbeat.update(last_checkpoint=str(target) if target else None)
    if main:
        ctx.tracker_run_id = tracking.tracker_run_id(out)
        ctx.heartbeat.update(tracker_run_id=ctx.tracker_run_id)
        if tracking.enabled(cfg):
            tracking.init(cfg, ctx.tracker_run_id)
            ctx.stop.install()  # again: wandb.init may have installed handlers of its own
    trainer = SupervisedTrainer(
        model=prepared.model,
        args=args,
        train_dataset=prepared.splits.train,
        eval_dataset=prepared.splits.eval,
        compute_metrics=compute_metrics,
        callbacks=[SupervisionCallback(ctx), EpochCallback(prepared.splits.train)],
        ctx=ctx,
    )
    outcome = train(trainer, target)
    if outcome.reason == protocol.REASON_COMPLETED and store is not None:
        # A finished run resumes from nothing: its snapshot would only hold memory. The supervisor
        # removes a completed run's stores too; a `vit-train` by hand has no supervisor to do it.
        store.remove()
    return outcome


def _progress(trainer: SupervisedTrainer) -> dict[str, Any]:
    return {"step": trainer.state.global_step, "max_steps": trainer.state.max_steps}


def _exception_fields(exc: BaseException, lines: int) -> dict[str, Any]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).splitlines()
    return {"exception_type": type(exc).__name__, "traceback": tb[-lines:]}


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


def train(trainer: SupervisedTrainer, target: Path | None) -> Outcome:
    """Run the Trainer and classify how it ended."""
    oom: dict[str, Any] | None = None
    try:
        trainer.train(resume_from_checkpoint=str(target) if target else None)
    except ckpt.CheckpointInvalid as exc:
        log.error("%s", exc)
        return Outcome(protocol.REASON_INCOMPATIBLE, str(exc))
    except DiskLow as exc:
        log.error("Stopping: %s", exc)
        fields = {**_progress(trainer), "disk_needed_bytes": exc.needed, "disk_free_bytes": exc.free}
        return Outcome(protocol.REASON_DISK_LOW, str(exc), fields)
    except StoppedWhileWaiting as exc:
        log.warning("%s", exc)
        return Outcome(protocol.REASON_INTERRUPTED, str(exc), _progress(trainer))
    except data_mod.DataError as exc:
        return _data_error(trainer, exc)
    except BaseException as exc:
        if is_device_fatal(exc):
            return _device_error(trainer, exc)
        if not is_oom(exc):
            log.exception("Training crashed at step %d", trainer.state.global_step)
            fields = {**_progress(trainer), **_exception_fields(exc, 25)}
            return Outcome(protocol.REASON_CRASH, f"{type(exc).__name__}: {_first_line(exc)}", fields)
        # Keep only text: the exception's frames hold the tensors whose memory the
        # emergency checkpoint needs back.
        oom = {**_exception_fields(exc, 12), "message": f"{type(exc).__name__}: {_first_line(exc)[:500]}"}
        del exc
    if oom is not None:
        return after_oom(trainer, oom)
    if trainer.state.global_step >= trainer.state.max_steps:
        try:
            return complete(trainer)
        except data_mod.DataError as exc:  # the final evaluation met a corrupt image
            return _data_error(trainer, exc)
    # train() returns normally after a requested stop: the step count, not the return, decides.
    stop, ctx = trainer.ctx.stop, trainer.ctx
    latency = time.monotonic() - stop.received_at if stop.received_at else None
    msg = f"{stop.describe() if stop.requested else 'training stopped early'}; checkpoint {ctx.last_checkpoint}"
    return Outcome(protocol.REASON_INTERRUPTED, msg, {**_progress(trainer), "stop_to_exit_s": latency})


def _device_error(trainer: SupervisedTrainer, exc: BaseException) -> Outcome:
    """The device is gone: report it and touch nothing on it (no emergency checkpoint, no snapshot).

    The step in the report is the last one completed; the newest snapshot holds it (or the newest
    disk checkpoint, without snapshots), and the restart resumes from there.
    """
    if trainer.ctx.snapshots is not None:
        trainer.ctx.snapshots.enabled = False  # a capture now would read the failed device
    log.error(
        "Device error at step %d: %s: %s. Nothing is saved from the device; the restart resumes from the "
        "newest snapshot or checkpoint (%s)",
        trainer.state.global_step,
        type(exc).__name__,
        _first_line(exc),
        trainer.ctx.last_checkpoint or "none on disk",
    )
    fields = {**_progress(trainer), **_exception_fields(exc, 25)}
    return Outcome(protocol.REASON_DEVICE_ERROR, f"{type(exc).__name__}: {_first_line(exc)[:500]}", fields)


def _data_error(trainer: SupervisedTrainer, exc: data_mod.DataError) -> Outcome:
    """A corrupt image fails again on every retry: the user must fix or remove it."""
    message = data_mod.error_message(exc)
    log.error("Stopping at step %d: %s", trainer.state.global_step, message)
    return Outcome(protocol.REASON_DATA_ERROR, message, _progress(trainer))


def after_oom(trainer: SupervisedTrainer, oom: dict[str, Any]) -> Outcome:
    """Log the out-of-memory, commit the last whole step if possible, report it."""
    t = trainer.ctx.cfg.training
    message = oom.pop("message")
    log.error(
        "Out of memory at step %d with per-device batch %d x accumulation %d: %s",
        trainer.state.global_step,
        t.per_device_train_batch_size,
        t.gradient_accumulation_steps,
        message,
    )
    saved = emergency_checkpoint(trainer)
    fields = {**_progress(trainer), **oom, "emergency_checkpoint": saved is not None, "phase": trainer.ctx.phase}
    return Outcome(protocol.REASON_OOM, message, fields)


def complete(trainer: SupervisedTrainer) -> Outcome:
    """Final evaluation and the final model, committed by a rename like a checkpoint."""
    state, out, main = trainer.state, trainer.ctx.output_dir, fault.rank() == 0
    evals = [h for h in state.log_history if "eval_loss" in h and h.get("step") == state.global_step]
    metrics = evals[-1] if evals else (trainer.evaluate() if trainer.eval_dataset is not None else {})
    final = out / "model"
    staging = out / ".staging-model"
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    trainer.save_model(str(staging))
    barrier()
    if main:
        if final.exists():
            ckpt.set_aside(final, "replaced by the model of a later completed run")
        os.rename(staging, final)
    log.info(
        "Training complete: step %d/%d, %s; final model in %s",
        state.global_step,
        state.max_steps,
        {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)},
        final,
    )
    fields = {**_progress(trainer), "metrics": metrics}
    return Outcome(protocol.REASON_COMPLETED, f"completed {state.global_step} steps", fields)
