"""supervisor/host.py RunDirWatch: the run folder wakes the supervisor's loop for news only."""

from __future__ import annotations

import threading
from pathlib import Path

from watchdog import events as ev

from supervisor import protocol
from supervisor.host import RunDirWatch, poll_until, wakes


def test_only_finished_writes_of_real_files_are_news() -> None:
    hb = "/out/run/heartbeat.json"
    tmp = "/out/run/.heartbeat.json.a1b2c3.tmp"
    assert wakes(ev.FileMovedEvent(tmp, hb))
    assert wakes(ev.FileClosedEvent("/out/run/metrics.jsonl"))
    assert wakes(ev.DirMovedEvent("/out/.staging-checkpoint-5", "/out/checkpoint-5"))
    assert wakes(ev.FileDeletedEvent(hb))
    assert wakes(ev.FileCreatedEvent("/out/run/exit-1.json"))
    assert not wakes(ev.FileCreatedEvent(tmp))
    assert not wakes(ev.FileClosedEvent(tmp))
    assert not wakes(ev.FileMovedEvent(hb, tmp))
    assert not wakes(ev.FileModifiedEvent(hb))
    assert not wakes(ev.FileOpenedEvent(hb))
    assert not wakes(ev.FileClosedNoWriteEvent(hb))


class Wakes:
    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            self.count += 1


def test_a_heartbeat_rewrite_wakes_once_and_reading_it_never(tmp_path: Path) -> None:
    protocol.run_dir(tmp_path).mkdir()
    hb = protocol.heartbeat_path(tmp_path)
    marker = tmp_path / "run" / "marker"
    woken = Wakes()
    watch = RunDirWatch(tmp_path, woken)
    assert watch.start()
    try:
        protocol.atomic_write_json(hb, {"global_step": 1}, durable=False)
        assert poll_until(lambda: woken.count >= 1, 30, interval=0.01)
        # Events arrive in order: once the marker's has, every event of the heartbeat write has too,
        # and the rename was its only news (not the temporary file's creation and close).
        protocol.atomic_write_json(marker, {"x": 1}, durable=False)
        assert poll_until(lambda: woken.count >= 2, 30, interval=0.01)
        assert woken.count == 2
        for _ in range(20):
            protocol.read_json(hb)
        protocol.atomic_write_json(marker, {"y": 2}, durable=False)
        assert poll_until(lambda: woken.count >= 3, 30, interval=0.01)
        assert woken.count == 3
    finally:
        watch.stop()
