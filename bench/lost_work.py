#!/usr/bin/env python3
"""Lost work: optimizer steps lost per fault kind, snapshots off and on side by side, against the save interval.

    python bench/lost_work.py                          # save every 5 and 20 steps, 3 trials each, seed 0
    python bench/lost_work.py --intervals 5,10,40 --trials 5 --seed 1 --faults sigkill,segv
    python bench/lost_work.py --faults sigkill --every 1   # snapshots every step instead of the default auto

Each trial starts a real worker (tests' TINY model, no evaluation) and hits it at a seeded
random step K; the same K is used twice in a row, with ``snapshot.every_steps: 0`` (off) and
``--every`` (on: ``auto`` by default, the product's default; ``1`` for a snapshot every step),
so the two columns differ only by the snapshots:
  sigterm        SIGTERM when the heartbeat reaches step K (the worker commits that step and exits 3)
  oom-forward    torch.OutOfMemoryError in the K-th forward pass (tests/inject_worker.py)
  oom-optimizer  torch.OutOfMemoryError inside the K-th optimizer step, after the weights changed
  sigkill        SIGKILL when the heartbeat reaches step K
  segv           a real SIGSEGV of the worker in the K-th forward pass
  device-error   CUDA's illegal-memory-access RuntimeError in the K-th forward (the worker saves
                 nothing from the device and exits 7)
  kill-in-save   SIGKILL in the middle of a checkpoint commit (the 2nd or 3rd save: K is its step);
                 with snapshots on, the step being saved was snapshotted before its save began,
                 whatever the interval
Steps lost = the highest step the worker completed (its heartbeat) − the step a ``--resume``
would start from: the newest good disk checkpoint (``worker.checkpoint.newest_good``) or, when
newer, the newest snapshot that validates (header, CRC, step; ``worker.snapshot``).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c

FAULTS = ("sigterm", "oom-forward", "oom-optimizer", "sigkill", "segv", "device-error", "kill-in-save")
INJECTED = {"oom-forward": 4, "oom-optimizer": 4, "segv": -signal.SIGSEGV, "device-error": 7, "kill-in-save": -9}
SIGNALLED = {"sigterm": (signal.SIGTERM, 3), "sigkill": (signal.SIGKILL, -signal.SIGKILL)}
EXPECTED_OFF = {
    "sigterm": "0",
    "oom-forward": "0 (emergency checkpoint)",
    "kill-in-save": "= interval (the save is lost)",
}
EXPECTED_ON = {"sigterm": "0", "oom-forward": "0", "kill-in-save": "0 (snapshot before the save)"}
INJECT = c.REPO / "tests" / "inject_worker.py"


def every_steps(v: str) -> int | str:
    if v == "auto":
        return v
    if not v.isdigit() or int(v) < 1:
        raise argparse.ArgumentTypeError(f"--every takes auto or a number of steps >= 1, not {v!r}")
    return int(v)


def bound(fault: str, interval: int, snapshots: bool) -> int:
    """The most steps a fault may lose: 0 where the worker saves (or, with snapshots, where the
    step being saved was snapshotted first), else one step with a snapshot every step, else the save interval."""
    if fault in ("sigterm", "oom-forward") or (fault == "kill-in-save" and snapshots):
        return 0
    return 1 if snapshots else interval


def resume_step(out: Path, shm: Path | None) -> int:
    """The step ``--resume`` would start from: the newest good checkpoint or a newer valid snapshot.

    The snapshot is read with the identity its own header records (the bench does not change the
    config between the fault and this look, so the worker's identity check would agree).
    """
    from supervisor import protocol
    from worker import checkpoint as ckpt
    from worker import snapshot

    good = ckpt.newest_good(out)
    step = (ckpt.step_of(good) or 0) if good is not None else 0
    if shm is None:
        return step
    for header in shm.glob(f"vit-supervisor-*/*/{snapshot.HEADER}"):
        raw = protocol.read_json(header) or {}
        snap = snapshot.SnapshotStore(header.parent, raw.get("identity") or {}).read_newest()
        if snap is not None:
            step = max(step, snap.step)
    return step


def trial(
    work: Path, fault: str, interval: int, k: int, n: int, shm: Path | None, every: str = "auto"
) -> tuple[int, int, int]:
    """Run one trial (snapshots on when ``shm`` is given); return (step hit, highest completed step, resume step)."""
    name = f"{fault}-{interval}-{n}-{'on' if shm else 'off'}"
    cfg = c.write_config(
        work / f"{name}.yaml",
        {
            "training": {
                "output_dir": name,
                "max_steps": 10 * interval + 50,
                "save_steps": interval,
                "eval_strategy": "no",
                "save_total_limit": 2,
            },
            "snapshot": {"every_steps": every, "root": str(shm)} if shm else {"every_steps": 0},
        },
    )
    out = c.output_dir(cfg)
    log = out.parent / f"{out.name}.log"
    if fault in INJECTED:
        # kill-in-save counts saves: the save of step k is save number k / interval.
        at = k // interval if fault == "kill-in-save" else k
        rc = c.run_worker(cfg, log=log, argv=[c.PY, str(INJECT), f"{fault}:{at}", str(cfg)], timeout=300)
        if rc != INJECTED[fault]:
            raise SystemExit(f"{fault} trial: expected exit {INJECTED[fault]}, got {rc}; see {log}")
        hit = k
    else:
        sig, want = SIGNALLED[fault]
        p = c.spawn(c.worker_argv(cfg), log)
        try:
            hit = c.wait_for(
                lambda: (s := c.heartbeat(out).get("global_step") or 0) >= k and s,
                300,
                f"step {k}",
                progress=lambda: c.run_progress(out),
            )
            p.send_signal(sig)
            rc = p.wait(120)
        finally:
            c.kill_group(p)
        if rc != want:
            raise SystemExit(f"{fault} trial: expected exit {want}, got {rc}; see {log}")
    reached = int(c.heartbeat(out).get("global_step") or 0)
    resume = resume_step(out, shm)
    if shm is not None:
        shutil.rmtree(shm, ignore_errors=True)  # each trial's store is its own; nothing else reads it
    return hit, reached, resume


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--intervals", default="5,20", help="save_steps values (default 5,20)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"default: {','.join(FAULTS)}")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument(
        "--every", type=every_steps, default="auto", help="snapshot.every_steps with snapshots on (default auto)"
    )
    a = ap.parse_args(argv)
    unknown = sorted(set(a.faults.split(",")) - set(FAULTS))
    if unknown:
        ap.error(f"unknown fault(s) {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    c.banner("Lost work per fault, snapshots off and on, against the save interval")
    rng = random.Random(a.seed)
    work = c.work_dir("lost-work", a.workdir)
    # The snapshots live where they would in production: on a tmpfs.
    shm_base = Path(tempfile.mkdtemp(prefix="vit-lost-work-", dir="/dev/shm" if Path("/dev/shm").is_dir() else work))
    rows, misses = [], []
    try:
        for interval in [int(x) for x in a.intervals.split(",")]:
            for fault in a.faults.split(","):
                hits: list[int] = []
                lost: dict[bool, list[int]] = {False: [], True: []}
                for n in range(a.trials):
                    # Past the first checkpoint, anywhere in the next two intervals (a save: the 2nd or 3rd).
                    k = (
                        rng.randint(2, 3) * interval
                        if fault == "kill-in-save"
                        else rng.randint(interval + 1, 3 * interval)
                    )
                    hits.append(k)
                    for snapshots in (False, True):  # paired: the same fault at the same step
                        hit, reached, resume = trial(
                            work, fault, interval, k, n, shm_base / "s" if snapshots else None, a.every
                        )
                        lost[snapshots].append(reached - resume)
                        c.say(
                            f"{fault} every {interval}, snapshots {'on' if snapshots else 'off'}: hit at {hit}, "
                            f"completed {reached}, resume from {resume}"
                        )
                for snapshots in (False, True):
                    b = bound(fault, interval, snapshots)
                    if max(lost[snapshots]) > b:
                        misses.append(
                            f"{fault} with save_steps {interval}, snapshots {'on' if snapshots else 'off'}: "
                            f"lost {max(lost[snapshots])} steps (bound {b})"
                        )
                mean = {s: sum(v) / len(v) for s, v in lost.items()}
                rows.append(
                    [
                        fault,
                        interval,
                        a.trials,
                        ", ".join(map(str, hits)),
                        ", ".join(map(str, lost[False])),
                        ", ".join(map(str, lost[True])),
                        mean[False],
                        mean[True],
                        max(lost[True]),
                        EXPECTED_OFF.get(fault, "<= interval"),
                        EXPECTED_ON.get(fault, "<= 1"),
                    ]
                )
    finally:
        shutil.rmtree(shm_base, ignore_errors=True)
    print(
        c.table(
            [
                "fault",
                "save interval",
                "trials",
                "hit at step",
                "lost, snapshots off",
                "lost, snapshots on",
                "mean off",
                "mean on",
                "max on",
                "expected off",
                "expected on",
            ],
            rows,
        )
    )
    print(
        f"\nseed {a.seed}; tests' TINY model, no evaluation; snapshots on = every_steps {a.every}; "
        f"load average at the end {'/'.join(f'{x:.1f}' for x in os.getloadavg())}; work dir {work}"
    )
    for m in misses:
        print("MISS:", m)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
