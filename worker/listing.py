"""A cached listing of a folder tree, valid while no directory in the tree changed.

Listing and stat-ing 200k images costs seconds (minutes on network storage), and every
restart and every standby used to pay it again. A listing is saved with a stamp of each
directory it walked (inode, mtime, ctime in nanoseconds): adding, removing or renaming
an entry anywhere in the tree changes its directory's mtime, so one ``stat`` per
directory (tens, not hundreds of thousands) tells whether the listing still holds.

What a stamp cannot see: an image rewritten in place under the same name (no directory
changes). That is documented in the README; delete the cache file to force a re-listing.

The cache file is checked, never trusted: a wrong version, root or kind, a digest that
does not match its content, a directory stamp that differs, or a payload the caller
rejects makes it a miss (one log line), and the data is listed again. A listing whose
directories changed in the last :data:`RACY_NS` is not saved: a change in the same
mtime tick as the listing would otherwise go unnoticed (git's "racy index" problem).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervisor import protocol

log = logging.getLogger("vit_train")

VERSION = 1
RACY_NS = 2_000_000_000
"""Directories modified this recently (before the listing started) make the listing unsaveable."""

Stamp = list[Any]  # [relative dir, inode, mtime_ns, ctime_ns]


class CacheMiss(Exception):
    """The cache file cannot be used (the message says why)."""


def cache_file(output_dir: Path, kind: str, root: Path) -> Path:
    """Where the listing of ``root`` for ``kind`` lives: the run folder, so it goes with the run."""
    key = hashlib.sha256(f"{kind}\0{root.resolve()}".encode()).hexdigest()[:16]
    return protocol.run_dir(output_dir) / "data-cache" / f"{kind}-{key}.json"


def stamp(root: Path, rel: str) -> Stamp:
    st = os.stat(root / rel if rel else root)
    return [rel, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _digest(header: dict[str, Any], body: bytes) -> str:
    """Over the header (without its digest) and the payload's bytes as written: nothing is
    serialised again to check it (that cost more than the listing's other checks at 200k)."""
    h = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "digest"}, sort_keys=True).encode())
    h.update(b"\n")
    h.update(body)
    return h.hexdigest()


def load(path: Path, kind: str, root: Path, check: Callable[[Any], Any]) -> Any:
    """The payload saved for ``root``, checked by ``check`` (which raises CacheMiss or returns it
    converted); raises CacheMiss when there is none usable."""
    try:
        head, _, body = path.read_bytes().partition(b"\n")
        raw = json.loads(head)
    except FileNotFoundError:
        raise CacheMiss("no cache yet") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CacheMiss(f"unreadable ({type(exc).__name__})") from None
    if not isinstance(raw, dict) or raw.get("version") != VERSION or raw.get("kind") != kind:
        raise CacheMiss("another version or kind")
    if raw.get("root") != str(root.resolve()):
        raise CacheMiss("made for another folder")
    dirs = raw.get("dirs")
    if not isinstance(dirs, list) or not dirs or raw.get("digest") != _digest(raw, body):
        raise CacheMiss("its digest does not match its content")
    for d in dirs:
        ok = isinstance(d, list) and len(d) == 4 and isinstance(d[0], str) and all(type(v) is int for v in d[1:])
        if not ok or d[0].startswith("/") or ".." in d[0].split("/"):
            raise CacheMiss("a malformed directory stamp")
        try:
            now = stamp(root, d[0])
        except OSError:
            raise CacheMiss(f"directory {d[0] or '.'} is gone") from None
        if now != d:
            raise CacheMiss(f"directory {d[0] or '.'} changed")
    try:
        return check(json.loads(body))
    except CacheMiss:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise CacheMiss(f"a malformed payload ({type(exc).__name__})") from None


def save(path: Path, kind: str, root: Path, dirs: list[Stamp], payload: Any, started_ns: int) -> bool:
    """Write the listing atomically; False (and nothing written) when it may be racy or cannot be written."""
    if any(d[2] >= started_ns - RACY_NS for d in dirs):
        log.info("Data listing not cached: %s changed less than %.0f s ago", root, RACY_NS / 1e9)
        return False
    header: dict[str, Any] = {"version": VERSION, "kind": kind, "root": str(root.resolve()), "dirs": dirs}
    body = json.dumps(payload, separators=(",", ":")).encode()
    header["digest"] = _digest(header, body)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Not fsynced: after a power loss a torn file fails its digest and is listed again.
        protocol.atomic_write_bytes(path, json.dumps(header).encode() + b"\n" + body, durable=False)
    except OSError as exc:  # a cache is never worth failing the attempt for
        log.warning("Data listing not cached in %s: %s", path, exc)
        return False
    return True


def cached(
    path: Path,
    kind: str,
    root: Path,
    check: Callable[[Any], Any],
    make: Callable[[], tuple[list[Stamp], Any]],
) -> tuple[Any, bool]:
    """(payload, hit): the checked cached payload, or a fresh one from ``make`` (then saved)."""
    try:
        return load(path, kind, root, check), True
    except CacheMiss as miss:
        if path.exists():
            log.info("Data listing cache %s ignored: %s", path, miss)
    started = time.time_ns()
    dirs, payload = make()
    save(path, kind, root, dirs, payload, started)
    return check(payload), False
