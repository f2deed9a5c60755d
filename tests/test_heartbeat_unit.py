"""worker/fault.py HeartbeatWriter: updates between writes are kept, not lost."""

from __future__ import annotations

from pathlib import Path

from supervisor import protocol
from worker.fault import HeartbeatWriter


def on_disk(out: Path) -> dict[str, object]:
    return protocol.read_json(protocol.heartbeat_path(out)) or {}


def test_fields_of_updates_that_did_not_write_land_in_the_next_write(tmp_path: Path) -> None:
    protocol.run_dir(tmp_path).mkdir()
    hb = HeartbeatWriter(tmp_path, 3600.0, attempt=2, global_step=0)
    hb.update(state=protocol.HB_TRAINING, global_step=1, force=True)
    hb.update(global_step=2, loss=0.5)  # within the interval, same state: not written
    hb.update(global_step=3, epoch=0.25)
    assert on_disk(tmp_path)["global_step"] == 1
    hb.update(state=protocol.HB_SAVING)  # a new state is written at once, with everything since
    got = on_disk(tmp_path)
    assert (got["state"], got["global_step"], got["loss"], got["epoch"], got["attempt"]) == (
        protocol.HB_SAVING,
        3,
        0.5,
        0.25,
        2,
    )


def test_an_elapsed_interval_writes_without_a_state_change(tmp_path: Path) -> None:
    protocol.run_dir(tmp_path).mkdir()
    hb = HeartbeatWriter(tmp_path, 0.0, global_step=0)
    hb.update(state=protocol.HB_TRAINING, global_step=1)
    hb.update(global_step=2)
    assert on_disk(tmp_path)["global_step"] == 2
