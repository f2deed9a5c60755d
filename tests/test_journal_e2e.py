"""A real journald: a supervised run with one SIGKILL logs to it, and journalctl finds the restart.

No systemd runs as init here, so the test starts Debian's ``systemd-journald`` itself as a journal
*namespace* (``systemd-journald NAME``: sockets in ``/run/systemd/journal.NAME/``, files in
``/var/log/journal/MACHINE-ID.NAME/``, read with ``journalctl --namespace NAME``), which leaves
the machine's own journal alone. The supervisor's stderr is connected to that journald's stdout
stream and ``$JOURNAL_STREAM`` is set, exactly as systemd does for a unit, so the supervisor's own
detection decides to use the journal; ``VIT_SUPERVISOR_JOURNAL_SOCKET`` points it at the
namespace's socket (under systemd, ``LogNamespace=`` bind-mounts that to the default path).

The ``systemd`` package is installed when missing (root and apt-get needed; a file lock keeps
two xdist workers from running apt at once); without root or apt the test is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from filelock import FileLock

from supervisor import journal
from supervisor.host import poll_until
from tests.conftest import REPO, TINY, Run, deep_update, finish, note_real_process, wait_for
from tests.test_journal_unit import RELEASED

pytestmark = pytest.mark.e2e

JOURNALD_PATHS = ("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald")
APT_LOCK = "/tmp/vit-supervisor-apt.lock"


def _journald_binary() -> str | None:
    found = [p for p in JOURNALD_PATHS if os.access(p, os.X_OK)]
    return found[0] if found and shutil.which("journalctl") else None


def _install_systemd() -> str:
    """The journald binary, installed with apt-get when missing; pytest.skip where it cannot be."""
    if os.geteuid() != 0:
        pytest.skip("a standalone journald needs root (its sockets live in /run/systemd)")
    with FileLock(APT_LOCK):
        binary = _journald_binary()
        if binary is None:
            if shutil.which("apt-get") is None:
                pytest.skip("systemd-journald is not installed and there is no apt-get to install it")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            wait = ["-o", "DPkg::Lock::Timeout=600"]  # another test's install (its own lock) may hold dpkg's
            install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *wait, "systemd"]
            for cmd in (["apt-get", "update", "-q", *wait], install):
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
                if r.returncode != 0:
                    pytest.skip(f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()[-500:]}")
            binary = _journald_binary()
            if binary is None:
                pytest.skip("the systemd package installed no systemd-journald or journalctl")
        machine_id = Path("/etc/machine-id")
        if not (machine_id.exists() and machine_id.read_text().strip()):
            # A container without one: journald names its folder after it. This is what a systemd boot does.
            subprocess.run(["systemd-machine-id-setup"], capture_output=True, check=False, timeout=60)
    return binary


@dataclass
class Journald:
    namespace: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def run_dir(self) -> Path:
        return Path(f"/run/systemd/journal.{self.namespace}")

    @property
    def socket(self) -> str:
        return str(self.run_dir / "socket")

    def stream(self, identifier: str) -> socket.socket:
        """A stdout stream like the one systemd gives a unit (the header of journald's stream protocol)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.run_dir / "stdout"))
        s.sendall(f"{identifier}\n\n6\n0\n0\n0\n0\n".encode())
        s.shutdown(socket.SHUT_RD)
        return s

    def query(self, *matches: str) -> list[dict[str, Any]]:
        r = subprocess.run(
            ["journalctl", f"--namespace={self.namespace}", "--no-pager", "-o", "json", *matches],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode in (0, 1), r.stderr  # 1: no entries yet on some versions
        return [_decoded(json.loads(line)) for line in r.stdout.splitlines() if line.startswith("{")]

    def text(self) -> str:
        """Every entry's MESSAGE: what a failed wait shows."""
        return "\n".join(f"{e.get('_TRANSPORT')}: {e.get('MESSAGE')}" for e in self.query())


def _decoded(entry: dict[str, Any]) -> dict[str, Any]:
    """journalctl -o json writes a value that is not printable text as a list of byte values."""
    return {k: bytes(v).decode(errors="replace") if isinstance(v, list) else v for k, v in entry.items()}


@pytest.fixture(scope="module")
def journald(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Journald]:
    binary = _install_systemd()
    d = tmp_path_factory.mktemp("journald")
    ns = f"vittest{secrets.token_hex(4)}"
    log = d / "journald.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([binary, ns], stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    jd = Journald(ns, proc, log)
    keep: socket.socket | None = None
    try:
        up = poll_until(
            lambda: proc.poll() is not None or (Path(jd.socket).exists() and (jd.run_dir / "stdout").exists()),
            30,
        )
        if proc.poll() is not None or not up:
            pytest.skip(f"systemd-journald {ns} did not start: {log.read_text(errors='replace')[-500:]}")
        # A namespace's journald exits after 30 s without a client; this stream keeps it for the module.
        keep = jd.stream("vit-journal-test")
        yield jd
    finally:
        if keep is not None:
            keep.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # The test's own namespace: its sockets and journal files (nobody else writes there).
        shutil.rmtree(jd.run_dir, ignore_errors=True)
        for base in ("/var/log/journal", "/run/log/journal"):
            for folder in Path(base).glob(f"*.{ns}"):
                shutil.rmtree(folder, ignore_errors=True)


class JournalRun(Run):
    """A run whose supervisor logs to ``jd``: a failed wait shows the journal instead of a log file."""

    def __init__(self, tmp_path: Path, config: Path, jd: Journald) -> None:
        super().__init__(tmp_path, config)
        self.jd = jd

    def start(self, *extra: str) -> subprocess.Popen[str]:
        note_real_process("supervisor")
        stream = self.jd.stream("vit-supervisor")
        st = os.fstat(stream.fileno())
        env = dict(
            self.env,
            JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}",
            **{journal.ENV_SOCKET: self.jd.socket},
        )
        env.pop(journal.ENV_JOURNAL, None)
        with stream:  # the child keeps its own copy, as a unit's process does
            proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor.cli", "start", str(self.config), *extra],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stream.fileno(),
                stderr=stream.fileno(),
                text=True,
                cwd=REPO,
            )
        self.procs.append(proc)
        return proc

    def log(self) -> str:
        return self.jd.text()[-6000:]


def test_supervised_run_with_a_sigkill_leaves_one_restart_entry_journalctl_finds(
    tmp_path: Path, journald: Journald
) -> None:
    cfg = tmp_path / "config.yaml"
    over = {"supervisor": {"standby": False}, "snapshot": {"root": str(tmp_path / "shm")}}
    cfg.write_text(yaml.safe_dump(deep_update(TINY, over), sort_keys=False))
    run = JournalRun(tmp_path, cfg, journald)
    try:
        sup = run.start()
        run.worker_at_step(8)
        victim = run.state()["worker_pid"]
        os.kill(victim, signal.SIGKILL)
        assert finish(sup, run) == 0, run.log()
    finally:
        run.cleanup()
    st = run.state()
    assert st["state"] == "completed" and st["restart_count"] == 1
    mine = (f"VIT_RUN={run.out.resolve()}", f"_PID={sup.pid}")
    # journald takes datagrams in order but in its own time: once the last one is in, all are.
    last = f"MESSAGE_ID={RELEASED['supervisor-exited']}"
    wait_for(lambda: journald.query(last, *mine), 30, "the supervisor's last entry in the journal")

    # journalctl MESSAGE_ID=<restart>: one entry per restart, with the attempt, reason and step.
    restarts = journald.query(f"MESSAGE_ID={RELEASED['restart']}", *mine)
    assert len(restarts) == 1, journald.text()
    r = restarts[0]
    first = st["attempts"][0]
    assert (r["VIT_ATTEMPT"], r["VIT_REASON"], r["VIT_EXIT"]) == ("1", "crash", "killed by SIGKILL"), r
    assert r["VIT_STEP"] == str(first["step_reached"]) and int(r["VIT_STEP"]) >= 8
    assert r["MESSAGE"].startswith(f"attempt 1 ended at step {r['VIT_STEP']}: ") and r["MESSAGE"].endswith("restarting")
    assert r["PRIORITY"] == "4" and r["SYSLOG_IDENTIFIER"] == "vit-supervisor" and r["_TRANSPORT"] == "journal"
    assert r["VIT_CONFIG"] == str(cfg.resolve()) and r["VIT_PID"] == str(victim)

    # Every state change is an entry, of its own kind where it has one.
    def kinds(kind: str) -> list[dict[str, Any]]:
        return journald.query(f"MESSAGE_ID={RELEASED[kind]}", *mine)

    assert [e["VIT_STATE"] for e in kinds("supervisor-started")] == ["starting"]
    changed = [(e["VIT_PREVIOUS_STATE"], e["VIT_STATE"]) for e in kinds("state-changed")]
    assert changed.count(("starting", "running")) == 2 and ("running", "starting") in changed, changed
    (done,) = kinds("completed")
    assert done["VIT_PREVIOUS_STATE"] == "running" and done["MESSAGE"].startswith("running -> completed")
    assert [e["VIT_ATTEMPT"] for e in kinds("worker-launched")] == ["1", "2"]
    assert [e["VIT_DECISION"] for e in kinds("worker-exited")] == ["complete"]
    (end,) = kinds("supervisor-exited")
    assert end["VIT_CODE"] == "0" and end["VIT_STATE"] == "completed"

    # Entries instead of JSON lines, not beside them: nothing of the supervisor's came as plain text.
    as_text = journald.query("_TRANSPORT=stdout", f"_PID={sup.pid}")
    assert not [e for e in as_text if '"event"' in str(e.get("MESSAGE"))], as_text[:3]


def test_multiline_and_oversized_fields_reach_journald_whole(journald: Journald) -> None:
    sink = journal.Sink(journal.sender(journald.socket), structlog.processors.JSONRenderer())
    tag = secrets.token_hex(4)
    trace = "Traceback (most recent call last):\n  File x, line 1\nRuntimeError: a\nb=c"
    big = "y" * 400_000  # over one datagram: a sealed memfd
    for ev in (
        {"event": "crash", "level": "error", "tag": tag, "exception": trace},
        {"event": "big", "tag": tag, "blob": big},
    ):
        with pytest.raises(structlog.DropEvent):
            sink(None, "error", dict(ev))
    got = wait_for(
        lambda: (lambda e: e if len(e) == 2 else None)(journald.query(f"VIT_TAG={tag}", "--all")),
        30,
        "two entries in the journal",
    )
    assert got[0]["VIT_EXCEPTION"] == trace and "\n" not in got[0]["MESSAGE"] and got[0]["PRIORITY"] == "3"
    assert got[1]["VIT_BLOB"] == big
