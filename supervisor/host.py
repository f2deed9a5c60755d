"""The supervisor's view of the host: processes, signals, clock, disk, wake-ups.

:class:`RealHost` is the production object; tests/test_state_machine.py drives
the state machine with a fake of the same shape (fake clock, fake children,
the standby's stdin included). The run directory's files are not behind this
seam: the daemon reads and writes them directly (tests use real files in
``tmp_path``).

Waiting is event driven, never a busy poll: one self-pipe wakes the main loop.
Writers are a thread blocked in ``Popen.wait`` per child (exit), watchdog's
inotify observer (heartbeat and checkpoint changes) and ``signal.set_wakeup_fd``
(signals). The loop sleeps in ``select`` on the pipe with a timeout that is its
next deadline (hang check, backoff, escalation, systemd watchdog ping).
"""

from __future__ import annotations

import itertools
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psutil


class Host(Protocol):
    """What the state machine needs from the operating system (every use the daemon makes)."""

    def monotonic(self) -> float: ...
    def time(self) -> float: ...
    def wait(self, timeout: float) -> None:
        """Sleep until something may have happened (child exit, file change, signal) or ``timeout``."""

    def spawn(
        self, argv: list[str], env: dict[str, str], log_path: Path, *, stdin_pipe: bool = False
    ) -> tuple[int, float]:
        """Start a child in its own session, output to ``log_path``; return (pid, create_time).

        ``stdin_pipe``: keep a pipe to its stdin for one :meth:`send_line` (a standby's go)."""

    def send_line(self, pid: int, line: str | None) -> bool:
        """Write one line to the child's stdin and close it (None: only close, i.e. EOF).

        False if the child is gone, has no pipe, or ``line`` is None."""

    def exit_status(self, pid: int) -> int | None:
        """The child's return code once it has exited, else None (never blocks)."""

    def kill(self, pid: int, sig: int, *, group: bool = False) -> bool:
        """Send a signal; False if the process is already gone."""

    def alive(self, pid: int, create_time: float | None) -> bool:
        """Whether ``pid`` is still the process that started at ``create_time`` (any parent)."""

    def is_worker(self, pid: int, create_time: float | None) -> bool:
        """Whether ``pid`` is provably a training worker we may signal: alive, started at
        ``create_time`` (required), and running ``-m worker`` or ``vit-train``."""

    def free_disk(self, path: Path) -> int: ...
    def oom_kills(self) -> int:
        """Kernel plus cgroup OOM-kill counters (only their movement matters)."""

    def dir_identity(self, path: Path) -> tuple[int, int] | None:
        """(device, inode) of a directory, None if missing: tells a deleted-and-recreated one apart."""


class RealHost:
    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._codes: dict[int, int] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ waking

    @property
    def wake_fd(self) -> int:
        """Write end of the self-pipe; ``signal.set_wakeup_fd`` points here."""
        return self._w

    def wake(self) -> None:
        try:
            os.write(self._w, b"\0")
        except (BlockingIOError, OSError):
            pass  # a full pipe already guarantees a wake-up

    def wait(self, timeout: float) -> None:
        try:
            ready, _, _ = select.select([self._r], [], [], max(0.0, timeout))
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
            return
        if ready:
            try:
                while os.read(self._r, 4096):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass

    # ------------------------------------------------------------------ clock

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    # ------------------------------------------------------------------ children

    def spawn(
        self, argv: list[str], env: dict[str, str], log_path: Path, *, stdin_pipe: bool = False
    ) -> tuple[int, float]:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            # Own session: a terminal's Ctrl+C reaches only the supervisor, which decides what the
            # worker gets. Spawned from the main thread on purpose: PR_SET_PDEATHSIG in the worker
            # fires when the *thread* that forked it exits, not only the process.
            proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        try:
            created = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            created = time.time()
        with self._lock:
            self._children[proc.pid] = proc
        threading.Thread(target=self._reap, args=(proc,), name=f"wait-{proc.pid}", daemon=True).start()
        return proc.pid, created

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        with self._lock:
            self._codes[proc.pid] = code
        self.wake()

    def exit_status(self, pid: int) -> int | None:
        with self._lock:
            return self._codes.get(pid)

    def send_line(self, pid: int, line: str | None) -> bool:
        """Write one line to a child's stdin pipe and close it (None: just close, i.e. EOF).

        False if the child is gone or has no pipe.
        """
        with self._lock:
            proc = self._children.get(pid)
        if proc is None or proc.stdin is None or proc.stdin.closed:
            return False
        try:
            if line is not None:
                proc.stdin.write(line.encode() + b"\n")
                proc.stdin.flush()
            return line is not None
        except (BrokenPipeError, OSError, ValueError):
            return False
        finally:
            try:
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass

    def kill(self, pid: int, sig: int, *, group: bool = False) -> bool:
        """``group``: the child's process group and every descendant (torchrun starts each rank in
        a session of its own, out of reach of the group)."""
        descendants: list[psutil.Process] = []
        if group:
            try:
                descendants = psutil.Process(pid).children(recursive=True)
            except psutil.Error:
                pass
        try:
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            return False  # already gone: exactly what we wanted
        finally:
            for p in descendants:
                try:
                    p.send_signal(sig)
                except psutil.Error:
                    pass
        return True

    def alive(self, pid: int, create_time: float | None) -> bool:
        return process_alive(pid, create_time)

    def is_worker(self, pid: int, create_time: float | None) -> bool:
        return is_worker_process(pid, create_time)

    # ------------------------------------------------------------------ resources

    def free_disk(self, path: Path) -> int:
        path.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(path).free

    def oom_kills(self) -> int:
        return oom_kill_count()

    def dir_identity(self, path: Path) -> tuple[int, int] | None:
        return dir_identity(path)


_CREATE_TIME_SLACK_S = 1.0  # psutil's create time is derived from boot time and clock ticks


def process_alive(pid: object, create_time: object) -> bool:
    """Whether ``pid`` is a live process that started at ``create_time`` (None: any start time).

    The one identity check for state-file pids (the daemon's orphan, ``status``'s supervisor):
    a pid alone may have been reused by an unrelated process since it was written."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if (
            isinstance(create_time, (int, float))
            and not isinstance(create_time, bool)
            and not abs(proc.create_time() - create_time) <= _CREATE_TIME_SLACK_S  # NaN: not equal either
        ):
            return False
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except (psutil.Error, OverflowError, ValueError):
        return False


def is_worker_process(pid: object, create_time: object) -> bool:
    """Whether ``pid`` is provably one of our training workers (never signal one that is not).

    Needs the create time (a bare pid proves nothing) and a command line that runs the
    worker: ``-m worker`` (also under torchrun) or the ``vit-train`` entry point."""
    if not isinstance(create_time, (int, float)) or not process_alive(pid, create_time):
        return False
    assert isinstance(pid, int)  # process_alive checked it
    try:
        proc = psutil.Process(pid)
        cmdline = proc.cmdline()
        name = proc.name()
    except psutil.Error:
        return False
    runs_module = any(a == "-m" and b == "worker" for a, b in itertools.pairwise(cmdline))
    entry_point = any(Path(a).name == "vit-train" for a in cmdline[:2])
    return runs_module or entry_point or name == "vit-train"


def is_supervisor_process(pid: object, create_time: object) -> bool:
    """Whether ``pid`` is provably a live ``vit-supervisor`` (what ``stop`` may signal)."""
    if not isinstance(create_time, (int, float)) or not process_alive(pid, create_time):
        return False
    assert isinstance(pid, int)  # process_alive checked it
    try:
        cmdline = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    module = any(a == "-m" and b.startswith("supervisor") for a, b in itertools.pairwise(cmdline))
    return module or any(Path(a).name == "vit-supervisor" for a in cmdline[:2])


def dir_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a directory; None if it is missing. A new directory at the same path differs."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def oom_kill_count() -> int:
    """Sum of the system-wide and this cgroup's OOM-kill counters (cgroup v2 or v1)."""
    total = 0
    total += _counter(Path("/proc/vmstat"), "oom_kill")
    for path in _cgroup_memory_files():
        total += _counter(path, "oom_kill")
    return total


def _cgroup_memory_files() -> list[Path]:
    out: list[Path] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # cgroup v2 unified hierarchy
            out.append(Path("/sys/fs/cgroup") / rel.lstrip("/") / "memory.events")
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory")
            for candidate in (base / rel.lstrip("/"), base):  # inside a container the path may be the root
                if (candidate / "memory.oom_control").exists():
                    out.append(candidate / "memory.oom_control")
                    break
    return out


def _counter(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value.strip() or 0)
    except (OSError, ValueError):
        pass
    return 0


_WRITE_EVENTS = frozenset({"created", "moved", "deleted", "closed"})


def _is_temporary(path: object) -> bool:
    """A file that an atomic write renames into place (``protocol.atomic_write_bytes``'s
    ``.NAME.XXXX.tmp``): its creation and close are not news, its rename is."""
    name = os.path.basename(os.fsdecode(path)) if isinstance(path, (str, bytes)) else ""
    return name.startswith(".") and name.endswith(".tmp")


def wakes(event: object) -> bool:
    """Whether a watchdog event is news for the loop: a rename into place, a deletion (or a
    finished write, a creation), of anything but a temporary file."""
    kind = getattr(event, "event_type", None)
    if kind not in _WRITE_EVENTS:
        return False
    if kind == "moved":
        return not _is_temporary(getattr(event, "dest_path", ""))
    return not _is_temporary(getattr(event, "src_path", ""))


class RunDirWatch:
    """Wakes the main loop when the heartbeat, an exit report or a checkpoint folder changes.

    Best effort: without inotify (or if its limits are reached) the loop still
    re-reads the heartbeat on its own timeout, only with more latency.

    Everything the loop reads from the run folder is written atomically (a temporary file
    renamed into place; a checkpoint folder renamed from its staging name), so the kernel
    is asked for renames and deletions only: no creations, opens, reads or writes (the
    loop's own reads of the heartbeat among them; waking on those would spin it), and a
    heartbeat rewritten at every step costs one wake-up, not seven. A file written in place
    is seen on the loop's timeout (at most ``_timeout``'s cap, 0.5 s while a worker runs).
    """

    def __init__(self, output_dir: Path, wake: Callable[[], None]) -> None:
        self.output_dir = output_dir
        self.wake = wake
        self.observer: Any = None

    def start(self) -> bool:
        try:
            from watchdog import events as ev
            from watchdog.observers import Observer
        except ImportError:  # pragma: no cover - a declared dependency
            return False
        wake = self.wake

        class _Handler(ev.FileSystemEventHandler):
            def on_any_event(self, event: object) -> None:
                if wakes(event):
                    wake()

        # Asks inotify for IN_MOVE and IN_DELETE only (and IN_DELETE_SELF, always).
        kinds: list[type[ev.FileSystemEvent]] = [
            ev.FileMovedEvent,
            ev.DirMovedEvent,
            ev.FileDeletedEvent,
            ev.DirDeletedEvent,
        ]
        try:
            observer = Observer()
            handler = _Handler()
            # checkpoint-N/ appearing; heartbeat, reports
            for folder in (self.output_dir, self.output_dir / "run"):
                observer.schedule(handler, str(folder), recursive=False, event_filter=kinds)
            observer.daemon = True
            observer.start()
        except (OSError, RuntimeError):
            return False
        self.observer = observer
        return True

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=2)
            self.observer = None


def self_create_time() -> float:
    return psutil.Process().create_time()


def install_signal_wakeup(fd: int) -> None:
    signal.set_wakeup_fd(fd, warn_on_full_buffer=False)


T = TypeVar("T")


def poll_until(
    predicate: Callable[[], T | None],
    timeout: float,
    *,
    interval: float = 0.05,
    progress: Callable[[], object] | None = None,
) -> T | None:
    """Call ``predicate`` until it returns something truthy (returned) or the deadline passes (None).

    With ``progress``, the deadline is a *stall* limit: it restarts whenever
    ``progress()`` returns a value it has not returned before (a step count, a
    state), so a slow but working machine is waited for and a stuck one is not.
    For waits in the CLI, tests and benchmarks; the daemon's own loop never polls.
    """
    deadline = time.monotonic() + timeout
    seen = progress() if progress is not None else None
    while True:
        value = predicate()
        if value:
            return value
        now = time.monotonic()
        if progress is not None:
            current = progress()
            if current != seen:
                seen, deadline = current, now + timeout
        if now >= deadline:
            return None
        time.sleep(interval)
