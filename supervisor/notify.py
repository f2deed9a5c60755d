"""systemd's notify protocol (``sd_notify``) over a plain AF_UNIX datagram socket; no libsystemd needed.

Under ``Type=notify`` systemd sets ``NOTIFY_SOCKET`` (a path, or ``@name`` for
the abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and
``WATCHDOG_PID``). Outside systemd every call is a cheap no-op.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one datagram (e.g. ``"READY=1\\nSTATUS=running"``); False if there is no socket to send to."""
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # Linux abstract namespace
    elif not address.startswith("/"):
        return False  # vsock and other forms are not ours to handle
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            # Never block the supervisor loop on a reader that is behind (a datagram queue holds ~10).
            sock.send(message.encode("utf-8", "replace"), socket.MSG_DONTWAIT)
    except OSError:
        return False  # systemd gone, socket unreachable or full: notifications are advisory
    return True


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec``), or None when no watchdog is armed."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    wanted = env.get("WATCHDOG_PID", "")
    if wanted.isdigit() and int(wanted) != (os.getpid() if pid is None else pid):
        return None  # the watchdog is for another process (e.g. we are a child of the service)
    return int(usec) / 1e6 / 2


class Notifier:
    """The supervisor's messages to systemd: READY once, STATUS on every change, throttled watchdog pings."""

    def __init__(self, env: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.env = dict(os.environ if env is None else env)
        self.clock = clock
        self.ready_sent = False
        self.interval = watchdog_interval(self.env)
        self._last_ping: float | None = None

    @property
    def active(self) -> bool:
        return bool(self.env.get("NOTIFY_SOCKET"))

    def ready(self, status: str) -> None:
        if not self.ready_sent:
            self.ready_sent = True
            notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}", self.env)

    def status(self, status: str) -> None:
        notify(f"STATUS={status}", self.env)

    def stopping(self, status: str) -> None:
        notify(f"STOPPING=1\nSTATUS={status}", self.env)

    def watchdog(self) -> None:
        """Call from the main loop only: a ping proves the loop is alive, not just the process."""
        if self.interval is None:
            return
        now = self.clock()
        if self._last_ping is None or now - self._last_ping >= self.interval:
            self._last_ping = now
            notify("WATCHDOG=1", self.env)
