"""Checkpoint validation, set-aside and the disk guard, on real files without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker import checkpoint as ckpt
from worker.disk import DiskGuard, DiskLow, StoppedWhileWaiting


@pytest.fixture
def good_checkpoint(short_run: Path) -> Path:
    """A real committed checkpoint written by the worker's own save path (5 steps of TINY; the
    session's shared run, so read only)."""
    return short_run / "checkpoint-5"


def copy_run(src: Path, dst_root: Path, steps: list[int]) -> Path:
    """An output dir with copies of ``src`` renamed to each step (manifests patched to match)."""
    import shutil

    out = dst_root / "out"
    for s in steps:
        d = out / f"checkpoint-{s}"
        shutil.copytree(src, d)
        state = json.loads((d / "trainer_state.json").read_text())
        state["global_step"] = s
        (d / "trainer_state.json").write_text(json.dumps(state))
        (d / ckpt.MANIFEST).unlink()
        ckpt.commit(d, d.with_name(f".tmp-{s}"), s)
        (d.with_name(f".tmp-{s}")).rename(d)
    return out


def test_committed_checkpoint_validates(good_checkpoint: Path) -> None:
    state = ckpt.validate(good_checkpoint)
    assert state["global_step"] == 5
    manifest = json.loads((good_checkpoint / ckpt.MANIFEST).read_text())
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state.pth"} <= set(manifest["files"])


@pytest.mark.parametrize(
    "breakage,expect",
    [
        ("truncate_safetensors", "model.safetensors"),
        ("missing_optimizer", "missing optimizer.pt"),
        ("empty_dir", "empty"),
        ("bad_json", "trainer_state.json"),
        ("step_mismatch", "global_step"),
    ],
)
def test_broken_checkpoint_is_set_aside_and_the_older_good_one_is_used(
    good_checkpoint: Path, tmp_path: Path, breakage: str, expect: str
) -> None:
    out = copy_run(good_checkpoint, tmp_path, [5, 10])
    newest = out / "checkpoint-10"
    if breakage == "truncate_safetensors":
        f = newest / "model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    elif breakage == "missing_optimizer":
        (newest / "optimizer.pt").unlink()
    elif breakage == "empty_dir":
        for f in newest.iterdir():
            f.unlink()
    elif breakage == "bad_json":
        (newest / "trainer_state.json").write_text("{not json")
        (newest / ckpt.MANIFEST).unlink()  # a foreign checkpoint: only the contents can tell
    elif breakage == "step_mismatch":
        (newest / ckpt.MANIFEST).unlink()
        state = json.loads((newest / "trainer_state.json").read_text())
        state["global_step"] = 7
        (newest / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ckpt.CheckpointInvalid, match=expect):
        ckpt.validate(newest)
    assert ckpt.newest_good(out) == out / "checkpoint-5"
    aside = list((out / ckpt.SET_ASIDE).iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("checkpoint-10.")
    assert expect.split()[-1] in (aside[0] / "REASON.txt").read_text()


def test_flipped_byte_is_caught_by_the_manifest_hash(good_checkpoint: Path, tmp_path: Path) -> None:
    out = copy_run(good_checkpoint, tmp_path, [5])
    f = out / "checkpoint-5" / "optimizer.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointInvalid, match="SHA-256"):
        ckpt.validate(out / "checkpoint-5")


def test_staging_folders_are_outside_the_checkpoint_pattern(tmp_path: Path) -> None:
    s = ckpt.staging_dir(tmp_path, 7)
    s.mkdir()
    assert ckpt.list_checkpoints(tmp_path) == []
    assert not list(tmp_path.glob("checkpoint-*"))
    ckpt.clean_staging(tmp_path)
    assert not s.exists()


def test_rotation_candidates_never_include_newest_or_best(tmp_path: Path) -> None:
    for s in (5, 10, 15, 20):
        (tmp_path / f"checkpoint-{s}").mkdir()
        (tmp_path / f"checkpoint-{s}" / ckpt.MANIFEST).write_text("{}")  # committed by us: rotation may remove it
    victims = ckpt.rotation_candidates(tmp_path, keep=1, best=str(tmp_path / "checkpoint-5"))
    assert [v.name for v in victims] == ["checkpoint-10", "checkpoint-15"]
    assert ckpt.rotation_candidates(tmp_path, keep=4, best=None) == []


class FakeDisk:
    """Scripted free space: each call pops the next value (the last one repeats)."""

    def __init__(self, *values: int) -> None:
        self.values = list(values)
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


def test_disk_guard_passes_when_there_is_room(tmp_path: Path) -> None:
    g = DiskGuard(tmp_path, 100, "wait", 1.0, free_bytes=FakeDisk(1000))
    g.ensure(500, lambda: pytest.fail("nothing should be removed"))


def test_disk_guard_makes_room_from_rotation_before_waiting(tmp_path: Path) -> None:
    old = tmp_path / "checkpoint-5"
    old.mkdir()
    g = DiskGuard(
        tmp_path, 100, "wait", 1.0, free_bytes=FakeDisk(300, 900), sleep=lambda s: pytest.fail("should not wait")
    )
    g.ensure(500, lambda: [old])
    assert not old.exists()


def test_disk_guard_stops_with_disk_low_when_configured(tmp_path: Path) -> None:
    g = DiskGuard(tmp_path, 100, "stop", 1.0, free_bytes=FakeDisk(300))
    with pytest.raises(DiskLow) as e:
        g.ensure(500, lambda: [])
    assert e.value.needed == 600 and e.value.free == 300


def test_disk_guard_waits_until_space_appears(tmp_path: Path) -> None:
    waits: list[tuple[int, int]] = []
    sleeps: list[float] = []
    g = DiskGuard(
        tmp_path,
        100,
        "wait",
        2.5,
        free_bytes=FakeDisk(300, 300, 400, 700),
        on_wait=lambda n, f: waits.append((n, f)),
        sleep=sleeps.append,
    )
    g.ensure(500, lambda: [])
    assert waits == [(600, 300), (600, 300), (600, 400)] and sleeps == [2.5, 2.5, 2.5]


def test_disk_guard_stop_while_waiting_raises(tmp_path: Path) -> None:
    stop = {"now": False}

    def sleep(_: float) -> None:
        stop["now"] = True

    g = DiskGuard(tmp_path, 0, "wait", 1.0, free_bytes=FakeDisk(10), stop_requested=lambda: stop["now"], sleep=sleep)
    with pytest.raises(StoppedWhileWaiting):
        g.ensure(500, lambda: [])
