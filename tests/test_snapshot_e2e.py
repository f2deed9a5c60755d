"""Snapshots wired into the worker (issue 12 step 2): a kill during the snapshot copy resumes from the
previous snapshot bit-identically; the snapshot after an evaluation equals that step's checkpoint; off
means off. Kills at random instants, corrupt snapshots and the other faults: test_snapshot_faults_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import heartbeat, vit_train, wait_for
from tests.test_worker_e2e import TIMEOUT, max_abs_diff, run_to_end, write_cfg

pytestmark = pytest.mark.e2e


def snapshot_header(base: Path) -> dict[str, Any]:
    """The header of the one store under ``base`` ({} while there is none)."""
    for h in base.glob("vit-supervisor-*/*/header.json"):
        try:
            return dict(json.loads(h.read_bytes()))
        except ValueError:
            return {}  # never torn (atomic rename), but stay safe
    return {}


def kill_with_snapshot_at(cfg: Path, out: Path, shm: Path, step: int) -> int:
    """SIGKILL the worker once both its heartbeat and its newest snapshot reached ``step``;
    return the killed worker's last heartbeat step."""
    p = vit_train(cfg)
    try:
        wait_for(
            lambda: (
                ((heartbeat(out).get("global_step") or 0) >= step and snapshot_header(shm).get("step", 0) >= step)
                or p.poll() is not None
            ),
            TIMEOUT,
            f"step {step} with its snapshot",
            interval=0.005,
        )
    finally:
        p.kill()
        p.communicate()
    assert p.returncode == -9, "the worker ended before it was killed"
    return int(heartbeat(out)["global_step"])


def test_snapshots_off_create_no_store(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    cfg = write_cfg(
        tmp_path / "c.yaml", {"training": {"max_steps": 2}, "snapshot": {"every_steps": 0, "root": str(shm)}}
    )
    run_to_end(cfg)
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    assert not shm.exists()


def test_snapshot_after_epoch_evaluation_equals_the_checkpoint_of_that_step(make_config: Any, tmp_path: Path) -> None:
    """In process: step 19 ends epoch 1, where the Trainer evaluates and then saves (save_strategy
    epoch). The snapshot of step 19 must hold the same state as checkpoint-19, RNG included, which
    is not the RNG at ``on_step_end`` (the evaluation's DataLoader draws from it). (Step 20, the last,
    is saved too, and so snapshotted before its save: the snapshot of 19 is read before step 20.)"""
    import torch
    from transformers import TrainerCallback

    from supervisor.schema import load_config
    from tests.test_snapshot_unit import _bytes_io, _same
    from worker import snapshot as snap
    from worker.fault import StopRequest
    from worker.train import compute_metrics, open_context, prepare, snapshot_store, training_arguments
    from worker.trainer import Snapshots, SupervisedTrainer, SupervisionCallback, snapshot_rng

    overrides = {
        "training": {"max_steps": 20, "save_strategy": "epoch", "eval_strategy": "epoch"},
        "snapshot": {"every_steps": 19, "root": str(tmp_path / "shm")},
    }
    cfg = load_config(make_config(overrides))
    ctx = open_context(cfg, StopRequest())
    prepared = prepare(cfg)
    store = snapshot_store(cfg, prepared.splits.fingerprint)
    assert store is not None
    ctx.snapshots = Snapshots(store, cfg.snapshot.every_steps)
    at_step_end: dict[int, Any] = {}
    newest: dict[int, Any] = {}

    class RecordRng(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            at_step_end[state.global_step] = snapshot_rng()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            assert ctx.snapshots is not None and store is not None
            ctx.snapshots.join()
            newest[state.global_step] = store.read_newest()

    trainer = SupervisedTrainer(
        model=prepared.model,
        args=training_arguments(cfg, []),
        train_dataset=prepared.splits.train,
        eval_dataset=prepared.splits.eval,
        compute_metrics=compute_metrics,
        callbacks=[SupervisionCallback(ctx), RecordRng()],
        ctx=ctx,
    )
    trainer.train()
    got = newest[19]
    assert got is not None and got.step == 19 and got.tensors is not None
    assert "model.safetensors" not in got.files and "optimizer.pt" not in got.files  # held raw
    own = cfg.output_dir / "checkpoint-19"
    mine = snap.materialize(got, tmp_path / "from-snapshot")
    assert {p.name for p in mine.iterdir()} == {p.name for p in own.iterdir()}
    for name in ("config.json", "model.safetensors"):
        assert (mine / name).read_bytes() == (own / name).read_bytes(), name
    args = (torch.load(d / "training_args.bin", weights_only=False).to_dict() for d in (mine, own))
    assert next(args) == next(args)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        assert _same(torch.load(mine / name, weights_only=False), torch.load(own / name, weights_only=False)), name
    # TrainerControl's flags are those in flight when each was written (the checkpoint's is written
    # with should_save still set); the Trainer restores them only with
    # restore_callback_states_from_checkpoint, which the worker does not set.
    state, theirs = (json.loads((d / "trainer_state.json").read_bytes()) for d in (mine, own))
    for s in (state, theirs):
        s["stateful_callbacks"].pop("TrainerControl")
    assert state == theirs
    rng = torch.load(_bytes_io(snap.checkpoint_files(got.files)["rng_state.pth"]), weights_only=False)
    assert not _same(rng, at_step_end[19]), "evaluation no longer draws from the RNG: this test proves nothing"
    # Of step 19 (before its save), step 20 before its save, and step 20 again after the epoch-end
    # evaluation that follows the last step's save.
    assert len(ctx.snapshots.seconds) == 3 and len(ctx.snapshots.exposed) == 3


def test_sigkill_during_the_snapshot_copy_resumes_from_the_previous_snapshot_bit_identical(
    tmp_path: Path, reference_tiny: Path
) -> None:
    """The copy of step 12's snapshot is held halfway (tests/snapshot_inject.py): its slot is half
    written, training waits at step 13's optimizer step. SIGKILL then: the header still names
    step 11's slot, the resume takes it, and the run ends bit-identical to the uninterrupted one."""
    import subprocess

    from tests.conftest import PYTHON, REPO, worker_env

    shm = tmp_path / "shm"
    cfg = write_cfg(
        tmp_path / "c.yaml", {"training": {"save_steps": 100}, "snapshot": {"every_steps": 1, "root": str(shm)}}
    )
    out = tmp_path / "out"
    marker = tmp_path / "copy-held"
    p = subprocess.Popen(
        [PYTHON, str(REPO / "tests" / "snapshot_inject.py"), "hold-copy:12", str(marker), str(cfg)],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: marker.exists() or p.poll() is not None, TIMEOUT, "the held snapshot copy", interval=0.02)
        assert p.poll() is None, "the worker ended before its copy was held"
        held = json.loads(marker.read_text())
        assert 0 < held["written"] < held["size"]  # inside the copy, not before or after it
        header = snapshot_header(shm)
        assert header["step"] == 11  # the new slot is not committed
        torn = next(shm.glob(f"vit-supervisor-*/*/slot-{1 - header['slot']}"))
        assert torn.stat().st_size > 0  # half of step 12 is in the other slot
        assert (heartbeat(out).get("global_step") or 0) <= 12  # training waits for the copy
    finally:
        p.kill()
        log, _ = p.communicate()
    assert p.returncode == -9, log[-3000:]
    assert not list(out.glob("checkpoint-*"))
    log = run_to_end(cfg, "--resume")
    assert "Training will resume from snapshot step 11 (newer than any disk checkpoint)" in log, log[-3000:]
    assert max_abs_diff(out / "checkpoint-38", reference_tiny) == 0.0
