"""Snapshots under torchrun: 2 CPU ranks over gloo, every rank snapshots its part every step;
the whole job SIGKILLed, resumed from the newest step every rank holds, bit-identical to the
uninterrupted run; and a rank one snapshot ahead of the other (resume at the common previous step)."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest

from bench.common import run_progress
from tests.conftest import heartbeat, wait_for
from tests.test_distributed_e2e import STALL, finish, rank_pids, torchrun
from tests.test_worker_e2e import max_abs_diff, write_cfg
from worker.snapshot import HEADER, SLOTS, default_root

pytestmark = pytest.mark.e2e

# 2 ranks x 16 = 32 samples a step: 10 steps an epoch, 30 in all. save_steps 100: no disk
# checkpoint before the last step, so a resume that gets past the kill proves the snapshots.
STEPS = 30
KILL_AT = 12


def overrides(shm: Path) -> dict[str, Any]:
    return {"training": {"num_train_epochs": 3, "save_steps": 100}, "snapshot": {"every_steps": 1, "root": str(shm)}}


def store_header(out: Path, shm: Path, rank: int) -> dict[str, Any]:
    """Rank ``rank``'s store header ({} while there is none)."""
    try:
        return dict(json.loads((default_root(out, rank, shm) / HEADER).read_bytes()))
    except (OSError, ValueError):
        return {}


def job_pids(launcher: int) -> list[int]:
    return [*rank_pids(launcher), launcher]


def sigkill_job(pids: list[int]) -> None:
    """SIGKILL the ranks and the launcher (torchrun starts each rank in its own session)."""
    for pid in pids:
        try:
            psutil.Process(pid).send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("snapref2")
    cfg = write_cfg(d / "c.yaml", overrides(d / "shm"))
    p = torchrun(cfg)
    log = finish(p, cfg)
    assert p.returncode == 0, log
    return d / "out" / f"checkpoint-{STEPS}"


def resumed_from_snapshot(cfg: Path) -> int:
    """Resume the job with ``--resume`` to the end; the snapshot step it resumed from."""
    p = torchrun(cfg, "--resume")
    log = finish(p, cfg)
    assert p.returncode == 0, log
    text = (cfg.parent / "torchrun.log").read_text()
    m = re.search(r"Training will resume from snapshot step (\d+) \(newer than any disk checkpoint\)", text)
    assert m, text[-4000:]
    return int(m.group(1))


def test_two_ranks_sigkilled_resume_from_the_newest_common_snapshot_bit_identical(
    tmp_path: Path, reference: Path
) -> None:
    shm, out = tmp_path / "shm", tmp_path / "out"
    cfg = write_cfg(tmp_path / "c.yaml", overrides(shm))
    p = torchrun(cfg)
    wait_for(
        lambda: (
            p.poll() is not None
            or (
                (heartbeat(out).get("global_step") or 0) >= KILL_AT
                and all(store_header(out, shm, r).get("step", 0) >= KILL_AT for r in (0, 1))
            )
        ),
        STALL,
        f"step {KILL_AT} with both ranks' snapshots",
        interval=0.005,
        progress=lambda: run_progress(out),
    )
    sigkill_job(job_pids(p.pid))
    finish(p, cfg)
    assert p.returncode != 0, "the job ended before it was killed"
    reached = max(int(heartbeat(out)["global_step"]), *(store_header(out, shm, r)["step"] for r in (0, 1)))
    assert not list(out.glob("checkpoint-*"))
    step = resumed_from_snapshot(cfg)
    assert reached - 1 <= step <= reached  # at most one step lost
    assert max_abs_diff(out / f"checkpoint-{STEPS}", reference) == 0.0


def test_a_rank_one_snapshot_ahead_resumes_at_the_common_previous_step_bit_identical(
    tmp_path: Path, reference: Path
) -> None:
    """Rank 1 is left as a SIGKILL in the middle of writing its snapshot of step n leaves it
    (header back at n - 1, slot cut) while rank 0 committed n: the ranks resume at n - 1,
    which rank 0 offers as its previous entry."""
    shm, out = tmp_path / "shm", tmp_path / "out"
    cfg = write_cfg(tmp_path / "c.yaml", overrides(shm))
    p = torchrun(cfg)
    pids: list[int] = []

    def frozen_at_rest() -> bool:
        """Freeze the ranks; keep them frozen if both hold the same newest step and a previous one."""
        if p.poll() is not None:
            return True
        if (heartbeat(out).get("global_step") or 0) < KILL_AT:
            return False
        pids[:] = job_pids(p.pid)
        ranks = pids[:-1]
        for pid in ranks:
            psutil.Process(pid).suspend()
        h = [store_header(out, shm, r) for r in (0, 1)]
        if h[0].get("step") == h[1].get("step") and all("previous" in x for x in h):
            return True
        for pid in ranks:
            psutil.Process(pid).resume()
        return False

    wait_for(frozen_at_rest, STALL, f"both ranks at rest past step {KILL_AT}", progress=lambda: run_progress(out))
    sigkill_job(pids)
    finish(p, cfg)
    assert p.returncode != 0, "the job ended before it was killed"
    n = store_header(out, shm, 0)["step"]
    root1 = default_root(out, 1, shm)
    h1 = json.loads((root1 / HEADER).read_bytes())
    behind = {k: v for k, v in h1.items() if k != "previous"} | h1["previous"]
    (root1 / HEADER).write_text(json.dumps(behind))
    slot = root1 / SLOTS[h1["slot"]]
    slot.write_bytes(slot.read_bytes()[: slot.stat().st_size // 2])
    assert not list(out.glob("checkpoint-*"))
    assert resumed_from_snapshot(cfg) == n - 1
    assert max_abs_diff(out / f"checkpoint-{STEPS}", reference) == 0.0
