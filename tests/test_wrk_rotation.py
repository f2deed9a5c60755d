"""Checkpoint rotation deletes only what the worker committed (issue 11, bug 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY, deep_update, vit_train
from worker import checkpoint as ckpt


def ours(out: Path, step: int) -> Path:
    """A folder as the worker commits it: exact name and our manifest."""
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / ckpt.MANIFEST).write_text(json.dumps({"format": 1, "step": step, "files": {}}))
    return d


def foreign(out: Path, name: str) -> Path:
    d = out / name
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("the user's\n")
    return d


def test_rotation_keeps_the_newest_and_the_best_and_deletes_only_our_older_checkpoints(tmp_path: Path) -> None:
    for s in (5, 10, 15, 20, 25):
        ours(tmp_path, s)
    deleted = ckpt.rotate(tmp_path, keep=2, best=str(tmp_path / "checkpoint-5"))
    assert sorted(p.name for p in deleted) == ["checkpoint-10", "checkpoint-15", "checkpoint-20"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-25", "checkpoint-5"]


@pytest.mark.parametrize(
    "name",
    ["checkpoint-1.bak", "checkpoint-1-old", "old-checkpoint-1", "checkpoint-01x", "my_checkpoint-3", "checkpoint-"],
)
def test_rotation_never_deletes_a_folder_whose_name_merely_contains_checkpoint_n(tmp_path: Path, name: str) -> None:
    user = foreign(tmp_path, name)
    for s in (5, 10, 15):
        ours(tmp_path, s)
    ckpt.rotate(tmp_path, keep=2, best=None)
    assert (user / "notes.txt").read_text() == "the user's\n"
    assert not (tmp_path / "checkpoint-5").exists()


def test_rotation_never_deletes_an_exact_checkpoint_n_without_our_manifest(tmp_path: Path) -> None:
    user = foreign(tmp_path, "checkpoint-1")  # e.g. copied in from a plain transformers run
    for s in (5, 10, 15):
        ours(tmp_path, s)
    assert user not in ckpt.rotation_candidates(tmp_path, keep=1, best=None)
    ckpt.rotate(tmp_path, keep=2, best=None)
    assert (user / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-10", "checkpoint-15"]


def test_rotation_of_a_file_named_like_a_checkpoint_leaves_it(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-2").write_text("a file, not ours")
    for s in (5, 10, 15):
        ours(tmp_path, s)
    ckpt.rotate(tmp_path, keep=2, best=None)
    assert (tmp_path / "checkpoint-2").read_text() == "a file, not ours"


@pytest.mark.e2e
def test_training_leaves_user_folders_named_like_checkpoints_alone(tmp_path: Path) -> None:
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(deep_update(TINY, {"training": {"max_steps": 20}})))
    out = tmp_path / "out"
    keep = [foreign(out, "checkpoint-10.bak"), foreign(out, "checkpoint-3-before-refactor")]
    p = vit_train(cfg)
    log, _ = p.communicate(timeout=180)
    assert p.returncode == 0, log[-3000:]
    for d in keep:
        assert (d / "notes.txt").read_text() == "the user's\n", d
    assert sorted(p.name for p in ckpt.list_checkpoints(out)) == ["checkpoint-10", "checkpoint-15", "checkpoint-20"]
