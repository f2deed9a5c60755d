"""Free-disk check before every save: make room from rotation, then wait or stop."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("vit_train")

MiB = 1 << 20


class DiskLow(Exception):
    """Not enough free space for the next checkpoint (and the config says stop)."""

    def __init__(self, needed: int, free: int, path: Path) -> None:
        super().__init__(
            f"need {needed / MiB:.1f} MiB free on {path} for the next checkpoint "
            f"(incl. reserve), only {free / MiB:.1f} MiB free"
        )
        self.needed = needed
        self.free = free


class StoppedWhileWaiting(Exception):
    """A stop arrived while training was paused for disk space; no checkpoint could be written."""


class DiskGuard:
    """Decides whether a save of ``needed`` bytes may start.

    ``free_bytes`` is injectable so unit tests can script the free space.
    """

    def __init__(
        self,
        path: Path,
        reserve_bytes: int,
        on_low: str,
        recheck_s: float,
        free_bytes: Callable[[], int] | None = None,
        stop_requested: Callable[[], bool] = lambda: False,
        on_wait: Callable[[int, int], None] = lambda needed, free: None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.path = path
        self.reserve = reserve_bytes
        self.on_low = on_low
        self.recheck_s = recheck_s
        self.free_bytes = free_bytes or (lambda: shutil.disk_usage(self.path).free)
        self.stop_requested = stop_requested
        self.on_wait = on_wait
        self.sleep = sleep
        self.waited_s = 0.0

    def ensure(self, ckpt_bytes: int, removable: Callable[[], list[Path]]) -> None:
        """Return when a save of ``ckpt_bytes`` fits; raise DiskLow or StoppedWhileWaiting."""
        need = ckpt_bytes + self.reserve
        free = self.free_bytes()
        if free >= need:
            return
        for victim in removable():
            log.warning(
                "Low disk: removing %s early (rotation would remove it after this save) "
                "to make room for the next checkpoint",
                victim.name,
            )
            shutil.rmtree(victim)
            free = self.free_bytes()
            if free >= need:
                return
        if self.on_low == "stop":
            raise DiskLow(need, free, self.path)
        log.warning(
            "Low disk: need %.1f MiB free on %s (checkpoint %.1f MiB + reserve %.1f MiB), %.1f MiB free; "
            "training paused, re-checking every %gs",
            need / MiB,
            self.path,
            ckpt_bytes / MiB,
            self.reserve / MiB,
            free / MiB,
            self.recheck_s,
        )
        start = time.monotonic()
        while free < need:
            self.on_wait(need, free)
            if self.stop_requested():
                raise StoppedWhileWaiting(
                    f"stopped while waiting for disk space ({free / MiB:.1f} MiB free, "
                    f"{need / MiB:.1f} MiB needed); no checkpoint was written"
                )
            self.sleep(self.recheck_s)
            free = self.free_bytes()
        self.waited_s += time.monotonic() - start
        log.warning("Disk space available again (%.1f MiB free); training continues", free / MiB)
