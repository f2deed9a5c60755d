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
    <root>/header.json   which slot is the newest, and how to verify it

Container (one file per slot)::

    8 bytes   magic b"VITSNAP1"
    8 bytes   n: length of the index, unsigned little-endian
    n bytes   index: JSON {"format": 1, "step": S, "files": [[name, offset, length], ...]}
    ...       the files' bytes, concatenated in index order; offsets count from the end of the index

Header (JSON, replaced atomically): ``format``, ``generation`` (1, 2, ...), ``slot`` (0 or 1),
``step``, ``size`` (bytes of the slot file), ``checksum`` (``"crc32"``), ``crc32`` (of the
whole slot file), ``identity`` (the run's config/data fingerprint, world size, rank, ...),
``time`` (epoch seconds of the write), ``pid``.

Commit protocol (:meth:`SnapshotStore.write`): write the slot the header does *not* name,
in place, with plain ``write()`` calls; then replace the header (temporary file + rename,
:func:`supervisor.protocol.atomic_write_bytes`). The rename is the commit. A kill at any
instant leaves either the old header, which names the old slot whose bytes were not
touched, or the new header, whose slot was completely written before the rename. Both
are in the same kernel's page cache, so a later reader sees every ``write()`` that
returned before the rename; fsync would add nothing (tmpfs has no stable storage, and a
host crash loses the snapshot by design: disk checkpoints cover that).

Only the newest snapshot is recorded. The other slot is never used as a fallback: it is
the one the next write overwrites, so nothing trustworthy records what it holds, and a
corrupt newest slot (which only a bug, a second writer or bad memory can cause) means
the disk checkpoint is the safer fallback. (A multi-rank resume needs the newest step
that *every* rank holds, so a rank that flipped ahead must offer its previous slot: that
will take the previous entry in the header, cleared before its slot is overwritten.)

Reading (:meth:`SnapshotStore.read_newest`) trusts nothing: the header's types and
ranges, the identity, the slot's size, the CRC, the index's bounds and names, and that
``trainer_state.json`` says ``global_step == step``. Whatever does not validate is
logged and ignored, never raised.

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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor import protocol
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
            self._next = self._after_current()
        generation, slot = self._next
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
        header = {
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
        protocol.atomic_write_bytes(self.root / HEADER, json.dumps(header, sort_keys=True).encode(), durable=False)
        self._next = (generation + 1, 1 - slot)

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

    def _after_current(self) -> tuple[int, int]:
        """The generation and slot that follow the header on disk (a new writer after a restart
        must not overwrite the snapshot it may be resuming from)."""
        header = self._header(quiet=True)
        if header is None:
            return 1, 0
        return header["generation"] + 1, 1 - header["slot"]

    # -- reading -----------------------------------------------------------------------

    def read_newest(self) -> Snapshot | None:
        """The newest snapshot if every check passes, else None (with a log line saying why)."""
        why = "no header"
        for _ in range(_READ_TRIES):
            header = self._header()
            if header is None:
                return None
            try:
                snap, why = self._read_slot(header)
            except (OSError, MemoryError) as exc:
                snap, why = None, f"{type(exc).__name__}: {exc}"
            if snap is not None:
                return snap
            if self._header(quiet=True) == header:
                break  # nobody is writing: the slot itself is bad
        log.warning("Ignoring the snapshot in %s: %s", self.root, why)
        return None

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
