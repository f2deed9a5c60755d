"""The snapshot store's header with a ``previous`` entry (worker/snapshot.py), and the ranks'
agreement on the newest step they all hold (worker/train.py ``common_snapshot``).

The store tests use tmp_path as the root and never import torch. The commit protocol is cut
at each of its points (before and after each header replacement, in the middle of the slot
write) the way a kill would cut it; a real SIGKILL at random instants closes the section.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from worker import snapshot as snap
from worker.snapshot import HEADER, SLOTS, SnapshotStore

REPO = Path(__file__).resolve().parents[1]
IDENTITY = {"config_sha": "abc", "data_fingerprint": "d1", "world_size": 2, "rank": 0}


def state(step: int) -> bytes:
    return json.dumps({"global_step": step, "log_history": []}).encode()


def files_of(step: int, size: int = 1000, tag: str = "") -> dict[str, bytes]:
    body = (f"{tag}step {step};".encode() * (size // 8 + 1))[:size]
    return {"trainer_state.json": state(step), "model.safetensors": body, "optimizer.pt": body[::-1]}


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "shm", IDENTITY)


def header(store: SnapshotStore) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((store.root / HEADER).read_text())
    return result


def write_header(store: SnapshotStore, h: dict[str, Any]) -> None:
    (store.root / HEADER).write_text(json.dumps(h))


def written(*steps: int, root: Path) -> SnapshotStore:
    s = SnapshotStore(root, IDENTITY)
    for step in steps:
        s.write(step, files_of(step))
    return s


# ----------------------------------------------------------------------------- newest and previous


def test_header_names_the_newest_and_the_previous_snapshot(store: SnapshotStore) -> None:
    store.write(1, files_of(1))
    assert "previous" not in header(store)  # nothing before the first
    assert store.listed_steps() == store.available_steps() == [1]
    store.write(2, files_of(2))
    h = header(store)
    assert (h["slot"], h["step"], h["generation"]) == (1, 2, 2)
    prev = h["previous"]
    assert (prev["slot"], prev["step"], prev["generation"]) == (0, 1, 1)
    assert set(prev) == {"generation", "slot", "step", "size", "digest", "time"}
    assert store.listed_steps() == store.available_steps() == [2, 1]
    for step in (1, 2):
        got = store.read_step(step)
        assert got is not None and got.step == step and got.files == files_of(step)
    assert store.read_newest().step == 2  # type: ignore[union-attr]
    store.write(3, files_of(3))
    assert store.available_steps() == [3, 2]
    assert store.read_step(1) is None  # overwritten: no longer offered


def test_read_step_of_a_step_the_store_does_not_hold_is_none_with_a_line(
    store: SnapshotStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.write(4, files_of(4))
    store.write(5, files_of(5))
    with caplog.at_level(logging.WARNING, logger="vit_train"):
        assert store.read_step(3) is None
    assert "No snapshot of step 3" in caplog.text
    assert SnapshotStore(store.root.parent / "empty", IDENTITY).read_step(3) is None
    assert SnapshotStore(store.root.parent / "empty", IDENTITY).available_steps() == []


def test_the_writer_never_opens_a_slot_that_the_header_names(
    store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The invariant itself: whenever a slot is opened for writing, no header entry names it."""
    real_open = os.open
    checked: list[int] = []

    def watching_open(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        name = os.path.basename(os.fspath(path))
        if name in SLOTS and flags & os.O_RDWR:
            h = header(store) if (store.root / HEADER).exists() else {}
            named = {h.get("slot"), (h.get("previous") or {}).get("slot")} - {None}
            assert SLOTS.index(name) not in named, f"{name} is named by the header {h}"
            checked.append(SLOTS.index(name))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(snap.os, "open", watching_open)
    for step in range(1, 7):
        store.write(step, files_of(step))
        again = SnapshotStore(store.root, IDENTITY)  # a restarted writer too
        again.write(step + 100, files_of(step + 100))
        store = again
    assert len(checked) == 12


def test_a_restarted_writer_does_not_offer_a_step_from_the_abandoned_future(store: SnapshotStore) -> None:
    """A worker resumed from an older disk checkpoint (no common snapshot step) snapshots lower steps
    than the store holds: those higher steps belong to a timeline that training left."""
    for step in (4, 5):
        store.write(step, files_of(step))
    again = SnapshotStore(store.root, IDENTITY)
    again.write(3, files_of(3))
    assert "previous" not in header(again)
    assert again.available_steps() == [3]
    again.write(4, files_of(4, tag="new"))
    assert again.available_steps() == [4, 3]
    assert again.read_step(4).files == files_of(4, tag="new")  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- a kill at each point


class Killed(BaseException):
    """Where the protocol was cut: nothing after it ran (BaseException, like a signal's exit)."""


@pytest.mark.parametrize(
    ("point", "newest", "offered"),
    [
        ("before_unnaming", 2, [2, 1]),  # the old header stands: both entries, both slots untouched
        ("after_unnaming", 2, [2]),  # the previous slot is about to be written: no longer named
        ("mid_slot", 2, [2]),
        ("before_commit", 2, [2]),  # the slot is complete but not named
        ("after_commit", 3, [3, 2]),
    ],
)
def test_a_kill_at_each_point_of_the_commit_leaves_a_valid_newest(
    store: SnapshotStore, monkeypatch: pytest.MonkeyPatch, point: str, newest: int, offered: list[int]
) -> None:
    store.write(1, files_of(1, 50_000))
    store.write(2, files_of(2, 50_000))  # slot 1 newest, slot 0 (step 1) previous: the next write's slot
    real_header, real_put = SnapshotStore._write_header, snap._put
    headers = [0]

    def cut_header(self: SnapshotStore, h: dict[str, Any]) -> None:
        headers[0] += 1
        if (point, headers[0]) in (("before_unnaming", 1), ("before_commit", 2)):
            raise Killed
        real_header(self, h)
        if (point, headers[0]) in (("after_unnaming", 1), ("after_commit", 2)):
            raise Killed

    def cut_put(view: memoryview, at: int, piece: Any) -> int:
        if point == "mid_slot" and memoryview(piece).nbytes > 10_000:  # a file's body, not the index
            real_put(view, at, bytes(memoryview(piece)[:7000]))
            raise Killed
        return real_put(view, at, piece)

    monkeypatch.setattr(SnapshotStore, "_write_header", cut_header)
    monkeypatch.setattr(snap, "_put", cut_put)
    with pytest.raises(Killed):
        store.write(3, files_of(3, 50_000))
    monkeypatch.undo()
    reader = SnapshotStore(store.root, IDENTITY)  # what the restarted worker sees
    assert reader.read_newest().step == newest  # type: ignore[union-attr]
    assert reader.available_steps() == reader.listed_steps() == offered
    for step in offered:
        assert reader.read_step(step).files == files_of(step, 50_000)  # type: ignore[union-attr]
    # The restarted worker resumes from the newest and snapshots on; the store stays consistent.
    reader.write(newest + 1, files_of(newest + 1))
    assert reader.available_steps() == [newest + 1, newest]


@pytest.mark.parametrize("cut", [0, 1, 16, "half", "all_but_one", "garbage_same_size", "missing"])
def test_a_slot_abandoned_mid_write_is_never_offered(
    store: SnapshotStore, monkeypatch: pytest.MonkeyPatch, cut: int | str
) -> None:
    """The writer was killed while writing the previous entry's slot (header without ``previous``),
    leaving that slot cut at any length or garbled: only the newest is offered."""
    store.write(1, files_of(1))
    store.write(2, files_of(2))
    h = header(store)
    write_header(store, {k: v for k, v in h.items() if k != "previous"})  # what the un-naming leaves
    slot = store.root / SLOTS[h["previous"]["slot"]]
    raw = slot.read_bytes()
    if cut == "missing":
        slot.unlink()
    elif cut == "garbage_same_size":
        slot.write_bytes(os.urandom(len(raw)))
    else:
        n = {"half": len(raw) // 2, "all_but_one": len(raw) - 1}.get(str(cut), cut)
        slot.write_bytes(raw[: int(n)])
    assert store.available_steps() == store.listed_steps() == [2]
    assert store.read_step(1) is None


# ----------------------------------------------------------------------------- damage, newest vs previous


def flip(path: Path, where: float = 0.5) -> None:
    raw = bytearray(path.read_bytes())
    raw[min(int(len(raw) * where), len(raw) - 1)] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("where", [0.0, 0.5, 1.0])
def test_a_flipped_byte_in_the_previous_slot_leaves_the_newest(
    store: SnapshotStore, caplog: pytest.LogCaptureFixture, where: float
) -> None:
    store.write(1, files_of(1))
    store.write(2, files_of(2))
    flip(store.root / "slot-0", where)
    with caplog.at_level(logging.WARNING, logger="vit_train"):
        assert store.available_steps() == [2]
    assert "step 1" in caplog.text
    assert store.listed_steps() == [2, 1]  # the header alone cannot tell: reading does
    assert store.read_step(1) is None
    assert store.read_newest().files == files_of(2)  # type: ignore[union-attr]


@pytest.mark.parametrize("where", [0.0, 0.5, 1.0])
def test_a_flipped_byte_in_the_newest_slot_leaves_the_previous_for_a_multi_rank_resume(
    store: SnapshotStore, caplog: pytest.LogCaptureFixture, where: float
) -> None:
    store.write(1, files_of(1))
    store.write(2, files_of(2))
    flip(store.root / "slot-1", where)
    with caplog.at_level(logging.WARNING, logger="vit_train"):
        assert store.available_steps() == [1]
    assert "step 2" in caplog.text
    assert store.read_step(1).files == files_of(1)  # type: ignore[union-attr]
    assert store.read_newest() is None  # a single process does not fall back (module docstring)


def _prev_change(h: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    prev = dict(h["previous"])
    if value is _DROP:
        del prev[key]
    else:
        prev[key] = value
    return {**h, "previous": prev}


_DROP = object()
HOSTILE_PREVIOUS: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = [
    ("list", lambda h: {**h, "previous": [0, 1]}),
    ("string", lambda h: {**h, "previous": "slot-0"}),
    ("number", lambda h: {**h, "previous": 1}),
    ("null", lambda h: {**h, "previous": None}),
    ("empty", lambda h: {**h, "previous": {}}),
    ("slot_same_as_newest", lambda h: _prev_change(h, "slot", h["slot"])),
    ("slot_2", lambda h: _prev_change(h, "slot", 2)),
    ("slot_bool", lambda h: _prev_change(h, "slot", False)),
    ("slot_str", lambda h: _prev_change(h, "slot", "0")),
    ("slot_float", lambda h: _prev_change(h, "slot", 0.0)),
    ("step_str", lambda h: _prev_change(h, "step", "1")),
    ("step_neg", lambda h: _prev_change(h, "step", -1)),
    ("step_float", lambda h: _prev_change(h, "step", 1.0)),
    ("step_as_new", lambda h: _prev_change(h, "step", h["step"])),
    ("step_newer", lambda h: _prev_change(h, "step", h["step"] + 1)),
    ("step_other", lambda h: _prev_change(h, "step", 0)),  # the slot's index and trainer_state.json say 1
    ("step_missing", lambda h: _prev_change(h, "step", _DROP)),
    ("generation_as_new", lambda h: _prev_change(h, "generation", h["generation"])),
    ("generation_0", lambda h: _prev_change(h, "generation", 0)),
    ("generation_str", lambda h: _prev_change(h, "generation", "1")),
    ("size_float", lambda h: _prev_change(h, "size", float(h["previous"]["size"]))),
    ("size_off_by_one", lambda h: _prev_change(h, "size", h["previous"]["size"] + 1)),
    ("size_missing", lambda h: _prev_change(h, "size", _DROP)),
    ("digest_neg", lambda h: _prev_change(h, "digest", -1)),
    ("digest_big", lambda h: _prev_change(h, "digest", 1 << 64)),
    ("digest_wrong", lambda h: _prev_change(h, "digest", (h["previous"]["digest"] + 1) % (1 << 64))),
    ("digest_str", lambda h: _prev_change(h, "digest", str(h["previous"]["digest"]))),
    ("time_str", lambda h: _prev_change(h, "time", "yesterday")),
    ("time_bool", lambda h: _prev_change(h, "time", True)),
    ("time_inf", lambda h: _prev_change(h, "time", 1e300)),
    ("carries_identity", lambda h: _prev_change(h, "identity", {"someone": "else"})),
    ("carries_format", lambda h: _prev_change(h, "format", 1)),
    ("carries_checksum", lambda h: _prev_change(h, "checksum", "md5")),
    ("nested_previous", lambda h: _prev_change(h, "previous", dict(h["previous"]))),
]


@pytest.mark.parametrize("case", HOSTILE_PREVIOUS, ids=[c[0] for c in HOSTILE_PREVIOUS])
def test_a_wrong_previous_entry_is_ignored_and_the_newest_still_read(
    store: SnapshotStore, case: tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]
) -> None:
    store.write(1, files_of(1))
    store.write(2, files_of(2))
    write_header(store, case[1](header(store)))
    assert store.available_steps() == [2]
    assert store.read_newest().files == files_of(2)  # type: ignore[union-attr]
    assert store.read_step(1) is None
    # The next write un-names whatever was there and records a proper previous entry.
    store2 = SnapshotStore(store.root, IDENTITY)
    store2.write(3, files_of(3))
    assert store2.available_steps() == [3, 2]


def test_a_valid_previous_entry_with_extra_keys_is_still_read(store: SnapshotStore) -> None:
    """A later version may record more per snapshot: unknown keys are not a reason to distrust."""
    store.write(1, files_of(1))
    store.write(2, files_of(2))
    write_header(store, _prev_change(header(store), "note", "from a later version"))
    assert store.available_steps() == [2, 1]


def test_a_wrong_newest_entry_invalidates_the_header_previous_included(store: SnapshotStore) -> None:
    """The header is what vouches for both entries: one that is malformed vouches for nothing."""
    store.write(1, files_of(1))
    store.write(2, files_of(2))
    write_header(store, {**header(store), "slot": "1"})
    assert store.available_steps() == store.listed_steps() == []
    assert store.read_step(1) is None


# ----------------------------------------------------------------------------- a real SIGKILL

CHILD = textwrap.dedent(
    """
    import json, sys
    from worker.snapshot import SnapshotStore
    store = SnapshotStore(sys.argv[1], {"run": "kill-test"})
    found = store.read_newest()
    step = found.step if found else 0
    body = bytearray(2 << 20)
    while True:
        step += 1
        body[:16] = step.to_bytes(16, "little")
        body[-16:] = step.to_bytes(16, "little")
        store.write(step, {"trainer_state.json": json.dumps({"global_step": step}).encode(), "w": bytes(body)})
        sys.stdout.write(f"{step}\\n")
        sys.stdout.flush()
    """
)


def test_sigkill_at_random_instants_leaves_the_newest_and_at_most_the_one_before(tmp_path: Path) -> None:
    root = tmp_path / "shm"
    store = SnapshotStore(root, {"run": "kill-test"})
    rnd = random.Random(21)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with_previous = last = 0
    for _ in range(15):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(root)], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.strip(), "the child wrote nothing"
        time.sleep(rnd.uniform(0, 0.02))
        proc.send_signal(signal.SIGKILL)
        rest = proc.stdout.read()
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        done = int((first + rest).split()[-1])  # the last write the child saw complete
        steps = store.available_steps()
        assert steps and steps[0] in (done, done + 1), (steps, done)
        newest = store.read_newest()  # the single-process resume path reads the same newest step
        assert newest is not None and newest.step == steps[0] > last  # each child resumed and moved on
        last = newest.step
        assert steps == store.listed_steps()  # nothing the header names is torn
        assert steps in ([steps[0]], [steps[0], steps[0] - 1])
        with_previous += len(steps) == 2
        for step in steps:
            body = store.read_step(step).files["w"]  # type: ignore[union-attr]
            assert int.from_bytes(body[:16], "little") == step == int.from_bytes(body[-16:], "little")
    assert with_previous > 0  # most kills land outside the short window without a previous entry


# ----------------------------------------------------------------------------- the ranks' agreement


class FakeGroup:
    """Collectives for ranks played by threads: what ``common_snapshot`` exchanges, in rank order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.local = threading.local()
        self.gate = threading.Barrier(size, timeout=30)
        self.box: list[Any] = [None] * size
        self.rounds = 0

    def rank(self) -> int:
        r: int = self.local.rank
        return r

    def all_gather(self, obj: Any) -> list[Any]:
        self.box[self.rank()] = obj
        self.gate.wait()
        out = list(self.box)
        if self.rank() == 0:
            self.rounds += 1
        self.gate.wait()
        return out

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        out = self.all_gather(obj)
        return out if self.rank() == 0 else None


@pytest.fixture
def agree(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[list[SnapshotStore | None]], tuple[Any, FakeGroup]]]:
    """Run ``common_snapshot`` on one store per rank, each rank in its own thread; rank 0's result."""
    from worker import fault
    from worker import train as train_mod

    def run(stores: list[SnapshotStore | None]) -> tuple[Any, FakeGroup]:
        group = FakeGroup(len(stores))
        monkeypatch.setattr(train_mod, "all_gather", group.all_gather)
        monkeypatch.setattr(train_mod, "gather_to_main", group.gather_to_main)
        monkeypatch.setattr(fault, "rank", group.rank)
        results: list[Any] = [None] * len(stores)
        errors: list[BaseException] = []

        def rank_main(r: int) -> None:
            group.local.rank = r
            try:
                results[r] = train_mod.common_snapshot(stores[r])
            except BaseException as exc:
                errors.append(exc)
                group.gate.abort()

        threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert all(r is None for r in results[1:])
        return results[0], group

    yield run


def rank_files(step: int, rank: int) -> dict[str, bytes]:
    if rank == 0:
        return {**files_of(step), "rng_state_0.pth": f"rng0@{step}".encode()}
    return {"trainer_state.json": state(step), f"rng_state_{rank}.pth": f"rng{rank}@{step}".encode()}


def rank_stores(tmp_path: Path, *steps_per_rank: tuple[int, ...]) -> list[SnapshotStore | None]:
    stores: list[SnapshotStore | None] = []
    for r, steps in enumerate(steps_per_rank):
        s = SnapshotStore(tmp_path / f"rank{r}", {**IDENTITY, "rank": r})
        for step in steps:
            s.write(step, rank_files(step, r))
        stores.append(s)
    return stores


def test_ranks_in_step_agree_on_the_newest_and_rank_0_gets_every_part(tmp_path: Path, agree: Any) -> None:
    got, group = agree(rank_stores(tmp_path, (4, 5), (4, 5), (4, 5)))
    assert got is not None and got.step == 5
    assert got.files == {
        **rank_files(5, 0),
        "rng_state_1.pth": b"rng1@5",
        "rng_state_2.pth": b"rng2@5",
    }  # rank 0's trainer_state.json, every rank's RNG
    assert group.rounds == 3  # offers, reads, parts: one agreement round


def test_a_rank_one_snapshot_ahead_resumes_at_the_common_previous_step(tmp_path: Path, agree: Any) -> None:
    got, _ = agree(rank_stores(tmp_path, (4, 5, 6), (4, 5)))
    assert got is not None and got.step == 5
    assert got.files["model.safetensors"] == files_of(5)["model.safetensors"]
    assert got.files["rng_state_1.pth"] == b"rng1@5"
    got, _ = agree(rank_stores(tmp_path / "b", (4, 5), (4, 5, 6)))  # the other way round
    assert got is not None and got.step == 5


def test_a_rank_whose_slot_fails_to_read_withdraws_that_step_and_the_ranks_agree_again(
    tmp_path: Path, agree: Any
) -> None:
    stores = rank_stores(tmp_path, (4, 5), (4, 5))
    flip(stores[1].root / "slot-1")  # rank 1's step 5: listed by its header, but corrupt
    got, group = agree(stores)
    assert got is not None and got.step == 4
    assert got.files["rng_state_1.pth"] == b"rng1@4"
    assert group.rounds == 5


def test_no_common_step_means_none_with_a_line_naming_each_ranks_steps(
    tmp_path: Path, agree: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="vit_train"):
        got, _ = agree(rank_stores(tmp_path, (7, 8), (5,)))
    assert got is None
    assert "No snapshot step is held by every rank (rank 0: 8, 7; rank 1: 5)" in caplog.text
    stores = rank_stores(tmp_path / "b", (7, 8), ())
    got, _ = agree(stores)
    assert got is None
    got, _ = agree([stores[0], None])  # snapshots off on a rank (no store)
    assert got is None


def test_capture_rank_files_holds_the_ranks_rng_and_names_its_step() -> None:
    from types import SimpleNamespace

    import torch

    rng = {"cpu": torch.random.get_rng_state()}
    trainer = SimpleNamespace(
        args=SimpleNamespace(process_index=1),
        state=SimpleNamespace(global_step=7),
        ctx=SimpleNamespace(rng_override=rng),
    )
    files = snap.capture_rank_files(trainer)
    assert set(files) == {"trainer_state.json", "rng_state_1.pth"}
    assert json.loads(files["trainer_state.json"])["global_step"] == 7
    assert torch.equal(torch.load(_io(files["rng_state_1.pth"]), weights_only=False)["cpu"], rng["cpu"])
    with pytest.raises(ValueError, match="rank 0"):
        snap.capture_rank_files(SimpleNamespace(args=SimpleNamespace(process_index=0)))


def _io(b: bytes) -> Any:
    import io

    return io.BytesIO(b)


def test_choose_checkpoint_commits_the_common_snapshot_with_every_ranks_part(
    make_config: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from supervisor.schema import load_config
    from tests.test_snapshot_unit import fake_checkpoint_files
    from worker import checkpoint as ckpt
    from worker import guard
    from worker.train import choose_checkpoint

    cfg = load_config(make_config({"snapshot": {"every_steps": 1, "root": str(tmp_path / "shm")}}))
    (cfg.output_dir / "run").mkdir(parents=True)
    guard.record(cfg.output_dir, cfg, "fp")
    files = fake_checkpoint_files(6)
    files["rng_state_0.pth"] = files.pop("rng_state.pth")
    files["rng_state_1.pth"] = b"rank 1"
    common = snap.Snapshot(6, files, time.time(), 3, 1)
    with caplog.at_level("INFO", logger="vit_train"):
        target, reason, _ = choose_checkpoint(cfg, "fp", resume=True, checkpoint=None, newest=lambda: common)
    assert reason is None and target == cfg.output_dir / "checkpoint-6"
    assert ckpt.validate(target)["global_step"] == 6
    assert (target / "rng_state_1.pth").read_bytes() == b"rank 1"
    assert "Training will resume from snapshot step 6 (newer than any disk checkpoint)" in caplog.text


def test_a_single_process_store_replaces_its_header_once_per_snapshot(
    store: SnapshotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``keep_previous`` (a single process resumes from the newest only) the header never
    names a previous entry, so there is nothing to un-name before a slot is overwritten."""
    store.keep_previous = False
    writes = [0]
    real = SnapshotStore._write_header

    def counting(self: SnapshotStore, h: dict[str, Any]) -> None:
        writes[0] += 1
        real(self, h)

    monkeypatch.setattr(SnapshotStore, "_write_header", counting)
    for step in (1, 2, 3):
        store.write(step, files_of(step))
        assert "previous" not in header(store)
    assert writes[0] == 3
    assert store.listed_steps() == store.available_steps() == [3]
    assert store.read_newest().files == files_of(3)  # type: ignore[union-attr]
