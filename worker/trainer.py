"""The Trainer subclass and its callback: committed checkpoints, stop-at-step-end, heartbeat.

:class:`SupervisedTrainer` owns checkpointing (staging, commit, our own rotation,
strict loads); :class:`SupervisionCallback` turns stop requests into "save at
the end of this step", keeps the heartbeat and appends the metrics log. They
share a :class:`RunContext` with the entry point (worker/train.py).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import shutil
import statistics
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from supervisor import protocol
from supervisor.schema import Config
from worker import checkpoint as ckpt
from worker import snapshot
from worker.disk import DiskGuard
from worker.dist import any_ranks, barrier
from worker.fault import HeartbeatWriter, ParentWatch, StopRequest, attempt, set_memory_headroom_from_env
from worker.fault import world_size as fault_world_size
from worker.rng import BoundaryRng

log = logging.getLogger("vit_train")


@dataclass
class RunContext:
    """What the Trainer subclass and the callback share with the entry point."""

    cfg: Config
    output_dir: Path
    stop: StopRequest
    parent: ParentWatch
    heartbeat: HeartbeatWriter
    disk: DiskGuard
    last_checkpoint: Path | None = None
    last_ckpt_bytes: int | None = None
    phase: str = "setup"  # setup | forward | optimizer | boundary
    rng: BoundaryRng = field(default_factory=BoundaryRng)
    """The RNG states at the last step boundary (for the emergency checkpoint)."""
    rng_override: dict[str, Any] | None = None
    save_seconds: list[float] = field(default_factory=list)
    tracker_run_id: str | None = None
    snapshots: Snapshots | None = None


class Snapshots:
    """Shared-memory snapshots of the training state (under torchrun each rank its part), the big
    copy overlapped with the next step.

    A snapshot must hold the state training continues from, which is the state *after* the
    step's boundary work: ``on_step_end`` runs before the Trainer logs, evaluates and saves
    (``_maybe_log_save_evaluate``), and evaluation draws from the global torch RNG (every
    DataLoader iterator takes a base seed from it). So ``on_step_end`` only marks the step
    as due, and the capture happens after the last ``_maybe_log_save_evaluate`` of that step:
    the one in the step loop, or, when the loop leaves the epoch after this step, the one
    after ``on_epoch_end`` (epoch evaluation and epoch saves happen there). A step that is saved
    to disk is also snapshotted just before its save starts (:meth:`before_save`), so that a kill
    in the middle of the save loses nothing.

    The capture has two parts. The small state (RNG, trainer state, scheduler, scaler) is
    serialised there and then. The big tensors (weights, optimizer state) are only
    referenced, and a thread copies their bytes into the store's free slot and commits it
    while the next step's forward and backward run: the weights and the optimizer state do
    not change until the next optimizer step, and :meth:`join`, called in
    ``on_pre_optimizer_step``, makes that step wait for the copy. Everything else that
    changes the weights or ends training joins first too (:meth:`SupervisedTrainer.train`
    and ``_load_best_model``). A kill during the copy leaves the previous snapshot: the
    header names the new slot only once it is complete. A small state (under
    :data:`snapshot.SYNC_BELOW`) is copied at the boundary instead: cheaper than a hand-off.

    The interval is ``snapshot.every_steps``, or with ``auto`` chosen as training goes by
    :class:`snapshot.IntervalChooser` from the exposed cost (the synchronous part plus any
    wait in :meth:`join`) and the copy thread's own CPU time, against the step time.
    """

    def __init__(self, store: snapshot.SnapshotStore, every_steps: int | str) -> None:
        self.store = store
        self.every_steps = every_steps
        self.chooser = snapshot.IntervalChooser(every_steps)
        self.enabled = True
        self.due: int | None = None
        self.epoch_ending = False
        self.seconds: list[float] = []  # capture start -> committed, per snapshot
        self.exposed: list[float] = []  # what training waited for, per snapshot
        self.size = 0  # bytes of the newest snapshot
        self._capturer = snapshot.Capturer()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        self._pending_step = 0
        self._sync_s = 0.0
        self._last_step: int | None = None
        self._last_step_end: float | None = None
        self._last_step_cpu = 0.0  # the process's CPU time at the last step end
        self._sync_cpu = 0.0  # this thread's CPU time in the boundary part of the snapshot in flight
        self._setup_at = 0.0
        self._copy_cpu = 0.0  # the copy thread's CPU time for the last snapshot it wrote

    def step_end(self, step: int) -> bool:
        """Record a step end; whether this rank's interval wants a snapshot of ``step``."""
        now, cpu = time.monotonic(), time.process_time()
        if self._last_step_end is not None:
            new = self.chooser.add_step(now - self._last_step_end, cpu - self._last_step_cpu)
            if new is not None:
                self._log_interval(new)
        self._last_step_end, self._last_step_cpu = now, cpu
        return self.enabled and self.chooser.is_due(step, self._last_step)

    def mark_due(self, step: int) -> None:
        """Snapshot this step (under torchrun: because some rank's interval says so, so that every
        rank snapshots the same steps whatever interval each one's own measurements chose)."""
        if self.enabled:
            self.due = step

    def after_boundary_work(self, trainer: SupervisedTrainer) -> None:
        """Called after every ``_maybe_log_save_evaluate``; starts the due snapshot after the last one."""
        epoch_end_call, self.epoch_ending = self.epoch_ending, False
        state, control = trainer.state, trainer.control
        if self.due is None or self.due != state.global_step:
            return
        leaves_epoch = float(state.epoch or 0.0).is_integer() or control.should_epoch_stop
        if not epoch_end_call and (leaves_epoch or control.should_training_stop):
            return  # on_epoch_end and its _maybe_log_save_evaluate still belong to this step
        self.due = None
        self.join()
        if not self.enabled:
            return
        t0, cpu0 = time.monotonic(), time.thread_time()
        self._setup_at = self._setup_seconds()
        step = state.global_step
        try:
            if trainer.args.process_index > 0:
                # Ranks > 0 hold no weights of their own to save: their small part, synchronously.
                self.store.write(step, snapshot.capture_rank_files(trainer))
                self._done(step, t0, time.monotonic() - t0, busy=time.thread_time() - cpu0)
                return
            self.store.keep_previous = getattr(trainer.args, "world_size", 1) > 1  # only torchrun's agreement reads it
            cap = self._capturer.capture(trainer)
            if cap.tensor_bytes < snapshot.SYNC_BELOW:
                self._copy(cap, t0)  # small: cheaper here than handed to the thread
                self._last_step = step
                self._done(step, None, time.monotonic() - t0, busy=time.thread_time() - cpu0)
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-copy")
            self._pending = self._pool.submit(self._copy, cap, t0)
        except Exception as exc:  # a snapshot is an optimisation: it must never end training
            self._off(step, exc)
            return
        self._pending_step = step
        self._sync_s, self._sync_cpu = time.monotonic() - t0, time.thread_time() - cpu0
        self._last_step = step

    def before_save(self, trainer: SupervisedTrainer) -> None:
        """Snapshot the step whose disk checkpoint is about to be written, committed before the
        save's first byte: a kill in the middle of the save then resumes from this very step.

        Called from the Trainer's saves only (every rank saves the same steps, so every rank
        snapshots the same steps), after the step's logging and evaluation: what the save writes
        is what the snapshot holds (:func:`snapshot.capture_files` mirrors the save's own changes
        to the trainer state). When later boundary work of this step may still change the state
        (``on_epoch_end`` and its ``_maybe_log_save_evaluate``), the step stays due and
        :meth:`after_boundary_work` takes it again after that work.
        """
        if not self.enabled:
            return
        state, control = trainer.state, trainer.control
        leaves_epoch = float(state.epoch or 0.0).is_integer() or control.should_epoch_stop
        last_call = self.epoch_ending or not (leaves_epoch or control.should_training_stop)
        ending, self.epoch_ending, self.due = self.epoch_ending, True, state.global_step
        try:
            self.after_boundary_work(trainer)  # as the step's last boundary call: now
        finally:
            self.epoch_ending = ending
        self.join()  # the copy too: committed before the save starts
        if not last_call and self.enabled:
            self.due = state.global_step

    def _copy(self, cap: snapshot.Capture, t0: float) -> None:
        # What the copy takes from training beside it: this thread's CPU time, or its duration when
        # longer (a big copy also takes memory bandwidth from the training step's cores).
        cpu0, wall0 = time.thread_time(), time.monotonic()
        self.size = snapshot.write_capture(self.store, self._capturer, cap)
        self._copy_cpu = max(time.thread_time() - cpu0, time.monotonic() - wall0)
        self.seconds.append(time.monotonic() - t0)

    def join(self) -> None:
        """Wait for the snapshot being copied, if any (before anything changes the weights)."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        t0 = time.monotonic()
        try:
            pending.result()
        except Exception as exc:
            self._off(self._pending_step, exc)
            return
        self._done(self._pending_step, None, self._sync_s + time.monotonic() - t0, busy=self._sync_cpu + self._copy_cpu)

    def _setup_seconds(self) -> float:
        return self._capturer.setup_seconds + self.store.setup_seconds

    def _done(self, step: int, t0: float | None, exposed: float, busy: float | None = None) -> None:
        """Record a committed snapshot: its exposed time and its busy time (CPU time: the boundary
        part's, plus the copy thread's for a copy in the thread), for the interval's choice."""
        if t0 is not None:
            self.seconds.append(time.monotonic() - t0)
        self.exposed.append(exposed)
        # What is done once (the config files, the list of tensors, mapping a slot) is not what
        # every later snapshot costs: the interval is chosen from the rest.
        once = self._setup_seconds() - self._setup_at
        new = self.chooser.add_cost(max(0.0, exposed - once), None if busy is None else max(0.0, busy - once))
        if new is not None:
            self._log_interval(new)

    def _log_interval(self, new: int) -> None:
        log.info(
            "Snapshot interval now %d step%s (auto: %.1f ms per snapshot, %.1f ms per step)",
            new,
            "" if new == 1 else "s",
            1e3 * (self.chooser.cost_seconds or 0.0),
            1e3 * (self.chooser.step_seconds or 0.0),
        )

    def _off(self, step: int, exc: BaseException) -> None:
        self.enabled = False
        self.due = None
        log.warning(
            "Snapshots off for this attempt: the snapshot of step %d failed (%s: %s); disk checkpoints still apply",
            step,
            type(exc).__name__,
            exc,
        )

    def close(self) -> None:
        """Wait for the last copy, stop the thread and log what the snapshots cost."""
        self.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.store.close()
        if self.exposed:
            log.info(
                "Snapshots: %d taken, newest of step %s, %.2f MiB; copy median %.1f ms, exposed median %.2f ms; "
                "interval %d (%s)",
                len(self.exposed),
                self._last_step,
                self.size / 2**20,
                1e3 * statistics.median(self.seconds) if self.seconds else 0.0,
                1e3 * statistics.median(self.exposed),
                self.chooser.interval,
                "auto" if self.chooser.auto else "fixed",
            )


class _IgnoreStopSignals:
    """worker_init_fn wrapper: DataLoader workers ignore SIGTERM/SIGINT.

    A terminal's Ctrl+C or a service manager's SIGTERM reaches the whole process
    group. torch's worker handler dies on a SIGTERM that its parent did not send,
    and the main process then fails with "DataLoader worker ... killed by signal"
    before it can save. The main process alone decides when to stop; its workers
    end with it.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.parent = os.getpid()

    def __call__(self, worker_id: int) -> None:
        import ctypes
        import signal
        import sys

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # A DataLoader worker is forked with the main process's descriptors, the run's locks
        # among them: when the main process is killed (SIGKILL, a segfault, the OOM killer) it
        # must die at once rather than at torch's next parent check (up to 5 s), or a restart
        # finds the run still locked by an orphan.
        if sys.platform.startswith("linux"):
            try:
                ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
            except (OSError, AttributeError):
                pass
        if os.getppid() != self.parent:  # died before the prctl
            os._exit(1)
        if self.inner is not None:
            self.inner(worker_id)


def snapshot_rng() -> dict[str, Any]:
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.random.get_rng_state()
    return states


class SupervisedTrainer(Trainer):
    """Trainer whose checkpoints are committed atomically after a disk check, and whose
    loads restore every tensor or fail."""

    def __init__(self, *args: Any, ctx: RunContext, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ctx = ctx

    # -- saving -------------------------------------------------------------------------

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        self.commit_checkpoint(snapshot_first=True)

    def commit_checkpoint(self, snapshot_first: bool = False) -> Path:
        """Write every rank's part into the staging folder, then rank 0 seals and renames it.

        Barriers make it all-or-nothing across ranks: the rename happens only after
        every rank's RNG state is on disk. With ``snapshot_first`` (the Trainer's own saves)
        and snapshots on, the step is snapshotted before anything is written
        (:meth:`Snapshots.before_save`): a kill in the middle of the save loses no step.
        """
        ctx = self.ctx
        step = self.state.global_step
        out = ctx.output_dir
        final = out / f"checkpoint-{step}"
        if ctx.last_checkpoint == final and final.is_dir():
            return final  # already committed at this step (a stop right after a periodic save)
        if snapshot_first and ctx.snapshots is not None:
            ctx.snapshots.before_save(self)
        main = self.args.should_save
        self.store_flos()
        keep = self.args.save_total_limit
        if main:
            needed = ctx.last_ckpt_bytes or ckpt.estimate_bytes(self.model)
            ctx.disk.ensure(
                needed,
                lambda: (
                    ckpt.rotation_candidates(out, max(1, keep - 1), self.state.best_model_checkpoint) if keep else []
                ),
            )
            ctx.heartbeat.update(state=protocol.HB_SAVING, force=True)
        t0 = time.monotonic()
        staging = ckpt.staging_dir(out, step)
        if main:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir()
        barrier()
        try:
            self.save_model(str(staging), _internal_call=True)
            if self.state.best_global_step:
                best = out / f"checkpoint-{self.state.best_global_step}"
                if best.exists() or self.state.best_global_step == step:
                    self.state.best_model_checkpoint = str(best)
            self._save_optimizer_and_scheduler(str(staging))
            self._save_scaler(str(staging))
            self._save_rng_state(str(staging))
            barrier()
            size = 0
            if main:
                from transformers.trainer_callback import ExportableState

                stateful: dict[str, Any] = self.state.stateful_callbacks
                for cb in [
                    c for c in [*self.callback_handler.callbacks, self.control] if isinstance(c, ExportableState)
                ]:
                    name = cb.__class__.__name__
                    if isinstance(stateful.get(name), list):
                        stateful[name].append(cb.state())
                    else:
                        stateful[name] = cb.state()
                self.state.save_to_json(str(staging / "trainer_state.json"))
                size = ckpt.commit(staging, final, step)
            barrier()
        except BaseException:
            if main:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        ctx.last_checkpoint = final
        ctx.save_seconds.append(time.monotonic() - t0)
        if main:
            ctx.last_ckpt_bytes = size
            log.info("Committed checkpoint %s (%.1f MiB, %.2fs)", final.name, size / 2**20, ctx.save_seconds[-1])
            if keep:
                ckpt.rotate(out, keep, self.state.best_model_checkpoint)
            ctx.heartbeat.update(state=protocol.HB_TRAINING, last_checkpoint=str(final), force=True)
        return final

    def _save_rng_state(self, output_dir: str) -> None:
        if self.ctx.rng_override is None:
            return super()._save_rng_state(output_dir)
        name = "rng_state.pth" if self.args.world_size <= 1 else f"rng_state_{self.args.process_index}.pth"
        torch.save(self.ctx.rng_override, os.path.join(output_dir, name))

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        finally:
            # However training ends (done, stopped, crashed, out of memory), the copy in flight is
            # finished before anything else happens: an emergency checkpoint, the exit report, the exit.
            if self.ctx.snapshots is not None:
                self.ctx.snapshots.close()

    def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> None:
        super()._maybe_log_save_evaluate(*args, **kwargs)
        if self.ctx.snapshots is not None:
            self.ctx.snapshots.after_boundary_work(self)

    # -- data loading -------------------------------------------------------------------

    def _get_dataloader(self, *args: Any, **kwargs: Any) -> Any:
        dl = super()._get_dataloader(*args, **kwargs)
        if self.args.dataloader_num_workers > 0:
            base = getattr(dl, "base_dataloader", dl)  # accelerate wraps the torch DataLoader
            base.worker_init_fn = _IgnoreStopSignals(base.worker_init_fn)
        return dl

    # -- loading ------------------------------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        ckpt.load_weights_strict(model if model is not None else self.model, Path(resume_from_checkpoint))

    def _load_best_model(self) -> None:
        if self.ctx.stop.requested or self.state.global_step < self.state.max_steps:
            return  # an interrupted run keeps training from where it stopped, not from the best
        best = self.state.best_model_checkpoint
        if best is None:
            return  # transformers only calls this with a best checkpoint; nothing to load otherwise
        if self.ctx.snapshots is not None:
            self.ctx.snapshots.join()  # the copy reads the weights this replaces
        log.info("Loading best model from %s (%s %s)", best, self.args.metric_for_best_model, self.state.best_metric)
        ckpt.load_weights_strict(self.model, Path(best))

    # -- evaluation ---------------------------------------------------------------------

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        self.ctx.heartbeat.update(state=protocol.HB_EVALUATING, force=True)
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.ctx.heartbeat.update(
                state=protocol.HB_STOPPING if self.ctx.stop.requested else protocol.HB_TRAINING, force=True
            )


class SupervisionCallback(TrainerCallback):
    """Turns stop signals into "save at the end of this step", keeps the heartbeat,
    remembers where in a step we are (for the emergency checkpoint after an OOM)."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self._t_step: float | None = None
        self._rate: float | None = None
        self._last_loss: float | None = None
        self._cuda = torch.cuda.is_available()  # asked once: it is not free at every step

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kw: Any) -> None:
        # A resume reloads trainer_state.json, whose logging/eval/save intervals would silently
        # override the config's: the config in force decides.
        state.compute_steps(args, state.max_steps)
        limit = set_memory_headroom_from_env()
        if limit:
            log.warning("Address space limited to %.0f MiB (VIT_MEMORY_HEADROOM_MB)", limit / 2**20)
        self.ctx.phase = "boundary"
        # The Trainer restores a checkpoint's RNG states after this call: the first step end reads them.
        self.ctx.rng.reset()
        self.ctx.heartbeat.update(
            state=protocol.HB_TRAINING,
            global_step=state.global_step,
            start_step=state.global_step,
            max_steps=state.max_steps,
            epoch=state.epoch,
            force=True,
        )

    def on_step_begin(self, args: TrainingArguments, state: Any, control: Any, **kw: Any) -> None:
        self.ctx.phase = "forward"
        if self._t_step is None:
            self._t_step = time.monotonic()

    def on_pre_optimizer_step(self, args: TrainingArguments, state: Any, control: Any, **kw: Any) -> None:
        if self.ctx.snapshots is not None:
            self.ctx.snapshots.join()  # the snapshot's copy reads the weights this step changes
        self.ctx.phase = "optimizer"

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kw: Any) -> None:
        ctx = self.ctx
        ctx.phase = "boundary"
        ctx.rng.capture()
        due = ctx.snapshots.step_end(state.global_step) if ctx.snapshots is not None else False
        now = time.monotonic()
        if self._t_step is not None:
            dt = max(now - self._t_step, 1e-6)
            inst = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1) / dt
            self._rate = inst if self._rate is None else 0.8 * self._rate + 0.2 * inst
        self._t_step = now
        if ctx.parent.parent_gone():
            ctx.stop.request("the supervisor process is gone")
        # One collective for both votes (a no-op in a single process): every rank stops at the same
        # step, and every rank snapshots the same steps (some rank's interval wants this one).
        stop_any, due_any = any_ranks([ctx.stop.requested, due], args.device)
        if due_any and ctx.snapshots is not None:
            ctx.snapshots.mark_due(state.global_step)
        if stop_any and not ctx.stop.requested:
            ctx.stop.request("another rank was asked to stop")
        if ctx.stop.requested:
            ctx.stop.take()
            log.warning("%s: saving a checkpoint at step %d, then exiting", ctx.stop.describe(), state.global_step)
            control.should_save = True
            control.should_training_stop = True
        if state.global_step >= state.max_steps:
            control.should_save = True  # the last step is always committed
        gpu = {"gpu_mem_peak_bytes": torch.cuda.max_memory_allocated()} if self._cuda else {}
        ctx.heartbeat.update(
            state=protocol.HB_STOPPING if ctx.stop.requested else protocol.HB_TRAINING,
            global_step=state.global_step,
            max_steps=state.max_steps,
            **gpu,
            epoch=round(state.epoch or 0.0, 4),
            loss=self._last_loss,
            samples_per_s=round(self._rate, 2) if self._rate else None,
            force=ctx.stop.requested,
        )

    def on_epoch_end(self, args: TrainingArguments, state: Any, control: Any, **kw: Any) -> None:
        if self.ctx.snapshots is not None:
            self.ctx.snapshots.epoch_ending = True
        if self.ctx.stop.requested:
            # A stop breaks out mid-epoch; the Trainer would still run its epoch-end evaluation
            # (and, under torchrun, its collectives) before exiting. The step is committed: go.
            control.should_evaluate = False
            control.should_save = False

    def on_log(
        self, args: TrainingArguments, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if not logs:
            return
        if "loss" in logs:
            self._last_loss = float(logs["loss"])
        if state.is_world_process_zero:
            # Every attempt appends here, steps that a restart redoes included: the run report
            # draws one curve across attempts from it. JSON lines survive a kill mid-write.
            row = {
                "time": time.time(),
                "attempt": attempt(),
                "step": state.global_step,
                "epoch": state.epoch,
                "per_device_train_batch_size": args.per_device_train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
            }
            try:
                with open(protocol.metrics_path(self.ctx.output_dir), "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError:
                pass


def compute_metrics(pred: Any) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    y = np.argmax(logits, axis=-1)
    return {
        "accuracy": float(accuracy_score(pred.label_ids, y)),
        "f1": float(f1_score(pred.label_ids, y, average="macro")),
    }


def training_arguments(cfg: Config, report_to: list[str]) -> TrainingArguments:
    t = cfg.training
    warmup: float = t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio
    return TrainingArguments(
        output_dir=str(cfg.output_dir),
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=warmup,
        lr_scheduler_type=t.lr_scheduler_type,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_strategy="steps",
        eval_strategy=t.eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=t.load_best_model_at_end,
        metric_for_best_model=t.metric_for_best_model,
        greater_is_better=t.greater_is_better,
        dataloader_num_workers=t.dataloader_num_workers,
        seed=t.seed,
        data_seed=t.seed,
        fp16=t.fp16,
        bf16=t.bf16,
        tf32=t.tf32,
        full_determinism=t.full_determinism,
        optim=t.optim,
        report_to=report_to,
        run_name=cfg.tracking.run_name or cfg.output_dir.name,
        disable_tqdm=True,
        remove_unused_columns=False,
        save_only_model=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without a GPU, torchrun ranks train with DDP over gloo (accelerate's MULTI_CPU needs use_cpu).
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if not torch.cuda.is_available() and fault_world_size() > 1 else None,
    )


def emergency_checkpoint(trainer: SupervisedTrainer) -> Path | None:
    """After an OOM, commit the last completed step if the weights are still those of a step
    boundary (the OOM hit in forward/backward or evaluation, not inside the optimizer step)."""
    ctx = trainer.ctx
    step = trainer.state.global_step
    if trainer.args.world_size > 1:
        log.warning(
            "No emergency checkpoint: with several ranks the others may be inside a collective, "
            "so a coordinated save cannot be made; the newest committed checkpoint stands"
        )
        return None
    if step <= 0 or trainer.optimizer is None:
        log.warning("No emergency checkpoint: no optimizer step had completed")
        return None
    if ctx.phase not in ("forward", "boundary"):
        log.warning(
            "No emergency checkpoint: the OOM hit inside the optimizer step, so the weights are "
            "half-updated; the newest committed checkpoint stands"
        )
        return None
    if ctx.last_checkpoint is not None and ckpt.step_of(ctx.last_checkpoint) == step:
        return ctx.last_checkpoint
    rng = ctx.rng.at_boundary()
    if rng is None:
        log.warning(
            "No emergency checkpoint: the random states at the last step boundary are not known exactly "
            "(no step ended in this attempt, or Python's or NumPy's generator moved since it was last read); "
            "the newest committed checkpoint stands"
        )
        return None
    if trainer.model is not None:
        trainer.model.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    ctx.rng_override = rng
    try:
        path = trainer.commit_checkpoint()
    except BaseException as exc:  # the save itself may run out of memory
        log.warning("Emergency checkpoint failed (%s: %s); the previous checkpoint stands", type(exc).__name__, exc)
        return None
    finally:
        ctx.rng_override = None
    log.warning("Emergency checkpoint %s committed after the out-of-memory: no step is lost", path.name)
    return path
