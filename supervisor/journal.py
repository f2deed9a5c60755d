"""Supervisor events as structured journald entries, when the supervisor runs under systemd.

Each event the supervisor logs (``log.info("exit", attempt=2, reason="crash", ...)``) becomes one
journal entry: ``MESSAGE`` (one readable line), ``PRIORITY``, a fixed ``MESSAGE_ID`` per kind of
event (:data:`KINDS`, the README's table), ``SYSLOG_IDENTIFIER=vit-supervisor``, and the event's
own fields upper-cased behind one prefix (``VIT_ATTEMPT``, ``VIT_REASON``, ``VIT_STEP``, ...)
plus ``VIT_EVENT``, ``VIT_KIND``, ``VIT_RUN`` and ``VIT_CONFIG``. So
``journalctl -u vit-supervisor@NAME MESSAGE_ID=<restart>`` lists every restart with its attempt,
reason and step. Anywhere else (a terminal, ``--detach``'s log file) the log stays as it was.

When: ``VIT_SUPERVISOR_JOURNAL`` is ``auto`` (the default), ``on`` or ``off``. ``auto`` follows
systemd's documented test: ``$JOURNAL_STREAM`` names the device and inode of the stream systemd
connected to the journal, and it must match the supervisor's stderr (a redirected stderr, or a
child that inherited the variable, does not match). ``VIT_SUPERVISOR_JOURNAL_SOCKET`` overrides
the socket (default ``/run/systemd/journal/socket``; a unit with ``LogNamespace=`` gets its
namespace's socket bind-mounted there by systemd, so it needs no setting).

A journal that is absent, refuses the entry or is too busy to take it at once never stops or
slows the supervisor: the socket is non-blocking, and an entry that cannot be sent is written
as the JSON line it would have been without the journal (with one line saying why, once per
outage).

Library: ``logging-journald``'s ``JournaldTransport``, a pure-Python sender of journald's native
protocol (datagrams of ``KEY=VALUE`` lines; the length-prefixed binary-safe form for values with
newlines, such as tracebacks; a sealed memfd passed over the socket for entries too large for one
datagram), MIT, maintained, no dependencies. The reference binding, ``systemd-python``
(``systemd.journal.send``), ships only as source and compiles against libsystemd: ``make venv``
would need ``libsystemd-dev``, ``pkg-config`` and a C compiler on every machine. ``cysystemd``
has wheels, but a 2.4 MB compiled module linking libsystemd is a lot to carry for sending
datagrams. The transport is imported only when the journal is on, so ``status`` and a supervisor
outside systemd never load it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, TextIO

from supervisor.schema import ConfigError

ENV_JOURNAL = "VIT_SUPERVISOR_JOURNAL"
ENV_SOCKET = "VIT_SUPERVISOR_JOURNAL_SOCKET"
DEFAULT_SOCKET = "/run/systemd/journal/socket"
SETTINGS = ("auto", "on", "off")

IDENTIFIER = "vit-supervisor"
PREFIX = "VIT_"

# syslog priorities (sd-daemon.h): the level names structlog's add_log_level writes.
PRIORITIES: dict[str, int] = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}

# In the journal every event's fields share one namespace, so a field named for its event's
# context gets the run-wide name: `journalctl VIT_STATE=failed` and VIT_STEP mean one thing.
RENAMED: dict[str, str] = {"new": "state", "old": "previous_state", "step_reached": "step"}

# MESSAGE shows a generic event's fields up to this many characters each (the fields hold them whole).
SHORT = 160

# Keys of the event dict that become standard journal fields, not VIT_ ones.
_CONSUMED = frozenset({"event", "level", "timestamp"})

SendFn = Callable[[list[tuple[str, str]]], None]


# ----------------------------------------------------------------------------- kinds of entry


@dataclass(frozen=True)
class Kind:
    """One kind of journal entry: a stable MESSAGE_ID that saved queries and alerts can use."""

    name: str
    message_id: str
    """128 bits as 32 lower-case hex digits (journald's form), fixed forever once released."""
    what: str
    """When it is sent (the README's table)."""
    priority: int | None = None
    """A ceiling on PRIORITY (lower is more severe): a restart is worth a warning however it was logged."""


KINDS: tuple[Kind, ...] = (
    Kind("supervisor-started", "3f94f2a4ceb0470bbbed6fcf3b6eee37", "a supervisor began (state `starting`)"),
    Kind(
        "state-changed",
        "db8fa0487ae141049af321c31ecfae36",
        "any other state change (`running`, `backoff`, `stopping`, `starting` again)",
    ),
    Kind("worker-launched", "158c62ae07bf4aed8db24169361d915a", "an attempt began: worker pid, batch, accumulation"),
    Kind(
        "standby-took-over",
        "c8c029a2df5f47d8974aecc1bd9678b4",
        "the pre-warmed standby became the attempt's worker",
    ),
    Kind(
        "standby", "ecaa4bb445bb485ea4a36add5c35f5ad", "standby started, ready, dismissed, killed; cold start instead"
    ),
    Kind(
        "restart",
        "dbd7764e3b804700b761b49f7767b198",
        "a worker exit that is restarted: the attempt that ended, reason, step reached, exit",
        priority=PRIORITIES["warning"],
    ),
    Kind(
        "worker-exited",
        "0e769d5a11ec43a28e1214725cc47567",
        "a worker exit that is not restarted (completed, stopped, failed, waits for disk, stale standby)",
    ),
    Kind(
        "hang",
        "930ed005c2d6404caa717ad72326fbbb",
        "no progress for too long: the worker is stopped",
        priority=PRIORITIES["warning"],
    ),
    Kind(
        "batch-changed",
        "2b0c4830079e47c9b28e4e02a97b9cfb",
        "per-device batch lowered after an out-of-memory exit (or kept from an earlier supervisor)",
        priority=PRIORITIES["warning"],
    ),
    Kind(
        "waiting-for-disk",
        "ba7a4019e9b04e1b90fe676ee6362eb5",
        "state `waiting`: no launch until the output directory has room",
        priority=PRIORITIES["warning"],
    ),
    Kind(
        "failed",
        "0750f5a5f8f84186b23db419618c2908",
        "state `failed`: gave up, or a non-retryable error",
        priority=PRIORITIES["error"],
    ),
    Kind("completed", "e66f70d8e0af4934acf2e977f185b01e", "state `completed`: the run reached its step count"),
    Kind("stopped", "27bc673a134144d0bfc65242c044434d", "state `stopped`: stopped on request"),
    Kind("signal", "c792421bedc34f67b6454fd3394091c8", "a signal to the supervisor (stop, force, status, ignored)"),
    Kind(
        "sigkill",
        "d5cf44acb5424b18b74ae9a4e00ae474",
        "a worker that did not exit in time gets SIGKILL",
        priority=PRIORITIES["warning"],
    ),
    Kind("supervisor-exited", "6dbd433f0da34ba9b3fc4d3d8f79cc0e", "the supervisor exits: final state and exit code"),
    Kind("orphan", "582c0399be454a349eff86384b73ca74", "a previous supervisor's worker found, waited for"),
    Kind("snapshots", "95b154e9cb974bd2afec3de13cce193a", "snapshot stores off, on again, kept or removed"),
    Kind(
        "other",
        "7416e86d285942a4a64375152c2925a1",
        "any other event (output directory deleted, state file not written, ...)",
    ),
)
BY_NAME: dict[str, Kind] = {k.name: k for k in KINDS}

# Events whose kind follows from the event name alone.
_EVENT_KINDS = {
    "launch": "worker-launched",
    "hang": "hang",
    "batch": "batch-changed",
    "signal": "signal",
    "escalate": "sigkill",
    "orphan": "orphan",
    "snapshots": "snapshots",
}
_STATE_KINDS = {"waiting": "waiting-for-disk", "failed": "failed", "completed": "completed", "stopped": "stopped"}


def kind_of(ev: Mapping[str, Any]) -> Kind:
    """The kind of one event dict (structlog's: ``event`` plus the call's fields)."""
    event = ev.get("event")
    if event == "state":
        first = "supervisor-started" if ev.get("old") is None else "state-changed"
        return BY_NAME[_STATE_KINDS.get(str(ev.get("new")), first)]
    if event == "exit":
        if "decision" not in ev:  # serve()'s last line: the supervisor's own exit
            return BY_NAME["supervisor-exited"]
        return BY_NAME["restart" if ev.get("decision") == "restart" else "worker-exited"]
    if event == "standby":
        return BY_NAME["standby-took-over" if ev.get("action") == "took over" else "standby"]
    return BY_NAME[_EVENT_KINDS.get(str(event), "other")]


# ----------------------------------------------------------------------------- the entry


def field_name(key: str) -> str:
    """``step_reached`` -> ``VIT_STEP``: journald takes A-Z, 0-9 and _ , at most 64 characters."""
    key = RENAMED.get(key, key)
    return (PREFIX + re.sub(r"[^A-Z0-9_]", "_", key.upper()))[:64]


def field_value(value: Any) -> str | None:
    """The text of one value (None: the field is left out). Newlines are kept: the transport
    sends such values in journald's binary-safe form."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return str.__str__(value)  # a str enum (State) by its value
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, default=str, separators=(",", ":"))


def _fields(ev: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ev.items() if k not in _CONSUMED and v is not None}


def _state_line(ev: Mapping[str, Any]) -> str:
    old, new, why = ev.get("old"), ev.get("new"), ev.get("why")
    head = f"{old} -> {new}" if old is not None else f"{new}"
    return f"{head}: {why}" if why else head


_EXIT_ENDINGS = {
    "restart": "restarting",
    "complete": "the run is complete",
    "stop": "stopped, not restarted",
    "fail": "not restarted: the run failed",
    "wait_disk": "waiting for disk space",
    "replace_standby": "cold start instead",
}


def _exit_line(ev: Mapping[str, Any]) -> str:
    if "decision" not in ev:
        line = f"supervisor exits with code {ev.get('code')} in state {ev.get('state')}"
        return f"{line}: {ev['last_error']}" if ev.get("last_error") else line
    step = f" at step {ev['step_reached']}" if ev.get("step_reached") is not None else ""
    what = ev.get("message") or ev.get("exit") or ev.get("reason")
    ending = _EXIT_ENDINGS.get(str(ev.get("decision")), str(ev.get("decision")))
    return f"attempt {ev.get('attempt')} ended{step}: {what}; {ending}"


def _launch_line(ev: Mapping[str, Any]) -> str:
    return (
        f"attempt {ev.get('attempt')} launched: worker pid {ev.get('pid')}, "
        f"per-device batch {ev.get('batch')} x accumulation {ev.get('accum')}"
    )


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= SHORT else text[: SHORT - 3] + "..."


def _generic_line(ev: Mapping[str, Any]) -> str:
    rest = _fields(ev)
    lead = [_short(rest.pop(k)) for k in ("action", "why") if k in rest]
    tail = [f"{k}={_short(v)}" for k, v in rest.items() if not (isinstance(v, str) and "\n" in v)]
    text = ": ".join([str(ev.get("event")), *lead])
    return f"{text} ({', '.join(tail)})" if tail else text


_LINES: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "state": _state_line,
    "exit": _exit_line,
    "launch": _launch_line,
}


def message(ev: Mapping[str, Any]) -> str:
    """One readable line for MESSAGE (the event's fields are in the entry as well)."""
    line = _LINES.get(str(ev.get("event")), _generic_line)(ev)
    return " ".join(line.split("\n"))  # MESSAGE is one line; a traceback has a field of its own


def priority(ev: Mapping[str, Any], kind: Kind) -> int:
    level = PRIORITIES.get(str(ev.get("level", "info")), PRIORITIES["info"])
    return level if kind.priority is None else min(level, kind.priority)


def entry(ev: Mapping[str, Any], static: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """The journal entry of one event dict: standard fields first, then the VIT_ ones.

    ``static``: fields of every entry (``run``, ``config``); an event's own field of the same name wins.
    """
    kind = kind_of(ev)
    out: dict[str, str] = {
        "MESSAGE": message(ev),
        "PRIORITY": str(priority(ev, kind)),
        "MESSAGE_ID": kind.message_id,
        "SYSLOG_IDENTIFIER": IDENTIFIER,
        field_name("event"): str(ev.get("event")),
        field_name("kind"): kind.name,
    }
    reserved = set(out)
    for key, value in {**(static or {}), **_fields(ev)}.items():
        name, text = field_name(key), field_value(value)
        if text is not None and name not in reserved:
            out[name] = text
    return list(out.items())


# ----------------------------------------------------------------------------- when, and where to


def setting(env: Mapping[str, str]) -> str:
    """``VIT_SUPERVISOR_JOURNAL``, checked: ``auto``, ``on`` or ``off`` (ConfigError otherwise)."""
    raw = env.get(ENV_JOURNAL, "").strip().lower() or "auto"
    if raw not in SETTINGS:
        raise ConfigError(
            f"{ENV_JOURNAL}={env.get(ENV_JOURNAL)!r} is not one of {', '.join(SETTINGS)}: "
            f"unset it (auto: the journal when systemd connects stderr to it), or set on or off"
        )
    sock = env.get(ENV_SOCKET, "")
    if sock and not sock.startswith("/"):
        raise ConfigError(
            f"{ENV_SOCKET}={sock!r} is not an absolute path: give journald's socket, e.g. {DEFAULT_SOCKET}"
        )
    return raw


def stream_is_journal(env: Mapping[str, str], stream: TextIO) -> bool:
    """systemd's test: ``$JOURNAL_STREAM`` (``DEVICE:INODE``) is the stream ``stream`` writes to."""
    raw = env.get("JOURNAL_STREAM", "")
    dev, _, ino = raw.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or a stream without a descriptor
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def socket_for(env: Mapping[str, str], stream: TextIO) -> str | None:
    """The journal socket to send entries to, or None for plain log lines on ``stream``."""
    mode = setting(env)
    if mode == "off" or (mode == "auto" and not stream_is_journal(env, stream)):
        return None
    return env.get(ENV_SOCKET) or DEFAULT_SOCKET


def sender(path: str) -> SendFn:
    """A send function for journald's native socket at ``path``: non-blocking, never connected
    (each datagram is addressed, as libsystemd does, so a restarted journald is found again)."""
    from logging_journald import JournaldTransport

    transport = JournaldTransport(socket_path=path, connected=False)
    transport.socket.setblocking(False)  # a journal too busy to take an entry now gets the JSON line
    send: SendFn = transport.send  # the package ships no type information
    return send


# ----------------------------------------------------------------------------- structlog's last processor


class Sink:
    """The last structlog processor under the journal: sends the entry and drops the event; when
    the send fails, returns the line ``fallback`` renders (the logger prints it on stderr)."""

    def __init__(
        self,
        send: SendFn,
        fallback: Callable[[Any, str, MutableMapping[str, Any]], Any],
        static: Mapping[str, Any] | None = None,
    ) -> None:
        self.send = send
        self.fallback = fallback
        self.static = dict(static or {})
        self.failing = False

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> Any:
        from structlog import DropEvent

        try:
            self.send(entry(event_dict, self.static))
        except Exception as exc:  # whatever the journal or the entry did: the event is still logged
            line = self.fallback(logger, method_name, dict(event_dict))
            if not self.failing:
                self.failing = True
                note = {
                    "event": "journal",
                    "level": "warning",
                    "timestamp": event_dict.get("timestamp"),
                    "error": f"{type(exc).__name__}: {exc}",
                    "action": "JSON lines on stderr until the journal takes entries again",
                }
                line = f"{self.fallback(logger, 'warning', note)}\n{line}"
            return line
        self.failing = False
        raise DropEvent
