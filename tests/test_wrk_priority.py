"""A promoted standby trains at normal priority (SCHED_OTHER, nice 0) on every thread (issue 11, bug 5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO, worker_env

# A standby's life in miniature: lowered priority, threads started while it waits (torch's
# intra-op pool among them), the go, then threads started afterwards.
CHILD = """
import json, os, subprocess, threading
from worker.standby import STANDBY_NICE, lower_priority, restore_priority
# torch first: at SCHED_IDLE its import (over a CPU-second) would wait for minutes beside a busy
# machine's other work. The import starts a thread of its own, which lower_priority must lower too.
import torch
before = set(os.listdir("/proc/self/task"))
assert len(before) > 1, before
lower_priority()

def nices(proc="self"):
    out = {}
    for tid in os.listdir(f"/proc/{proc}/task"):
        with open(f"/proc/{proc}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            out[tid] = [int(fields[16]), int(fields[38])]  # nice, scheduling policy
    return out

assert os.getpriority(os.PRIO_PROCESS, 0) == STANDBY_NICE
done = threading.Event()
for _ in range(3):
    threading.Thread(target=done.wait, daemon=True).start()
torch.set_num_threads(3)
torch.ones(256, 256) @ torch.ones(256, 256)  # starts the intra-op pool at nice 10
helper = subprocess.Popen(["sleep", "120"])  # as wandb's service process, started while preparing
waiting = nices()
helper_waiting = nices(helper.pid)
restore_priority()
threading.Thread(target=done.wait, daemon=True).start()
torch.ones(256, 256) @ torch.ones(256, 256)
assert before <= set(waiting)
print(json.dumps({"waiting": waiting, "promoted": nices(), "helper": [helper_waiting, nices(helper.pid)]}))
helper.kill()
done.set()
"""


def test_every_thread_of_a_promoted_standby_runs_at_normal_priority() -> None:
    env = worker_env(OMP_NUM_THREADS="3")
    p = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    seen = json.loads(p.stdout.strip().splitlines()[-1])
    idle, normal = os.SCHED_IDLE, os.SCHED_OTHER
    assert len(seen["waiting"]) >= 5 and {tuple(v) for v in seen["waiting"].values()} == {(10, idle)}
    assert len(seen["promoted"]) > len(seen["waiting"])  # a thread started after the go is checked too
    assert {tuple(v) for v in seen["promoted"].values()} == {(0, normal)}, seen["promoted"]
    before, after = seen["helper"]
    assert {tuple(v) for v in before.values()} == {(10, idle)} and {tuple(v) for v in after.values()} == {(0, normal)}
