"""The supervisor driving torchrun: 2 CPU ranks over gloo, one policy for the whole job."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import Run, finish, heartbeat

pytestmark = pytest.mark.e2e

# 2 ranks x 16 = 32 samples per step: 10 steps per epoch. Long enough that a stop lands mid-run.
TWO = {
    "launcher": "torchrun",
    "distributed": {"nproc_per_node": 2},
    "training": {"num_train_epochs": 12, "save_steps": 5},
    "supervisor": {"startup_timeout_s": 120},
}
# Killed at step 12 and resumed from 10: 40 steps is enough to see the restarted job complete.
TWO_SHORT = {**TWO, "training": {"num_train_epochs": 4, "save_steps": 5}}
# Stall limits (they restart while the job moves): three processes importing torch on a
# loaded 2-core machine show no progress for a while.
STALL = 120


def ranks(run: Any) -> list[psutil.Process]:
    """The rank processes under the current torchrun."""
    launcher = psutil.Process(run.state()["worker_pid"])
    return [c for c in launcher.children(recursive=True) if c.name() == "vit-train"]


def test_killing_one_rank_restarts_the_whole_job_which_resumes_and_completes(make_config: Any, new_run: Any) -> None:
    run = new_run(make_config(TWO_SHORT))
    sup = run.start()
    run.wait_for(
        lambda: (heartbeat(run.out).get("global_step") or 0) >= 12 and run.state().get("attempt") == 1,
        STALL,
        "2 ranks at step 12",
    )
    victims = ranks(run)
    assert len(victims) == 2
    killed = time.time()
    victims[1].kill()
    run.wait_for(
        lambda: run.state().get("attempt") == 2 and (run.state()["attempts"][1].get("first_step_at")),
        STALL,
        "the restarted job's first new step",
    )
    restart_s = run.state()["attempts"][1]["first_step_at"] - killed
    print(f"\n2-rank job: SIGKILL of one rank -> first new step of the restarted job: {restart_s:.2f}s")
    assert finish(sup, run, timeout=STALL) == 0, run.log()[-3000:]
    st = run.state()
    first, second = st["attempts"][:2]
    assert first["reason"] == "crash" and "died without an exit report" in first["message"]
    assert second["step_start"] >= 10 and st["attempts"][-1]["reason"] == "completed"
    final = max(run.out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {f.name for f in final.iterdir()}


def test_real_oom_on_one_rank_lowers_the_batch_on_all_ranks(make_config: Any, new_run: Any) -> None:
    cfg = make_config(
        {
            "launcher": "torchrun",
            "distributed": {"nproc_per_node": 2},
            "model": {"scratch": {"image_size": 32}},
            "data": {"limit": None},
            "training": {
                "per_device_train_batch_size": 1024,
                "gradient_accumulation_steps": 1,
                "max_steps": 1,
                "eval_strategy": "no",
            },
            "supervisor": {"oom_batch_factor": 0.0625, "startup_timeout_s": 120},
        }
    )
    run = new_run(cfg, VIT_MEMORY_HEADROOM_MB="400", VIT_MEMORY_HEADROOM_RANKS="1")
    sup = run.start()
    assert finish(sup, run, timeout=STALL) == 0, run.log()[-3000:]
    st = run.state()
    first, last = st["attempts"][0], st["attempts"][-1]
    assert first["reason"] == "oom" and first["message"].startswith("rank 1:")
    assert "can't allocate memory" in first["message"]
    assert (last["per_device_train_batch_size"], last["gradient_accumulation_steps"]) == (64, 16)
    reports = [json.loads(p.read_text()) for p in (run.out / "run").glob(f"exit-{last['attempt']}.rank*.json")]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert {(r["per_device_train_batch_size"], r["gradient_accumulation_steps"]) for r in reports} == {(64, 16)}


def test_ctrl_c_makes_every_rank_checkpoint_the_same_step_and_stop(make_config: Any, new_run: Any) -> None:
    run = new_run(make_config(TWO))
    sup = run.start()
    run.wait_for(lambda: (heartbeat(run.out).get("global_step") or 0) >= 4, STALL, "training")
    sup.send_signal(signal.SIGINT)
    assert finish(sup, run, timeout=STALL) == 0, run.log()[-3000:]
    st = run.state()
    assert st["state"] == "stopped"
    reports = [json.loads(p.read_text()) for p in (run.out / "run").glob("exit-1.rank*.json")]
    assert len(reports) == 2 and {r["reason"] for r in reports} == {"interrupted"}
    steps = {r["step"] for r in reports}
    assert len(steps) == 1
    ck = run.out / f"checkpoint-{steps.pop()}"
    assert {"rng_state_0.pth", "rng_state_1.pth", "vit_checkpoint.json"} <= {f.name for f in ck.iterdir()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_local_nodes_with_one_supervisor_each_train_together(
    tmp_path: Path, make_config: Any, new_run: Any
) -> None:
    port = free_port()
    common = {
        "launcher": "torchrun",
        "training": {"num_train_epochs": 3, "output_dir": str(tmp_path / "out")},
        "supervisor": {"startup_timeout_s": 120},
    }
    node = [
        make_config(
            {
                **common,
                "distributed": {"nproc_per_node": 1, "nnodes": 2, "node_rank": r, "rdzv_endpoint": f"127.0.0.1:{port}"},
            },
            name=f"node{r}.yaml",
        )
        for r in (0, 1)
    ]
    runs = []
    for r in (0, 1):
        (tmp_path / f"node{r}").mkdir()
        runs.append(Run(tmp_path / f"node{r}", node[r]))
        runs[-1].out = tmp_path / "out"  # shared by both nodes: the heartbeat to watch for progress
    try:
        procs = [runs[0].start(), runs[1].start()]
        for r, p in zip(runs, procs, strict=False):
            assert finish(p, r, timeout=STALL) == 0, r.log()[-3000:]
    finally:
        for r in runs:
            r.cleanup()
    out = tmp_path / "out"
    s0 = json.loads((out / "run" / "state.json").read_text())
    s1 = json.loads((out / "run" / "node-1" / "state.json").read_text())
    assert s0["state"] == s1["state"] == "completed"
    final = out / "checkpoint-30"  # 300 examples / (2 nodes x 16) per step, 3 epochs
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {f.name for f in final.iterdir()}
    assert json.loads((out / "run" / "node-1" / "exit-1.rank1.json").read_text())["reason"] == "completed"
