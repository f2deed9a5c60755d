"""sd_notify against real AF_UNIX datagram sockets (path and abstract), as systemd's NOTIFY_SOCKET is."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor import notify
from supervisor.daemon import Supervisor
from supervisor.notify import Notifier


@pytest.fixture
def sock_path() -> Iterator[tuple[socket.socket, str]]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    d = tempfile.mkdtemp(prefix="ntf")
    path = os.path.join(d, "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    yield s, path
    s.close()
    os.unlink(path)
    os.rmdir(d)


def drain(s: socket.socket) -> list[str]:
    out = []
    s.settimeout(0.05)
    while True:
        try:
            out.append(s.recv(4096).decode())
        except (TimeoutError, BlockingIOError):
            return out


def test_notify_sends_datagram_to_path_socket(sock_path: tuple[socket.socket, str]) -> None:
    s, path = sock_path
    assert notify.notify("READY=1\nSTATUS=hello", {"NOTIFY_SOCKET": path})
    assert s.recv(4096) == b"READY=1\nSTATUS=hello"


def test_notify_supports_abstract_namespace_socket() -> None:
    name = f"vit-supervisor-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(2)
        assert notify.notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert s.recv(4096) == b"WATCHDOG=1"


def test_notify_without_socket_is_a_quiet_no_op(tmp_path: Path) -> None:
    assert notify.notify("READY=1", {}) is False
    assert notify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "missing.sock")}) is False


def test_watchdog_interval_is_half_of_watchdog_sec_and_only_for_our_pid() -> None:
    assert notify.watchdog_interval({"WATCHDOG_USEC": "10000000"}) == 5.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}) == 5.0
    assert notify.watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}) is None
    assert notify.watchdog_interval({}) is None


def test_ready_is_sent_once_and_watchdog_pings_are_throttled(sock_path: tuple[socket.socket, str]) -> None:
    s, path = sock_path
    now = [0.0]
    n = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, clock=lambda: now[0])
    n.ready("running")
    n.ready("running again")
    for t in (0.0, 0.5, 0.9, 1.0, 1.5, 2.1):
        now[0] = t
        n.watchdog()
    msgs = drain(s)
    assert sum("READY=1" in m for m in msgs) == 1
    assert msgs.count("WATCHDOG=1") == 3  # at 0.0, 1.0 and 2.1 (interval = WatchdogSec / 2 = 1s)


def test_supervisor_reports_ready_status_and_pings_from_its_loop(
    sock_path: tuple[socket.socket, str], tmp_path: Path
) -> None:
    from tests.test_state_machine import FakeOS, RecordingLog, completes, make_cfg, script_of

    s, path = sock_path
    msgs: list[str] = []
    s.settimeout(0.5)

    def receive() -> None:  # like systemd: always reading
        while True:
            try:
                data = s.recv(4096)
            except (TimeoutError, OSError):
                return
            msgs.append(data.decode())

    reader = threading.Thread(target=receive)
    reader.start()
    cfg = make_cfg(tmp_path)
    fake = FakeOS(Path(cfg.training.output_dir), script_of(completes))
    # A slow fake clock gives the reader time to keep up (the real loop sleeps between pings).
    fake_wait = fake.wait
    fake.wait = lambda t: (time.sleep(0.002), fake_wait(t))  # type: ignore[method-assign]
    notifier = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}, clock=fake.monotonic)
    Supervisor(cfg, fake, log=RecordingLog(), notifier=notifier).run()
    reader.join()
    ready = [m for m in msgs if "READY=1" in m]
    assert len(ready) == 1 and "STATUS=running" in ready[0]
    assert any(m.startswith("STATUS=completed") for m in msgs)
    assert msgs.count("WATCHDOG=1") >= 5  # ~every 0.5 s of the fake 10 s run
