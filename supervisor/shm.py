"""Snapshot stores as the supervisor sees them: where a run's stores are, what their headers say,
how much shared memory they need, and removing them once the run no longer needs them.

The worker writes the stores (:mod:`worker.snapshot`: ``header.json`` + ``slot-0`` + ``slot-1``
per rank); the supervisor owns their lifecycle. This module is torch-free and reads nothing it
does not bound: a header over :data:`MAX_HEADER` bytes is not read, a planted FIFO or symlink
is not opened, every header field may be missing or wrong-typed. Nothing here raises on what
it finds in a store folder.

Space. A store needs two slots of the checkpoint's size plus a little slack
(:func:`needed_bytes`, the same formula as ``SnapshotStore.needed_bytes``). The checkpoint's
size is measured from the run's newest ``checkpoint-N`` when there is one; otherwise it is
computed from the config (:func:`estimate_state`): the ViT's parameter count from the
architecture (``model.scratch``, or a local or cached pretrained model's ``config.json``),
times 4 bytes for the fp32 weights and 8 more for AdamW's two moments.

Removal (:func:`remove_stores`) deletes only what a store is made of: regular files named
``header.json``, ``slot-0``, ``slot-1`` or a temporary header, inside a folder owned by this
user whose name is exactly this run's store name. It never follows a symlink (the folders are
opened with ``O_NOFOLLOW`` and every name is resolved relative to them), and anything else in
the folder is left where it is and reported, together with the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor import protocol
from supervisor.schema import SCRATCH, Config

DEFAULT_BASE = Path("/dev/shm")
HEADER = "header.json"
SLOTS = ("slot-0", "slot-1")
MAX_HEADER = 64 << 10
"""A header is a few hundred bytes; a bigger file is not ours and is not read."""
SLACK = 64 << 10
"""Per slot and once more for the header: container prefix, index, header (as ``SnapshotStore.needed_bytes``)."""
SMALL_FILES = 1 << 20
"""Allowance for a checkpoint's small files (trainer state, scheduler, RNG, args) when estimating from the config."""

_TMP_HEADER = re.compile(r"^\.header\.json\.[A-Za-z0-9_]+\.tmp$")  # a writer killed between mkstemp and rename
_RANK = re.compile(r"-rank(\d{1,6})$")
_MAX_CONFIG_JSON = 1 << 20
# A ViT-Base/16 at 224 px, for when nothing better is known (a hub id not in the local cache).
_VIT_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "intermediate_size": 3072,
    "image_size": 224,
    "patch_size": 16,
}


# ----------------------------------------------------------------------------- where


def store_base(base: str | os.PathLike[str] | None = None) -> Path:
    """The folder that holds this user's stores: ``<base or /dev/shm>/vit-supervisor-<uid>``.

    The uid keeps users apart on a shared host (``/dev/shm`` is world-writable)."""
    return Path(base or DEFAULT_BASE) / f"vit-supervisor-{os.getuid()}"


def _store_prefix(output_dir: str | os.PathLike[str]) -> str:
    real = os.path.realpath(os.fspath(output_dir))
    digest = hashlib.sha256(real.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(real))[:40] or "run"
    return f"{name}-{digest}"


def default_root(output_dir: str | os.PathLike[str], rank: int = 0, base: str | os.PathLike[str] | None = None) -> Path:
    """``/dev/shm/vit-supervisor-<uid>/<name>-<hash>-rank<rank>`` for the run in ``output_dir``.

    The hash is of the output directory's real path, so two runs never share a store and a
    run reached through a symlink finds its own. The readable tail of the name is for people
    looking at ``ls``.
    """
    return store_base(base) / f"{_store_prefix(output_dir)}-rank{int(rank)}"


def run_stores(output_dir: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> list[Path]:
    """This run's store folders (one per rank that ever snapshotted on this host), by rank.

    Only names of exactly this run's form; what they contain is not checked here."""
    prefix = _store_prefix(output_dir)
    found: list[tuple[int, Path]] = []
    try:
        entries = list(os.scandir(store_base(base)))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.startswith(prefix + "-rank"):
            continue
        m = _RANK.search(entry.name)
        if m and entry.name == f"{prefix}-rank{m.group(1)}" and str(int(m.group(1))) == m.group(1):
            found.append((int(m.group(1)), Path(entry.path)))
    return [p for _, p in sorted(found)]


def rank_of(root: Path) -> int | None:
    m = _RANK.search(root.name)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------- what a store holds


@dataclass(frozen=True)
class StoreInfo:
    """What a store's header says, as far as it can be trusted without reading the slots.

    ``problem`` is None when the header has a usable step, time and size; otherwise it says
    why not (and those fields may be None). The slots are not checksummed here: the worker
    does that before it resumes from one."""

    root: Path
    rank: int | None
    step: int | None = None
    time: float | None = None
    size: int | None = None
    """Bytes of the newest snapshot (one slot)."""
    used_bytes: int = 0
    """Bytes the store's files take in the file system now (both slots and the header)."""
    problem: str | None = None


def _int(v: Any, lo: int = 0, hi: int = 1 << 62) -> int | None:
    return v if type(v) is int and lo <= v <= hi else None


def read_store(root: str | os.PathLike[str]) -> StoreInfo:
    """The newest snapshot's step, time and size from ``root``'s header. Never raises."""
    root = Path(root)
    used = store_bytes(root)
    rank = rank_of(root)
    try:
        raw = _read_small(root / HEADER, MAX_HEADER)
    except FileNotFoundError:
        return StoreInfo(root, rank, used_bytes=used, problem="no header.json")
    except OSError as exc:
        return StoreInfo(root, rank, used_bytes=used, problem=f"header.json unreadable: {exc.strerror or exc}")
    if raw is None:
        return StoreInfo(root, rank, used_bytes=used, problem=f"header.json larger than {MAX_HEADER} bytes")
    try:
        h = json.loads(raw)
    except (ValueError, RecursionError):
        return StoreInfo(root, rank, used_bytes=used, problem="header.json is not JSON")
    if not isinstance(h, dict):
        return StoreInfo(root, rank, used_bytes=used, problem="header.json is not a JSON object")
    step, size = _int(h.get("step")), _int(h.get("size"))
    t = h.get("time")
    when = float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < 1e11 else None
    bad = [k for k, v in (("step", step), ("time", when), ("size", size)) if v is None]
    problem = f"header.json has no usable {', '.join(bad)}" if bad else None
    return StoreInfo(root, rank, step, when, size, used, problem)


def _read_small(path: Path, limit: int, *, follow: bool = False) -> bytes | None:
    """A regular file's bytes, None when it is larger than ``limit``; never opens a FIFO (which
    would block), nor a symlink unless ``follow`` (the Hugging Face cache links to its blobs)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path.name} is not a regular file")
        if st.st_size > limit:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(limit + 1)
    finally:
        os.close(fd)
    return None if len(raw) > limit else raw


def store_bytes(root: str | os.PathLike[str]) -> int:
    """Bytes held by a store's own files (slots, header); 0 when there is nothing."""
    total = 0
    for name in (*SLOTS, HEADER):
        try:
            st = os.lstat(Path(root) / name)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            total += st.st_size
    return total


# ----------------------------------------------------------------------------- space


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes (for this user) on the file system of ``path``, or of its nearest existing parent."""
    p = Path(os.path.abspath(os.fspath(path)))
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def needed_bytes(state_size: int) -> int:
    """What one store for a checkpoint of ``state_size`` bytes takes: two slots and the header."""
    return 2 * (state_size + SLACK) + SLACK


def vit_parameters(
    *,
    hidden_size: int,
    num_hidden_layers: int,
    intermediate_size: int,
    image_size: int,
    patch_size: int,
    num_channels: int,
    num_labels: int,
    concat_mode: str = "none",
    qkv_bias: bool = True,
) -> int:
    """Parameters of the worker's ViT classifier (``ViTModel`` without pooler + linear head).

    Embeddings: [CLS], one position per patch and [CLS], the patch projection (a conv of
    ``patch_size`` squared times ``num_channels`` inputs). Each block: query, key, value and
    output projections, the MLP's two layers, two layer norms. One final layer norm. The head
    sees twice the width when image pairs are concatenated.
    """
    h, i = hidden_size, intermediate_size
    patches = (image_size // patch_size) ** 2
    embeddings = h + (patches + 1) * h + num_channels * patch_size * patch_size * h + h
    attention = 4 * h * h + (4 if qkv_bias else 1) * h
    block = attention + (h * i + i) + (i * h + h) + 2 * (2 * h)
    width = h * (2 if concat_mode == "concat" else 1)
    return embeddings + num_hidden_layers * block + 2 * h + width * num_labels + num_labels


@dataclass(frozen=True)
class Estimate:
    """The bytes one snapshot (one checkpoint) of the run takes, and where the figure comes from."""

    state_bytes: int
    source: str
    """e.g. ``checkpoint-40``, ``model.scratch``, ``config.json of /models/vit``."""
    guess: bool = False
    """True when nothing about the model was known (a hub id not in the local cache)."""

    @property
    def needed(self) -> int:
        return needed_bytes(self.state_bytes)


def estimate_state(cfg: Config) -> Estimate:
    """The size of one snapshot of this run: the newest checkpoint's files, else computed from the config."""
    out = Path(cfg.training.output_dir)
    step = protocol.newest_checkpoint_step(out)
    if step >= 0:
        measured = _files_bytes(out / f"checkpoint-{step}")
        if measured:
            return Estimate(measured, f"checkpoint-{step}")
    m = cfg.model
    arch: Mapping[str, Any] | None
    if m.model_name == SCRATCH:
        s = m.scratch
        arch = {
            "hidden_size": s.hidden_size,
            "num_hidden_layers": s.num_hidden_layers,
            "intermediate_size": s.intermediate_size,
            "image_size": s.image_size,
            "patch_size": s.patch_size,
            "num_channels": s.num_channels,
        }
        source = "model.scratch"
    else:
        found = _pretrained_config(m.model_name)
        arch, source = (found[0], f"config.json of {found[1]}") if found else (None, "")
    if arch is None:
        return _guess(cfg, f"a guess: ViT-Base size ({m.model_name} has no config.json here)")
    try:
        params = vit_parameters(
            hidden_size=int(arch["hidden_size"]),
            num_hidden_layers=int(arch["num_hidden_layers"]),
            intermediate_size=int(arch["intermediate_size"]),
            image_size=int(arch.get("image_size", 224)),
            patch_size=int(arch.get("patch_size", 16)),
            num_channels=int(arch.get("num_channels", 3)),
            num_labels=m.num_labels,
            concat_mode=m.concat_mode,
            qkv_bias=bool(arch.get("qkv_bias", True)),
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError):
        return _guess(cfg, f"a guess: ViT-Base size ({source} lacks the ViT sizes)")
    # fp32 weights, plus AdamW's two fp32 moments per weight.
    return Estimate(params * 4 * 3 + SMALL_FILES, source)


def _guess(cfg: Config, source: str) -> Estimate:
    b = _VIT_BASE
    params = vit_parameters(
        hidden_size=b["hidden_size"],
        num_hidden_layers=b["num_hidden_layers"],
        intermediate_size=b["intermediate_size"],
        image_size=b["image_size"],
        patch_size=b["patch_size"],
        num_channels=3,
        num_labels=cfg.model.num_labels,
        concat_mode=cfg.model.concat_mode,
    )
    return Estimate(params * 12 + SMALL_FILES, source, True)


def _files_bytes(folder: Path) -> int:
    """Bytes of the regular files directly in ``folder`` (what a snapshot of that checkpoint holds)."""
    total = 0
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_size
    except OSError:
        return 0
    return total


def _pretrained_config(name: str) -> tuple[dict[str, Any], Path] | None:
    """A pretrained model's ``config.json``: a local folder, or the Hugging Face cache's copy of a hub id."""
    candidates: list[Path] = []
    if os.path.isdir(name):
        candidates.append(Path(name) / "config.json")
    elif re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", name):
        snaps = _hub_cache() / f"models--{name.replace('/', '--')}" / "snapshots"
        try:
            candidates += sorted(snaps.glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        except OSError:
            pass
    for path in candidates:
        try:
            raw = _read_small(path, _MAX_CONFIG_JSON, follow=True)
            obj = json.loads(raw) if raw is not None else None
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            return obj, path.parent
    return None


def _hub_cache() -> Path:
    """Where huggingface_hub keeps downloaded models (its documented environment variables)."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]) / "hub"
    xdg = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return xdg / "huggingface" / "hub"


def snapshots_on(cfg: Config) -> bool:
    """Whether the config asks for snapshots (``every_steps`` is ``auto`` or a positive N)."""
    return bool(cfg.snapshot.every_steps != 0)


def run_needed_bytes(cfg: Config, estimate: Estimate) -> int:
    """Shared memory this node's stores need: the full store of the rank that holds the model
    (global rank 0), a small one (RNG and trainer state) for every other local rank."""
    if cfg.launcher != "torchrun":
        return estimate.needed
    d = cfg.distributed
    small = needed_bytes(SMALL_FILES)
    return (estimate.needed if d.node_rank == 0 else small) + (d.nproc_per_node - 1) * small


def shortfall(free: int, needed: int, base: Path, estimate: Estimate) -> str | None:
    """One line saying what is missing and how to fix it; None when the stores fit."""
    if free >= needed:
        return None
    return (
        f"{base} has {human(free)} free, this run's snapshots need {human(needed)} "
        f"(2 slots of {human(estimate.state_bytes)}, from {estimate.source}); "
        f"fix: give it more shared memory (Docker: --shm-size={_suggest(needed)}), point snapshot.root "
        "at a larger tmpfs, or set snapshot.every_steps: 0"
    )


def _suggest(needed: int) -> str:
    """A --shm-size that holds the stores with room for DataLoader workers' shared tensors."""
    gib = -(-int(needed * 1.5) // (1 << 30))
    return f"{max(gib, 1)}g"


def human(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ----------------------------------------------------------------------------- removal


@dataclass
class Removal:
    """What :func:`remove_stores` did: folders removed, and everything it left with the reason."""

    removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept: list[str] = field(default_factory=list)
    """``"path: why"`` for each folder or entry left in place."""


def remove_stores(output_dir: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> Removal:
    """Delete this run's stores (every rank). Never raises on what it finds; see the module docstring."""
    result = Removal()
    user_dir = store_base(base)
    try:
        dfd = os.open(user_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return result
    except OSError as exc:
        # A symlink planted in place of our folder (ELOOP/ENOTDIR) or no permission: not ours to touch.
        result.kept.append(f"{user_dir}: not a folder of ours ({exc.strerror or exc})")
        return result
    try:
        if not _owned_dir(os.fstat(dfd)):
            result.kept.append(f"{user_dir}: not owned by this user")
            return result
        for root in run_stores(output_dir, base):
            _remove_one(dfd, root, result)
    finally:
        os.close(dfd)
    return result


def _owned_dir(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


def _ours(name: str) -> bool:
    return name in (HEADER, *SLOTS) or bool(_TMP_HEADER.match(name))


def _remove_one(parent_fd: int, root: Path, result: Removal) -> None:
    try:
        fd = os.open(root.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    except FileNotFoundError:
        return
    except OSError as exc:
        result.kept.append(f"{root}: not a store folder ({exc.strerror or exc})")
        return
    left: list[str] = []
    try:
        if not _owned_dir(os.fstat(fd)):
            result.kept.append(f"{root}: not owned by this user")
            return
        for name in os.listdir(fd):
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not (_ours(name) and stat.S_ISREG(st.st_mode)):
                left.append(name)
                continue
            try:
                os.unlink(name, dir_fd=fd)
                result.freed_bytes += st.st_size
            except FileNotFoundError:
                pass
            except OSError as exc:
                left.append(f"{name} ({exc.strerror or exc})")
    except OSError as exc:
        result.kept.append(f"{root}: {exc.strerror or exc}")
        return
    finally:
        os.close(fd)
    if left:
        result.kept.append(f"{root}: kept, holds what is not a snapshot file: {', '.join(sorted(left)[:5])}")
        return
    try:
        os.rmdir(root.name, dir_fd=parent_fd)
        result.removed.append(str(root))
    except OSError as exc:  # a writer re-created a file meanwhile: leave it, say so
        result.kept.append(f"{root}: {exc.strerror or exc}")
