"""Training-state snapshots in host shared memory: lose at most one step to a crash the host survives.

A snapshot holds exactly the state a disk checkpoint holds. The small files
(``config.json``, ``scheduler.pt``, ``trainer_state.json``, ``rng_state*.pth``,
``training_args.bin``, ``scaler.pt`` when there is a grad scaler) are held as the
bytes of those files. The big tensors (the model's parameters and buffers, the
optimizer's state) are held raw, one after another, with their names, dtypes and
shapes in the index and the rest of the optimizer's state dict (param groups, step
counts that are not tensors) as a small ``torch.save`` "skeleton": turning them into
``model.safetensors`` and ``optimizer.pt`` costs a serialisation that only a resume
needs, so it happens there (:func:`materialize`, which writes the files into a
staging folder and commits it with the normal :func:`worker.checkpoint.commit`; from
there the tested exact resume of a disk checkpoint does the rest). Capturing is then
a copy of tensor bytes into the slot, which the worker runs while the next step's
forward and backward run (worker/trainer.py ``Snapshots``).

Layout of a store (one per run and rank, see :func:`default_root`)::

    <root>/slot-0        a container (below)
    <root>/slot-1        a container
    <root>/header.json   which slot holds the newest snapshot and which the previous one, and how to verify them

Container (one file per slot)::

    8 bytes   magic b"VITSNAP2"
    8 bytes   n: length of the index, unsigned little-endian
    n bytes   index: JSON {"format": 2, "step": S, "files": [[name, offset, length], ...],
              "tensors": null or {"skeleton": [offset, length], "metadata": {...},
                                  "entries": [[group, name, dtype, shape, offset, length], ...]}}
    ...       the files' bytes, then the skeleton, then the tensors' bytes, each right after the
              previous; offsets count from the end of the index

A tensor entry's group is ``model`` (name: its key in ``model.safetensors``) or ``optimizer``
(name: ``<param id>.<state key>`` in the optimizer's state dict); ``metadata`` is that of
``model.safetensors``. Containers of format 1 (files only, magic ``VITSNAP1``) are not read:
they are ignored like any other unreadable slot, and the disk checkpoint is used.

Header (JSON, replaced atomically): ``format``, ``checksum`` (``"crc32"``), ``identity``
(the run's config/data fingerprint, world size, rank, ...), ``pid``, and the *entry* of the
newest snapshot: ``generation`` (1, 2, ...), ``slot`` (0 or 1), ``step``, ``size`` (bytes of
the slot file), ``crc32`` (of the whole slot file), ``time`` (epoch seconds of the write).
Optionally ``previous``: the entry of the snapshot before it, in the other slot (an object
with the same entry keys, an older generation and a lower step).

Commit protocol (:meth:`SnapshotStore.write`), for a store whose header names slot A as
newest and slot B as previous:

1. If the header has a ``previous`` entry, replace the header with one without it (the
   entry names B, the slot about to be overwritten: no header ever names a slot while it
   is being written).
2. Write slot B in place, with plain ``write()`` calls (straight from the tensors' memory,
   computing the CRC on the way).
3. Replace the header: B is the newest, A the previous (A only when its step is lower than
   B's: a writer that restarted from an older checkpoint does not offer a step from the
   abandoned future).

Each header replacement is a temporary file + rename
(:meth:`SnapshotStore._write_header`); the renames are the commits. A kill at
any instant leaves one of three headers: the old one (A and B both untouched since they
were named), the one of step 1 (A untouched), or the new one (B completely written before
the rename, A untouched since its own write). So the newest entry is always valid, and the
previous one is there except while its slot is being rewritten. Both slots and headers are
in the same kernel's page cache, so a later reader sees every ``write()`` that returned
before a rename; fsync would add nothing (tmpfs has no stable storage, and a host crash
loses the snapshot by design: disk checkpoints cover that).

A single-process resume uses the newest entry only (:meth:`SnapshotStore.read_newest`): a
newest slot that does not validate (which only a bug, a second writer or bad memory can
cause) means the disk checkpoint is the safer fallback. A multi-rank resume needs the newest
step that *every* rank holds (:meth:`SnapshotStore.available_steps`,
:meth:`SnapshotStore.read_step`, the agreement in ``worker/train.py``), and a rank that
committed one snapshot more than another offers its previous entry for that.

Why two entries are enough under torchrun: every rank snapshots at the same steps, and
between one rank's commit of the snapshot of step s and any rank's capture of the next
one (s + N) there is a collective every rank takes part in: the gradient all-reduce of step
s + 1 when the snapshot is written at the boundary, and the stop vote at the boundary of
s + N (``worker.dist.any_ranks`` in ``SupervisionCallback.on_step_end``) when the commit is
deferred into the next step's forward/backward. No rank can leave a collective before
every rank has entered it, so when a rank commits s + N every other rank has committed s:
ranks are at most one snapshot apart. A rank ahead holds s + N as newest and s as
previous (its previous is dropped only while it writes s + 2N, which it cannot start
before every rank has committed s + N); a rank behind holds s as newest. The newest step
every rank holds is therefore the lowest newest step among the ranks, and it is at most
one snapshot older than the newest any rank reached.

Reading trusts nothing: the header's types and ranges, the identity, the slot's size, the
CRC, the index's bounds and names, and that ``trainer_state.json`` says ``global_step ==
step``; the previous entry is checked on its own (same checks, the other slot, an older
generation, a lower step), so a bad previous entry never hides a good newest one. Whatever
does not validate is logged and ignored, never raised.

Why CRC-32 (``zlib.crc32``, stdlib, about 4 GB/s here and it releases the GIL): the
checksum guards against accidents (a torn or truncated slot, a second writer, a flipped
bit), not an adversary, who could rewrite the header as easily as the slot. Against
random corruption CRC-32 misses with probability 2^-32 and it catches every burst up to
32 bits, the same as CRC32C (which differs only in being hardware-accelerated on x86);
xxh3 is faster but arrives only as a dependency of wandb. The header names the
algorithm, so switching is a format detail, not a migration.

A store has one writer at a time (the worker, under the run's worker lock); readers may
run at any time. A reader that races a writer may see a checksum mismatch and retries a
few times while the header moves on.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import stat
import statistics
import struct
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.shm import default_root as default_root  # where the stores are: shared with the supervisor
from worker import checkpoint as ckpt

log = logging.getLogger("vit_train")

FORMAT = 1  # of the header
CONTAINER = 2  # of the slot's index
MAGIC = b"VITSNAP2"
_PREFIX = struct.Struct("<8sQ")
HEADER = "header.json"
SLOTS = ("slot-0", "slot-1")
DEFAULT_BASE = Path("/dev/shm")

_MAX_HEADER = 64 << 10  # a header is a few hundred bytes; anything bigger is not ours
_MAX_INDEX = 16 << 20  # thousands of names fit in far less
_SLACK = 64 << 10  # container prefix + index, and the header, per :meth:`SnapshotStore.needed_bytes`
_SMALL = 64 << 10  # chunks below this are joined before writing (:func:`_coalesce`)
_READ_TRIES = 3  # a reader racing the writer sees a moving header; a corrupt slot fails every try
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")  # a plain file name: no path, no "..", no hidden file
# Header keys that describe the store, not one snapshot: every other key belongs to the newest entry.
_STORE_KEYS = frozenset({"format", "checksum", "identity", "pid", "previous"})
_OPT_NAME = re.compile(r"^(0|[1-9][0-9]{0,8})\.(.{1,200})$", re.DOTALL)  # "<param id>.<state key>"
# Bytes per element of the dtypes a snapshot holds (torch's names); the reader checks sizes without torch.
ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "complex64": 8,
    "complex128": 16,
}
_MAX_DIMS = 16


@dataclass(frozen=True)
class TensorSpec:
    """One raw tensor of a snapshot: where it goes and how to read its bytes."""

    group: str
    """``model`` (``name`` is its key in model.safetensors) or ``optimizer`` (``<param id>.<state key>``)."""
    name: str
    dtype: str
    """torch's dtype name without ``torch.``, one of :data:`ITEMSIZE`."""
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class TensorState:
    """A snapshot's big tensors, raw, and what :func:`materialize` needs to turn them into
    ``model.safetensors`` and ``optimizer.pt``.

    ``buffers`` hold one buffer per spec (each ``spec.nbytes`` long; views of the slot's
    bytes when read back), or, when writing, one buffer holding all of them in order.
    """

    specs: tuple[TensorSpec, ...]
    buffers: tuple[Any, ...]
    skeleton: bytes
    """``torch.save`` of the optimizer's state dict with its tensors left out."""
    metadata: dict[str, str]
    """model.safetensors' metadata (``{"format": "pt"}`` for a transformers model)."""

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs) + len(self.skeleton)


@dataclass(frozen=True)
class Snapshot:
    """One validated snapshot: the small files a checkpoint of ``step`` holds, and its big
    tensors raw in ``tensors`` (None for a snapshot written with every file as bytes)."""

    step: int
    files: dict[str, bytes]
    time: float
    generation: int
    slot: int
    tensors: TensorState | None = None

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values()) + (self.tensors.nbytes if self.tensors else 0)


def _normalize(identity: Mapping[str, Any]) -> dict[str, Any]:
    """The identity as it reads back from JSON, so that comparing written and read is exact."""
    out: dict[str, Any] = json.loads(json.dumps(dict(identity), sort_keys=True, default=str))
    return out


def _int(v: Any, lo: int = 0, hi: int = 1 << 62) -> int | None:
    """``v`` if it is a real int (not a bool, not a float) within [lo, hi]."""
    return v if type(v) is int and lo <= v <= hi else None


class SnapshotStore:
    """Two slots and a header under ``root``; see the module docstring for the format."""

    def __init__(self, root: str | os.PathLike[str], identity: Mapping[str, Any]) -> None:
        self.root = Path(root)
        self.identity = _normalize(identity)
        self._next: tuple[int, int] | None = None  # (generation, slot) of the next write, once known
        self._current: dict[str, Any] | None = None  # the header on disk, as this writer last wrote or read it

    # -- writing -----------------------------------------------------------------------

    def write(
        self, step: int, files: Mapping[str, bytes | bytearray | memoryview], tensors: TensorState | None = None
    ) -> None:
        """Make ``files`` (the small files of a checkpoint of ``step``, or all of them) and
        ``tensors`` (the big ones, raw) the newest snapshot.

        Raises ValueError for a snapshot that could never be read back (a bad name, no
        ``trainer_state.json`` of this step, a buffer of the wrong size) and OSError when the
        store cannot be written (ENOSPC on a small ``/dev/shm``): the previous snapshot then
        still stands.
        """
        if _int(step) is None:
            raise ValueError(f"step must be a non-negative int, not {step!r}")
        names = list(files)
        bad = [n for n in names if not isinstance(n, str) or not _NAME.match(n)]
        if bad:
            raise ValueError(f"not plain file names: {bad[:4]}")
        why = _state_mismatch(files.get("trainer_state.json"), step)
        if why:
            raise ValueError(why)
        chunks: list[Any] = [files[n] for n in names]
        index: list[list[Any]] = []
        offset = 0
        for name, chunk in zip(names, chunks, strict=True):
            length = memoryview(chunk).nbytes
            index.append([name, offset, length])
            offset += length
        tensor_index: dict[str, Any] | None = None
        if tensors is not None:
            tensor_index, offset = _tensor_index(tensors, offset)
            chunks += [tensors.skeleton, *tensors.buffers]
        if self._next is None or not os.path.isdir(self.root):
            # First write, or the folder was emptied under us (someone cleaned /dev/shm): start from
            # what the header on disk says, if anything.
            self._prepare_root()
            self._current = self._header(quiet=True)
            self._next = self._after(self._current)
        generation, slot = self._next
        current = self._current
        if current is not None and "previous" in current:
            # The previous entry names the slot about to be overwritten: un-name it first.
            current = {k: v for k, v in current.items() if k != "previous"}
            self._write_header(current)
            self._current = current
        index_raw = json.dumps(
            {"format": CONTAINER, "step": step, "files": index, "tensors": tensor_index}, separators=(",", ":")
        ).encode()
        head = _PREFIX.pack(MAGIC, len(index_raw)) + index_raw
        size = len(head) + offset
        crc = 0
        path = self.root / SLOTS[slot]
        # In place, not truncated first: on tmpfs the pages of the last write are reused, and the
        # header does not name this slot, so no reader trusts what is in it now.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            for piece in _coalesce([head, *chunks]):
                crc = _write_all(fd, piece, crc)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        header: dict[str, Any] = {
            "format": FORMAT,
            "generation": generation,
            "slot": slot,
            "step": step,
            "size": size,
            "checksum": "crc32",
            "crc32": crc,
            "identity": self.identity,
            "time": time.time(),
            "pid": os.getpid(),
        }
        if current is not None and current["step"] < step:
            header["previous"] = _entry(current)
        self._write_header(header)
        self._current = header
        self._next = (generation + 1, 1 - slot)

    def _write_header(self, header: dict[str, Any]) -> None:
        """Replace the header atomically (a temporary file and a rename), twice per snapshot.

        Plain system calls on a fixed temporary name (one writer per store; :meth:`_prepare_root`
        removes a dead writer's): about a third of :func:`supervisor.protocol.atomic_write_bytes`'s time,
        which creates folders and draws a random name first.
        """
        tmp = self.root / f".{HEADER}.{os.getpid()}.tmp"
        data = memoryview(json.dumps(header, sort_keys=True).encode())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
        os.replace(tmp, self.root / HEADER)

    def _prepare_root(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(self.root)
        # Refuse a root someone else planted (a symlink or another user's folder in /dev/shm).
        if not os.path.isdir(self.root) or os.path.islink(self.root) or st.st_uid != os.getuid():
            raise OSError(f"snapshot folder {self.root} is not a folder owned by this user")
        # Temporary headers of a writer killed between mkstemp and rename: ours (one writer), never read.
        for p in self.root.glob(f".{HEADER}.*.tmp"):
            try:
                p.unlink()
            except OSError:
                pass

    @staticmethod
    def _after(header: dict[str, Any] | None) -> tuple[int, int]:
        """The generation and slot that follow ``header``, the one on disk (a new writer after a
        restart must not overwrite the newest snapshot, which it may be resuming from)."""
        if header is None:
            return 1, 0
        return header["generation"] + 1, 1 - header["slot"]

    # -- reading -----------------------------------------------------------------------

    def read_newest(self) -> Snapshot | None:
        """The newest snapshot if every check passes, else None (with a log line saying why).

        Never the previous entry: see the module docstring for why a single process does not fall back to it.
        """
        return self._read(lambda header: [header])

    def read_step(self, step: int) -> Snapshot | None:
        """The snapshot of ``step`` (the newest or the previous entry) if every check passes, else None."""
        return self._read(lambda header: [e for e in self._entries(header)[0] if e["step"] == step], step)

    def listed_steps(self) -> list[int]:
        """The steps the header lists, newest first, without reading the slots (cheap): the
        newest entry's and the previous entry's when that checks out (else it is logged and
        left out). :meth:`read_step` verifies a slot; :meth:`available_steps` verifies them all."""
        header = self._header()
        if header is None:
            return []
        entries, why_not_previous = self._entries(header)
        if why_not_previous:
            log.warning("Ignoring the previous snapshot in %s: %s", self.root, why_not_previous)
        return [e["step"] for e in entries]

    def available_steps(self) -> list[int]:
        """The steps this store can give back now, newest first: its newest and its previous
        entry, each read and verified on its own (a bad one is logged and left out)."""
        problems: list[str] = []
        steps: list[int] = []
        for _ in range(_READ_TRIES):
            header = self._header()
            if header is None:
                return []
            entries, why_not_previous = self._entries(header)
            problems = [f"previous entry: {why_not_previous}"] if why_not_previous else []
            steps = []
            for entry in entries:
                snap, why = self._try_read(entry)
                if snap is None:
                    problems.append(f"step {entry['step']}: {why}")
                else:
                    steps.append(snap.step)
                del snap  # one slot's bytes in memory at a time
            if not problems or self._header(quiet=True) == header:
                break  # all good, or nobody is writing: what is wrong stays wrong
        for why in problems:
            log.warning("Ignoring a snapshot in %s: %s", self.root, why)
        return steps

    def _read(self, pick: Callable[[dict[str, Any]], list[dict[str, Any]]], step: int | None = None) -> Snapshot | None:
        """The first entry that ``pick(header)`` returns, read and verified, retried while a writer moves the header."""
        why = "no header"
        for _ in range(_READ_TRIES):
            header = self._header()
            if header is None:
                return None
            entries = pick(header)
            if not entries:
                log.warning("No snapshot of step %s in %s (the header names %s)", step, self.root, header["step"])
                return None
            snap, why = self._try_read(entries[0])
            if snap is not None:
                return snap
            if self._header(quiet=True) == header:
                break  # nobody is writing: the slot itself is bad
        log.warning("Ignoring the snapshot%s in %s: %s", "" if step is None else f" of step {step}", self.root, why)
        return None

    def _try_read(self, entry: dict[str, Any]) -> tuple[Snapshot | None, str]:
        try:
            return self._read_slot(entry)
        except (OSError, MemoryError) as exc:
            return None, f"{type(exc).__name__}: {exc}"

    @staticmethod
    def _entries(header: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        """The newest entry (``header`` itself) and, when it checks out, the previous one as a
        header of the same shape; with why a previous entry that does not check out is left out."""
        if "previous" not in header:
            return [header], ""
        previous, why = _previous_entry(header)
        return ([header], why) if previous is None else ([header, previous], "")

    def _header(self, quiet: bool = False) -> dict[str, Any] | None:
        """The parsed header if its shape and identity are right."""
        path = self.root / HEADER
        try:
            raw = _read_regular(path, _MAX_HEADER + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if not quiet:
                log.warning("Ignoring the snapshot in %s: header unreadable (%s)", self.root, exc)
            return None
        why = None
        header: Any = None
        if len(raw) > _MAX_HEADER:
            why = "header too large"
        else:
            try:
                header = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                why = f"header does not parse ({exc})"
        if why is None:
            why = _header_problem(header)
        if why is None and header["identity"] != self.identity:
            a, b = header["identity"], self.identity
            keys = sorted(k for k in set(a) | set(b) if a.get(k, _MISSING) != b.get(k, _MISSING))
            why = f"written by a different run (identity differs in {', '.join(keys)})"
        if why is not None:
            if not quiet:
                log.warning("Ignoring the snapshot in %s: %s", self.root, why)
            return None
        result: dict[str, Any] = header
        return result

    def _read_slot(self, header: dict[str, Any]) -> tuple[Snapshot | None, str]:
        path = self.root / SLOTS[header["slot"]]
        size = header["size"]
        fd = _open_regular(path)
        with os.fdopen(fd, "rb", buffering=0) as f:
            actual = os.fstat(fd).st_size
            if actual != size:
                return None, f"{SLOTS[header['slot']]} has {actual} bytes, the header says {size} (torn or replaced)"
            # The whole slot, checksummed before any of it is parsed (the parse is defensive all the same).
            raw = bytearray(size)
            view = memoryview(raw)
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    return None, "slot ends early (replaced while being read)"
                got += n
        if zlib.crc32(view) != header["crc32"]:
            return None, f"checksum mismatch in {SLOTS[header['slot']]} (corrupt or overwritten)"
        magic, n = _PREFIX.unpack_from(view)
        if magic != MAGIC or n > _MAX_INDEX or _PREFIX.size + n > size:
            return None, "slot prefix is not a snapshot container of this version"
        start = _PREFIX.size + n
        layout, why = _parse_index(bytes(view[_PREFIX.size : start]), header["step"], size - start)
        if layout is None:
            return None, why
        data = view[start:]
        files = {name: bytes(data[off : off + length]) for name, off, length in layout.files}
        tensors = None
        if layout.tensors is not None:
            (s_off, s_len), specs, offsets, metadata = layout.tensors
            buffers = tuple(data[o : o + spec.nbytes] for spec, o in zip(specs, offsets, strict=True))
            tensors = TensorState(specs, buffers, bytes(data[s_off : s_off + s_len]), metadata)
        why_state = _state_mismatch(files.get("trainer_state.json"), header["step"])
        if why_state:
            return None, why_state
        return Snapshot(
            step=header["step"],
            files=files,
            time=float(header["time"]),
            generation=header["generation"],
            slot=header["slot"],
            tensors=tensors,
        ), ""

    # -- space and lifecycle -----------------------------------------------------------

    def free_bytes(self) -> int:
        """Free bytes (for this user) on the store's file system, looking up from ``root`` to an existing folder."""
        p = self.root
        while not p.exists() and p != p.parent:
            p = p.parent
        st = os.statvfs(p)
        return st.f_bavail * st.f_frsize

    def used_bytes(self) -> int:
        """Bytes the store holds now (reused by its next writes, so they count as available to it)."""
        total = 0
        for name in (*SLOTS, HEADER):
            try:
                total += os.lstat(self.root / name).st_size
            except OSError:
                pass
        return total

    @staticmethod
    def needed_bytes(state_size: int) -> int:
        """What a store for a checkpoint of ``state_size`` bytes takes: two slots and the header."""
        return 2 * (state_size + _SLACK) + _SLACK

    def remove(self) -> None:
        """Delete the store (run complete, stopped for good, or no longer resumable)."""
        shutil.rmtree(self.root, ignore_errors=True)
        self._next = None


_MISSING = object()


def _coalesce(chunks: list[Any], small: int = _SMALL) -> list[Any]:
    """``chunks`` with runs of small ones joined into pieces of up to ``small`` bytes.

    A model has many small tensors (biases, norms) and every ``write()`` lets go of the GIL
    and has to win it back from the training thread: a few joined pieces cost less than
    hundreds of tiny writes. Big chunks pass through as they are (no copy).
    """
    out: list[Any] = []
    run: list[Any] = []
    size = 0
    for chunk in chunks:
        n = memoryview(chunk).nbytes
        if n >= small:
            if run:
                out.append(b"".join(run))
                run, size = [], 0
            out.append(chunk)
            continue
        if size + n > small and run:
            out.append(b"".join(run))
            run, size = [], 0
        run.append(chunk)
        size += n
    if run:
        out.append(b"".join(run))
    return out


def _write_all(fd: int, chunk: Any, crc: int) -> int:
    """Write all of ``chunk`` at the file's position; return ``crc`` continued over it.

    Both calls release the GIL for large buffers, so the training thread runs on meanwhile.
    """
    view = memoryview(chunk).cast("B")
    crc = zlib.crc32(view, crc)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    return crc


def _open_regular(path: Path) -> int:
    """A read descriptor of ``path`` if it is a regular file: a planted FIFO would block the
    reader forever (hence O_NONBLOCK, which regular files ignore), a symlink could point anywhere."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path.name} is not a regular file")
    return fd


def _read_regular(path: Path, limit: int) -> bytes:
    with os.fdopen(_open_regular(path), "rb") as f:
        return f.read(limit)


def _entry(header: dict[str, Any]) -> dict[str, Any]:
    """The newest entry of ``header``: what its ``previous`` becomes when the next snapshot is committed."""
    return {k: v for k, v in header.items() if k not in _STORE_KEYS}


def _previous_entry(header: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """``header``'s previous entry as a header of its own (the store's keys from ``header``),
    if it passes every check a header does and fits beside the newest entry."""
    prev = header["previous"]
    if not isinstance(prev, dict):
        return None, "the previous entry is not an object"
    if _STORE_KEYS & set(prev):
        return None, f"the previous entry carries store keys ({', '.join(sorted(_STORE_KEYS & set(prev)))})"
    merged = {**{k: header[k] for k in _STORE_KEYS if k in header and k != "previous"}, **prev}
    why = _header_problem(merged)
    if why is not None:
        return None, why.replace("header", "previous entry", 1)
    if merged["slot"] == header["slot"]:
        return None, "the previous entry names the newest slot"
    if merged["generation"] >= header["generation"] or merged["step"] >= header["step"]:
        return None, "the previous entry is not older than the newest (generation or step)"
    return merged, ""


def _header_problem(h: Any) -> str | None:
    if not isinstance(h, dict):
        return "header is not a JSON object"
    if h.get("format") != FORMAT or type(h.get("format")) is not int:
        return f"header format {h.get('format')!r}, this version reads {FORMAT}"
    checks = {
        "generation": _int(h.get("generation"), 1),
        "slot": _int(h.get("slot"), 0, 1),
        "step": _int(h.get("step")),
        "size": _int(h.get("size"), _PREFIX.size),
        "crc32": _int(h.get("crc32"), 0, 0xFFFFFFFF),
    }
    bad = [k for k, v in checks.items() if v is None]
    if bad:
        return f"header fields missing or out of range: {', '.join(bad)}"
    if h.get("checksum") != "crc32":
        return f"unknown checksum {h.get('checksum')!r}"
    if not isinstance(h.get("identity"), dict):
        return "header identity is not an object"
    t = h.get("time")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t < 1e11:
        return "header time missing or out of range"
    return None


@dataclass(frozen=True)
class _Layout:
    files: list[tuple[str, int, int]]
    """(name, offset, length) of each small file."""
    tensors: tuple[tuple[int, int], tuple[TensorSpec, ...], list[int], dict[str, str]] | None
    """(skeleton offset and length, specs, their offsets, model metadata), or None."""


def _parse_index(raw: bytes, step: int, data_size: int) -> tuple[_Layout | None, str]:
    """The layout if the index covers exactly ``data_size`` bytes, each piece right after the
    previous, with plain file names and tensor entries whose sizes match their dtypes and shapes."""
    try:
        index = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        return None, f"index does not parse ({exc})"
    if not isinstance(index, dict) or index.get("format") != CONTAINER or index.get("step") != step:
        return None, "index format or step does not match the header"
    entries = index.get("files")
    if not isinstance(entries, list):
        return None, "index has no file list"
    files: list[tuple[str, int, int]] = []
    seen: set[str] = set()
    offset = 0
    for e in entries:
        if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and _NAME.match(e[0])):
            return None, f"index entry {str(e)[:80]!r} is not [name, offset, length]"
        name, off, length = e[0], _int(e[1]), _int(e[2])
        if off != offset or length is None or name in seen:
            return None, f"index entry for {name} is out of bounds or repeated"
        seen.add(name)
        files.append((name, offset, length))
        offset += length
    tensors = None
    if index.get("tensors") is not None:
        tensors, offset, why = _parse_tensor_index(index["tensors"], offset)
        if tensors is None:
            return None, why
    if offset != data_size:
        return None, f"index covers {offset} bytes, the slot holds {data_size}"
    return _Layout(files, tensors), ""


def _parse_tensor_index(
    t: Any, offset: int
) -> tuple[tuple[tuple[int, int], tuple[TensorSpec, ...], list[int], dict[str, str]] | None, int, str]:
    if not isinstance(t, dict) or not isinstance(t.get("entries"), list):
        return None, offset, "index has a tensor section without entries"
    meta = t.get("metadata")
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        return None, offset, "tensor metadata is not a mapping of strings"
    sk = t.get("skeleton")
    if not (isinstance(sk, list) and len(sk) == 2 and _int(sk[0]) == offset and _int(sk[1]) is not None):
        return None, offset, "optimizer skeleton is out of bounds"
    skeleton = (offset, sk[1])
    offset += sk[1]
    specs: list[TensorSpec] = []
    offsets: list[int] = []
    seen: set[tuple[str, str]] = set()
    for e in t["entries"]:
        spec = _tensor_spec(e)
        if spec is None or (spec.group, spec.name) in seen:
            return None, offset, f"tensor entry {str(e)[:80]!r} is malformed or repeated"
        if _int(e[4]) != offset:
            return None, offset, f"tensor {spec.name[:80]} is out of bounds"
        seen.add((spec.group, spec.name))
        specs.append(spec)
        offsets.append(offset)
        offset += spec.nbytes
    return (skeleton, tuple(specs), offsets, dict(meta)), offset, ""


def _tensor_spec(e: Any) -> TensorSpec | None:
    """``[group, name, dtype, shape, offset, length]`` as a spec, if every part is sound."""
    if not (isinstance(e, list) and len(e) == 6 and isinstance(e[1], str) and 0 < len(e[1]) <= 1000):
        return None
    group, name, dtype, shape, length = e[0], e[1], e[2], e[3], _int(e[5])
    if group not in ("model", "optimizer") or (group == "optimizer" and not _OPT_NAME.match(name)):
        return None
    if dtype not in ITEMSIZE or not isinstance(shape, list) or len(shape) > _MAX_DIMS:
        return None
    dims = [_int(d, 0, 1 << 40) for d in shape]
    if any(d is None for d in dims):
        return None
    numel = 1
    for d in shape:
        numel *= d
    if length != numel * ITEMSIZE[dtype]:
        return None
    return TensorSpec(group, name, dtype, tuple(shape), numel * ITEMSIZE[dtype])


def _tensor_index(tensors: TensorState, offset: int) -> tuple[dict[str, Any], int]:
    """The index's tensor section for ``tensors`` placed at ``offset``, and the offset after them."""
    one = len(tensors.buffers) == 1 and len(tensors.specs) != 1  # a single buffer holding them all, in order
    if not one and len(tensors.specs) != len(tensors.buffers):
        raise ValueError(f"{len(tensors.specs)} tensor specs but {len(tensors.buffers)} buffers")
    if one and memoryview(tensors.buffers[0]).nbytes != sum(spec.nbytes for spec in tensors.specs):
        raise ValueError("the tensors' buffer does not hold exactly their bytes")
    section: dict[str, Any] = {"skeleton": [offset, len(tensors.skeleton)], "metadata": dict(tensors.metadata)}
    offset += len(tensors.skeleton)
    entries = []
    for i, spec in enumerate(tensors.specs):
        if _tensor_spec([spec.group, spec.name, spec.dtype, list(spec.shape), 0, spec.nbytes]) is None:
            raise ValueError(f"tensor {spec.group} {spec.name[:80]!r} could not be read back ({spec})")
        if not one and memoryview(tensors.buffers[i]).nbytes != spec.nbytes:
            raise ValueError(f"tensor {spec.name[:80]!r} has the wrong number of bytes (its spec says {spec.nbytes})")
        entries.append([spec.group, spec.name, spec.dtype, list(spec.shape), offset, spec.nbytes])
        offset += spec.nbytes
    section["entries"] = entries
    return section, offset


def _state_mismatch(raw: Any, step: int) -> str | None:
    """Why ``raw`` is not a trainer_state.json of ``step`` (None when it is)."""
    if raw is None:
        return "no trainer_state.json"
    try:
        gstep = json.loads(bytes(raw))["global_step"]
    except (ValueError, RecursionError, KeyError, TypeError) as exc:
        return f"trainer_state.json does not parse ({type(exc).__name__})"
    if type(gstep) is not int or gstep != step:
        return f"trainer_state.json says global_step {gstep!r}, the snapshot is of step {step}"
    return None


# ----------------------------------------------------------------------------- to disk


def materialize(snapshot: Snapshot, output_dir: str | os.PathLike[str]) -> Path:
    """Commit ``snapshot`` as ``checkpoint-<step>`` in ``output_dir`` with the normal checkpoint path.

    An existing ``checkpoint-<step>`` that validates is returned as it is (the same step
    holds the same state). One that does not is set aside by :func:`ckpt.commit`. The new
    checkpoint is validated before it is returned; one that fails is set aside and
    :class:`ckpt.CheckpointInvalid` raised.
    """
    out = Path(output_dir)
    step = snapshot.step
    final = out / f"checkpoint-{step}"
    if final.exists():
        try:
            ckpt.validate(final)
            log.info("Snapshot of step %d not written: %s already holds it", step, final.name)
            return final
        except ckpt.CheckpointInvalid as exc:
            log.warning("%s does not validate (%s); replacing it with the snapshot of that step", final.name, exc)
    staging = ckpt.staging_dir(out, step)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        for name, data in snapshot.files.items():
            with open(staging / name, "wb") as f:
                f.write(data)
        if snapshot.tensors is not None:
            _write_tensor_files(snapshot.tensors, staging)
        size = ckpt.commit(staging, final, step)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        ckpt.validate(final)
    except ckpt.CheckpointInvalid as exc:
        ckpt.set_aside(final, f"committed from a snapshot but does not validate: {exc}")
        raise
    log.info("Committed snapshot of step %d as %s (%.1f MiB)", step, final.name, size / 2**20)
    return final


def _write_tensor_files(tensors: TensorState, folder: Path) -> None:
    """``model.safetensors`` and ``optimizer.pt`` from raw tensors, as the Trainer's own save writes them.

    model.safetensors goes through the same ``safetensors.torch`` call as ``save_pretrained``
    (same names, dtypes, shapes, bytes and metadata: the same file); optimizer.pt is
    ``torch.save`` of the optimizer's state dict, rebuilt from the skeleton.
    """
    import safetensors.torch
    import torch

    model: dict[str, Any] = {}
    optim: list[tuple[int, str, Any]] = []
    for spec, buf in zip(tensors.specs, tensors.buffers, strict=True):
        t = torch.empty(spec.shape, dtype=getattr(torch, spec.dtype))
        if spec.nbytes:
            # A byte copy into a fresh tensor: its own storage, aligned whatever the slot's offset was.
            src = buf if not memoryview(buf).readonly else bytearray(buf)  # frombuffer warns on read-only memory
            t.reshape(-1).view(torch.uint8).copy_(torch.frombuffer(src, dtype=torch.uint8))
        if spec.group == "model":
            model[spec.name] = t
        else:
            param, _, key = spec.name.partition(".")
            optim.append((int(param), key, t))
    state_dict = torch.load(io.BytesIO(tensors.skeleton), weights_only=True)
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict):
        raise ckpt.CheckpointInvalid("the snapshot's optimizer skeleton is not an optimizer state dict")
    for pid, key, t in optim:
        state_dict["state"].setdefault(pid, {})[key] = t
    safetensors.torch.save_file(model, str(folder / "model.safetensors"), metadata=tensors.metadata)
    torch.save(state_dict, folder / "optimizer.pt")


# ----------------------------------------------------------------------------- capture


def capture_files(trainer: Any) -> dict[str, bytes]:
    """The bytes :meth:`SupervisedTrainer.commit_checkpoint` would write now, built in memory.

    Mirrors transformers' ``save_model`` -> ``save_pretrained`` (config, tied weights
    dropped, weight renamings reverted, ``{"format": "pt"}`` metadata),
    ``_save_optimizer_and_scheduler``, ``_save_scaler`` and ``_save_rng_state`` for a
    plain single-process or DDP job on CPU or CUDA; ranks other than the saving one
    capture their RNG file only, plus ``trainer_state.json`` so that every rank's snapshot
    names and proves its step. DeepSpeed, FSDP, XLA, PEFT, quantised and sharded (> 50 GB)
    models are not supported and raise NotImplementedError. Does not change the trainer's
    state (the copy of ``TrainerState`` gets the callbacks' states, as a save does).
    """
    args = trainer.args
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        raise NotImplementedError("snapshots of DeepSpeed or FSDP jobs are not supported")
    files: dict[str, bytes] = {}
    main = bool(args.should_save)
    if main:
        files.update(_model_files(trainer))
        files["optimizer.pt"] = _torch_bytes(trainer.optimizer.state_dict())
        files["scheduler.pt"] = _torch_bytes(trainer.lr_scheduler.state_dict())
        scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
        if scaler is not None:
            files["scaler.pt"] = _torch_bytes(scaler.state_dict())
        files["training_args.bin"] = _torch_bytes(args)
    files["trainer_state.json"] = _trainer_state_json(trainer)
    ctx = getattr(trainer, "ctx", None)
    rng = getattr(ctx, "rng_override", None) or _rng_states(args)
    name = "rng_state.pth" if args.world_size <= 1 else f"rng_state_{args.process_index}.pth"
    files[name] = _torch_bytes(rng)
    return files


def capture_rank_files(trainer: Any) -> dict[str, bytes]:
    """What a rank other than 0 holds in its own store under torchrun: its part of a checkpoint.

    That part is its ``rng_state_<rank>.pth`` (rank 0 holds everything else: under DDP the
    weights, optimizer and scheduler are the same on every rank) and a minimal
    ``trainer_state.json`` that names the step, so that the store can prove which step the
    part belongs to. Only rank 0's ``trainer_state.json`` goes into a committed checkpoint.
    """
    args = trainer.args
    if args.process_index == 0:
        raise ValueError("rank 0 holds the whole state: capture it with capture_files")
    rng = getattr(getattr(trainer, "ctx", None), "rng_override", None) or _rng_states(args)
    step = trainer.state.global_step
    return {
        "trainer_state.json": json.dumps({"global_step": step, "rank": args.process_index}).encode(),
        f"rng_state_{args.process_index}.pth": _torch_bytes(rng),
    }


def _torch_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _model_files(trainer: Any) -> dict[str, bytes]:
    import safetensors.torch

    files, metadata, state = _model_parts(trainer)
    tensors = {k: v.contiguous() for k, v in state.items()}
    files["model.safetensors"] = safetensors.torch.save(tensors, metadata=metadata)
    return files


def _model_parts(trainer: Any) -> tuple[dict[str, bytes], dict[str, str], dict[str, Any]]:
    """What ``save_pretrained`` writes, before serialising the weights: the config files, the
    safetensors metadata and the state dict it saves (tied weights dropped, renamings reverted)."""
    from transformers import PreTrainedModel
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    if not isinstance(model, PreTrainedModel):
        # Trainer._save's fallback for a plain nn.Module: its state dict alone.
        return {}, {"format": "pt"}, dict(model.state_dict())
    if getattr(model, "_hf_peft_config_loaded", False) or getattr(model, "hf_quantizer", None) is not None:
        raise NotImplementedError("snapshots of PEFT or quantised models are not supported")
    if getattr(model, "_keys_to_ignore_on_save", None):
        raise NotImplementedError("snapshots of models with keys to ignore on save are not supported")
    files: dict[str, bytes] = {}
    # save_pretrained records these two on the config before writing it; the same here.
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [model.__class__.__name__.removeprefix("FSDP")]
    files["config.json"] = model.config.to_json_string(use_diff=True).encode()
    if model.can_generate():
        files["generation_config.json"] = model.generation_config.to_json_string(use_diff=True).encode()
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    state = revert_weight_conversion(model, state)
    if sum(t.numel() * t.element_size() for t in state.values()) > 50 * 10**9:
        raise NotImplementedError("models over save_pretrained's 50 GB shard size are not supported")
    return files, {"format": "pt"}, dict(state)


def _trainer_state_json(trainer: Any) -> bytes:
    """``TrainerState.save_to_json``'s bytes after commit_checkpoint's updates, on a copy."""
    return (json.dumps(_trainer_state_dict(trainer), indent=2, sort_keys=True) + "\n").encode()


def _trainer_state_dict(trainer: Any) -> dict[str, Any]:
    """What :func:`_trainer_state_json` writes, as a deep copy (``dataclasses.asdict``)."""
    from transformers.trainer_callback import ExportableState

    state = trainer.state
    d = dataclasses.asdict(state)
    stateful: dict[str, Any] = d.get("stateful_callbacks") or {}
    for cb in [c for c in [*trainer.callback_handler.callbacks, trainer.control] if isinstance(c, ExportableState)]:
        name = cb.__class__.__name__
        if isinstance(stateful.get(name), list):
            stateful[name].append(cb.state())
        else:
            stateful[name] = cb.state()
    d["stateful_callbacks"] = stateful
    # commit_checkpoint's store_flos() folds the flos since the last save in. Under DDP that is a
    # collective, which a snapshot must not start; this rank's count stands in (flos are reported, not trained on).
    d["total_flos"] = state.total_flos + getattr(trainer, "current_flos", 0)
    best = state.best_global_step
    if best:
        out = Path(getattr(getattr(trainer, "ctx", None), "output_dir", None) or trainer.args.output_dir)
        best_path = out / f"checkpoint-{best}"
        if best_path.exists() or best == state.global_step:
            d["best_model_checkpoint"] = str(best_path)
    return d


def _rng_states(args: Any) -> dict[str, Any]:
    """What ``Trainer._save_rng_state`` stores, for CPU and CUDA."""
    import random

    import numpy as np
    import torch
    from transformers.training_args import ParallelMode

    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        if args.parallel_mode == ParallelMode.DISTRIBUTED:
            states["cuda"] = torch.cuda.random.get_rng_state_all()
        else:
            states["cuda"] = torch.cuda.random.get_rng_state()
    return states


# ----------------------------------------------------------------------------- capture, raw


@dataclass(frozen=True)
class Capture:
    """Rank 0's state at a step boundary: the big tensors as the live tensors themselves (their
    values do not change until the next optimizer step), the small state as objects of its own
    (copies taken at the boundary), serialised by :meth:`serialise` in the copy thread."""

    step: int
    files: dict[str, bytes]
    """Files already as bytes (config.json, training_args.bin)."""
    objects: dict[str, Any]
    """File name -> object that ``torch.save`` turns into that file (RNG, scheduler, scaler)."""
    state: dict[str, Any]
    """trainer_state.json's content."""
    skeleton: dict[str, Any]
    """The optimizer's state dict without its tensors."""
    specs: tuple[TensorSpec, ...]
    tensors: tuple[Any, ...]
    metadata: dict[str, str]
    ready: Any = None
    """On CUDA, an event recorded on the training stream at the boundary: the copies wait for it."""

    def serialise(self) -> tuple[dict[str, bytes], bytes]:
        """The small files as bytes, and the skeleton's ``torch.save`` bytes."""
        files = dict(self.files)
        files.update((name, _torch_bytes(obj)) for name, obj in self.objects.items())
        files["trainer_state.json"] = (json.dumps(self.state, indent=2, sort_keys=True) + "\n").encode()
        return files, _torch_bytes(self.skeleton)


class Capturer:
    """Captures rank 0's training state for a snapshot without serialising the tensors.

    :meth:`capture` runs at the step boundary and takes copies of the small state (RNG,
    scheduler, trainer state, the optimizer's param groups) and references to the tensors;
    in the copy thread :meth:`Capture.serialise` turns the small state into files and
    :meth:`host_buffers` gives each tensor's bytes in host memory: the tensor's own memory
    on CPU, a pinned copy made on a side stream on CUDA.
    What does not change within an attempt is kept between captures: ``config.json``,
    ``training_args.bin``, the list of tensors ``save_pretrained`` would save (while the
    model's parameters and buffers stay where they are) and the byte views of CPU tensors.
    """

    def __init__(self) -> None:
        self._fixed: dict[str, bytes] | None = None
        self._metadata: dict[str, str] = {}
        self._model_key: list[tuple[dict[str, Any], str, Any, int]] | None = None
        self._model: list[tuple[str, Any]] = []
        self._views_key: tuple[tuple[int, int], ...] | None = None
        self._views: list[Any] = []
        self._stage: Any = None  # the host buffer the CPU tensors are gathered into
        self._staging: _CudaStaging | None = None
        self._specs_key: tuple[int, ...] | None = None
        self._specs: tuple[TensorSpec, ...] = ()
        self._specs_of: tuple[Any, ...] = ()  # keeps the tensors whose ids make the key alive
        self._cuda = False

    def capture(self, trainer: Any) -> Capture:
        import copy

        import torch

        args = trainer.args
        if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
            raise NotImplementedError("snapshots of DeepSpeed or FSDP jobs are not supported")
        if self._fixed is None:
            fixed, self._metadata, _ = _model_parts(trainer)
            fixed["training_args.bin"] = _torch_bytes(args)
            self._fixed = fixed
        # Objects that the next step changes are copied now; their serialisation waits for the thread.
        # (The RNG getters return fresh copies; a scheduler's state dict shares its lists.)
        objects: dict[str, Any] = {"scheduler.pt": copy.deepcopy(trainer.lr_scheduler.state_dict())}
        scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
        if scaler is not None:
            objects["scaler.pt"] = copy.deepcopy(scaler.state_dict())
        ctx = getattr(trainer, "ctx", None)
        rng = getattr(ctx, "rng_override", None) or _rng_states(args)
        objects["rng_state.pth" if args.world_size <= 1 else f"rng_state_{args.process_index}.pth"] = rng
        named = self._model_tensors(trainer)
        skeleton, optim = _optimizer_parts(trainer.optimizer)
        tensors = tuple(t for _, t in itertools.chain(named, optim))
        key = tuple(map(id, tensors))  # the same tensor objects (kept alive here) have the same specs
        if key != self._specs_key:
            specs = tuple([_spec("model", k, t) for k, t in named] + [_spec("optimizer", k, t) for k, t in optim])
            if any(t.device.type not in ("cpu", "cuda") for t in tensors):
                raise NotImplementedError("snapshots of tensors outside CPU and CUDA memory are not supported")
            self._specs_key, self._specs, self._specs_of = key, specs, tensors
            self._cuda = any(t.is_cuda for t in tensors)
        ready = None
        if self._cuda:
            # Where the copy may start: when the training stream's work queued so far (this step) is done.
            ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            ready.record()
        return Capture(
            step=trainer.state.global_step,
            files=self._fixed,
            objects=objects,
            state=_trainer_state_dict(trainer),
            skeleton=skeleton,
            specs=self._specs,
            tensors=tensors,
            metadata=self._metadata,
            ready=ready,
        )

    def _model_tensors(self, trainer: Any) -> list[tuple[str, Any]]:
        """What save_pretrained would save, kept while the model's parameters and buffers stay
        the same tensors at the same addresses (checked on the modules' own dicts: cheap)."""
        if self._model_key is not None and all(
            d.get(name) is t and t is not None and t.data_ptr() == ptr for d, name, t, ptr in self._model_key
        ):
            return self._model
        model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
        entries = [
            (d, name, t, t.data_ptr())
            for m in model.modules()
            for d in (m._parameters, m._buffers)
            for name, t in d.items()
            if t is not None
        ]
        _, _, state = _model_parts(trainer)
        named = list(state.items())
        storages = {t.untyped_storage().data_ptr() for _, _, t, _ in entries}
        # Kept only when every tensor to save is (a view of) a parameter or buffer: the optimizer
        # updates those in place. A renaming that builds new tensors must be redone each time.
        shared = all(t.untyped_storage().data_ptr() in storages for _, t in named)
        self._model_key, self._model = (entries, named) if shared else (None, [])
        return named

    def host_buffers(self, cap: Capture) -> tuple[Any, ...]:
        """The tensors' bytes in host memory, in ``cap.specs`` order, as one buffer (runs in
        the copy thread).

        One buffer, filled by one ``torch.cat`` (CPU) or one batch of copies on a side stream
        (CUDA), so that the thread lets go of the GIL and wins it back from the training thread
        a handful of times per snapshot, not twice per tensor: on a busy CPU each hand-off can
        cost the training thread a scheduler slice. The price is one host copy of the state.
        """
        import torch

        if cap.ready is not None:  # some on CUDA
            if self._staging is None or not self._staging.fits(cap.tensors):
                self._staging = _CudaStaging(cap.tensors)
            return (self._staging.fill(cap.tensors, cap.ready),)
        flat = self._flat_views(cap.tensors)
        total = sum(t.numel() for t in flat)
        if self._stage is None or self._stage.numel() != total:
            self._stage = torch.empty(total, dtype=torch.uint8)
        if flat:
            torch.cat(flat, out=self._stage)
        return (memoryview(self._stage.numpy().data),)

    def _flat_views(self, tensors: tuple[Any, ...]) -> list[Any]:
        """Each CPU tensor as a flat uint8 view (kept while the tensors stay where they are)."""
        key = tuple((t.data_ptr(), t.nbytes) for t in tensors)
        if key == self._views_key:
            return self._views
        views = [_flat_bytes(t) for t in tensors]
        # A non-contiguous tensor's view is a copy of this moment: never kept.
        if all(t.is_contiguous() for t in tensors):
            self._views_key, self._views = key, views
        return views


def _flat_bytes(t: Any) -> Any:
    """The bytes of tensor ``t`` as a flat uint8 tensor, without a copy when it is contiguous."""
    import torch

    return t.detach().reshape(-1).view(torch.uint8)


class _CudaStaging:
    """Pinned host memory for a capture's tensors, filled on a side stream.

    Not exercised on this project's CPU test machines: kept small on purpose. The copies
    wait for the training stream's work up to the boundary (an event recorded there), run on
    their own stream while the next step's forward and backward run, and the copy thread
    waits for them before it reads the pinned memory. The source tensors (parameters and
    optimizer state) are neither freed nor changed before the next optimizer step, which
    waits for the copy thread, so no ``record_stream`` is needed. Tensors on the CPU (an
    optimizer's step counts) are copied into the same buffer, in order.
    """

    def __init__(self, tensors: tuple[Any, ...]) -> None:
        import torch

        devices = {t.device for t in tensors if t.is_cuda}
        if len(devices) != 1:
            raise NotImplementedError(
                f"snapshots of tensors on several GPUs are not supported ({sorted(map(str, devices))})"
            )
        self.device = devices.pop()
        self.sizes = [t.nbytes for t in tensors]
        self.buffer = torch.empty(sum(self.sizes), dtype=torch.uint8, pin_memory=True)
        self.views = []
        offset = 0
        for n in self.sizes:
            self.views.append(self.buffer[offset : offset + n])
            offset += n
        self.stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]

    def fits(self, tensors: tuple[Any, ...]) -> bool:
        return [t.nbytes for t in tensors] == self.sizes and all(t.device == self.device for t in tensors if t.is_cuda)

    def fill(self, tensors: tuple[Any, ...], ready: Any) -> memoryview:
        import torch

        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            for t, view in zip(tensors, self.views, strict=True):
                view.copy_(_flat_bytes(t), non_blocking=True)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(self.stream)
        done.synchronize()
        return memoryview(self.buffer.numpy().data)


def _spec(group: str, name: str, t: Any) -> TensorSpec:
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in ITEMSIZE:
        raise NotImplementedError(f"snapshots of {dtype} tensors are not supported ({name})")
    return TensorSpec(group, name, dtype, tuple(t.shape), t.numel() * ITEMSIZE[dtype])


def _optimizer_parts(optimizer: Any) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """The optimizer's state dict without its tensors (a skeleton: param groups, non-tensor
    state) and those tensors, named ``<param id>.<state key>``.

    ``state_dict()`` builds new dicts and lists; a scheduler assigns new values into the live
    param groups, never into these, so the skeleton needs no deeper copy.
    """
    import torch

    sd = optimizer.state_dict()
    state: dict[Any, Any] = {}
    tensors: list[tuple[str, Any]] = []
    for pid, per_param in sd["state"].items():
        rest: dict[Any, Any] = {}
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and type(pid) is int and isinstance(key, str) and 0 < len(key) <= 200:
                tensors.append((f"{pid}.{key}", value))
            else:
                rest[key] = value
        state[pid] = rest
    return {**sd, "state": state}, tensors


# ----------------------------------------------------------------------------- how often


BUDGET = 0.02
"""The share of training time that ``every_steps: auto`` lets snapshots cost."""
MAX_INTERVAL = 10_000


def choose_interval(cost_s: float, step_s: float, current: int, budget: float = BUDGET) -> int:
    """The smallest interval N at which a snapshot costing ``cost_s`` of exposed time every N
    steps of ``step_s`` stays within ``budget`` of training time.

    Raised at once when over budget; lowered only when the lower interval fits with a quarter
    of the budget to spare, and by at most half at a time, so that noise does not flip it
    back and forth.
    """
    if step_s <= 0 or cost_s < 0 or not math.isfinite(cost_s / step_s):
        return current
    need = max(1, math.ceil(cost_s / (budget * step_s) - 1e-9))
    if need >= current:
        return min(need, MAX_INTERVAL)
    roomy = max(1, math.ceil(cost_s / (0.75 * budget * step_s) - 1e-9))
    return min(current, max(roomy, (current + 1) // 2))


class IntervalChooser:
    """``snapshot.every_steps``: a fixed N (due at multiples of N), or ``auto``.

    ``auto`` starts at every step and re-chooses after each snapshot. The cost of a snapshot
    is what training loses to it: at least its exposed time (the synchronous part plus any
    wait for the copy), and more where the copy thread competes with training for the CPU
    or the GIL (a small model on few cores). That part shows only as slower steps, so the
    chooser keeps two sets of step times, the steps that ran beside a copy and those that
    did not, and takes the larger of the exposed time and the difference of their medians.
    At an interval of 1 every 16th step goes without a snapshot to keep the second set
    current (then up to 2 steps can be lost). Medians, not means: an evaluation or a disk
    save inside a step, or a snapshot slowed by a save's I/O, is an outlier that must not
    set the interval. The first snapshot's cost counts, one-time parts (the copy thread, the
    config files, the list of tensors) included: an expensive state gets a long interval at
    once rather than after a few costly snapshots, and the interval comes down from there (by
    half at a time at most, see :func:`choose_interval`).
    """

    WARMUP = 0
    SAMPLE = 16

    def __init__(self, every_steps: int | str, budget: float = BUDGET) -> None:
        self.auto = every_steps == "auto"
        self.interval = 1 if self.auto else int(every_steps)
        self.budget = budget
        self._with: deque[float] = deque(maxlen=16)  # step times beside a copy
        self._without: deque[float] = deque(maxlen=16)
        self._costs: deque[float] = deque(maxlen=8)
        self._seen = 0
        self._undecided = False  # a cost came before any step time: the choice waits for one

    def is_due(self, step: int, last: int | None) -> bool:
        """Whether ``step`` gets a snapshot, the last one having been of step ``last``."""
        if not self.auto:
            return self.interval > 0 and step % self.interval == 0
        if self._undecided:
            return False  # a snapshot's cost is known but no step time yet: no second one before a choice
        if self.interval == 1 and step % self.SAMPLE == 0:
            return False  # a step without a copy, for the baseline step time
        return last is None or step - last >= self.interval

    def add_step(self, seconds: float, beside_copy: bool = False) -> int | None:
        """Record the time between two step ends, and whether a snapshot copy ran in it;
        return the new interval when a choice that waited for a step time changes it."""
        (self._with if beside_copy else self._without).append(seconds)
        return self._choose() if self._undecided else None

    def add_cost(self, seconds: float) -> int | None:
        """Record one snapshot's exposed cost; return the new interval when it changes."""
        self._seen += 1
        if not self.auto or self._seen <= self.WARMUP:
            return None
        self._costs.append(seconds)
        return self._choose()

    def _choose(self) -> int | None:
        step, cost = self.step_seconds, self.cost_seconds
        self._undecided = step is None
        if step is None or cost is None:
            return None
        new = choose_interval(cost, step, self.interval, self.budget)
        if new == self.interval:
            return None
        self.interval = new
        return new

    @property
    def step_seconds(self) -> float | None:
        """Median step time without a copy (with one, until there are a few without)."""
        if len(self._without) >= 3 or not self._with:
            return statistics.median(self._without) if self._without else None
        return statistics.median([*self._with, *self._without])

    @property
    def cost_seconds(self) -> float | None:
        """What a snapshot costs training: see the class docstring."""
        if not self._costs:
            return None
        exposed = statistics.median(self._costs)
        if len(self._with) >= 3 and len(self._without) >= 3:
            return max(exposed, statistics.median(self._with) - statistics.median(self._without))
        return exposed


SYNC_BELOW = 8 << 20
"""Snapshots with fewer tensor bytes than this are copied at the boundary, not in the thread:
handing a copy of a few hundred kilobytes to a thread costs more (GIL hand-offs with the
training thread, a busy CPU) than the copy itself, and done in place its cost is all exposed,
so ``auto`` sees it whole."""


def write_capture(store: SnapshotStore, capturer: Capturer, cap: Capture) -> int:
    """Serialise ``cap``'s small state, copy its tensors into ``store`` and commit it (the copy
    thread's job); return the snapshot's size in bytes."""
    files, skeleton = cap.serialise()
    tensors = TensorState(cap.specs, capturer.host_buffers(cap), skeleton, cap.metadata)
    store.write(cap.step, files, tensors)
    return sum(len(b) for b in files.values()) + tensors.nbytes
