"""Shared-memory snapshots (worker/snapshot.py): the two-slot commit protocol, hostile stores, materialize.

The store tests use tmp_path as the root and never import torch; the materialize and
capture tests build real checkpoint files.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import xxhash

from worker import checkpoint as ckpt
from worker import snapshot as snap
from worker.snapshot import HEADER, SLOTS, SnapshotStore

REPO = Path(__file__).resolve().parents[1]
IDENTITY = {"config_sha": "abc", "data_fingerprint": "d1", "world_size": 1, "rank": 0}


def state(step: int) -> bytes:
    """trainer_state.json as ``TrainerState.save_to_json`` lays it out (and so :func:`snap.materialize`)."""
    return (json.dumps({"global_step": step, "log_history": []}, indent=2, sort_keys=True) + "\n").encode()


def files_of(step: int, size: int = 1000) -> dict[str, bytes]:
    body = (f"step {step};".encode() * (size // 8 + 1))[:size]
    return {"trainer_state.json": state(step), "model.safetensors": body, "optimizer.pt": body[::-1]}


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "shm", IDENTITY)


def header(store: SnapshotStore) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((store.root / HEADER).read_text())
    return result


# ----------------------------------------------------------------------------- protocol


def test_round_trip(store: SnapshotStore) -> None:
    assert store.read_newest() is None  # nothing written yet: None, no log noise needed
    files = files_of(7)
    files["empty.bin"] = b""
    store.write(7, files)
    got = store.read_newest()
    assert got is not None
    assert got.step == 7 and got.files == files and got.generation == 1 and got.slot == 0
    assert abs(got.time - time.time()) < 60
    assert list(got.files) == list(files)  # order kept


def test_slots_alternate_and_the_other_slot_is_untouched(store: SnapshotStore) -> None:
    seen = []
    for step in (1, 2, 3, 4):
        before = {s: (store.root / s).read_bytes() for s in SLOTS if (store.root / s).exists()}
        store.write(step, files_of(step))
        h = header(store)
        seen.append((h["generation"], h["slot"]))
        for s, content in before.items():
            if s != SLOTS[h["slot"]]:
                assert (store.root / s).read_bytes() == content, "a write touched the active slot"
        assert store.read_newest().step == step  # type: ignore[union-attr]
    assert seen == [(1, 0), (2, 1), (3, 0), (4, 1)]


def test_a_new_writer_continues_after_the_header(store: SnapshotStore) -> None:
    """A restarted worker must not overwrite the snapshot it may be resuming from."""
    store.write(1, files_of(1))
    store.write(2, files_of(2))  # slot 1 is newest
    again = SnapshotStore(store.root, IDENTITY)
    slot1 = (store.root / "slot-1").read_bytes()
    again.write(3, files_of(3, 5000))
    assert header(again)["slot"] == 0 and header(again)["generation"] == 3
    assert (store.root / "slot-1").read_bytes() == slot1
    # A smaller snapshot after a bigger one: the slot is cut to size, and reads back.
    again.write(4, files_of(4, 10))
    again.write(5, files_of(5, 10))
    assert again.read_newest().files == files_of(5, 10)  # type: ignore[union-attr]


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty", "missing"])
def test_kill_mid_write_of_the_inactive_slot_keeps_the_previous(store: SnapshotStore, damage: str) -> None:
    store.write(1, files_of(1))
    store.write(2, files_of(2))  # slot 1 active; slot 0 (step 1) is what the next write overwrites
    inactive = store.root / "slot-0"
    if damage == "garbage":
        inactive.write_bytes(os.urandom(3000))
    elif damage == "truncate":
        inactive.write_bytes(inactive.read_bytes()[:100])
    elif damage == "empty":
        inactive.write_bytes(b"")
    else:
        inactive.unlink()
    got = store.read_newest()
    assert got is not None and got.step == 2 and got.files == files_of(2)


@pytest.mark.parametrize("how", ["no_space", "midway"])
def test_write_that_dies_midway_keeps_the_previous(
    store: SnapshotStore, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The slot cannot be allocated (ENOSPC on a full /dev/shm: an error, never a SIGBUS in the
    copy) or the write fails after part of the slot: the header still names the old slot."""
    store.write(1, files_of(1, 100_000))
    real_put = snap._put
    calls = [0]

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    def dying_put(view: memoryview, at: int, piece: Any) -> int:
        calls[0] += 1
        if calls[0] > 2:
            raise OSError(28, "No space left on device")
        return real_put(view, at, bytes(memoryview(piece)[:1000]))

    if how == "no_space":
        monkeypatch.setattr(snap.os, "posix_fallocate", no_space)
    else:
        monkeypatch.setattr(snap, "_put", dying_put)
    with pytest.raises(OSError):
        store.write(2, files_of(2, 100_000))
    monkeypatch.undo()
    got = store.read_newest()
    assert got is not None and got.step == 1 and got.files == files_of(1, 100_000)
    store.write(2, files_of(2))  # and the store works on afterwards
    assert store.read_newest().step == 2  # type: ignore[union-attr]


@pytest.mark.parametrize("damage", ["half", "garbage_same_size", "flipped_byte", "flipped_last_byte", "grown"])
def test_damaged_active_slot_is_ignored_and_the_older_slot_not_used(
    store: SnapshotStore, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The header keeps only the newest: a bad newest slot means no snapshot (the disk checkpoint
    takes over), never a silent fall back to the other slot, which nothing vouches for."""
    store.write(1, files_of(1))
    store.write(2, files_of(2))
    active = store.root / "slot-1"
    raw = bytearray(active.read_bytes())
    if damage == "half":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage_same_size":
        raw = bytearray(os.urandom(len(raw)))
    elif damage == "flipped_byte":
        raw[len(raw) // 2] ^= 0x01
    elif damage == "flipped_last_byte":
        raw[-1] ^= 0x80
    else:
        raw += b"x"
    active.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="vit_train"):
        assert store.read_newest() is None
    assert "Ignoring the snapshot" in caplog.text


def test_a_reader_racing_the_writer_never_gets_a_torn_snapshot(store: SnapshotStore) -> None:
    """``vit-supervisor status`` may read while the worker writes: a snapshot it returns is whole."""
    import threading

    store.write(1, files_of(1, 200_000))
    stop = threading.Event()

    def writer() -> None:
        step = 1
        while not stop.is_set():
            step += 1
            store.write(step, files_of(step, 200_000))

    t = threading.Thread(target=writer)
    t.start()
    reader = SnapshotStore(store.root, IDENTITY)
    seen = []
    try:
        for _ in range(200):
            got = reader.read_newest()
            if got is not None:
                assert got.files == files_of(got.step, 200_000)
                seen.append(got.step)
    finally:
        stop.set()
        t.join()
    assert seen and seen == sorted(seen)  # (a read may give up while the header keeps moving; never a torn one)


def test_identity_mismatch_is_ignored_with_the_keys_named(
    store: SnapshotStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.write(3, files_of(3))
    other = SnapshotStore(store.root, {**IDENTITY, "config_sha": "changed", "extra": 1})
    with caplog.at_level(logging.WARNING, logger="vit_train"):
        assert other.read_newest() is None
    assert "config_sha, extra" in caplog.text
    # Same identity through a JSON round trip (tuples become lists) still matches.
    same = SnapshotStore(store.root, {**IDENTITY, "world_size": 1})
    assert same.read_newest() is not None


def _valid_header(store: SnapshotStore) -> dict[str, Any]:
    store.write(5, files_of(5))
    return header(store)


HOSTILE_HEADERS: list[tuple[str, Any]] = [
    ("not_json", b"{not json"),
    ("binary", b"\xff\xfe\x00\x01" * 10),
    ("empty", b""),
    ("list", b"[1, 2]"),
    ("null", b"null"),
    ("deep_nesting", b"[" * 100_000 + b"]" * 100_000),
    ("too_large", b'{"a": "' + b"x" * (128 << 10) + b'"}'),
    ("format_1", {"format": 1}),
    ("format_str", {"format": "1"}),
    ("format_true", {"format": True}),
    ("slot_2", {"slot": 2}),
    ("slot_neg", {"slot": -1}),
    ("slot_bool", {"slot": True}),
    ("slot_str", {"slot": "0"}),
    ("slot_float", {"slot": 1.0}),
    ("step_neg", {"step": -5}),
    ("step_str", {"step": "5"}),
    ("step_huge", {"step": 10**30}),
    ("step_other", {"step": 6}),  # the slot's index and trainer_state.json say 5
    ("size_float", {"size": 10.0}),
    ("size_small", {"size": 3}),
    ("size_off_by_one", "size+1"),
    ("digest_neg", {"digest": -1}),
    ("digest_big", {"digest": 1 << 64}),
    ("digest_wrong", "digest+1"),
    ("checksum_md5", {"checksum": "md5"}),
    ("identity_list", {"identity": [1]}),
    ("identity_null", {"identity": None}),
    ("time_str", {"time": "now"}),
    ("time_nan", b"nan"),
    ("time_inf", {"time": 1e300}),
    ("generation_0", {"generation": 0}),
    ("missing_digest", {"digest": None}),
]


@pytest.mark.parametrize("case", HOSTILE_HEADERS, ids=[c[0] for c in HOSTILE_HEADERS])
def test_hostile_header_is_ignored(store: SnapshotStore, case: tuple[str, Any]) -> None:
    name, change = case
    h = _valid_header(store)
    if isinstance(change, bytes) and name == "time_nan":
        raw = json.dumps(h).replace(str(h["time"]), "NaN").encode()
    elif isinstance(change, bytes):
        raw = change
    elif change == "size+1":
        raw = json.dumps({**h, "size": h["size"] + 1}).encode()
    elif change == "digest+1":
        raw = json.dumps({**h, "digest": (h["digest"] + 1) % (1 << 64)}).encode()
    else:
        merged = {**h, **change}
        raw = json.dumps({k: v for k, v in merged.items() if v is not None or k == "identity"}).encode()
    (store.root / HEADER).write_bytes(raw)
    assert store.read_newest() is None


@pytest.mark.parametrize(
    "kind", ["directory", "header_is_fifo", "symlink_to_slot", "slot_is_directory", "slot_is_fifo"]
)
def test_hostile_files_are_ignored(store: SnapshotStore, kind: str) -> None:
    store.write(5, files_of(5))
    if kind == "directory":
        (store.root / HEADER).unlink()
        (store.root / HEADER).mkdir()
    elif kind == "header_is_fifo":
        (store.root / HEADER).unlink()
        os.mkfifo(store.root / HEADER)  # would block a plain open() forever
    elif kind == "symlink_to_slot":
        slot = store.root / "slot-0"
        slot.rename(store.root / "elsewhere")
        slot.symlink_to(store.root / "elsewhere")  # O_NOFOLLOW: a planted link is not followed
    elif kind == "slot_is_directory":
        (store.root / "slot-0").unlink()
        (store.root / "slot-0").mkdir()
    else:
        (store.root / "slot-0").unlink()
        os.mkfifo(store.root / "slot-0")
    assert store.read_newest() is None


def _forge(store: SnapshotStore, step: int, index: Any, data: bytes, magic: bytes = snap.MAGIC) -> None:
    """A slot with a hostile index but a correct size and digest: only the container checks can catch it."""
    raw_index = index if isinstance(index, bytes) else json.dumps(index).encode()
    body = snap._PREFIX.pack(magic, len(raw_index)) + raw_index + data
    store.root.mkdir(parents=True, exist_ok=True)
    (store.root / "slot-0").write_bytes(body)
    h = {
        "format": snap.FORMAT,
        "generation": 1,
        "slot": 0,
        "step": step,
        "size": len(body),
        "checksum": snap.CHECKSUM,
        "digest": xxhash.xxh3_64_intdigest(body),
        "identity": IDENTITY,
        "time": time.time(),
        "pid": 1,
    }
    (store.root / HEADER).write_text(json.dumps(h))


def _entries(*spec: tuple[Any, Any, Any], tensors: Any = None) -> dict[str, Any]:
    return {"format": snap.CONTAINER, "step": 5, "files": [list(e) for e in spec], "tensors": tensors}


SK = b"skeleton"
W = bytes(range(24))  # a float32 tensor of shape [2, 3]


def _tensors(*entries: list[Any], skeleton: Any = None, metadata: Any = None) -> dict[str, Any]:
    """A tensor section: the entries from offset 0, then the skeleton (after one tensor W by default)."""
    return {
        "skeleton": skeleton or [len(W), len(SK)],
        "metadata": {"format": "pt"} if metadata is None else metadata,
        "entries": list(entries),
    }


ST = state(5)
TS = ("trainer_state.json", len(W) + len(SK), len(ST))  # after one tensor and the skeleton
S0 = ("trainer_state.json", len(SK), len(ST))  # after a skeleton alone
HOSTILE_CONTAINERS: list[tuple[str, Any, bytes]] = [
    ("forged_ok", _entries(("trainer_state.json", 0, len(ST))), ST),  # the control: this one is valid
    ("past_end", _entries(("trainer_state.json", 0, len(ST) + 10)), ST),
    ("gap", _entries(("trainer_state.json", 4, len(ST))), b"xxxx" + ST),
    ("overlap", _entries(("trainer_state.json", 0, len(ST)), ("a", 0, len(ST))), ST + ST),
    ("short_cover", _entries(("trainer_state.json", 0, len(ST))), ST + b"tail"),
    ("negative", _entries(("trainer_state.json", 0, -1)), ST),
    ("float_len", _entries(("trainer_state.json", 0, float(len(ST)))), ST),
    ("dotdot", _entries(("..", 0, len(ST))), ST),
    ("slash", _entries(("../trainer_state.json", 0, len(ST))), ST),
    ("hidden", _entries((".trainer_state.json", 0, len(ST))), ST),
    ("nul", _entries(("trainer_state.json\x00", 0, len(ST))), ST),
    ("duplicate", _entries(("trainer_state.json", 0, len(ST)), ("trainer_state.json", len(ST), len(ST))), ST + ST),
    ("not_a_list", {"format": snap.CONTAINER, "step": 5, "files": {"trainer_state.json": [0, len(ST)]}}, ST),
    ("entry_short", _entries(("trainer_state.json", 0, len(ST)))["files"][0][:2], ST),
    ("index_step", {**_entries(("trainer_state.json", 0, len(ST))), "step": 4}, ST),
    ("index_format", {**_entries(("trainer_state.json", 0, len(ST))), "format": 2}, ST),
    ("index_garbage", b"\x00garbage", ST),
    ("no_state", _entries(("model.safetensors", 0, len(ST))), ST),
    ("state_step", _entries(("trainer_state.json", 0, len(state(4)))), state(4)),
    ("state_garbage", _entries(("trainer_state.json", 0, 3)), b"{[("),
    ("state_bool_step", _entries(("trainer_state.json", 0, 20)), b'{"global_step":true}'),
    ("bad_magic", b"magic", ST),
    # the tensor section: the tensors from offset 0, then the skeleton, then the files
    ("tensors_ok", _entries(TS, tensors=_tensors(["model", "w", "float32", [2, 3], 0, 24])), W + SK + ST),
    (
        "tensor_past_end",
        _entries(
            ("trainer_state.json", 32 + len(SK), len(ST)),
            tensors=_tensors(["model", "w", "float32", [2, 4], 0, 32], skeleton=[32, len(SK)]),
        ),
        W + SK + ST,
    ),
    ("tensor_size_vs_shape", _entries(TS, tensors=_tensors(["model", "w", "float32", [2, 2], 0, 24])), W + SK + ST),
    ("tensor_dtype", _entries(TS, tensors=_tensors(["model", "w", "object", [2, 3], 0, 24])), W + SK + ST),
    ("tensor_group", _entries(TS, tensors=_tensors(["other", "w", "float32", [2, 3], 0, 24])), W + SK + ST),
    ("tensor_opt_name", _entries(TS, tensors=_tensors(["optimizer", "w", "float32", [2, 3], 0, 24])), W + SK + ST),
    ("tensor_neg_dim", _entries(TS, tensors=_tensors(["model", "w", "float32", [-2, -3], 0, 24])), W + SK + ST),
    (
        "tensor_gap",
        _entries(
            ("trainer_state.json", 25 + len(SK), len(ST)),
            tensors=_tensors(["model", "w", "float32", [2, 3], 1, 24], skeleton=[25, len(SK)]),
        ),
        b"x" + W + SK + ST,
    ),
    (
        "tensor_repeated",
        _entries(
            ("trainer_state.json", 48 + len(SK), len(ST)),
            tensors=_tensors(
                ["model", "w", "float32", [2, 3], 0, 24],
                ["model", "w", "float32", [2, 3], 24, 24],
                skeleton=[48, len(SK)],
            ),
        ),
        W + W + SK + ST,
    ),
    ("skeleton_gap", _entries(S0, tensors=_tensors(skeleton=[1, len(SK) - 1])), SK + ST),
    ("skeleton_float", _entries(S0, tensors=_tensors(skeleton=[0, float(len(SK))])), SK + ST),
    ("metadata_list", _entries(S0, tensors=_tensors(metadata=[1], skeleton=[0, len(SK)])), SK + ST),
    ("tensors_no_entries", _entries(S0, tensors={"skeleton": [0, len(SK)], "metadata": {}}), SK + ST),
    ("skeleton_alone_ok", _entries(S0, tensors=_tensors(skeleton=[0, len(SK)])), SK + ST),  # valid: no tensors
]


@pytest.mark.parametrize("case", HOSTILE_CONTAINERS, ids=[c[0] for c in HOSTILE_CONTAINERS])
def test_hostile_container_is_ignored(store: SnapshotStore, case: tuple[str, Any, bytes]) -> None:
    name, index, data = case
    if name == "bad_magic":
        _forge(store, 5, _entries(("trainer_state.json", 0, len(ST))), ST, magic=b"VITSNAP2")  # format 2: not read
    else:
        _forge(store, 5, index, data)
    got = store.read_newest()
    if name == "forged_ok":
        assert got is not None and got.files == {"trainer_state.json": ST} and got.tensors is None
    elif name == "skeleton_alone_ok":
        assert got is not None and got.tensors is not None and got.tensors.specs == () and got.tensors.skeleton == SK
    elif name == "tensors_ok":
        assert got is not None and got.files == {"trainer_state.json": ST} and got.tensors is not None
        assert got.tensors.specs == (snap.TensorSpec("model", "w", "float32", (2, 3), 24),)
        assert bytes(got.tensors.buffers[0]) == W and got.tensors.skeleton == SK
    else:
        assert got is None


def test_write_refuses_what_could_not_be_read_back(store: SnapshotStore) -> None:
    with pytest.raises(ValueError, match="trainer_state"):
        store.write(3, {"model.safetensors": b"x"})
    with pytest.raises(ValueError, match="global_step"):
        store.write(3, {"trainer_state.json": state(4)})
    with pytest.raises(ValueError, match="plain file names"):
        store.write(3, {"trainer_state.json": state(3), "../x": b""})
    with pytest.raises(ValueError):
        store.write(-1, {"trainer_state.json": state(-1)})


def test_root_planted_by_someone_else_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OSError, match="not a folder owned"):
        SnapshotStore(tmp_path / "link", IDENTITY).write(1, files_of(1))
    assert not list(real.iterdir())


def test_store_emptied_under_a_writer(store: SnapshotStore) -> None:
    """/dev/shm cleaned (or the supervisor removed the store) while the worker runs: the next write recreates it."""
    store.write(1, files_of(1))
    store.write(2, files_of(2))
    shutil.rmtree(store.root)
    assert store.read_newest() is None
    store.write(3, files_of(3))
    got = store.read_newest()
    assert got is not None and got.step == 3 and got.generation == 1


def test_stale_temporary_headers_are_cleaned(store: SnapshotStore) -> None:
    store.write(1, files_of(1))
    (store.root / f".{HEADER}.abc.tmp").write_text("half")
    SnapshotStore(store.root, IDENTITY).write(2, files_of(2))
    assert sorted(p.name for p in store.root.iterdir()) == [HEADER, *SLOTS]


def test_default_root_is_per_run_rank_and_user(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (tmp_path / "alias").symlink_to(a)
    r = snap.default_root(a, 0)
    assert r.parent == Path("/dev/shm") / f"vit-supervisor-{os.getuid()}"
    assert r.name.startswith("a-") and r.name.endswith("-rank0")
    assert snap.default_root(tmp_path / "alias", 0) == r
    assert snap.default_root(a, 1) != r
    assert snap.default_root(b, 0) != r
    assert snap.default_root(a, 0, base=tmp_path).parent.parent == tmp_path


def test_space_accounting_and_remove(store: SnapshotStore) -> None:
    assert store.used_bytes() == 0
    free = store.free_bytes()  # the root does not exist yet: its nearest existing parent's file system
    assert free > 0
    assert SnapshotStore.needed_bytes(100 << 20) >= 2 * (100 << 20)
    assert SnapshotStore.needed_bytes(100 << 20) < 2 * (100 << 20) + (1 << 20)
    store.write(1, files_of(1, 50_000))
    store.write(2, files_of(2, 50_000))
    used = store.used_bytes()
    assert 100_000 < used < SnapshotStore.needed_bytes(50_000 + 1000)
    store.remove()
    assert not store.root.exists() and store.read_newest() is None
    store.write(3, files_of(3))  # usable again after a remove
    assert store.read_newest().step == 3  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- to disk


def fake_checkpoint_files(step: int) -> dict[str, bytes]:
    """The file set of a real checkpoint, small: what ckpt.validate(deep=True) loads."""
    import io

    import safetensors.torch
    import torch

    def tb(obj: Any) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {
        "config.json": b"{}",
        "model.safetensors": safetensors.torch.save({"w": w}, metadata={"format": "pt"}),
        "optimizer.pt": tb({"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}),
        "scheduler.pt": tb({"last_epoch": step}),
        "trainer_state.json": state(step),
        "rng_state.pth": tb({"cpu": torch.random.get_rng_state()}),
        "training_args.bin": tb({"not": "args"}),
    }


def test_materialize_commits_a_normal_checkpoint(store: SnapshotStore, tmp_path: Path) -> None:
    files = fake_checkpoint_files(9)
    store.write(9, files)
    got = store.read_newest()
    assert got is not None
    out = tmp_path / "out"
    path = snap.materialize(got, out)
    assert path == out / "checkpoint-9"
    assert ckpt.validate(path)["global_step"] == 9
    assert ckpt.is_ours(path)
    assert {p.name for p in path.iterdir()} == {*files, ckpt.MANIFEST}
    assert all((path / n).read_bytes() == b for n, b in files.items())
    assert not ckpt.staging_dir(out, 9).exists()
    # The same step again: the good checkpoint stays as it is.
    mtime = (path / ckpt.MANIFEST).stat().st_mtime_ns
    assert snap.materialize(got, out) == path
    assert (path / ckpt.MANIFEST).stat().st_mtime_ns == mtime
    # A broken checkpoint of that step is set aside and replaced.
    (path / "optimizer.pt").write_bytes(b"broken")
    assert snap.materialize(got, out) == path
    assert ckpt.validate(path)["global_step"] == 9
    assert len(list((out / ckpt.SET_ASIDE).iterdir())) == 1


def test_materialize_of_an_incomplete_set_raises_and_leaves_nothing(store: SnapshotStore, tmp_path: Path) -> None:
    files = fake_checkpoint_files(4)
    del files["optimizer.pt"]
    store.write(4, files)
    got = store.read_newest()
    assert got is not None
    out = tmp_path / "out"
    with pytest.raises(ckpt.CheckpointInvalid, match=r"optimizer\.pt"):
        snap.materialize(got, out)
    assert ckpt.list_checkpoints(out) == []
    assert not ckpt.staging_dir(out, 4).exists()


# ----------------------------------------------------------------------------- capture from a real Trainer


def test_capture_from_a_trainer_matches_its_own_save(make_config: Any, tmp_path: Path) -> None:
    """Two steps of the tiny ViT in this process, built as worker/train.py builds it; the captured
    files equal what ``commit_checkpoint`` then writes, and materialized they are a valid
    checkpoint holding the trainer's exact weights."""
    import torch

    from supervisor.schema import load_config
    from worker.fault import StopRequest
    from worker.train import compute_metrics, open_context, prepare, training_arguments
    from worker.trainer import SupervisedTrainer, SupervisionCallback

    overrides = {"max_steps": 2, "save_strategy": "no", "eval_strategy": "no", "logging_steps": 1}
    cfg = load_config(make_config({"training": overrides}))
    ctx = open_context(cfg, StopRequest())
    prepared = prepare(cfg)
    trainer = SupervisedTrainer(
        model=prepared.model,
        args=training_arguments(cfg, []),
        train_dataset=prepared.splits.train,
        eval_dataset=prepared.splits.eval,
        compute_metrics=compute_metrics,
        callbacks=[SupervisionCallback(ctx)],
        ctx=ctx,
    )
    # Capture at the instant the worker commits its own checkpoint of the last step, so both see the same state:
    # as whole files (capture_files), and as the worker's snapshots take it (Capturer, raw tensors, plain objects).
    captured: dict[str, bytes] = {}
    raw_store = SnapshotStore(tmp_path / "raw-shm", IDENTITY)
    commit = trainer.commit_checkpoint

    def capture_then_commit(snapshot_first: bool = False) -> Path:
        captured.update(snap.capture_files(trainer))
        capturer = snap.Capturer()
        for _ in range(2):  # twice: the second capture reuses what the first one kept
            snap.write_capture(raw_store, capturer, capturer.capture(trainer))
        return commit(snapshot_first=snapshot_first)

    trainer.commit_checkpoint = capture_then_commit  # type: ignore[method-assign]
    trainer.train()
    assert trainer.state.global_step == 2
    files = captured
    assert set(files) == {
        "config.json",
        "model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "rng_state.pth",
        "training_args.bin",
    }
    own = cfg.output_dir / "checkpoint-2"
    assert set(files) | {ckpt.MANIFEST} == {p.name for p in own.iterdir()}
    for name in ("config.json", "model.safetensors", "trainer_state.json"):
        assert files[name] == (own / name).read_bytes(), name
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        ours = torch.load(_bytes_io(files[name]), weights_only=False)
        theirs = torch.load(own / name, weights_only=False)
        assert _same(ours, theirs), name
    args = torch.load(_bytes_io(files["training_args.bin"]), weights_only=False)
    assert args.to_dict() == torch.load(own / "training_args.bin", weights_only=False).to_dict()

    store = SnapshotStore(tmp_path / "shm", IDENTITY)
    store.write(2, files)
    got = store.read_newest()
    assert got is not None and got.files == files
    path = snap.materialize(got, tmp_path / "elsewhere")
    assert ckpt.validate(path)["global_step"] == 2
    fresh = prepare(cfg).model
    ckpt.load_weights_strict(fresh, path)
    trained = trainer.model.state_dict()
    diff = max((v - trained[k]).abs().max().item() for k, v in fresh.state_dict().items())
    assert diff == 0.0

    # The raw capture, materialized: the same files as the Trainer's own save.
    raw = raw_store.read_newest()
    assert raw is not None and raw.step == 2 and raw.tensors is not None and snap.OBJECTS in raw.files
    mat = snap.materialize(raw, tmp_path / "from-raw")
    assert {p.name for p in mat.iterdir()} == {p.name for p in own.iterdir()}
    for name in ("config.json", "model.safetensors", "trainer_state.json"):
        assert (mat / name).read_bytes() == (own / name).read_bytes(), name
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        ours = torch.load(mat / name, weights_only=False)
        theirs = torch.load(own / name, weights_only=False)
        assert _same(ours, theirs), name
    raw_store.remove()


def _bytes_io(b: bytes) -> Any:
    import io

    return io.BytesIO(b)


def _same(a: Any, b: Any) -> bool:
    """Deep equality through tensors, arrays, dicts, lists and tuples."""
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_plain_pickle_keeps_plain_data_exactly_and_refuses_anything_else() -> None:
    import collections

    import numpy as np

    data = {"lr": [0.001, float("inf")], "betas": (0.9, 0.999), "key": b"\x00\x01", "n": 2**70, "x": None, "s": {1}}
    back = snap.plain_loads(snap.plain_dumps(data))
    assert back == data and type(back["betas"]) is tuple
    for bad in (np.float64(1.0), collections.OrderedDict(a=1), 1j, int):
        with pytest.raises(TypeError, match="plain data only"):
            snap.plain_dumps({"v": bad})
    # A pickle that would look up a class (here os.system) is refused when loading, not run.
    import pickle

    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, ("true",))

    with pytest.raises(pickle.UnpicklingError, match="plain data only"):
        snap.plain_loads(pickle.dumps(Evil()))


def test_numpy_rng_state_is_read_in_full_only_when_it_moved() -> None:
    """The raw-bytes check gives exactly what np.random.get_state() gives, through draws, a reseed
    and the legacy generator's cached Gaussian (used up without a draw), and reuses the last full
    read (the same object) while nothing moved."""
    import numpy as np

    def same(a: Any, b: Any) -> bool:
        return bool(a[0] == b[0] and a[2:] == b[2:] and np.array_equal(a[1], b[1]))

    saved = np.random.get_state()
    try:
        rng = snap._NumpyRng()
        first = rng.state()
        assert same(first, np.random.get_state()) and rng.state() is first  # unchanged: kept
        assert rng.raw(first) is rng.raw(rng.state())  # and its plain form too
        for move in (
            np.random.rand,
            lambda: np.random.seed(7),
            lambda: np.random.randint(0, 10, size=700),  # past a key regeneration
            np.random.standard_normal,  # leaves a cached Gaussian
            np.random.standard_normal,  # uses it up: only has_gauss changes
            np.random.standard_normal,
        ):
            move()
            got = rng.state()
            assert same(got, np.random.get_state()), move
            assert rng.raw(got) == snap._numpy_raw(np.random.get_state())
    finally:
        np.random.set_state(saved)


def test_optimizer_skeleton_without_state_dict_matches_state_dict() -> None:
    """The cached skeleton with the live param groups' values is what state_dict() gives, as the
    scheduler moves the learning rate; a new state object (a load) rebuilds it."""
    import copy

    import torch

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(
        [{"params": model[0].parameters()}, {"params": model[1].parameters(), "weight_decay": 0.0}], lr=0.1
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    cap = snap.Capturer()

    def step() -> None:
        model(torch.randn(5, 3)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    step()
    kept = []
    for _ in range(4):
        skeleton, tensors, same = cap._optimizer_parts(opt)
        want, want_tensors = snap._optimizer_parts(opt)
        assert snap.plain_dumps(skeleton) == snap.plain_dumps(want)
        assert [(p, k, id(t)) for p, k, t in tensors] == [(p, k, id(t)) for p, k, t in want_tensors]
        kept.append(same)
        step()
    assert kept == [False, True, True, True]
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new state tensors (a resume)
    _, tensors, same = cap._optimizer_parts(opt)
    assert same is False and [id(t) for _, _, t in tensors] == [id(t) for _, _, t in snap._optimizer_parts(opt)[1]]


def test_trainer_state_json_keeps_the_encoded_log_history_only_while_it_is_the_same() -> None:
    enc = snap._StateJson()
    log: list[dict[str, Any]] = [{"loss": 1.0, "step": 1}]

    def full(fields: dict[str, Any], history: list[Any]) -> dict[str, Any]:
        return {"log_history": history, **fields}

    for step in range(2, 6):
        got = json.loads(enc.encode({"global_step": step}, log))
        assert got == full({"global_step": step}, log)
        log.append({"loss": 1.0 / step, "step": step})
    replaced = [{"eval_f1": 0.5, "step": 3}]  # a resume loads a new list
    assert json.loads(enc.encode({"global_step": 3}, replaced)) == full({"global_step": 3}, replaced)
    shorter = replaced[:0]
    assert json.loads(enc.encode({"global_step": 3}, shorter)) == full({"global_step": 3}, shorter)
    same_length = [{"loss": 9.0}]  # the same list object with its last entry swapped: encoded afresh
    enc.encode({"global_step": 1}, same_length)
    same_length[0] = {"loss": 8.0}
    assert json.loads(enc.encode({"global_step": 1}, same_length))["log_history"] == [{"loss": 8.0}]


def test_a_slot_file_replaced_under_the_writer_is_mapped_afresh(store: SnapshotStore) -> None:
    store.write(1, files_of(1, 50_000))
    store.write(2, files_of(2, 50_000))
    for name in SLOTS:  # someone replaced both slot files (the writer still maps the old ones)
        (store.root / name).unlink()
        (store.root / name).write_bytes(b"x")
    store.write(3, files_of(3, 50_000))
    store.write(4, files_of(4, 60_000))
    reader = SnapshotStore(store.root, IDENTITY)
    assert reader.available_steps() == [4, 3]
    assert reader.read_step(3).files == files_of(3, 50_000)  # type: ignore[union-attr]
    store.write(5, files_of(5, 10))  # shrinking: the file is cut to the snapshot's size
    assert (store.root / SLOTS[header(store)["slot"]]).stat().st_size == header(store)["size"]
    assert SnapshotStore(store.root, IDENTITY).read_newest().files == files_of(5, 10)  # type: ignore[union-attr]
    store.close()


# ----------------------------------------------------------------------------- the worker's writer


def _boundary(step: int, epoch: float, stopping: bool = False) -> Any:
    from types import SimpleNamespace

    control = SimpleNamespace(should_epoch_stop=False, should_training_stop=stopping)
    state = SimpleNamespace(global_step=step, epoch=epoch)
    return SimpleNamespace(state=state, control=control, args=SimpleNamespace(process_index=0))


def _fake_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Captures of small files only (no model): the writer's timing logic without a Trainer."""

    def capture(self: Any, trainer: Any) -> snap.Capture:
        files = fake_checkpoint_files(trainer.state.global_step)
        return snap.Capture(trainer.state.global_step, files, snap.plain_dumps({}), (), (), {})

    monkeypatch.setattr(snap.Capturer, "capture", capture)


def _step_end(w: Any, step: int) -> None:
    """What the callback does at a step end in a single process (the rank vote is a no-op)."""
    if w.step_end(step):
        w.mark_due(step)


def test_writer_waits_for_the_epoch_end_boundary_work_of_an_epochs_last_step(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from worker.trainer import Snapshots

    _fake_capture(monkeypatch)
    store = SnapshotStore(tmp_path / "shm", IDENTITY)
    w = Snapshots(store, every_steps=2)
    _step_end(w, 1)
    w.after_boundary_work(_boundary(1, 0.5))  # type: ignore[arg-type]
    w.join()
    assert store.read_newest() is None  # not due
    _step_end(w, 2)
    w.after_boundary_work(_boundary(2, 1.0))  # type: ignore[arg-type]
    w.join()
    assert store.read_newest() is None  # the epoch's evaluation and save are still to come
    w.epoch_ending = True
    w.after_boundary_work(_boundary(2, 1.0))  # type: ignore[arg-type]
    w.join()
    got = store.read_newest()
    assert got is not None and got.step == 2 and len(w.seconds) == 1 and len(w.exposed) == 1
    _step_end(w, 4)
    w.after_boundary_work(_boundary(4, 1.4, stopping=True))  # type: ignore[arg-type]
    w.join()
    assert store.read_newest().step == 2  # type: ignore[union-attr]
    w.epoch_ending = True
    w.after_boundary_work(_boundary(4, 1.4, stopping=True))  # type: ignore[arg-type]
    w.close()
    assert store.read_newest().step == 4  # type: ignore[union-attr]


def test_writer_failure_warns_once_and_turns_snapshots_off_without_raising(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The copy fails in its thread: the failure surfaces at the join, training goes on."""
    from worker.trainer import Snapshots

    _fake_capture(monkeypatch)
    (tmp_path / "file").write_text("x")  # a store under a file: every write fails with an OSError
    w = Snapshots(SnapshotStore(tmp_path / "file" / "shm", IDENTITY), every_steps=1)
    with caplog.at_level("WARNING", logger="vit_train"):
        for step in (1, 2, 3):
            _step_end(w, step)
            w.after_boundary_work(_boundary(step, step / 10))  # type: ignore[arg-type]
            w.join()
        w.close()
    assert not w.enabled and w.due is None
    warnings = [r for r in caplog.records if "Snapshots off" in r.getMessage()]
    assert len(warnings) == 1 and "step 1" in warnings[0].getMessage()


def test_the_optimizer_step_waits_for_the_copy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """join() (called in on_pre_optimizer_step) returns only once the snapshot is committed."""
    import threading

    from worker.trainer import Snapshots

    _fake_capture(monkeypatch)
    release = threading.Event()
    real = snap.write_capture

    def slow(store: SnapshotStore, capturer: Any, cap: Any) -> int:
        release.wait(30)
        return real(store, capturer, cap)

    monkeypatch.setattr(snap, "write_capture", slow)
    monkeypatch.setattr(snap, "SYNC_BELOW", 0)  # copied in the thread whatever its size
    store = SnapshotStore(tmp_path / "shm", IDENTITY)
    w = Snapshots(store, every_steps=1)
    _step_end(w, 1)
    w.after_boundary_work(_boundary(1, 0.1))  # type: ignore[arg-type]
    assert store.read_newest() is None  # the copy is still held
    threading.Timer(0.05, release.set).start()
    w.join()
    got = store.read_newest()
    assert got is not None and got.step == 1
    assert w.exposed[0] >= 0.04  # the wait counts as exposed cost


def test_the_writer_judges_a_threaded_copy_by_the_threads_cpu_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With a fake clock: 50 ms steps, nothing exposed, but each copy uses 10 ms of the copy
    thread's CPU (time.thread_time, read in the thread): auto snapshots less often at once; when
    the copies get cheap it comes back to every step, and then no step goes without one."""
    import threading
    from types import SimpleNamespace

    import worker.trainer as wt

    _fake_capture(monkeypatch)
    clock = SimpleNamespace(now=1000.0, cpu={})
    fake_time = SimpleNamespace(
        monotonic=lambda: clock.now,
        process_time=lambda: clock.now,
        thread_time=lambda: clock.cpu.get(threading.get_ident(), 0.0),
    )
    monkeypatch.setattr(wt, "time", fake_time)
    per_copy = [0.010]
    real = snap.write_capture

    def busy_copy(store: SnapshotStore, capturer: Any, cap: Any) -> int:
        me = threading.get_ident()
        clock.cpu[me] = clock.cpu.get(me, 0.0) + per_copy[0]
        return real(store, capturer, cap)

    monkeypatch.setattr(snap, "write_capture", busy_copy)
    monkeypatch.setattr(snap, "SYNC_BELOW", 0)  # copied in the thread whatever its size
    store = SnapshotStore(tmp_path / "shm", IDENTITY)
    for _ in SLOTS:  # both slots mapped now: their set-up (real time, subtracted from a cost) is done
        store.write(0, fake_checkpoint_files(0))
    w = wt.Snapshots(store, every_steps="auto")
    taken: list[int] = []

    def steps(first: int, last: int) -> None:
        for step in range(first, last + 1):
            w.join()  # on_pre_optimizer_step
            clock.now += 0.050
            _step_end(w, step)
            if w.due == step:
                taken.append(step)
            w.after_boundary_work(_boundary(step, step / 1000 + 0.0001))  # type: ignore[arg-type]

    steps(1, 12)
    assert w.chooser.interval == 10 and taken == [1, 11]  # 10 ms of 50: 20 %, every 10th step from the first
    per_copy[0] = 0.0001  # 0.2 %
    steps(13, 80)
    w.close()
    assert w.chooser.interval == 1
    assert taken[-20:] == list(range(61, 81))  # every step, none skipped for a baseline


# ----------------------------------------------------------------------------- every_steps: auto


def test_auto_picks_every_step_when_the_copy_is_cheap_and_more_when_it_is_not() -> None:
    assert snap.choose_interval(cost_s=0.001, step_s=0.1, current=1) == 1  # 1 % of a step
    assert snap.choose_interval(cost_s=0.002, step_s=0.1, current=1) == 1  # exactly the budget
    assert snap.choose_interval(cost_s=0.010, step_s=0.1, current=1) == 5  # 10 %: every 5th step is 2 %
    assert snap.choose_interval(cost_s=0.5, step_s=0.01, current=1) == 2500
    assert snap.choose_interval(cost_s=1e6, step_s=1e-6, current=1) == snap.MAX_INTERVAL
    # Lowered only with room to spare: 1.9 % at every step is under budget but too close to it.
    assert snap.choose_interval(cost_s=0.0019, step_s=0.1, current=2) == 2
    assert snap.choose_interval(cost_s=0.0014, step_s=0.1, current=2) == 1
    assert snap.choose_interval(cost_s=0.0001, step_s=0.1, current=40) == 20  # by half at most
    assert snap.choose_interval(cost_s=0.001, step_s=0.0, current=3) == 3  # no step time yet: unchanged


def test_auto_chooser_follows_measured_costs_and_fixed_n_keeps_multiples() -> None:
    c = snap.IntervalChooser("auto")
    assert c.auto and c.interval == 1
    # At interval 1 every step is due: none goes without a snapshot (a fault loses at most one step).
    assert all(c.is_due(s, s - 1) for s in range(2, 100)) and c.is_due(1, None)
    for _ in range(10):
        c.add_step(0.100)
    assert c.add_cost(0.001) is None and c.interval == 1  # cheap: every step
    for _ in range(8):
        changed = c.add_cost(0.010)  # made expensive: 10 % of a step
    assert c.interval == 5 and changed in (None, 5)
    assert not c.is_due(9, 5) and c.is_due(10, 5)
    for _ in range(8):
        c.add_cost(0.0005)  # cheap again
    assert c.interval == 1
    fixed = snap.IntervalChooser(3)
    assert not fixed.auto and [s for s in range(1, 10) if fixed.is_due(s, None)] == [3, 6, 9]
    for _ in range(5):
        assert fixed.add_cost(10.0) is None
    assert fixed.interval == 3


def test_auto_starts_long_after_an_expensive_first_snapshot_and_comes_down_by_halves() -> None:
    c = snap.IntervalChooser("auto")
    for _ in range(5):
        c.add_step(0.100)
    assert c.add_cost(0.5) == 250  # 5 steps' worth: 2 % means every 250th
    seen = [250] + [x for x in (c.add_cost(0.001) for _ in range(12)) if x is not None]  # then cheap
    assert seen[-1] == 1 == c.interval
    assert all(b < a <= 2 * b for a, b in itertools.pairwise(seen))  # down by half at most each time


def test_auto_counts_the_copy_threads_cpu_time_beside_the_exposed_time() -> None:
    """A copy in the thread: 0.5 ms exposed (1 % of a 50 ms step, within budget on its own), but
    the thread used 2 ms of CPU beside training (4 %): the interval follows the busy time, and
    comes back to every step when the thread gets cheap. No step ever goes without a snapshot."""
    c = snap.IntervalChooser("auto")
    c.add_cost(0.0005, busy=0.0025)  # before any step time: no choice yet, and no snapshot before one
    assert c.interval == 1 and not c.is_due(2, 1)
    assert c.add_step(0.050) == 3 and c.interval == 3  # 2.5 ms of 50 ms: 5 %, every 3rd step
    assert c.cost_seconds == pytest.approx(0.0025) and c.step_seconds == pytest.approx(0.050)
    for _ in range(8):
        c.add_step(0.050)
        c.add_cost(0.0005, busy=0.0006)  # the thread's CPU time fell: 1.2 %
    assert c.interval == 1 and all(c.is_due(s, s - 1) for s in range(2, 40))
    # Exposed time beyond the busy time (training waited for a copy slowed by other load) counts too.
    w = snap.IntervalChooser("auto")
    w.add_step(0.050)
    assert w.add_cost(0.005, busy=0.001) == 5


def test_auto_compares_cpu_time_with_the_steps_cpu_time_under_contention() -> None:
    """A loaded CPU: steps of 110 ms wall but 18 ms of CPU; a snapshot of 1.2 ms exposed (1 % of
    the wall step) that took 1.3 ms of CPU (7 % of the step's CPU). The CPU share counts."""
    c = snap.IntervalChooser("auto")
    for _ in range(4):
        c.add_step(0.110, cpu_seconds=0.018)
    assert c.add_cost(0.0012, busy=0.0013) == 4
    assert c.cost_seconds == pytest.approx(0.110 * 0.0013 / 0.018)
    # Without CPU times for the steps, or where the CPU share is the smaller, the wall share decides.
    w = snap.IntervalChooser("auto")
    for _ in range(4):
        w.add_step(0.110)
    assert w.add_cost(0.0012, busy=0.0013) is None and w.interval == 1
    g = snap.IntervalChooser("auto")
    for _ in range(4):
        g.add_step(0.100, cpu_seconds=0.100)
    assert g.add_cost(0.0015, busy=0.0001) is None and g.interval == 1


def test_every_steps_is_validated_when_built_in_code() -> None:
    from supervisor.schema import ConfigError, SnapshotConfig

    assert SnapshotConfig().every_steps == "auto" and SnapshotConfig().enabled
    assert not SnapshotConfig(every_steps=0).enabled
    for bad in ("often", -1, 2.5, True):
        with pytest.raises(ConfigError, match=r"snapshot\.every_steps"):
            SnapshotConfig(every_steps=bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- choosing what to resume


def _choose_setup(make_config: Any, tmp_path: Path) -> tuple[Any, SnapshotStore]:
    from supervisor.schema import load_config
    from worker.train import snapshot_store

    cfg = load_config(make_config({"snapshot": {"every_steps": 1, "root": str(tmp_path / "shm")}}))
    cfg.output_dir.mkdir(parents=True)
    (cfg.output_dir / "run").mkdir()
    store = snapshot_store(cfg, "fp")
    assert store is not None
    return cfg, store


def test_choose_checkpoint_resumes_a_newer_snapshot_as_a_committed_checkpoint(
    make_config: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from worker import guard
    from worker.train import choose_checkpoint

    cfg, store = _choose_setup(make_config, tmp_path)
    guard.record(cfg.output_dir, cfg, "fp")
    snap.materialize(snap.Snapshot(3, fake_checkpoint_files(3), 0.0, 1, 0), cfg.output_dir)
    store.write(7, fake_checkpoint_files(7))
    with caplog.at_level("INFO", logger="vit_train"):
        target, reason, _ = choose_checkpoint(cfg, "fp", resume=True, checkpoint=None, store=store)
    assert reason is None and target == cfg.output_dir / "checkpoint-7"
    assert ckpt.validate(target)["global_step"] == 7
    assert "Training will resume from snapshot step 7 (newer than checkpoint-3)" in caplog.text
    # An explicit --checkpoint means exactly that checkpoint.
    target, _, _ = choose_checkpoint(cfg, "fp", resume=True, checkpoint=cfg.output_dir / "checkpoint-3", store=store)
    assert target == cfg.output_dir / "checkpoint-3"


def test_choose_checkpoint_ignores_a_snapshot_no_newer_than_the_disk(make_config: Any, tmp_path: Path) -> None:
    from worker import guard
    from worker.train import choose_checkpoint

    cfg, store = _choose_setup(make_config, tmp_path)
    guard.record(cfg.output_dir, cfg, "fp")
    snap.materialize(snap.Snapshot(7, fake_checkpoint_files(7), 0.0, 1, 0), cfg.output_dir)
    store.write(5, fake_checkpoint_files(5))
    target, _, _ = choose_checkpoint(cfg, "fp", resume=True, checkpoint=None, store=store)
    assert target == cfg.output_dir / "checkpoint-7"
    assert not (cfg.output_dir / "checkpoint-5").exists()


def test_a_start_from_scratch_removes_a_leftover_store(make_config: Any, tmp_path: Path) -> None:
    """Same path and settings, run folder emptied (no guard): the old run's snapshot is not ours."""
    from worker.train import choose_checkpoint

    cfg, store = _choose_setup(make_config, tmp_path)
    store.write(7, fake_checkpoint_files(7))
    target, reason, _ = choose_checkpoint(cfg, "fp", resume=True, checkpoint=None, store=store)
    assert target is None and reason is None
    assert not store.root.exists() and ckpt.list_checkpoints(cfg.output_dir) == []


def test_auto_judges_a_big_copy_by_its_cpu_time_with_no_baseline_steps() -> None:
    """A big state copied in the thread: 1 ms exposed, but 0.37 s of the thread's CPU beside 0.75 s
    steps: every 25th step at once (the old chooser needed steps without a copy to tell, and
    skipped a snapshot at every 16th step to get them). A copy at the boundary counts its
    exposed time alone."""
    c = snap.IntervalChooser("auto")
    for _ in range(3):
        c.add_step(0.75)
    assert c.add_cost(0.001, busy=0.371) == 25
    for _ in range(12):
        assert c.add_cost(0.001, busy=0.371) is None
    assert c.interval == 25
    b = snap.IntervalChooser("auto")
    b.add_step(0.1)
    assert b.add_cost(0.001) is None and b.interval == 1 and b.is_due(16, 15)
