"""A promoted standby trains at normal priority on every thread (issue 11, bug 5)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, worker_env

# A standby's life in miniature: lowered priority, threads started while it waits (torch's
# intra-op pool among them), the go, then threads started afterwards.
CHILD = """
import json, os, threading
os.nice(10)  # as the standby does, before its heavy imports
import torch
from worker.standby import STANDBY_NICE, restore_priority

def nices():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            out[tid] = int(f.read().rsplit(")", 1)[1].split()[16])
    return out

assert os.getpriority(os.PRIO_PROCESS, 0) == STANDBY_NICE
done = threading.Event()
for _ in range(3):
    threading.Thread(target=done.wait, daemon=True).start()
torch.set_num_threads(3)
torch.ones(256, 256) @ torch.ones(256, 256)  # starts the intra-op pool at nice 10
waiting = nices()
restore_priority()
threading.Thread(target=done.wait, daemon=True).start()
torch.ones(256, 256) @ torch.ones(256, 256)
print(json.dumps({"waiting": waiting, "promoted": nices()}))
done.set()
"""


def test_every_thread_of_a_promoted_standby_runs_at_normal_priority() -> None:
    env = worker_env(OMP_NUM_THREADS="3")
    p = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    seen = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(seen["waiting"]) >= 5 and set(seen["waiting"].values()) == {10}
    assert len(seen["promoted"]) > len(seen["waiting"])  # a thread started after the go is checked too
    assert seen["promoted"] == dict.fromkeys(seen["promoted"], 0), seen["promoted"]
