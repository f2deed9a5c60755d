"""Training-state snapshots in host shared memory: lose at most one step to a crash the host survives.

A snapshot is exactly the file set a disk checkpoint holds (``config.json``,
``model.safetensors``, ``optimizer.pt``, ``scheduler.pt``, ``trainer_state.json``,
``rng_state*.pth``, ``training_args.bin``, ``scaler.pt`` when there is a grad scaler),
held as bytes in memory-backed files (``/dev/shm`` by default). Resuming from one
means writing those files into a staging folder and committing it with the normal
:func:`worker.checkpoint.commit` (:func:`materialize`); from there the tested exact
resume of a disk checkpoint does the rest, and the snapshot is on disk at once.

Layout of a store (one per run and rank, see :func:`default_root`)::

    <root>/slot-0        a container (below)
    <root>/slot-1        a container
    <root>/header.json   which slot holds the newest snapshot and which the previous one, and how to verify them

Container (one file per slot)::

    8 bytes   magic b"VITSNAP1"
    8 bytes   n: length of the index, unsigned little-endian
    n bytes   index: JSON {"format": 1, "step": S, "files": [[name, offset, length], ...]}
    ...       the files' bytes, concatenated in index order; offsets count from the end of the index

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
2. Write slot B in place, with plain ``write()`` calls.
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
s + N (``worker.dist.any_rank`` in ``SupervisionCallback.on_step_end``) when the commit is
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
import json
import logging
import os
import re
import shutil
import stat
import struct
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.shm import default_root as default_root  # where the stores are: shared with the supervisor
from worker import checkpoint as ckpt

log = logging.getLogger("vit_train")

FORMAT = 1
MAGIC = b"VITSNAP1"
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


@dataclass(frozen=True)
class Snapshot:
    """One validated snapshot: the files a checkpoint of ``step`` holds."""

    step: int
    files: dict[str, bytes]
    time: float
    generation: int
    slot: int

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values())


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

    def write(self, step: int, files: Mapping[str, bytes | bytearray | memoryview]) -> None:
        """Make ``files`` (the checkpoint file set of ``step``) the newest snapshot.

        Raises ValueError for a file set that could never be read back (a bad name, no
        ``trainer_state.json`` of this step) and OSError when the store cannot be written
        (ENOSPC on a small ``/dev/shm``): the previous snapshot then still stands.
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
        index: list[list[Any]] = []
        offset = 0
        for name in names:
            length = memoryview(files[name]).nbytes
            index.append([name, offset, length])
            offset += length
        index_raw = json.dumps({"format": FORMAT, "step": step, "files": index}, separators=(",", ":")).encode()
        head = _PREFIX.pack(MAGIC, len(index_raw)) + index_raw
        size = len(head) + offset
        crc = 0
        path = self.root / SLOTS[slot]
        # In place, not truncated first: on tmpfs the pages of the last write are reused, and the
        # header does not name this slot, so no reader trusts what is in it now.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            for chunk in (head, *(files[n] for n in names)):
                view = memoryview(chunk).cast("B")
                crc = zlib.crc32(view, crc)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
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
            prefix = f.read(_PREFIX.size)
            if len(prefix) != _PREFIX.size:
                return None, "slot shorter than its prefix"
            magic, n = _PREFIX.unpack(prefix)
            if magic != MAGIC or n > _MAX_INDEX or _PREFIX.size + n > size:
                return None, "slot prefix is not a snapshot container"
            index_raw = f.read(n)
            crc = zlib.crc32(index_raw, zlib.crc32(prefix))
            # The index is parsed before the checksum is known, so its checks are defensive too.
            entries, why = _parse_index(index_raw, header["step"], size - _PREFIX.size - n)
            if entries is None:
                return None, why
            files: dict[str, bytes] = {}
            for name, length in entries:
                # One read() fills a file of up to ~2 GiB from tmpfs; more takes several (and a join).
                data = f.read(length)
                if len(data) < length:
                    parts = [data]
                    got = len(data)
                    while got < length:
                        more = f.read(length - got)
                        if not more:
                            return None, f"slot ends inside {name}"
                        parts.append(more)
                        got += len(more)
                    data = b"".join(parts)
                crc = zlib.crc32(data, crc)
                files[name] = data
        if crc != header["crc32"]:
            return None, f"checksum mismatch in {SLOTS[header['slot']]} (corrupt or overwritten)"
        why_state = _state_mismatch(files.get("trainer_state.json"), header["step"])
        if why_state:
            return None, why_state
        return Snapshot(
            step=header["step"],
            files=files,
            time=float(header["time"]),
            generation=header["generation"],
            slot=header["slot"],
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


def _parse_index(raw: bytes, step: int, data_size: int) -> tuple[list[tuple[str, int]] | None, str]:
    """(name, length) in order if the index covers exactly ``data_size`` bytes with contiguous plain names."""
    try:
        index = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        return None, f"index does not parse ({exc})"
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("step") != step:
        return None, "index format or step does not match the header"
    entries = index.get("files")
    if not isinstance(entries, list):
        return None, "index has no file list"
    out: list[tuple[str, int]] = []
    seen: set[str] = set()
    offset = 0
    for e in entries:
        if not (isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and _NAME.match(e[0])):
            return None, f"index entry {str(e)[:80]!r} is not [name, offset, length]"
        name, off, length = e[0], _int(e[1]), _int(e[2])
        if off != offset or length is None or name in seen:
            return None, f"index entry for {name} is out of bounds or repeated"
        seen.add(name)
        out.append((name, length))
        offset += length
    if offset != data_size:
        return None, f"index covers {offset} bytes, the slot holds {data_size}"
    return out, ""


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
    from transformers import PreTrainedModel
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    if not isinstance(model, PreTrainedModel):
        # Trainer._save's fallback for a plain nn.Module: its state dict alone.
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        return {"model.safetensors": safetensors.torch.save(state, metadata={"format": "pt"})}
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
    tensors = {k: v.contiguous() for k, v in state.items()}
    files["model.safetensors"] = safetensors.torch.save(tensors, metadata={"format": "pt"})
    return files


def _trainer_state_json(trainer: Any) -> bytes:
    """``TrainerState.save_to_json``'s bytes after commit_checkpoint's updates, on a copy."""
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
    return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()


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
