"""Has the data changed since it was read? Answered at a standby's go without rescanning it.

A standby reads the data set long before it is needed. At the go it must not train on
data that changed meanwhile (the resume guard records the data's fingerprint), but
rescanning a large image folder to recompute the fingerprint costs seconds (1.8 s at
50k images) exactly when a restart should be fast. Instead the standby watches the
data's folders with inotify (watchdog) from *before* its scan until the go: if nothing
was created, deleted, moved, written or had its attributes changed there, the
fingerprint cannot have changed and the go needs no rescan. Any such event (or a
watch that could not be set up) means "rescan at the go", which then decides exactly
as before: the standby is stale only if the fingerprint really differs.

inotify events reach the watch's thread a little after the change. So that a change made
just before the go is not missed for that, the go also compares the modification times of
the watched folders themselves (taken when the watch started): creating, deleting or
renaming an entry changes its folder's time at once. What only the events can tell, a
file rewritten in place, is then seen within the thread's latency (milliseconds): no
different from a rewrite just after the go.

Reads (opens, closes without writing) are not changes: the active worker reads the
same images all the time, and the kernel does not even queue those events for us.
A change made on another host of a network file system is not seen by inotify; such
data should not change under a running job anyway, and the guard of every cold start
still compares fingerprints.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from pathlib import Path

from supervisor.schema import Config

log = logging.getLogger("vit_train")


def targets(cfg: Config) -> list[tuple[Path, bool]] | None:
    """(folder, recursive) pairs that hold everything the fingerprint covers; None if unknown."""
    d = cfg.data
    if d.source == "digits":
        # scikit-learn's bundled file: only a reinstall changes it, but watching costs nothing.
        spec = importlib.util.find_spec("sklearn")
        if spec is None or not spec.submodule_search_locations:
            return None
        return [(Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data", False)]
    if d.source == "image_folder":
        return [(Path(d.path or ""), True)]
    # Pairs: the CSV's folder and the image root. Rows may name images anywhere (absolute
    # paths); those are checked against the prepared pairs in :func:`covers`.
    csv_path = Path(d.path or "")
    base = Path(d.image_root) if d.image_root else csv_path.parent
    return [(csv_path.parent, False), (base, True)]


def covers(cfg: Config, found: list[Path]) -> bool:
    """Whether :func:`targets` watches every file the fingerprint covers, given ``found``, the
    prepared data's files. A symbolic link's target may lie anywhere (and inotify does not
    follow it). Pairs can name files outside the watched folders; with ``data.limit`` the
    prepared pairs are a subset of the CSV's, so only a rescan can tell.
    """
    if any(p.is_symlink() for p in found):
        return False
    if cfg.data.source != "pairs_csv":
        return True
    if cfg.data.limit is not None:
        return False
    base = Path(cfg.data.image_root) if cfg.data.image_root else Path(cfg.data.path or "").parent
    return all(p.is_relative_to(base) for p in found)


class DataWatch:
    """A running watch; :attr:`changed` names the first change seen (or why it cannot tell)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._why: str | None = None
        self._observer: object | None = None
        self._folders: dict[str, int] = {}
        """Every watched folder's st_mtime_ns when the watch started."""

    @property
    def changed(self) -> str | None:
        """None while nothing changed; else what did (or why the watch cannot vouch for the data)."""
        if not self._event.is_set():
            for folder, mtime in self._folders.items():
                now = _mtime(folder)
                if now != mtime:
                    self.mark(f"folder {folder!r} changed (an entry added, removed or renamed)")
                    break
        return self._why if self._event.is_set() else None

    def mark(self, why: str) -> None:
        if not self._event.is_set():
            self._why = why
            self._event.set()

    @classmethod
    def start(cls, cfg: Config) -> DataWatch:
        """Watch the configured data's folders; a watch that cannot be set up is already "changed"."""
        watch = cls()
        where = targets(cfg)
        if where is None:
            watch.mark("the data's location is not known to the watch")
            return watch
        try:
            from watchdog.events import (
                DirCreatedEvent,
                DirDeletedEvent,
                DirModifiedEvent,
                DirMovedEvent,
                FileClosedEvent,
                FileCreatedEvent,
                FileDeletedEvent,
                FileModifiedEvent,
                FileMovedEvent,
                FileSystemEvent,
                FileSystemEventHandler,
            )
            from watchdog.observers import Observer

            class _Handler(FileSystemEventHandler):
                def on_any_event(self, event: FileSystemEvent) -> None:
                    if not watch._event.is_set():
                        log.info(
                            "The data changed under the standby (%s %r): its go will rescan it",
                            event.event_type,
                            event.src_path,
                        )
                    watch.mark(f"{event.event_type} {event.src_path!r}")

            changes = [
                DirCreatedEvent,
                DirDeletedEvent,
                DirModifiedEvent,
                DirMovedEvent,
                FileClosedEvent,
                FileCreatedEvent,
                FileDeletedEvent,
                FileModifiedEvent,
                FileMovedEvent,
            ]
            observer = Observer()
            observer.daemon = True
            for folder, recursive in where:
                observer.schedule(_Handler(), str(folder), recursive=recursive, event_filter=changes)
            observer.start()
            watch._observer = observer
            watch._folders = _folder_times(where)
        except (OSError, ValueError) as exc:  # a missing folder, the inotify watch limit, ...
            watch.stop()
            watch.mark(f"the data's folders could not be watched ({exc})")
        return watch

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()  # type: ignore[attr-defined]
            observer.join(timeout=2)  # type: ignore[attr-defined]


def _mtime(folder: str) -> int | None:
    try:
        return os.stat(folder).st_mtime_ns
    except OSError:
        return None


def _folder_times(where: list[tuple[Path, bool]]) -> dict[str, int]:
    """st_mtime_ns of every watched folder (of every subfolder too where the watch is recursive)."""
    times: dict[str, int] = {}
    for top, recursive in where:
        folders = [str(top)]
        if recursive:
            folders += [os.path.join(root, d) for root, dirs, _ in os.walk(top) for d in dirs]
        for f in folders:
            times[f] = os.stat(f).st_mtime_ns
    return times
