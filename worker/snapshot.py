"""Training-state snapshots in host shared memory: lose at most one step to a crash the host survives.

A snapshot holds exactly the state a disk checkpoint holds, in the form that is cheapest
to take at every step; turning it into the checkpoint's files costs a serialisation that
only a resume needs, so it happens there (:func:`materialize`, which writes the files
into a staging folder and commits it with the normal :func:`worker.checkpoint.commit`;
from there the tested exact resume of a disk checkpoint does the rest):

- the big tensors (the model's parameters and buffers, the optimizer's state) raw, one
  after another, with their names, dtypes and shapes in the index;
- the rest of the optimizer's state dict (param groups, state that is not a tensor) as a
  small "skeleton", and the scheduler's and grad scaler's state dicts and every RNG state
  (tensors and NumPy's key as bytes) in one :data:`OBJECTS` file, both pickled as plain
  data (:func:`plain_dumps`: no class is looked up when they are loaded);
- ``trainer_state.json`` compact (laid out as the Trainer lays it out on materializing),
  ``config.json`` and ``training_args.bin`` as the bytes of those files, built once per
  attempt (they do not change within one: a new batch after an OOM is a new worker).

A snapshot of a tiny model is then a fraction of a millisecond (configs/demo.yaml's: 1.6
MiB, about 0.2 ms on an idle core); a big one is a copy of tensor bytes into the slot,
which the worker runs while the next step's forward and backward run (worker/trainer.py
``Snapshots``).

Layout of a store (one per run and rank, see :func:`default_root`)::

    <root>/slot-0        a container (below)
    <root>/slot-1        a container
    <root>/header.json   which slot holds the newest snapshot and which the previous one, and how to verify them

Container (one file per slot)::

    8 bytes   magic b"VITSNAP3"
    8 bytes   n: length of the index, unsigned little-endian
    n bytes   index: JSON {"format": 3, "step": S, "files": [[name, offset, length], ...],
              "tensors": null or {"skeleton": [offset, length], "metadata": {...},
                                  "entries": [[group, name, dtype, shape, offset, length], ...]}},
              padded with blanks to a multiple of 64 bytes with the prefix
    ...       the tensors' bytes, then the skeleton, then the files' bytes, each right after the
              previous; offsets count from the end of the index (the tensors' do not depend on
              the small files' sizes, so that part of the index is built once per set of tensors)

A tensor entry's group is ``model`` (name: its key in ``model.safetensors``) or ``optimizer``
(name: ``<param id>.<state key>`` in the optimizer's state dict); ``metadata`` is that of
``model.safetensors``. Containers of earlier formats (magic ``VITSNAP1``, ``VITSNAP2``) are
not read: they are ignored like any other unreadable slot, and the disk checkpoint is used.

Header (JSON, replaced atomically; format 2): ``format``, ``checksum`` (``"xxh3-64"``),
``identity`` (the run's config/data fingerprint, world size, rank, ...), ``pid``, and the
*entry* of the newest snapshot: ``generation`` (1, 2, ...), ``slot`` (0 or 1), ``step``,
``size`` (bytes of the slot file), ``digest`` (of the whole slot file), ``time`` (epoch
seconds of the write).
Optionally ``previous``: the entry of the snapshot before it, in the other slot (an object
with the same entry keys, an older generation and a lower step).

Commit protocol (:meth:`SnapshotStore.write`), for a store whose header names slot A as
newest and slot B as previous:

1. If the header has a ``previous`` entry, replace the header with one without it (the
   entry names B, the slot about to be overwritten: no header ever names a slot while it
   is being written).
2. Write slot B in place, through a shared mapping of the file that the writer keeps
   from one snapshot to the next (the tensors are copied straight from their memory into
   it: one copy, no staging buffer), then digest it.
3. Replace the header: B is the newest, A the previous (A only when its step is lower than
   B's: a writer that restarted from an older checkpoint does not offer a step from the
   abandoned future).

Each header replacement is a temporary file + rename
(:meth:`SnapshotStore._write_header`); the renames are the commits. A kill at
any instant leaves one of three headers: the old one (A and B both untouched since they
were named), the one of step 1 (A untouched), or the new one (B completely written before
the rename, A untouched since its own write). So the newest entry is always valid, and the
previous one is there except while its slot is being rewritten. Both slots and headers are
in the same kernel's page cache (a shared mapping writes into it directly), so a later
reader sees every store made before a rename; fsync or msync would add nothing (tmpfs has
no stable storage, and a host crash loses the snapshot by design: disk checkpoints cover
that). A slot's pages are allocated with ``posix_fallocate`` before the mapping touches
them, so a full ``/dev/shm`` is an ENOSPC error (the snapshots turn off, the previous one
stands), never a SIGBUS.

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
digest, the index's bounds and names, and that ``trainer_state.json`` says ``global_step ==
step``; the previous entry is checked on its own (same checks, the other slot, an older
generation, a lower step), so a bad previous entry never hides a good newest one. Whatever
does not validate is logged and ignored, never raised.

Why XXH3-64 (the ``xxhash`` package, also a dependency of wandb and datasets): the
checksum guards against accidents (a torn or truncated slot, a second writer, a flipped
bit), not an adversary, who could rewrite the header as easily as the slot. XXH3 runs at
memory speed (1.6 MiB in 25 us here, against 380 us for ``zlib.crc32``, which was the
largest single part of a small model's snapshot) and releases the GIL; against random
corruption a 64-bit digest misses with probability 2^-64 (CRC-32: 2^-32, though CRC
also guarantees every burst up to 32 bits). The header names the algorithm, so switching
is a format detail, not a migration.

A store has one writer at a time (the worker, under the run's worker lock); readers may
run at any time. A reader that races a writer may see a checksum mismatch and retries a
few times while the header moves on.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import mmap
import operator
import os
import pickle
import re
import shutil
import stat
import statistics
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from supervisor.shm import default_root as default_root  # where the stores are: shared with the supervisor
from worker import checkpoint as ckpt

log = logging.getLogger("vit_train")

FORMAT = 2  # of the header
CONTAINER = 3  # of the slot's index
MAGIC = b"VITSNAP3"
CHECKSUM = "xxh3-64"  # the header's name for the digest of a slot file
_PREFIX = struct.Struct("<8sQ")
HEADER = "header.json"
SLOTS = ("slot-0", "slot-1")
DEFAULT_BASE = Path("/dev/shm")

_MAX_HEADER = 64 << 10  # a header is a few hundred bytes; anything bigger is not ours
_MAX_INDEX = 16 << 20  # thousands of names fit in far less
_SLACK = 64 << 10  # container prefix + index, and the header, per :meth:`SnapshotStore.needed_bytes`
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
OBJECTS = "objects.pickle"
"""The small files whose content a capture keeps as objects (scheduler, RNG, scaler), pickled
as plain data in one piece; :func:`checkpoint_files` writes the files from them."""


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
    bytes when read back), or, when writing, one buffer holding all of them in order, or
    none when ``fill`` writes them.
    """

    specs: tuple[TensorSpec, ...]
    buffers: tuple[Any, ...]
    skeleton: bytes
    """The optimizer's state dict with its tensors left out, pickled as plain data (:func:`plain_dumps`)."""
    metadata: dict[str, str]
    """model.safetensors' metadata (``{"format": "pt"}`` for a transformers model)."""
    fill: Callable[[memoryview], None] | None = None
    """When writing: copies every tensor's bytes, in ``specs`` order, into the slot view it is
    given (exactly their size), so that they reach the slot with one copy and no staging buffer."""

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
        self._maps: dict[int, _MappedSlot] = {}
        self._paths = (str(self.root / HEADER), str(self.root / f".{HEADER}.{os.getpid()}.tmp"))
        self.keep_previous = True
        """Name the snapshot before the newest in the header (torchrun's ranks agree on a step
        with it). A single process resumes from the newest only: without it, a snapshot
        replaces the header once instead of twice."""
        self._fragment: tuple[tuple[TensorSpec, ...], dict[str, str], str, int] | None = None
        self.setup_seconds = 0.0
        """Time spent (re)allocating and mapping slots: once per slot, not per snapshot (see IntervalChooser)."""

    # -- writing -----------------------------------------------------------------------

    def write(
        self,
        step: int,
        files: Mapping[str, bytes | bytearray | memoryview],
        tensors: TensorState | None = None,
        *,
        trusted: bool = False,
    ) -> int:
        """Make ``files`` (the small files of a checkpoint of ``step``, or all of them) and
        ``tensors`` (the big ones, raw) the newest snapshot.

        ``trusted``: the caller built ``trainer_state.json`` from ``step`` itself (the
        :class:`Capturer`), so it is not parsed again here (it grows with the log history).
        Raises ValueError for a snapshot that could never be read back (a bad name, no
        ``trainer_state.json`` of this step, a buffer of the wrong size) and OSError when the
        store cannot be written (ENOSPC on a small ``/dev/shm``): the previous snapshot then
        still stands. Returns the size of the slot written.
        """
        if _int(step) is None:
            raise ValueError(f"step must be a non-negative int, not {step!r}")
        names = list(files)
        bad = [n for n in names if not isinstance(n, str) or not _NAME.match(n)]
        if bad:
            raise ValueError(f"not plain file names: {bad[:4]}")
        if "trainer_state.json" not in files:
            raise ValueError("no trainer_state.json")
        why = None if trusted else _state_mismatch(files.get("trainer_state.json"), step)
        if why:
            raise ValueError(why)
        # Data: the tensors (their offsets depend only on their specs, so that part of the index is
        # built once per set of tensors), the optimizer skeleton, then the small files.
        offset = 0
        fragment = ""
        pieces: list[Any] = []
        if tensors is not None:
            fragment, offset = self._tensor_fragment(tensors)
            tensor_bytes = offset
            if tensors.fill is None and len(tensors.buffers) == 1 and len(tensors.specs) != 1:
                pieces.append(tensors.buffers[0])
            elif tensors.fill is None:
                pieces += tensors.buffers
            skeleton_at = offset
            offset += len(tensors.skeleton)
            pieces.append(tensors.skeleton)
        index: list[list[Any]] = []
        for name in names:
            length = memoryview(files[name]).nbytes
            index.append([name, offset, length])
            offset += length
            pieces.append(files[name])
        section = "null" if tensors is None else f'{{"skeleton":[{skeleton_at},{len(tensors.skeleton)}],{fragment}}}'
        index_raw = (
            f'{{"format":{CONTAINER},"step":{step},"files":{json.dumps(index, separators=(",", ":"))},'
            f'"tensors":{section}}}'
        ).encode()
        # Trailing blanks (valid JSON) so that the tensors start on a 64-byte boundary of the slot.
        index_raw += b" " * (-(_PREFIX.size + len(index_raw)) % 64)
        head = _PREFIX.pack(MAGIC, len(index_raw)) + index_raw
        size = len(head) + offset
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
        # In place: the header does not name this slot now, so no reader trusts what is in it.
        mapped = self._mapped(slot, size)
        assert mapped.map is not None  # ensure() maps it
        view = memoryview(mapped.map)[:size]
        try:
            view[: len(head)] = head
            at = len(head)
            if tensors is not None and tensors.fill is not None:
                tensors.fill(view[at : at + tensor_bytes])
                at += tensor_bytes
            for piece in pieces:
                at = _put(view, at, piece)
            digest = xxhash.xxh3_64_intdigest(view)  # releases the GIL
        finally:
            view.release()
        header: dict[str, Any] = {
            "format": FORMAT,
            "generation": generation,
            "slot": slot,
            "step": step,
            "size": size,
            "checksum": CHECKSUM,
            "digest": digest,
            "identity": self.identity,
            "time": time.time(),
            "pid": os.getpid(),
        }
        if current is not None and current["step"] < step and self.keep_previous:
            header["previous"] = _entry(current)
        self._write_header(header)
        self._current = header
        self._next = (generation + 1, 1 - slot)
        return size

    def _write_header(self, header: dict[str, Any]) -> None:
        """Replace the header atomically (a temporary file and a rename), twice per snapshot.

        Plain system calls on a fixed temporary name (one writer per store; :meth:`_prepare_root`
        removes a dead writer's): about a third of :func:`supervisor.protocol.atomic_write_bytes`'s time,
        which creates folders and draws a random name first.
        """
        path, tmp = self._paths
        data = memoryview(json.dumps(header, sort_keys=True).encode())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _tensor_fragment(self, tensors: TensorState) -> tuple[str, int]:
        """The index's tensor entries and metadata as JSON (without braces), and their bytes in all.

        Built and checked once per set of specs (the capturer keeps the same tuple while the
        tensors stay the same), then reused: the entries' offsets count from the start of the data.
        """
        cached = self._fragment
        if cached is not None and cached[0] is tensors.specs and cached[1] == tensors.metadata:
            total = cached[3]
        else:
            section, total = _tensor_index(tensors.specs, tensors.metadata)
            cached = (tensors.specs, dict(tensors.metadata), json.dumps(section, separators=(",", ":"))[1:-1], total)
            self._fragment = cached
        if tensors.fill is None:
            one = len(tensors.buffers) == 1 and len(tensors.specs) != 1  # a single buffer holding them all, in order
            if one and memoryview(tensors.buffers[0]).nbytes != total:
                raise ValueError("the tensors' buffer does not hold exactly their bytes")
            if not one:
                if len(tensors.specs) != len(tensors.buffers):
                    raise ValueError(f"{len(tensors.specs)} tensor specs but {len(tensors.buffers)} buffers")
                for spec, buf in zip(tensors.specs, tensors.buffers, strict=True):
                    if memoryview(buf).nbytes != spec.nbytes:
                        raise ValueError(
                            f"tensor {spec.name[:80]!r} has the wrong number of bytes (its spec says {spec.nbytes})"
                        )
        return cached[2], total

    def _mapped(self, slot: int, size: int) -> _MappedSlot:
        """Slot ``slot`` as a writable shared mapping of at least ``size`` bytes, its file exactly ``size`` long.

        The mapping is kept from one snapshot to the next (the same pages every time: no page
        faults, no new allocation). Its pages are allocated with ``posix_fallocate`` before they
        are touched, so a full ``/dev/shm`` is an OSError (ENOSPC) here, never a SIGBUS in the
        copy. A slot file that was removed or replaced under the writer is opened afresh.
        """
        path = self.root / SLOTS[slot]
        mapped = self._maps.get(slot)
        if mapped is not None and not mapped.is_at(path):
            del self._maps[slot]
            mapped.close()
            mapped = None
        if mapped is None:
            mapped = _MappedSlot.open(path)
            self._maps[slot] = mapped
        t0 = time.monotonic()
        if mapped.ensure(size):
            self.setup_seconds += time.monotonic() - t0
        return mapped

    def close(self) -> None:
        """Let go of the slots' mappings (the files stay; the next write maps them again)."""
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()

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
        if xxhash.xxh3_64_intdigest(view) != header["digest"]:
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
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)
        self._next = None


_MISSING = object()


def _put(view: memoryview, at: int, piece: Any) -> int:
    """Copy ``piece`` into ``view`` at ``at``; return the offset after it."""
    data = memoryview(piece).cast("B")
    end = at + data.nbytes
    view[at:end] = data
    return end


class _MappedSlot:
    """A slot file held open and mapped shared, read-write, by the store's one writer."""

    PAGE = mmap.PAGESIZE

    def __init__(self, fd: int, ident: tuple[int, int], length: int) -> None:
        self.fd = fd
        self.ident = ident  # (st_dev, st_ino): the file this mapping is of
        self.length = length  # the file's length now
        self.map: mmap.mmap | None = None
        self.capacity = 0  # bytes mapped, all of them allocated

    @classmethod
    def open(cls, path: Path) -> _MappedSlot:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise OSError(f"{path.name} is not a regular file")
        return cls(fd, (st.st_dev, st.st_ino), st.st_size)

    def is_at(self, path: Path) -> bool:
        """Whether ``path`` is still this file (not removed, not replaced)."""
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.ident and st.st_size == self.length

    def ensure(self, size: int) -> bool:
        """Make the file exactly ``size`` bytes, allocated and mapped; whether the mapping had to be (re)made."""
        remapped = False
        if size > self.capacity:
            self._unmap()
            # Room for the small files to grow (the trainer state's log history) without a new mapping.
            capacity = -(-(size + _SLACK) // self.PAGE) * self.PAGE
            os.posix_fallocate(self.fd, 0, capacity)
            self.length = max(self.length, capacity)
            self.map = mmap.mmap(
                self.fd,
                capacity,
                flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
            self.capacity = capacity
            remapped = True
        if size > self.length:
            os.posix_fallocate(self.fd, self.length, size - self.length)  # allocated before it is touched
        elif size < self.length:
            os.ftruncate(self.fd, size)  # mapped pages past the end are never touched until allocated again
        self.length = size
        return remapped

    def _unmap(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a view still exported somewhere: the mapping goes with its last user
                pass
            self.map = None
            self.capacity = 0

    def close(self) -> None:
        self._unmap()
        try:
            os.close(self.fd)
        except OSError:
            pass


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
        "digest": _int(h.get("digest"), 0, (1 << 64) - 1),
    }
    bad = [k for k, v in checks.items() if v is None]
    if bad:
        return f"header fields missing or out of range: {', '.join(bad)}"
    if h.get("checksum") != CHECKSUM:
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
    tensors = None
    offset = 0
    if index.get("tensors") is not None:
        tensors, offset, why = _parse_tensor_index(index["tensors"], offset)
        if tensors is None:
            return None, why
    files: list[tuple[str, int, int]] = []
    seen: set[str] = set()
    for e in entries:
        if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and _NAME.match(e[0])):
            return None, f"index entry {str(e)[:80]!r} is not [name, offset, length]"
        name, off, length = e[0], _int(e[1]), _int(e[2])
        if off != offset or length is None or name in seen:
            return None, f"index entry for {name} is out of bounds or repeated"
        seen.add(name)
        files.append((name, offset, length))
        offset += length
    if offset != data_size:
        return None, f"index covers {offset} bytes, the slot holds {data_size}"
    return _Layout(files, tensors), ""


def _parse_tensor_index(
    t: Any, offset: int
) -> tuple[tuple[tuple[int, int], tuple[TensorSpec, ...], list[int], dict[str, str]] | None, int, str]:
    """The tensor section placed at ``offset``: the tensors one after another, then the skeleton."""
    if not isinstance(t, dict) or not isinstance(t.get("entries"), list):
        return None, offset, "index has a tensor section without entries"
    meta = t.get("metadata")
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        return None, offset, "tensor metadata is not a mapping of strings"
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
    sk = t.get("skeleton")
    if not (isinstance(sk, list) and len(sk) == 2 and _int(sk[0]) == offset and _int(sk[1]) is not None):
        return None, offset, "optimizer skeleton is out of bounds"
    skeleton = (offset, sk[1])
    offset += sk[1]
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


def _tensor_index(specs: tuple[TensorSpec, ...], metadata: Mapping[str, str]) -> tuple[dict[str, Any], int]:
    """The index's tensor section (without the skeleton) for ``specs`` placed from offset 0, and their bytes."""
    entries = []
    offset = 0
    for spec in specs:
        if _tensor_spec([spec.group, spec.name, spec.dtype, list(spec.shape), 0, spec.nbytes]) is None:
            raise ValueError(f"tensor {spec.group} {spec.name[:80]!r} could not be read back ({spec})")
        entries.append([spec.group, spec.name, spec.dtype, list(spec.shape), offset, spec.nbytes])
        offset += spec.nbytes
    return {"metadata": dict(metadata), "entries": entries}, offset


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
        for name, data in checkpoint_files(snapshot.files).items():
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


def checkpoint_files(files: Mapping[str, bytes]) -> dict[str, bytes]:
    """The files of a checkpoint from a snapshot's small files: :data:`OBJECTS` becomes the
    files it stands for (``scheduler.pt``, ``rng_state*.pth``, ``scaler.pt``, written by
    ``torch.save`` as the Trainer writes them), and ``trainer_state.json`` is laid out as
    ``TrainerState.save_to_json`` lays it out (a capture writes it compact). Raises
    :class:`ckpt.CheckpointInvalid` when the objects are not what a capture writes."""
    out = {name: bytes(data) for name, data in files.items() if name != OBJECTS}
    if OBJECTS in files:
        try:
            objects = plain_loads(files[OBJECTS])
        except (pickle.UnpicklingError, ValueError, EOFError, TypeError) as exc:
            raise ckpt.CheckpointInvalid(f"the snapshot's {OBJECTS} does not load: {exc}") from exc
        if not isinstance(objects, dict) or not all(isinstance(n, str) and _NAME.match(n) for n in objects):
            raise ckpt.CheckpointInvalid(f"the snapshot's {OBJECTS} is not a mapping of file names")
        for name, obj in objects.items():
            if name in out:
                raise ckpt.CheckpointInvalid(f"the snapshot holds {name} twice")
            out[name] = _torch_bytes(_rng_from_raw(obj) if name.startswith("rng_state") else obj)
    if "trainer_state.json" in out:
        state = json.loads(out["trainer_state.json"])
        out["trainer_state.json"] = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()
    return out


class _PlainPickler(pickle.Pickler):
    """Pickles plain data only: None, bools, ints, floats, strings, bytes and the built-in
    containers. Everything else (which would need a class looked up when loading) is refused."""

    def reducer_override(self, obj: Any) -> Any:
        raise TypeError(f"a snapshot holds plain data only, not {type(obj).__module__}.{type(obj).__qualname__}")


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"a snapshot holds plain data only, not {module}.{name}")


def plain_dumps(obj: Any) -> bytes:
    """``obj`` pickled, if it is plain data (see :class:`_PlainPickler`; TypeError otherwise).

    Several times faster than ``torch.save`` for the small state of a step, and as safe to
    load as JSON (:func:`plain_loads` looks up no class), while keeping tuples, bytes and
    exact floats that JSON would change."""
    buf = io.BytesIO()
    _PlainPickler(buf, protocol=5).dump(obj)
    return buf.getvalue()


def plain_loads(raw: bytes) -> Any:
    return _PlainUnpickler(io.BytesIO(raw)).load()


def _rng_raw(states: Mapping[str, Any], numpy_rng: _NumpyRng | None = None) -> dict[str, Any]:
    """``rng_state.pth``'s dict (:func:`_rng_states`) as plain data: tensors and the NumPy key as bytes
    (NumPy's converted once per state that ``numpy_rng`` gave)."""
    import torch

    def raw(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            return ("tensor", str(t.dtype).removeprefix("torch."), list(t.shape), t.cpu().numpy().tobytes())
        if isinstance(t, (list, tuple)):
            return ("list", [raw(x) for x in t])
        raise TypeError(f"an RNG state of type {type(t).__name__} is not supported in a snapshot")

    out: dict[str, Any] = {}
    for key, value in states.items():
        if key == "python":
            out[key] = value
        elif key == "numpy":
            out[key] = numpy_rng.raw(value) if numpy_rng is not None else _numpy_raw(value)
        else:
            out[key] = raw(value)
    return out


def _numpy_raw(value: Any) -> tuple[Any, ...]:
    name, keys, *rest = value
    return (name, keys.tobytes(), str(keys.dtype), *rest)


def _rng_from_raw(raw: Any) -> dict[str, Any]:
    """The inverse of :func:`_rng_raw`: the objects ``Trainer._save_rng_state`` saves."""
    import numpy as np
    import torch

    def tensor(v: Any) -> Any:
        if v[0] == "list":
            return [tensor(x) for x in v[1]]
        _, dtype, shape, data = v
        if dtype not in ITEMSIZE:
            raise ckpt.CheckpointInvalid(f"an RNG state of dtype {dtype!r}")
        return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(shape)

    if not isinstance(raw, dict):
        raise ckpt.CheckpointInvalid("the snapshot's RNG state is not a mapping")
    try:
        out: dict[str, Any] = {}
        for key, value in raw.items():
            if key == "python":
                out[key] = value
            elif key == "numpy":
                name, keys, dtype, *rest = value
                out[key] = (name, np.frombuffer(keys, dtype=np.dtype(dtype)).copy(), *rest)
            else:
                out[key] = tensor(value)
    except (ValueError, TypeError, IndexError, RuntimeError) as exc:
        raise ckpt.CheckpointInvalid(f"the snapshot's RNG state does not load: {exc}") from exc
    return out


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
    state_dict = plain_loads(tensors.skeleton)
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
    d = dataclasses.asdict(trainer.state)
    _finish_state_dict(trainer, d)
    return d


def _finish_state_dict(trainer: Any, d: dict[str, Any]) -> None:
    """What commit_checkpoint changes in the state before it saves it, done on ``d`` (the state's
    fields) rather than on the state itself: the callbacks' states, the flos, the best checkpoint."""
    from transformers.trainer_callback import ExportableState

    state = trainer.state
    stateful: dict[str, Any] = dict(d.get("stateful_callbacks") or {})
    for cb in [c for c in [*trainer.callback_handler.callbacks, trainer.control] if isinstance(c, ExportableState)]:
        name = cb.__class__.__name__
        if isinstance(stateful.get(name), list):
            stateful[name] = [*stateful[name], cb.state()]
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


def _rng_states(args: Any, numpy_rng: _NumpyRng | None = None) -> dict[str, Any]:
    """What ``Trainer._save_rng_state`` stores, for CPU and CUDA (NumPy's state through ``numpy_rng`` when given)."""
    import random

    import numpy as np
    import torch
    from transformers.training_args import ParallelMode

    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state() if numpy_rng is None else numpy_rng.state(),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        if args.parallel_mode == ParallelMode.DISTRIBUTED:
            states["cuda"] = torch.cuda.random.get_rng_state_all()
        else:
            states["cuda"] = torch.cuda.random.get_rng_state()
    return states


class _NumpyRng:
    """NumPy's global generator state (``np.random.get_state()``), read in full only when it moved.

    ``get_state`` copies the 2.5 KB Mersenne Twister key into a new array and builds the tuple
    around it: about 30 us on an idle core, the largest part of a small model's capture, for a
    generator that training rarely touches. Its raw state (the key and the position, exactly
    ``mt19937_state`` in NumPy's C source) is a few hundred nanoseconds to read through the bit
    generator's documented ctypes interface; while those bytes are those of the last full
    read, the state is that read's. Exact: every draw moves the position or regenerates the key,
    and the one other field, the cached Gaussian of the legacy ``RandomState``, can change
    without a draw only by being used up, so a state holding one is read in full every time.
    The layout is checked against a full read first: if it does not match (another NumPy, another
    generator), every read is a full one.
    """

    _RAW = 624 * 4 + 4  # uint32_t key[624]; int pos

    def __init__(self) -> None:
        self._bitgen: Any = None
        self._address = 0
        self._raw = b""
        self._state: Any = None
        self._state_raw: tuple[Any, tuple[Any, ...]] | None = None  # (the state, its raw form)
        self._usable = True

    def state(self) -> Any:
        import ctypes

        import numpy as np

        if not self._usable:
            return np.random.get_state()
        try:
            bitgen = np.random.mtrand._rand._bit_generator
            if bitgen is not self._bitgen:
                self._bitgen, self._address, self._state = bitgen, bitgen.ctypes.state_address, None
            raw = ctypes.string_at(self._address, self._RAW)
        except (AttributeError, TypeError, ValueError):
            self._usable = False
            return np.random.get_state()
        if self._state is not None and raw == self._raw:
            return self._state
        state: Any = np.random.get_state()
        if state[0] != "MT19937" or state[1].tobytes() + struct.pack("=i", state[2]) != raw:
            self._usable = False  # not the layout this reads: full reads from now on
            return state
        self._raw, self._state = raw, (None if state[3] else state)  # a cached Gaussian: read in full next time
        return state

    def raw(self, state: Any) -> tuple[Any, ...]:
        """:func:`_numpy_raw` of ``state``, kept for the state :meth:`state` keeps."""
        if state is not self._state:
            return _numpy_raw(state)
        if self._state_raw is None or self._state_raw[0] is not state:
            self._state_raw = (state, _numpy_raw(state))
        return self._state_raw[1]


# ----------------------------------------------------------------------------- capture, raw


@dataclass(frozen=True)
class Capture:
    """Rank 0's state at a step boundary: the small state already as bytes (serialised there
    and then: it changes with the next step), the big tensors as the live tensors themselves
    (their values do not change until the next optimizer step), copied by :meth:`Capturer.fill`."""

    step: int
    files: dict[str, bytes]
    """Every small file, as the slot holds it: config.json, training_args.bin, trainer_state.json
    (compact), and :data:`OBJECTS` (scheduler, RNG, scaler)."""
    skeleton: bytes
    """The optimizer's state dict without its tensors, as :func:`plain_dumps` bytes."""
    specs: tuple[TensorSpec, ...]
    tensors: tuple[Any, ...]
    metadata: dict[str, str]
    ready: Any = None
    """On CUDA, an event recorded on the training stream at the boundary: the copies wait for it."""
    tensor_bytes: int = 0
    """The tensors' bytes in all."""
    views: tuple[Any, ...] | None = None
    """On CPU, each tensor's bytes as a flat NumPy uint8 array (views of the tensors' memory)."""


class _StateJson:
    """``trainer_state.json`` (compact) of successive captures, the log history encoded once per entry.

    The log history only grows during an attempt (the Trainer appends a dict per logging and
    evaluation step), and it is most of the file late in a long run: re-encoding all of it at
    every step would make a snapshot's cost grow with the run. Entries already encoded are
    kept while the list is the same object, no shorter, and its last kept entry is still the
    same dict; anything else (a resume loads a new list) starts over.
    """

    def __init__(self) -> None:
        self._source: list[Any] | None = None
        self._count = 0
        self._last: Any = None
        self._encoded = ""

    def encode(self, fields: dict[str, Any], log_history: list[Any]) -> bytes:
        n = len(log_history)
        if (
            log_history is not self._source
            or n < self._count
            or (self._count and log_history[self._count - 1] is not self._last)
        ):
            self._source, self._count, self._last, self._encoded = log_history, 0, None, ""
        if n > self._count:
            new = ",".join(json.dumps(e) for e in log_history[self._count :])
            self._encoded = f"{self._encoded},{new}" if self._count else new
            self._count, self._last = n, log_history[-1]
        rest = json.dumps(fields)
        return f'{{"log_history":[{self._encoded}],{rest[1:]}'.encode()


class Capturer:
    """Captures rank 0's training state for a snapshot without serialising the tensors.

    :meth:`capture` runs at the step boundary: it serialises the small state (RNG, scheduler,
    trainer state, the optimizer's param groups) at once, as plain data (:func:`plain_dumps`,
    a fraction of ``torch.save``'s cost; :func:`materialize` writes the real files), and keeps
    references to the tensors; :meth:`fill` then copies the tensors' bytes straight into the
    slot (one ``numpy.concatenate`` on CPU; through pinned memory filled on a side stream on CUDA).
    What does not change within an attempt is kept between captures: ``config.json``,
    ``training_args.bin``, the list of tensors ``save_pretrained`` would save (while the
    model's parameters and buffers stay where they are), the tensors' specs and byte views
    (while the optimizer's state also holds the same objects: one check of both per capture),
    the optimizer's skeleton but for its param groups' values, NumPy's RNG state while it does
    not move (:class:`_NumpyRng`), and the encoded log history.
    """

    def __init__(self) -> None:
        self._fixed: dict[str, bytes] | None = None
        self._metadata: dict[str, str] = {}
        self._model_key: tuple[list[tuple[dict[str, Any], str, Any, int]], list[Any], list[int]] | None = None
        self._model: list[tuple[str, Any]] = []
        self._model_tensors_only: tuple[Any, ...] = ()
        self._views: tuple[Any, ...] | None = None
        self._staging: _CudaStaging | None = None
        self._specs: tuple[TensorSpec, ...] = ()
        self._specs_of: tuple[Any, ...] | None = None  # the tensors the specs and views are of, while they stay
        self._numpy_rng = _NumpyRng()
        self._specs_bytes = 0
        self._cuda = False
        self._state_json = _StateJson()
        self._optim_key: list[int] | None = None
        self._optim: list[tuple[Any, Any, Any]] = []
        self._optim_rest: dict[Any, Any] = {}
        self._optim_values: list[Any] = []
        self._optim_ids: list[list[int]] = []
        self.setup_seconds = 0.0
        """Time spent on what is done once per attempt (config files, specs, views), not per snapshot."""

    def capture(self, trainer: Any) -> Capture:
        import torch

        args = trainer.args
        if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
            raise NotImplementedError("snapshots of DeepSpeed or FSDP jobs are not supported")
        if self._fixed is None:
            t0 = time.monotonic()
            fixed, self._metadata, _ = _model_parts(trainer)
            fixed["training_args.bin"] = _torch_bytes(args)
            self._fixed = fixed
            self.setup_seconds += time.monotonic() - t0
        # Serialised now: the next step changes all of these. (The RNG getters return fresh copies.)
        objects: dict[str, Any] = {"scheduler.pt": trainer.lr_scheduler.state_dict()}
        scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
        if scaler is not None:
            objects["scaler.pt"] = scaler.state_dict()
        ctx = getattr(trainer, "ctx", None)
        rng = getattr(ctx, "rng_override", None) or _rng_states(args, self._numpy_rng)
        raw_rng = _rng_raw(rng, self._numpy_rng)
        objects["rng_state.pth" if args.world_size <= 1 else f"rng_state_{args.process_index}.pth"] = raw_rng
        named, model_tensors, model_kept = self._model_tensors(trainer)
        skeleton, optim, optim_kept = self._optimizer_parts(trainer.optimizer)
        # The same model tensors at the same addresses and the same optimizer state objects: the
        # tensors, their specs and their byte views are those of the last capture.
        tensors = self._specs_of if model_kept and optim_kept else None
        if tensors is None:
            t0 = time.monotonic()
            tensors = (*model_tensors, *[t for _, _, t in optim])
            specs = tuple(
                [_spec("model", k, t) for k, t in named] + [_spec("optimizer", f"{p}.{k}", t) for p, k, t in optim]
            )
            if any(t.device.type not in ("cpu", "cuda") for t in tensors):
                raise NotImplementedError("snapshots of tensors outside CPU and CUDA memory are not supported")
            self._specs = specs
            self._specs_bytes = sum(spec.nbytes for spec in specs)
            self._cuda = any(t.is_cuda for t in tensors)
            # A non-contiguous tensor's view is a copy of this moment: such views are taken anew each time.
            self._views = None if self._cuda else tuple(_flat_bytes(t).numpy() for t in tensors)
            kept = model_kept is not None and optim_kept is not None and all(t.is_contiguous() for t in tensors)
            self._specs_of = tensors if kept else None
            self.setup_seconds += time.monotonic() - t0
        ready = None
        if self._cuda:
            # Where the copy may start: when the training stream's work queued so far (this step) is done.
            ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            ready.record()
        files = dict(self._fixed)
        files["trainer_state.json"] = self._trainer_state(trainer)
        files[OBJECTS] = plain_dumps(objects)
        return Capture(
            step=trainer.state.global_step,
            files=files,
            skeleton=plain_dumps(skeleton),
            specs=self._specs,
            tensors=tensors,
            views=self._views,
            metadata=self._metadata,
            ready=ready,
            tensor_bytes=self._specs_bytes,
        )

    def _optimizer_parts(self, optimizer: Any) -> tuple[dict[str, Any], list[tuple[Any, Any, Any]], bool | None]:
        """:func:`_optimizer_parts`, and whether the state holds the objects of the last call
        (None: not known, the next call cannot tell either), without a ``state_dict()`` call while the optimizer's state
        holds the same objects (it updates its tensors in place) for the same parameters.

        Then only the param groups' values can have changed (a scheduler sets ``lr``), and the
        skeleton is the cached one with the live groups' values: what ``state_dict()`` would
        return, built without its pass over every parameter and state entry. A torch optimizer
        with state-dict hooks (which may change what it returns) goes through ``state_dict()``
        every time. The objects are kept referenced here, so no id in the key can be reused by another.
        """
        import torch

        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        plain = (
            isinstance(inner, torch.optim.Optimizer)
            and not inner._optimizer_state_dict_pre_hooks
            and not inner._optimizer_state_dict_post_hooks
        )
        if plain:
            groups = inner.param_groups
            key = [id(v) for per in inner.state.values() for v in per.values()]
            key += map(id, inner.state)
            key += [id(p) for g in groups for p in g["params"]]
            if key == self._optim_key:
                packed = [
                    {**{k: v for k, v in g.items() if k != "params"}, "params": ids}
                    for g, ids in zip(groups, self._optim_ids, strict=True)
                ]
                return {"state": self._optim_rest, "param_groups": packed}, self._optim, True
        sd = optimizer.state_dict()
        skeleton, self._optim = _optimizer_parts(optimizer, sd)
        self._optim_rest = skeleton["state"]
        if plain:
            self._optim_ids = [g["params"] for g in sd["param_groups"]]
            self._optim_values = [
                *(v for per in inner.state.values() for v in per.values()),
                *inner.state,
                *(p for g in groups for p in g["params"]),
            ]
            self._optim_key = key
            return skeleton, self._optim, False
        self._optim_key = None
        return skeleton, self._optim, None

    def _trainer_state(self, trainer: Any) -> bytes:
        """trainer_state.json as :func:`_trainer_state_dict` has it, compact, the log history
        encoded incrementally (:class:`_StateJson`); the same content, by a different path."""
        state = trainer.state
        fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "log_history"}
        try:
            _finish_state_dict(trainer, fields)
            return self._state_json.encode(fields, state.log_history)
        except TypeError:  # something JSON does not take as it is: the general path
            d = _trainer_state_dict(trainer)
            return json.dumps(d).encode()

    def _model_tensors(self, trainer: Any) -> tuple[list[tuple[str, Any]], tuple[Any, ...], bool | None]:
        """What save_pretrained would save (names and tensors, and the tensors alone), kept while the
        model's parameters and buffers stay the same tensors at the same addresses (checked on the
        modules' own dicts: cheap); and whether they were kept (None: they cannot be)."""
        key = self._model_key
        if key is not None:
            import torch

            entries = key[0]
            live = [d.get(name) for d, name, _, _ in entries]
            if all(map(operator.is_, live, key[1])) and list(map(torch.Tensor.data_ptr, key[1])) == key[2]:
                return self._model, self._model_tensors_only, True
        t0 = time.monotonic()
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
        if shared:
            held = [t for _, _, t, _ in entries]
            self._model_key, self._model = (entries, held, [p for _, _, _, p in entries]), named
        else:
            self._model_key, self._model = None, []
        self._model_tensors_only = tuple(t for _, t in named)
        self.setup_seconds += time.monotonic() - t0
        return named, self._model_tensors_only, False if shared else None

    def fill(self, cap: Capture) -> Callable[[memoryview], None]:
        """What copies ``cap``'s tensors into a slot (:attr:`TensorState.fill`; it runs in the copy thread
        for a big state).

        On CPU one ``numpy.concatenate`` of the tensors' bytes (NumPy views of them, kept while the
        tensors stay where they are), straight into the slot's mapping: one copy of each byte, a
        loop in C over the tensors (a model's many small tensors, an optimizer's 4-byte step counts,
        cost a fraction of a microsecond each, not a Python call or a torch dispatch each), on the
        calling thread alone (``torch.cat`` spreads a copy over OpenMP threads, which the training
        step's own threads and other load compete with: 240 us against 75 us for configs/demo.yaml's
        288 tensors). On CUDA the tensors go to pinned memory on a side stream first, then into the slot.
        """
        import numpy as np
        import torch

        def fill(dst: memoryview) -> None:
            if not dst.nbytes:
                return
            if cap.ready is not None:  # some on CUDA
                if self._staging is None or not self._staging.fits(cap.tensors):
                    self._staging = _CudaStaging(cap.tensors)
                out = torch.frombuffer(dst, dtype=torch.uint8)
                out.copy_(self._staging.fill(cap.tensors, cap.ready))
                del out
            else:
                views = cap.views if cap.views is not None else [_flat_bytes(t).numpy() for t in cap.tensors]
                np.concatenate(views, out=np.frombuffer(dst, dtype=np.uint8))

        return fill


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

    def fill(self, tensors: tuple[Any, ...], ready: Any) -> Any:
        """The tensors' bytes in the pinned buffer (a uint8 tensor), once the side stream has copied them."""
        import torch

        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            for t, view in zip(tensors, self.views, strict=True):
                view.copy_(_flat_bytes(t), non_blocking=True)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(self.stream)
        done.synchronize()
        return self.buffer


def _spec(group: str, name: str, t: Any) -> TensorSpec:
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in ITEMSIZE:
        raise NotImplementedError(f"snapshots of {dtype} tensors are not supported ({name})")
    return TensorSpec(group, name, dtype, tuple(t.shape), t.numel() * ITEMSIZE[dtype])


def _optimizer_parts(
    optimizer: Any, sd: dict[str, Any] | None = None
) -> tuple[dict[str, Any], list[tuple[Any, Any, Any]]]:
    """The optimizer's state dict without its tensors (a skeleton: param groups, non-tensor
    state) and those tensors as ``(param id, state key, tensor)`` (named ``<param id>.<state key>``
    in a snapshot).

    ``state_dict()`` builds new dicts and lists; a scheduler assigns new values into the live
    param groups, never into these, so the skeleton needs no deeper copy (and it is pickled at once).
    """
    import torch

    tensor = torch.Tensor
    sd = optimizer.state_dict() if sd is None else sd
    state = sd["state"]
    tensors = [(pid, key, v) for pid, per in state.items() for key, v in per.items() if isinstance(v, tensor)]
    rest = {pid: {k: v for k, v in per.items() if not isinstance(v, tensor)} for pid, per in state.items()}
    return {**sd, "state": rest}, tensors


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

    ``auto`` starts at every step and re-chooses after each snapshot, from what a snapshot
    costs training against the median time between step ends. A snapshot's cost is the larger
    of its exposed time (what training waited for: the synchronous part at the boundary plus
    any wait for the copy before the next optimizer step) and its *busy* time: the synchronous
    part plus the CPU time the copy thread used (``time.thread_time`` in the thread), or the copy's
    duration when that is longer (a copy of a big state also takes memory bandwidth from the
    training step: ViT-B on 2 cores, 140 ms of the thread's CPU for a 455 ms copy, and training
    1.3-1.5x slower at the interval the CPU time chose). The copy
    runs beside the next step's forward and backward, which on a busy CPU (a CPU-only run on
    few cores, other load) lose about that much CPU to it; counted in full, without waiting for
    step times to show it (their medians move by less than their noise for a small state), and
    without any step going without a snapshot to measure a baseline: at interval 1 every step is
    snapshotted, so a fault loses at most one. (On an idle core the copy costs training less;
    the estimate errs towards a longer interval, never past the budget.) The busy time is also
    compared with the process's CPU time per step: on a CPU shared with other load, the step's
    wall time is stretched by waiting for the CPU while a snapshot of a millisecond mostly is
    not, yet every CPU second it takes costs training as much wall time as the step's own do
    (demo model at load 6-15: 1.2 ms exposed against 109 ms steps, 1 %, but 1.3 ms of CPU
    against about 18 ms of CPU per step, 7 %); the larger of the two shares counts.

    Medians, not means: an evaluation or a disk save inside a step, or a snapshot slowed by a
    save's I/O, is an outlier that must not set the interval. The first snapshot's cost counts,
    less its one-time parts (the config files, the list of tensors and their views, allocating
    and mapping a slot: the caller subtracts them): an expensive state gets a long interval at
    once rather than after a few costly snapshots, and the interval comes down from there (by
    half at a time at most, see :func:`choose_interval`).
    """

    def __init__(self, every_steps: int | str, budget: float = BUDGET) -> None:
        self.auto = every_steps == "auto"
        self.interval = 1 if self.auto else int(every_steps)
        self.budget = budget
        self._steps: deque[float] = deque(maxlen=16)  # seconds between step ends
        self._step_cpu: deque[float] = deque(maxlen=16)  # the process's CPU seconds in the same intervals
        self._costs: deque[float] = deque(maxlen=8)  # per snapshot: max(exposed, busy)
        self._busy: deque[float] = deque(maxlen=8)  # per snapshot: CPU seconds (boundary part and copy thread)
        self._undecided = False  # a cost came before any step time: the choice waits for one

    def is_due(self, step: int, last: int | None) -> bool:
        """Whether ``step`` gets a snapshot, the last one having been of step ``last``."""
        if not self.auto:
            return self.interval > 0 and step % self.interval == 0
        if self._undecided:
            return False  # a snapshot's cost is known but no step time yet: no second one before a choice
        return last is None or step - last >= self.interval

    def add_step(self, seconds: float, cpu_seconds: float | None = None) -> int | None:
        """Record the time between two step ends (and the process's CPU time in it, when known);
        return the new interval when a choice that waited for a step time changes it."""
        self._steps.append(seconds)
        if cpu_seconds is not None and cpu_seconds > 0:
            self._step_cpu.append(cpu_seconds)
        return self._choose() if self._undecided else None

    def add_cost(self, exposed: float, busy: float | None = None) -> int | None:
        """Record one snapshot's exposed time and its busy time (synchronous part plus the copy
        thread's CPU time; None when it all ran at the boundary: the exposed time is all of it);
        return the new interval when it changes."""
        if not self.auto:
            return None
        self._costs.append(max(exposed, busy or 0.0))
        if busy is not None:
            self._busy.append(busy)
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
        """Median time between step ends (None before the first)."""
        return statistics.median(self._steps) if self._steps else None

    @property
    def cost_seconds(self) -> float | None:
        """Median cost of a snapshot to training, in step time: see the class docstring."""
        if not self._costs:
            return None
        cost = statistics.median(self._costs)
        step = self.step_seconds
        if self._busy and len(self._step_cpu) >= 3 and step:
            # The same share of the step's CPU time, in step time: under CPU contention a short
            # snapshot's wall time understates it (it often runs within one time slice, while the
            # step's wall time is stretched by waiting for the CPU).
            cost = max(cost, step * statistics.median(self._busy) / statistics.median(self._step_cpu))
        return cost


SYNC_BELOW = 8 << 20
"""Snapshots with fewer tensor bytes than this are copied at the boundary, not in the thread:
handing a copy of a few hundred kilobytes to a thread costs more (GIL hand-offs with the
training thread, a busy CPU) than the copy itself, and done in place its cost is all exposed,
so ``auto`` sees it whole."""


def write_capture(store: SnapshotStore, capturer: Capturer, cap: Capture) -> int:
    """Copy ``cap``'s tensors into ``store``'s free slot beside its small files and commit it (the
    copy thread's job for a big state); return the snapshot's size in bytes."""
    tensors = TensorState(cap.specs, (), cap.skeleton, cap.metadata, fill=capturer.fill(cap))
    return store.write(cap.step, cap.files, tensors, trusted=True)
