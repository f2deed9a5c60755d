"""The chaos harness, short: five kinds of real faults in one supervised run, every check enforced."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def test_short_chaos_run_passes_every_check(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "chaos.py"),
            "--short",
            "--no-tracking",
            "--no-standby-wait",
            "--seed",
            "3",
            "--workdir",
            str(tmp_path),
            "--report",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "all checks passed (5 faults)" in r.stdout
    for kind in ("sigkill", "sigterm", "kill_during_save", "truncate_checkpoint", "oom"):
        assert any(line.startswith(kind) for line in r.stdout.splitlines()), kind
    png = tmp_path / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
