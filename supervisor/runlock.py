"""One driver and one trainer per run directory, guaranteed by the kernel.

Two locks, each taken in two independent ways, all released by the kernel when
the holder dies, however it dies:

``run`` lock
    Who drives the run: the supervisor, or a ``vit-train`` started by hand
    (which then is its own driver). A second ``vit-supervisor start`` or a
    hand-started ``vit-train`` beside a supervised run is refused.
``worker`` lock
    Who writes checkpoints: the training process (the first rank of each node
    under torchrun). A worker launched by a supervisor takes only this one;
    its supervisor holds the run lock.

Each lock is an ``flock`` on a file in the run's state folder (``run/`` or
``run/node-K/``; it also records the holder's pid for messages) *and* an
abstract Unix socket whose name is derived from the run directory's real path.
The socket exists nowhere on disk, so deleting or replacing the output
directory under a running supervisor cannot free it: the flock alone could be
defeated that way (a new directory holds a new, unlocked file). The flock
alone still guards a run directory shared between network namespaces, where
abstract sockets are not shared.

The lock file records the holder's pid *and host name*: a run directory on shared storage (a
SLURM cluster) may be locked from another machine, where that pid means nothing here.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["run", "worker"]

_FILE = {"run": "supervisor.lock", "worker": "worker.lock"}


class LockHeld(Exception):
    """Another live process holds the lock; the message names it and what to do."""

    def __init__(self, kind: Kind, output_dir: Path, pid: int | None, host: str | None = None) -> None:
        self.kind = kind
        self.output_dir = output_dir
        self.pid = pid
        self.host = host
        who = f"pid {pid}" if pid else "another process"
        if host and host != socket.gethostname():
            who += f" on host {host}"
        if kind == "run":
            msg = (
                f"another supervisor or vit-train ({who}) is already running {output_dir}; "
                f"see `vit-supervisor status --run-dir {output_dir}`, or stop it first"
            )
        else:
            msg = f"another worker ({who}) is already training in {output_dir}; never two writers on one run"
        super().__init__(msg)


@dataclass
class RunLock:
    """A held lock; :meth:`release` (or the holder's death) frees it."""

    kind: Kind
    path: Path
    fd: int
    sock: socket.socket

    def release(self) -> None:
        try:
            self.sock.close()
        finally:
            try:
                os.close(self.fd)
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_dir(output_dir: str | os.PathLike[str], node_rank: int = 0) -> Path:
    base = Path(output_dir) / "run"
    return base if node_rank == 0 else base / f"node-{node_rank}"


def socket_name(output_dir: str | os.PathLike[str], kind: Kind, node_rank: int = 0) -> bytes:
    """The abstract socket's name: fixed by the directory's real path, not by anything on disk."""
    real = os.path.realpath(os.fspath(output_dir))
    digest = hashlib.sha256(f"{real}\0{kind}\0{node_rank}".encode()).hexdigest()[:40]
    return b"\0vit-supervisor/" + digest.encode()


def acquire(output_dir: str | os.PathLike[str], kind: Kind, node_rank: int = 0) -> RunLock:
    """Take the lock without waiting; raise :class:`LockHeld` if a live process has it.

    Creates the state folder if needed. Inherited by no child (close-on-exec).
    """
    out = Path(output_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(socket_name(out, kind, node_rank))
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        raise LockHeld(kind, out, *_holder_in_file(lock_dir(out, node_rank) / _FILE[kind])) from None
    try:
        fd = _flock(lock_dir(out, node_rank) / _FILE[kind], kind, out)
    except BaseException:
        sock.close()
        raise
    return RunLock(kind=kind, path=lock_dir(out, node_rank) / _FILE[kind], fd=fd, sock=sock)


def held(output_dir: str | os.PathLike[str], kind: Kind, node_rank: int = 0) -> bool:
    """Whether a live process holds the lock (a probe: takes and drops it if free)."""
    try:
        acquire(output_dir, kind, node_rank).release()
    except LockHeld:
        return True
    except OSError:
        return False
    return False


def _flock(path: Path, kind: Kind, out: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise LockHeld(kind, out, *_holder_in_file(path)) from None
        # Locked an inode that was unlinked or replaced meanwhile: lock the file now at the path.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            except OSError:
                pass  # a full disk: the lock holds all the same, only the pid is not recorded
            return fd
        os.close(fd)
    raise OSError(errno.EAGAIN, f"{path} keeps being replaced while it is locked")


def _holder_in_file(path: Path) -> tuple[int | None, str | None]:
    """The holder's pid and host name as the lock file records them (either None when unreadable;
    files of older versions hold the pid alone)."""
    try:
        with open(path, "rb") as f:
            words = f.read(300).decode("ascii", "replace").split()
    except OSError:
        return None, None
    pid = int(words[0]) if words and words[0].isdigit() else None
    host = words[1] if len(words) > 1 and words[1].isprintable() else None
    return pid, host
