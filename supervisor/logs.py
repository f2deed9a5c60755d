"""structlog set-up: readable lines on a terminal, one JSON object per line otherwise
(``--detach``'s log file, a pipe), so the same events serve people and scripts; under systemd,
one structured journal entry per event instead (:mod:`supervisor.journal`)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog


def setup(
    stream: TextIO | None = None,
    *,
    json: bool | None = None,
    level: int = logging.INFO,
    journal: str | None = None,
    env: Mapping[str, str] | None = None,
    fields: Mapping[str, Any] | None = None,
) -> None:
    """Log to ``stream`` (default stderr).

    ``json``: JSON lines or console lines (default: console on a terminal). ``journal``: a
    journald socket to send entries to; default: the one ``env`` (default ``os.environ``) and
    ``stream`` call for, if any (:func:`supervisor.journal.socket_for`; a bad
    setting raises ConfigError). ``fields``: journal fields of every entry (``run``,
    ``config``); the lines do not carry them.
    """
    stream = stream or sys.stderr
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    last = _journal_sink(stream, renderer, journal, os.environ if env is None else env, fields)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=False),
            structlog.processors.format_exc_info,
            last,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def _journal_sink(
    stream: TextIO,
    renderer: structlog.types.Processor,
    path: str | None,
    env: Mapping[str, str],
    fields: Mapping[str, Any] | None,
) -> structlog.types.Processor:
    """The journal's sink when the journal is wanted, else ``renderer`` itself."""
    from supervisor import journal

    path = path or journal.socket_for(env, stream)
    if path is None:
        return renderer
    try:
        send = journal.sender(path)
    except (ImportError, OSError) as exc:  # no transport (a venv not updated) or no socket: lines as before
        note = {"event": "journal", "level": "warning", "error": f"{type(exc).__name__}: {exc}", "action": "log lines"}
        print(renderer(None, "warning", note), file=stream, flush=True)
        return renderer
    # An entry the journal does not take is printed as the line `renderer` makes of it.
    return journal.Sink(send, renderer, fields)


def get(name: str = "vit-supervisor") -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
