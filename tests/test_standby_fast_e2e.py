"""A standby's go costs no rescan of unchanged data and no tracker start-up (issue 12, recovery <= 1 s).

The data watch (worker/datawatch.py) runs real inotify on real folders here; the take-over
tests run a real standby process with wandb offline.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from supervisor import protocol
from supervisor.schema import load_config
from tests.conftest import PYTHON, REPO, TINY, deep_update, wait_for, worker_env
from tests.test_worker_e2e import _digit_pngs
from tests.test_wrk_standby_stop import go, ready
from worker.datawatch import DataWatch, covers


def _config(tmp_path: Path, over: dict[str, Any]) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(deep_update(TINY, over)))
    return cfg


def _folder_config(tmp_path: Path, **training: Any) -> Path:
    _digit_pngs(tmp_path / "images", per_class=6)
    return _config(
        tmp_path,
        {
            "data": {"source": "image_folder", "path": "images", "limit": None},
            "training": {"num_train_epochs": 1, "save_steps": 100, **training},
        },
    )


def test_the_data_watch_ignores_reads_and_names_the_first_change(tmp_path: Path) -> None:
    cfg = load_config(_folder_config(tmp_path))
    watch = DataWatch.start(cfg)
    try:
        assert watch.changed is None
        for f in sorted((tmp_path / "images").rglob("*.png")):  # what a training worker does all the time
            f.read_bytes()
        new = tmp_path / "images" / "class_3" / "new.png"
        new.write_bytes(b"not really a png")
        # One inotify queue delivers in order: had a read counted, it would be named here instead.
        changed = wait_for(lambda: watch.changed, 30, "the watch to see the new file")
        # Named by the inotify event (the new file) or, when the go-time mtime check runs first, by its
        # folder; a read that counted would name one of the files read instead.
        assert "class_3" in changed and ("new.png" in changed or changed.startswith("folder")), changed
    finally:
        watch.stop()


def test_a_folder_that_cannot_be_watched_means_rescan_at_the_go(tmp_path: Path) -> None:
    cfg = load_config(_folder_config(tmp_path))
    cfg.data.path = str(tmp_path / "gone")
    watch = DataWatch.start(cfg)
    assert watch.changed is not None and "could not be watched" in watch.changed


def test_pairs_outside_the_image_root_or_under_a_limit_are_not_vouched_for(tmp_path: Path) -> None:
    (tmp_path / "pairs.csv").write_text("image_a,image_b,label\n")
    cfg = load_config(
        _config(
            tmp_path,
            {
                "model": {"concat_mode": "concat"},
                "data": {"source": "pairs_csv", "path": "pairs.csv", "limit": None},
            },
        )
    )
    inside = [tmp_path / "a.png", tmp_path / "sub" / "b.png"]
    assert covers(cfg, inside)
    assert not covers(cfg, [*inside, Path("/elsewhere/c.png")])
    cfg.data.limit = 10
    assert not covers(cfg, inside)


def test_a_symlinked_image_is_not_vouched_for(tmp_path: Path) -> None:
    cfg = load_config(_folder_config(tmp_path))
    files = sorted((tmp_path / "images").rglob("*.png"))
    assert covers(cfg, files)
    (tmp_path / "images" / "class_1" / "link.png").symlink_to(files[0])
    assert not covers(cfg, [*files, tmp_path / "images" / "class_1" / "link.png"])


def _standby(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    """A real standby whose output goes to ``log`` (read while it runs)."""
    with open(log, "wb") as f:
        return subprocess.Popen(
            [PYTHON, "-m", "worker", str(cfg), "--standby"],
            stdin=subprocess.PIPE,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=worker_env(),
            cwd=REPO,
            start_new_session=True,
        )


def _go_and_finish(tmp_path: Path, p: subprocess.Popen[bytes], log: Path) -> tuple[int, str, dict[str, Any]]:
    assert p.stdin is not None
    line, report_path = go(tmp_path)
    p.stdin.write(line.encode())
    p.stdin.close()
    try:
        p.wait(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, log.read_text(errors="replace"), json.loads(report_path.read_text())


@pytest.mark.e2e
def test_a_standby_with_unchanged_data_and_wandb_takes_over_without_a_rescan(tmp_path: Path) -> None:
    cfg = _folder_config(tmp_path, max_steps=3)
    raw = yaml.safe_load(cfg.read_text())
    raw["tracking"] = {"backend": "wandb", "mode": "offline", "project": "standby-fast"}
    cfg.write_text(yaml.safe_dump(raw))
    log_path = tmp_path / "standby.log"
    p = _standby(cfg, log_path)
    wait_for(lambda: ready(tmp_path / "out", p.pid), 180, "the standby to be ready")
    code, log, report = _go_and_finish(tmp_path, p, log_path)
    assert code == protocol.EXIT_COMPLETED and report["reason"] == "completed", log[-3000:]
    assert "Standby got a go" in log and "rescanned" not in log, log[-3000:]
    tracker = [line for line in log.splitlines() if "Tracker ready in" in line]
    assert len(tracker) == 1, log[-3000:]
    # The tracker's imports and service were started before the go: what is left is quick even
    # on a loaded machine (a cold wandb start is 1.2-2.5 s on 2 idle cores).
    assert float(tracker[0].split("Tracker ready in ")[1].split("s")[0]) < 1.0, tracker[0]
    runs = list((tmp_path / "out" / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs


@pytest.mark.e2e
@pytest.mark.parametrize("change", ["same bytes rewritten", "image added"])
def test_a_change_under_the_data_makes_the_go_rescan_and_only_a_real_one_is_stale(tmp_path: Path, change: str) -> None:
    cfg = _folder_config(tmp_path, max_steps=3)
    img = tmp_path / "images" / "class_2" / "1.png"
    log_path = tmp_path / "standby.log"
    p = _standby(cfg, log_path)
    wait_for(lambda: ready(tmp_path / "out", p.pid), 180, "the standby to be ready")
    if change == "image added":
        (img.parent / "extra.png").write_bytes(img.read_bytes())  # seen at the go by its folder's time
    else:
        img.write_bytes(img.read_bytes())  # only an inotify event tells: wait until the standby saw it
        wait_for(lambda: "The data changed under the standby" in log_path.read_text(), 60, "the watch's event")
    code, log, report = _go_and_finish(tmp_path, p, log_path)
    assert "Standby rescanned the data" in log, log[-3000:]
    if change == "image added":
        assert code == protocol.EXIT_STANDBY_STALE and report["reason"] == protocol.REASON_STANDBY_STALE, log[-3000:]
    else:
        assert code == protocol.EXIT_COMPLETED and report["reason"] == "completed", log[-3000:]
        assert "1.png" in log
