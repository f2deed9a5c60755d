#!/usr/bin/env python3
"""Lost work: optimizer steps lost per SIGTERM, per OOM and per SIGKILL, against the save interval.

    python bench/lost_work.py                          # save every 5 and 20 steps, 3 trials each, seed 0
    python bench/lost_work.py --intervals 5,10,40 --trials 5 --seed 1

Each trial starts a real worker (tests' TINY model, no evaluation) and hits it at a
seeded random step:
  sigterm        SIGTERM when the heartbeat reaches step K (the worker commits that step and exits 3)
  oom-forward    torch.OutOfMemoryError in the K-th forward pass (tests/inject_worker.py)
  oom-optimizer  torch.OutOfMemoryError inside the K-th optimizer step, after the weights changed
  sigkill        SIGKILL when the heartbeat reaches step K
Steps lost = the highest step the worker completed − the step of the checkpoint a resume
would start from (worker.checkpoint.newest_good: the one ``--resume`` picks).
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c

FAULTS = ("sigterm", "oom-forward", "oom-optimizer", "sigkill")
EXPECTED = {
    "sigterm": "0",
    "oom-forward": "0 (emergency checkpoint)",
    "oom-optimizer": "<= interval",
    "sigkill": "<= interval (a kill mid-save loses the whole interval)",
}
INJECT = c.REPO / "tests" / "inject_worker.py"


def trial(work: Path, fault: str, interval: int, k: int, n: int) -> tuple[int, int, int]:
    """Run one trial; return (step hit, highest completed step, resume step)."""
    cfg = c.write_config(
        work / f"{fault}-{interval}-{n}.yaml",
        {
            "training": {
                "output_dir": f"{fault}-{interval}-{n}",
                "max_steps": 10 * interval + 50,
                "save_steps": interval,
                "eval_strategy": "no",
                "save_total_limit": 2,
            }
        },
    )
    out = c.output_dir(cfg)
    log = out.parent / f"{out.name}.log"
    if fault.startswith("oom"):
        rc = c.run_worker(cfg, log=log, argv=[c.PY, str(INJECT), f"{fault}:{k}", str(cfg)], timeout=300)
        if rc != 4:
            raise SystemExit(f"{fault} trial: expected exit 4 (oom), got {rc}; see {log}")
        hit = k
    else:
        p = c.spawn(c.worker_argv(cfg), log)
        try:
            hit = c.wait_for(
                lambda: (s := c.heartbeat(out).get("global_step") or 0) >= k and s,
                300,
                f"step {k}",
                progress=lambda: c.run_progress(out),
            )
            p.send_signal(signal.SIGTERM if fault == "sigterm" else signal.SIGKILL)
            rc = p.wait(120)
        finally:
            c.kill_group(p)
        want = 3 if fault == "sigterm" else -signal.SIGKILL
        if rc != want:
            raise SystemExit(f"{fault} trial: expected exit {want}, got {rc}; see {log}")
    reached = int(c.heartbeat(out).get("global_step") or 0)
    from worker import checkpoint as ckpt

    good = ckpt.newest_good(out)
    resume = ckpt.step_of(good) if good is not None else 0
    return hit, reached, int(resume or 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--intervals", default="5,20", help="save_steps values (default 5,20)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args(argv)
    c.banner("Lost work per fault against the save interval")
    rng = random.Random(a.seed)
    work = c.work_dir("lost-work", a.workdir)
    rows = []
    misses = []
    for interval in [int(x) for x in a.intervals.split(",")]:
        for fault in a.faults.split(","):
            hits, lost = [], []
            for n in range(a.trials):
                # Past the first checkpoint, anywhere in the next two intervals.
                k = rng.randint(interval + 1, 3 * interval)
                hit, reached, resume = trial(work, fault, interval, k, n)
                hits.append(hit)
                lost.append(reached - resume)
                c.say(f"{fault} every {interval}: hit at {hit}, completed {reached}, resume from {resume}")
            bound = 0 if fault in ("sigterm", "oom-forward") else interval
            if max(lost) > bound:
                misses.append(f"{fault} with save_steps {interval} lost {max(lost)} steps (bound {bound})")
            rows.append(
                [
                    fault,
                    interval,
                    a.trials,
                    ", ".join(map(str, hits)),
                    ", ".join(map(str, lost)),
                    sum(lost) / len(lost),
                    max(lost),
                    EXPECTED[fault],
                ]
            )
    print(
        c.table(
            ["fault", "save interval", "trials", "hit at step", "steps lost", "mean lost", "max lost", "expected"], rows
        )
    )
    print(f"\nseed {a.seed}; tests' TINY model, no evaluation; work dir {work}")
    for m in misses:
        print("MISS:", m)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
