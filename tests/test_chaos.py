"""The chaos harness, short: five kinds of real faults in one supervised run, every check enforced.

Snapshots every step (``--snapshots 1``, the harness's default, passed explicitly): the harness then
fails any fault but the out-of-memory that lost more than one step, and a kill that landed in the
middle of a save that lost any (the step being saved is snapshotted before its save begins)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import run_progress
from tests.conftest import REPO, tail, wait_exit

pytestmark = pytest.mark.e2e

# A stall limit, above the harness's own (180 s) so that it reports a stuck run itself first.
STALL = 240


def test_short_chaos_run_passes_every_check(tmp_path: Path) -> None:
    stdout, stderr = tmp_path / "chaos.out", tmp_path / "chaos.err"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        p = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "bench" / "chaos.py"),
                "--short",
                "--no-tracking",
                "--no-standby-wait",
                "--seed",
                "3",
                "--snapshots",
                "1",
                "--snapshot-root",
                str(tmp_path / "shm"),
                "--workdir",
                str(tmp_path),
                "--report",
            ],
            cwd=REPO,
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,
        )
    # The reference run, then the chaos run: either one moving is progress.
    code = wait_exit(
        p,
        STALL,
        "the chaos run",
        progress=lambda: (run_progress(tmp_path / "reference"), run_progress(tmp_path / "chaos")),
        context=lambda: tail(stdout, 4000) + tail(stderr, 2000),
    )
    text = stdout.read_text()
    assert code == 0, text[-4000:] + tail(stderr, 2000)
    assert "all checks passed (5 faults)" in text
    assert "snapshots every 1 step(s)" in text
    for kind in ("sigkill", "sigterm", "kill_during_save", "truncate_checkpoint", "oom"):
        assert any(line.startswith(kind) for line in text.splitlines()), kind
    png = tmp_path / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
