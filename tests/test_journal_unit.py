"""Journal entries (supervisor/journal.py): kinds and their MESSAGE_IDs, fields, when the journal is
used, and what happens when it cannot take an entry. The sends go to real AF_UNIX datagram sockets
decoded here by journald's documented native protocol; tests/test_journal_e2e.py runs a real
journald."""

from __future__ import annotations

import array
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from supervisor import cli, journal, logs
from supervisor.journal import KINDS
from supervisor.schema import ConfigError
from supervisor.states import State

REPO = Path(__file__).resolve().parents[1]

# The released ids: saved `journalctl MESSAGE_ID=...` queries and alert rules depend on them.
RELEASED = {
    "supervisor-started": "3f94f2a4ceb0470bbbed6fcf3b6eee37",
    "state-changed": "db8fa0487ae141049af321c31ecfae36",
    "worker-launched": "158c62ae07bf4aed8db24169361d915a",
    "standby-took-over": "c8c029a2df5f47d8974aecc1bd9678b4",
    "standby": "ecaa4bb445bb485ea4a36add5c35f5ad",
    "restart": "dbd7764e3b804700b761b49f7767b198",
    "worker-exited": "0e769d5a11ec43a28e1214725cc47567",
    "hang": "930ed005c2d6404caa717ad72326fbbb",
    "batch-changed": "2b0c4830079e47c9b28e4e02a97b9cfb",
    "waiting-for-disk": "ba7a4019e9b04e1b90fe676ee6362eb5",
    "failed": "0750f5a5f8f84186b23db419618c2908",
    "completed": "e66f70d8e0af4934acf2e977f185b01e",
    "stopped": "27bc673a134144d0bfc65242c044434d",
    "signal": "c792421bedc34f67b6454fd3394091c8",
    "sigkill": "d5cf44acb5424b18b74ae9a4e00ae474",
    "supervisor-exited": "6dbd433f0da34ba9b3fc4d3d8f79cc0e",
    "orphan": "582c0399be454a349eff86384b73ca74",
    "snapshots": "95b154e9cb974bd2afec3de13cce193a",
    "other": "7416e86d285942a4a64375152c2925a1",
}

RESTART_EXIT = {
    "event": "exit",
    "level": "info",
    "timestamp": "2026-11-29T11:00:00",
    "pid": 4242,
    "attempt": 2,
    "exit": "killed by SIGKILL",
    "reason": "crash",
    "message": "worker killed by SIGKILL",
    "step_reached": 17,
    "progressed": True,
    "decision": "restart",
}


# ----------------------------------------------------------------------------- kinds and ids


def test_every_kind_has_its_released_unique_128_bit_message_id() -> None:
    ids = [k.message_id for k in KINDS]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids) and len({k.name for k in KINDS}) == len(KINDS)
    assert {k.name: k.message_id for k in KINDS} == RELEASED


def test_readme_table_and_the_unit_give_the_released_message_ids() -> None:
    text = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z-]+)` \| `([0-9a-f]{32})` \|", text, re.M))
    assert rows == RELEASED
    unit = (REPO / "systemd" / "vit-supervisor@.service").read_text()
    assert f"MESSAGE_ID={RELEASED['restart']}" in unit and f"R={RELEASED['restart']}" in text


@pytest.mark.parametrize(
    ("ev", "kind"),
    [
        ({"event": "state", "old": None, "new": "starting"}, "supervisor-started"),
        ({"event": "state", "old": None, "new": "failed"}, "failed"),
        ({"event": "state", "old": "starting", "new": "running"}, "state-changed"),
        ({"event": "state", "old": "running", "new": "backoff"}, "state-changed"),
        ({"event": "state", "old": "starting", "new": "waiting"}, "waiting-for-disk"),
        ({"event": "state", "old": "running", "new": "failed"}, "failed"),
        ({"event": "state", "old": "stopping", "new": "completed"}, "completed"),
        ({"event": "state", "old": "stopping", "new": "stopped"}, "stopped"),
        ({"event": "state", "old": "running", "new": State.FAILED}, "failed"),
        (RESTART_EXIT, "restart"),
        ({**RESTART_EXIT, "decision": "fail"}, "worker-exited"),
        ({**RESTART_EXIT, "decision": "complete"}, "worker-exited"),
        ({"event": "exit", "state": "completed", "code": 0}, "supervisor-exited"),
        ({"event": "launch", "pid": 1, "attempt": 1}, "worker-launched"),
        ({"event": "standby", "pid": 1, "attempt": 2, "action": "took over"}, "standby-took-over"),
        ({"event": "standby", "pid": 1, "action": "ready"}, "standby"),
        ({"event": "hang", "pid": 1, "why": "no new step"}, "hang"),
        ({"event": "batch", "per_device": 8, "accumulation": 2}, "batch-changed"),
        ({"event": "signal", "signal": "SIGTERM"}, "signal"),
        ({"event": "escalate", "signal": "SIGKILL"}, "sigkill"),
        ({"event": "orphan", "pid": 1}, "orphan"),
        ({"event": "snapshots", "action": "removed"}, "snapshots"),
        ({"event": "output_dir", "why": "deleted"}, "other"),
        ({"event": "something new"}, "other"),
    ],
)
def test_each_event_maps_to_its_kind(ev: dict[str, Any], kind: str) -> None:
    assert journal.kind_of(ev).name == kind
    assert dict(journal.entry(ev))["MESSAGE_ID"] == RELEASED[kind]


# ----------------------------------------------------------------------------- the entry


def test_restart_entry_carries_attempt_reason_step_and_a_readable_message() -> None:
    e = dict(journal.entry(RESTART_EXIT, {"run": "/srv/vit/demo", "config": "/etc/vit-supervisor/demo.yaml"}))
    assert e["MESSAGE_ID"] == RELEASED["restart"] and e["VIT_KIND"] == "restart" and e["VIT_EVENT"] == "exit"
    assert (e["VIT_ATTEMPT"], e["VIT_REASON"], e["VIT_STEP"], e["VIT_EXIT"]) == (
        "2",
        "crash",
        "17",
        "killed by SIGKILL",
    )
    assert e["VIT_RUN"] == "/srv/vit/demo" and e["VIT_CONFIG"] == "/etc/vit-supervisor/demo.yaml"
    assert e["SYSLOG_IDENTIFIER"] == "vit-supervisor" and e["VIT_PROGRESSED"] == "true"
    assert e["MESSAGE"] == "attempt 2 ended at step 17: worker killed by SIGKILL; restarting"
    assert e["PRIORITY"] == "4"  # logged at info, but a restart is worth a warning
    assert "VIT_STEP_REACHED" not in e and "VIT_LEVEL" not in e and "VIT_TIMESTAMP" not in e


def test_state_entry_names_the_state_and_the_change() -> None:
    ev = {"event": "state", "level": "info", "old": "running", "new": State.FAILED, "why": "gave up", "attempt": 3}
    e = dict(journal.entry(ev))
    assert (e["VIT_STATE"], e["VIT_PREVIOUS_STATE"], e["VIT_ATTEMPT"]) == ("failed", "running", "3")
    assert e["MESSAGE"] == "running -> failed: gave up" and e["PRIORITY"] == "3"
    started = dict(journal.entry({"event": "state", "old": None, "new": "starting", "why": "supervisor started"}))
    assert started["MESSAGE"] == "starting: supervisor started" and "VIT_PREVIOUS_STATE" not in started


@pytest.mark.parametrize(
    ("level", "priority"), [("debug", "7"), ("info", "6"), ("warning", "4"), ("error", "3"), ("critical", "2")]
)
def test_priority_follows_the_level(level: str, priority: str) -> None:
    assert dict(journal.entry({"event": "signal", "level": level}))["PRIORITY"] == priority


def test_field_names_are_prefixed_upper_case_and_valid_for_journald() -> None:
    ev = {"event": "x", "worker-pid": 3, "a.b c": 1, "k" * 100: 2, "MESSAGE": "mine", "kind": "not the kind"}
    e = dict(journal.entry(ev))
    assert e["VIT_WORKER_PID"] == "3" and e["VIT_A_B_C"] == "1" and e["VIT_" + "K" * 60] == "2"
    assert e["VIT_MESSAGE"] == "mine" and e["MESSAGE"] != "mine"  # an event field never replaces a standard one
    assert e["VIT_KIND"] == "other"
    for name in e:
        assert re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", name), name
        assert name.startswith("VIT_") or name in ("MESSAGE", "PRIORITY", "MESSAGE_ID", "SYSLOG_IDENTIFIER")


def test_values_are_text_none_is_left_out_and_newlines_are_kept() -> None:
    ev = {
        "event": "snapshots",
        "removed": None,
        "ok": False,
        "state": State.RUNNING,
        "steps": [5, 10],
        "freed": {"bytes": 3},
        "ratio": 0.5,
        "exception": "Traceback (most recent call last):\n  File x\nValueError: boom",
    }
    e = dict(journal.entry(ev))
    assert "VIT_REMOVED" not in e and e["VIT_OK"] == "false" and e["VIT_STATE"] == "running"
    assert e["VIT_STEPS"] == "[5,10]" and json.loads(e["VIT_FREED"]) == {"bytes": 3} and e["VIT_RATIO"] == "0.5"
    assert e["VIT_EXCEPTION"].count("\n") == 2
    assert "\n" not in e["MESSAGE"] and "Traceback" not in e["MESSAGE"]


def test_message_is_one_short_line_with_the_fields_whole_beside_it() -> None:
    ev = {"event": "snapshots", "action": "off: disk checkpoints only", "why": "w" * 1000, "where": "/dev/shm"}
    e = dict(journal.entry(ev))
    assert e["MESSAGE"].startswith("snapshots: off: disk checkpoints only: www") and "(where=/dev/shm)" in e["MESSAGE"]
    assert len(e["MESSAGE"]) < 400 and e["VIT_WHY"] == "w" * 1000


# ----------------------------------------------------------------------------- when the journal is used


def test_a_bad_setting_is_one_line_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"VIT_SUPERVISOR_JOURNAL='yes please' is not one of auto, on, off"):
        journal.setting({"VIT_SUPERVISOR_JOURNAL": "yes please"})
    with pytest.raises(ConfigError, match=r"VIT_SUPERVISOR_JOURNAL_SOCKET='journal.sock' is not an absolute path"):
        journal.setting({"VIT_SUPERVISOR_JOURNAL_SOCKET": "journal.sock"})
    assert [journal.setting({"VIT_SUPERVISOR_JOURNAL": v}) for v in ("", " ON ", "off", "auto")] == [
        "auto",
        "on",
        "off",
        "auto",
    ]


def test_start_refuses_a_bad_setting_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text((REPO / "configs" / "tiny.yaml").read_text().replace("../out/tiny", "out"))
    monkeypatch.setenv("VIT_SUPERVISOR_JOURNAL", "journald")
    for extra in ([], ["--detach"]):
        assert cli.main(["start", str(cfg), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "VIT_SUPERVISOR_JOURNAL='journald'" in err[0], err
    assert not (tmp_path / "out").exists()


def _stream_env(f: Any) -> dict[str, str]:
    st = os.fstat(f.fileno())
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_journal_stream_must_be_this_stderr(tmp_path: Path) -> None:
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        env = _stream_env(a)
        assert journal.stream_is_journal(env, a)
        assert not journal.stream_is_journal(env, b)  # stderr redirected elsewhere, variable inherited
        assert not journal.stream_is_journal({}, a)
        for bad in ("", "12", "x:y", "1:2:3", ":"):
            assert not journal.stream_is_journal({"JOURNAL_STREAM": bad}, a)
        assert not journal.stream_is_journal(env, io.StringIO())
        assert journal.socket_for(env, a) == "/run/systemd/journal/socket"
        assert journal.socket_for({**env, "VIT_SUPERVISOR_JOURNAL_SOCKET": "/run/j/s"}, a) == "/run/j/s"
        assert journal.socket_for({**env, "VIT_SUPERVISOR_JOURNAL": "off"}, a) is None
        assert journal.socket_for(env, b) is None
        assert journal.socket_for({"VIT_SUPERVISOR_JOURNAL": "on"}, b) == "/run/systemd/journal/socket"


def test_status_and_a_supervisor_off_the_journal_never_load_the_transport() -> None:
    code = (
        "import sys, io; from supervisor import cli, logs, journal; "
        "logs.setup(io.StringIO(), env={}); logs.get().info('x'); print('logging_journald' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


# ----------------------------------------------------------------------------- sending, on real sockets


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket where journald's would be (AF_UNIX paths must stay under 108 bytes)."""
    d = tempfile.mkdtemp(prefix="jrn")
    path = os.path.join(d, "socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    yield s, path
    s.close()
    for p in (path, d):
        try:
            os.remove(p) if p == path else os.rmdir(p)
        except OSError:
            pass


def decode(data: bytes) -> dict[str, str]:
    """journald's native protocol: KEY=VALUE lines, or KEY, newline, 64-bit little-endian size, VALUE, newline."""
    out: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            out[key.decode()] = value.decode()
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            out[line.decode()] = data[nl + 9 : nl + 9 + size].decode()
            assert data[nl + 9 + size : nl + 10 + size] == b"\n"
            i = nl + 10 + size
    return out


def receive(s: socket.socket) -> dict[str, str]:
    """One entry: the datagram itself, or (too large for one) the sealed memfd passed with it."""
    fds = array.array("i")
    data, anc, _, _ = s.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if fds:
        with os.fdopen(fds[0], "rb") as f:
            f.seek(0)
            data = f.read()
    return decode(data)


def test_logs_send_each_event_as_one_entry_and_print_nothing(receiver: tuple[socket.socket, str]) -> None:
    s, path = receiver
    out = io.StringIO()
    try:
        logs.setup(out, journal=path, fields={"run": "/srv/vit/demo"})
        logs.get().info("exit", **{k: v for k, v in RESTART_EXIT.items() if k not in ("event", "level", "timestamp")})
        logs.get().warning("hang", pid=7, attempt=1, step=3, why="no new step for 61s (hang_timeout_s 60)")
        first, second = receive(s), receive(s)
    finally:
        structlog.reset_defaults()
    assert out.getvalue() == ""
    assert first["MESSAGE_ID"] == RELEASED["restart"] and first["VIT_RUN"] == "/srv/vit/demo"
    assert (first["VIT_ATTEMPT"], first["VIT_REASON"], first["VIT_STEP"]) == ("2", "crash", "17")
    assert second["MESSAGE_ID"] == RELEASED["hang"] and second["PRIORITY"] == "4" and second["VIT_STEP"] == "3"


def test_multiline_and_oversized_values_arrive_whole(receiver: tuple[socket.socket, str]) -> None:
    s, path = receiver
    sink = journal.Sink(journal.sender(path), structlog.processors.JSONRenderer())
    trace = "Traceback (most recent call last):\n  File x, line 1\nRuntimeError: a\nb=c\n"
    big = "x" * 600_000  # over the datagram limit: sent as a sealed memfd
    for ev in ({"event": "crash", "exception": trace}, {"event": "big", "blob": big}):
        with pytest.raises(structlog.DropEvent):
            sink(None, "info", dict(ev))
    assert receive(s)["VIT_EXCEPTION"] == trace
    assert receive(s)["VIT_BLOB"] == big


def test_a_journal_that_is_gone_gets_json_lines_and_a_note_once(tmp_path: Path) -> None:
    path = str(tmp_path / "no-journal-here")
    out = io.StringIO()
    try:
        logs.setup(out, journal=path)
        logs.get().info("launch", pid=1, attempt=1, batch=16, accum=1, log="a.log")
        logs.get().info("launch", pid=2, attempt=2, batch=16, accum=1, log="b.log")
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["journal", "launch", "launch"]
    assert "FileNotFoundError" in lines[0]["error"] and [line["pid"] for line in lines[1:]] == [1, 2]


def test_a_journal_back_after_an_outage_gets_the_entries_again() -> None:
    d = tempfile.mkdtemp(prefix="jrn")
    path = os.path.join(d, "socket")
    sink = journal.Sink(journal.sender(path), lambda _l, _m, ev: json.dumps(ev))
    try:
        outage = sink(None, "info", {"event": "signal", "n": 1})
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(path)
            s.settimeout(5)
            with pytest.raises(structlog.DropEvent):
                sink(None, "info", {"event": "signal", "n": 2})
            assert receive(s)["VIT_N"] == "2" and not sink.failing
        os.remove(path)
        again = sink(None, "info", {"event": "signal", "n": 3})
    finally:
        if os.path.exists(path):
            os.remove(path)
        os.rmdir(d)
    for text, n in ((outage, 1), (again, 3)):  # a note at the start of each outage, then the line
        note, line = (json.loads(x) for x in text.splitlines())
        assert note["event"] == "journal" and json.loads(json.dumps(line))["n"] == n


def test_a_journal_that_does_not_read_never_blocks_the_supervisor(receiver: tuple[socket.socket, str]) -> None:
    _, path = receiver  # bound, never read: its queue fills up
    sink = journal.Sink(journal.sender(path), structlog.processors.JSONRenderer())
    ev = {"event": "state", "old": "running", "new": "backoff", "why": "w" * 2000}
    lines, slowest = [], 0.0
    for _ in range(3000):
        t0 = time.monotonic()
        try:
            lines.append(sink(None, "info", dict(ev)))
        except structlog.DropEvent:
            pass
        slowest = max(slowest, time.monotonic() - t0)
        if len(lines) >= 3:
            break
    assert len(lines) >= 3, "the queue never filled up"
    assert "BlockingIOError" in lines[0] and json.loads(lines[1])["event"] == "state"
    assert slowest < 2.0  # a blocking send would hang here for good


# ----------------------------------------------------------------------------- the supervisor's own events


def _entries(log: Any) -> list[dict[str, str]]:
    return [dict(journal.entry({"event": event, **kw})) for event, kw in log.events]


def test_an_oom_restart_and_its_lowered_batch_are_entries_of_their_own(tmp_path: Path) -> None:
    from tests.test_state_machine import completes, oom, run, script_of

    _, _, log, _ = run(tmp_path, script_of(oom, completes))
    entries = _entries(log)
    kinds = [e["VIT_KIND"] for e in entries]
    assert kinds.count("restart") == 1 and kinds.count("batch-changed") == 1
    restart = entries[kinds.index("restart")]
    batch = entries[kinds.index("batch-changed")]
    assert (restart["VIT_ATTEMPT"], restart["VIT_REASON"], restart["VIT_STEP"]) == ("1", "oom", "0")
    assert (batch["VIT_PER_DEVICE"], batch["VIT_ACCUMULATION"], batch["VIT_ATTEMPT"]) == ("8", "2", "1")
    assert "per-device batch 16 -> 8" in batch["VIT_WHY"] and batch["PRIORITY"] == "4"
    assert kinds[0] == "supervisor-started" and kinds[-1] == "completed"


def test_a_hang_names_its_attempt_and_step_then_restarts(tmp_path: Path) -> None:
    from tests.test_state_machine import FakeChild, completes, hangs_at, run, script_of

    def frozen(child: FakeChild, sig: int) -> None:  # only SIGKILL ends it
        if sig == signal.SIGKILL:
            child.code = -9

    _, _, log, _ = run(tmp_path, script_of(hangs_at(7), completes), setup=lambda f: setattr(f, "kill_hook", frozen))
    entries = _entries(log)
    kinds = [e["VIT_KIND"] for e in entries]
    hang = entries[kinds.index("hang")]
    assert (hang["VIT_ATTEMPT"], hang["VIT_STEP"]) == ("1", "7") and "hang_timeout_s" in hang["MESSAGE"]
    assert kinds.index("hang") < kinds.index("sigkill") < kinds.index("restart")
    restart = entries[kinds.index("restart")]
    assert (restart["VIT_REASON"], restart["VIT_STEP"], restart["VIT_EXIT"]) == ("hang", "7", "killed by SIGKILL")
