#!/usr/bin/env python3
"""Data at scale: start -> first step for image folders and ``datasets`` of 1k .. 200k images,
resume -> first new step early and late in an epoch, DataLoader throughput with 2 workers.

    python bench/data_scale.py                                  # 1k,10k,50k,200k; about 15 min on 2 cores
    python bench/data_scale.py --sizes 1k,10k --rounds 1
    python bench/data_scale.py --quick                          # smoke: 200 and 1k images, one round
    python bench/data_scale.py --workdir /data/bench-scale      # keep (and reuse) the generated data

Data (generated once into ``<workdir>/data``, reused when present): per size N, an image folder
of N 32 px RGB PNGs in 10 class folders (one encoded PNG per class, hard-linked N/10 times:
listing and stat cost what they cost for distinct files; decoding is the same work), and a
``save_to_disk`` dataset of the same N images (bytes inline, ClassLabel). The model is the
tests' TINY ViT (8 px grey), so data handling, not compute, dominates a step.

Part 0, preparation: ``worker.data.build`` timed inside one fresh process per source and size,
cold (empty run folder) then warm (the cache it just wrote): what grows with the data set,
without the 5+ s of imports that every start pays and that the machine's load makes noisy.

Part 1, start -> first step (spawn of ``python -m worker`` to the heartbeat of the first step
of that process), per source and size, the four cases taking turns round by round:
  fresh, cold    a new run folder: the listing is made (image_folder: walk + stat;
                 hf imagefolder: the ``datasets`` builder)
  fresh, warm    a new run folder holding a copy of the previous run's ``run/data-cache``
  resume, warm   ``--resume`` of the same run folder (a supervisor restart, a standby)
  resume, cold   ``--resume`` after deleting ``run/data-cache``
Sources: ``image_folder`` (our listing), ``hf_saved`` (``hf_dataset`` over ``save_to_disk``),
``hf_imagefolder`` (``hf_dataset`` over the folder through the imagefolder builder).
Goal (issue 13): warm start -> first step at the largest size within 1.2x of the smallest.

Part 2, resume position: a 10k folder (quick: 1k), batch 256, a checkpoint every step; resume
(``--checkpoint``) from 10 % and from 90 % of the first epoch -> first new step, rounds
interleaved. Position-independent means ratio ~1.0 (skipping is by index: no sample decoded).

Part 3, throughput: optimizer steps per second (median step gap of 30 steps, batch 64) on the
10k folder with ``dataloader_num_workers`` 0 and 2, and the same with ``data.augment: standard``
when this build knows that key (the row is skipped otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c

SOURCES = ("image_folder", "hf_saved", "hf_imagefolder")
CASES = ("fresh, cold", "fresh, warm", "resume, warm", "resume, cold")
GOAL = 1.2


def parse_size(s: str) -> int:
    s = s.strip().lower()
    return int(float(s[:-1]) * 1000) if s.endswith("k") else int(s)


def label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


# ----------------------------------------------------------------------------- data


def class_pngs() -> list[bytes]:
    import numpy as np
    from PIL import Image

    out = []
    for k in range(10):
        rs = np.random.RandomState(k)
        arr = (rs.rand(32, 32, 3) * 255).astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def make_folder(root: Path, n: int) -> Path:
    """``n`` PNGs in 10 class folders (hard links of one file per class); reused when complete."""
    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    pngs = class_pngs()
    for k in range(10):
        d = root / f"class_{k}"
        d.mkdir(parents=True)
        first = d / "0.png"
        first.write_bytes(pngs[k])
        for i in range(1, n // 10):
            os.link(first, d / f"{i}.png")
    # Old enough that the listing may be cached (worker/listing.py refuses racy, fresh folders).
    then = time.time() - 60
    for here, _, _ in os.walk(root):
        os.utime(here, (then, then))
    done.write_text(str(n))
    return root


def make_saved(root: Path, n: int) -> Path:
    """The same images as a save_to_disk dataset (bytes inline)."""
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    import datasets

    datasets.disable_progress_bars()
    pngs = class_pngs()
    labels = [i * 10 // n for i in range(n)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": pngs[y], "path": None} for y in labels], "label": labels}, features=feats
    )
    ds.save_to_disk(str(root))
    (root / ".complete").write_text(str(n))
    return root


def data_for(work: Path, source: str, n: int) -> tuple[Path, dict[str, Any]]:
    base = work / "data"
    if source == "hf_saved":
        return make_saved(base / f"saved-{label(n)}", n), {"source": "hf_dataset", "hf_format": "save_to_disk"}
    folder = make_folder(base / f"folder-{label(n)}", n)
    if source == "image_folder":
        return folder, {"source": "image_folder"}
    return folder, {"source": "hf_dataset", "hf_format": "imagefolder"}


# ----------------------------------------------------------------------------- runs


def config(work: Path, name: str, data: dict[str, Any], training: dict[str, Any]) -> Path:
    over = {
        "data": {"limit": None, "train_test_split": 0.2, **data},
        "training": {
            "output_dir": name,
            "eval_strategy": "no",
            "logging_steps": 1000,
            "save_total_limit": None,
            **training,
        },
    }
    return c.write_config(work / f"{name}.yaml", over)


def first_step(cfg: Path, args: list[str], log: Path, above: int = 0, stop_after: bool = True) -> float:
    """Seconds from spawn to the first heartbeat step above ``above`` of the new process; the
    process is then killed (``stop_after``) or waited for."""
    out = c.output_dir(cfg)
    watch = c.StepWatch(out, interval=0.002).start()
    t0 = time.time()
    p = c.spawn(c.worker_argv(cfg, *args), log)
    try:
        hit = c.wait_for(
            lambda: (
                next((t for t, _, pid, s in list(watch.records) if pid == p.pid and s > above), None)
                or (p.poll() is not None and -1)
            ),
            600,
            f"a step above {above}",
            progress=lambda: c.run_progress(out),
        )
        if hit == -1:
            raise SystemExit(f"worker exited {p.returncode} before a step above {above}; see {log}")
        if not stop_after:
            p.wait(600)
    finally:
        watch.stop()
        c.kill_group(p, signal.SIGKILL)
    return float(hit) - t0


def drop_cache(out: Path) -> None:
    shutil.rmtree(out / "run" / "data-cache", ignore_errors=True)


def start_cases(work: Path, source: str, n: int, rnd: int) -> dict[str, float]:
    """One round of the four start cases for (source, n)."""
    path, data = data_for(work, source, n)
    name = f"start-{source}-{label(n)}-r{rnd}"
    train = {"max_steps": 2, "save_steps": 1, "per_device_train_batch_size": 16}
    cfg = config(work, name, {**data, "path": str(path)}, train)
    out = c.output_dir(cfg)
    log = work / f"{name}.log"
    got: dict[str, float] = {}
    got["fresh, cold"] = first_step(cfg, [], log, stop_after=False)
    warm_name = f"{name}-warm"
    warm_cfg = config(work, warm_name, {**data, "path": str(path)}, train)
    warm_out = c.output_dir(warm_cfg)
    shutil.rmtree(warm_out, ignore_errors=True)
    (warm_out / "run").mkdir(parents=True)
    if (out / "run" / "data-cache").is_dir():
        shutil.copytree(out / "run" / "data-cache", warm_out / "run" / "data-cache")
    got["fresh, warm"] = first_step(warm_cfg, [], log)
    cfg = config(work, name, {**data, "path": str(path)}, {**train, "max_steps": 4})
    got["resume, warm"] = first_step(cfg, ["--resume"], log, above=2, stop_after=False)
    drop_cache(out)
    cfg = config(work, name, {**data, "path": str(path)}, {**train, "max_steps": 6})
    got["resume, cold"] = first_step(cfg, ["--resume"], log, above=4)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(warm_out, ignore_errors=True)
    return got


def part1(work: Path, sizes: list[int], sources: list[str], rounds: int) -> tuple[list[list[Any]], list[str]]:
    results: dict[tuple[str, int, str], list[float]] = {}
    for rnd in range(rounds):
        for n in sizes:
            for source in sources:
                c.say(f"round {rnd + 1}/{rounds}: {source} {label(n)}")
                for case, s in start_cases(work, source, n, rnd).items():
                    results.setdefault((source, n, case), []).append(s)
    rows, misses = [], []
    for source in sources:
        for n in sizes:
            rows.append([source, label(n), *(c.median(results[(source, n, k)]) for k in CASES)])
        for case in ("fresh, warm", "resume, warm"):
            lo = c.median(results[(source, sizes[0], case)])
            hi = c.median(results[(source, sizes[-1], case)])
            if lo and hi and len(sizes) > 1:
                ratio = hi / lo
                rows.append([source, f"{label(sizes[-1])}/{label(sizes[0])} {case}", ratio, "", "", ""])
                if ratio > GOAL:
                    misses.append(
                        f"{source} {case}: {label(sizes[-1])} is {ratio:.2f}x {label(sizes[0])} (goal {GOAL}x)"
                    )
    return rows, misses


# ----------------------------------------------------------------------------- prepare only

PREPARE = """
import json, sys, time
from supervisor.schema import load_config
from worker import data
cfg = load_config(sys.argv[1])
out = []
for _ in range(2):
    t = time.perf_counter()
    s = data.build(cfg)
    out.append(time.perf_counter() - t)
print(json.dumps({"cold": out[0], "warm": out[1], "n": len(s.train) + len(s.eval), "fp": s.fingerprint}))
"""


def prepare_times(work: Path, source: str, n: int, rnd: int) -> dict[str, float]:
    """data.build in a fresh process: cold (empty run folder), then warm (the cache just written)."""
    import json
    import subprocess

    path, data = data_for(work, source, n)
    name = f"prep-{source}-{label(n)}-r{rnd}"
    cfg = config(work, name, {**data, "path": str(path)}, {"max_steps": 1})
    shutil.rmtree(c.output_dir(cfg), ignore_errors=True)
    r = subprocess.run(
        [c.PY, "-c", PREPARE, str(cfg)], capture_output=True, text=True, cwd=c.REPO, env=c.env(), timeout=1800
    )
    if r.returncode != 0:
        raise SystemExit(f"prepare {source} {label(n)} failed: {r.stderr[-2000:]}")
    got = json.loads(r.stdout.strip().splitlines()[-1])
    if got["n"] != n - n % 10:
        raise SystemExit(f"prepare {source} {label(n)}: {got['n']} images, expected {n}")
    shutil.rmtree(c.output_dir(cfg), ignore_errors=True)
    return {"cold": got["cold"], "warm": got["warm"]}


def part0(work: Path, sizes: list[int], sources: list[str], rounds: int) -> list[list[Any]]:
    got: dict[tuple[str, int, str], list[float]] = {}
    for rnd in range(rounds):
        for n in sizes if rnd % 2 == 0 else sizes[::-1]:
            for source in sources:
                c.say(f"round {rnd + 1}/{rounds}: prepare {source} {label(n)}")
                for k, v in prepare_times(work, source, n, rnd).items():
                    got.setdefault((source, n, k), []).append(v)
                    c.say(f"  {source} {label(n)} {k}: {v:.3f} s (load {os.getloadavg()[0]:.1f})")
    rows = []
    for source in sources:
        for n in sizes:
            cold, warm = c.median(got[(source, n, "cold")]), c.median(got[(source, n, "warm")])
            per = 1e6 * cold / n if cold else None
            rows.append([source, label(n), cold, per, warm, 1e6 * warm / n if warm else None])
    return rows


# ----------------------------------------------------------------------------- resume position


def part2(work: Path, n: int, rounds: int) -> list[list[Any]]:
    path, data = data_for(work, "image_folder", n)
    batch = 256 if n >= 5000 else 32
    steps = -(-int(n * 0.8) // batch)
    early, late = max(1, round(0.1 * steps)), min(steps - 1, round(0.9 * steps))
    name = f"position-{label(n)}"
    train = {"max_steps": steps, "save_steps": 1, "per_device_train_batch_size": batch}
    cfg = config(work, name, {**data, "path": str(path)}, {**train, "max_steps": late})
    out = c.output_dir(cfg)
    shutil.rmtree(out, ignore_errors=True)
    log = work / f"{name}.log"
    c.say(f"training to step {late} of {steps} ({label(n)} images, batch {batch})")
    if c.run_worker(cfg, log=log, timeout=600) != 0:
        raise SystemExit(f"position run failed; see {log}")
    cfg = config(work, name, {**data, "path": str(path)}, train)
    times: dict[int, list[float]] = {early: [], late: []}
    for rnd in range(rounds):
        for at in (early, late) if rnd % 2 == 0 else (late, early):
            c.say(f"round {rnd + 1}/{rounds}: resume from step {at}")
            times[at].append(first_step(cfg, ["--checkpoint", str(out / f"checkpoint-{at}")], log, above=at))
    a, b = c.median(times[early]), c.median(times[late])
    return [
        [label(n), f"10 % (step {early}/{steps})", a],
        [label(n), f"90 % (step {late}/{steps})", b],
        [label(n), "ratio 90 % / 10 %", (b / a) if a and b else None],
    ]


# ----------------------------------------------------------------------------- throughput


def knows_augment() -> bool:
    from supervisor.schema import DataConfig

    return "augment" in {f.name for f in dataclasses.fields(DataConfig)}


def steps_per_s(work: Path, n: int, workers: int, augment: str | None, steps: int, rnd: int) -> float | None:
    path, data = data_for(work, "image_folder", n)
    extra = {"augment": augment} if augment else {}
    name = f"tput-{workers}-{augment or 'none'}-r{rnd}"
    cfg = config(
        work,
        name,
        {**data, "path": str(path), **extra},
        {
            "max_steps": steps,
            "save_steps": 10_000,
            "per_device_train_batch_size": 64,
            "dataloader_num_workers": workers,
        },
    )
    out = c.output_dir(cfg)
    shutil.rmtree(out, ignore_errors=True)
    watch = c.StepWatch(out, interval=0.002).start()
    try:
        rc = c.run_worker(cfg, log=work / f"{name}.log", timeout=600)
    finally:
        watch.stop()
    if rc != 0:
        raise SystemExit(f"throughput run failed; see {work / f'{name}.log'}")
    at = {s: t for t, _, _, s in watch.records}
    gaps = [at[s + 1] - at[s] for s in at if s + 1 in at and s >= 3]
    med = c.median(gaps)
    shutil.rmtree(out, ignore_errors=True)
    return 1 / med if med else None


def part3(work: Path, n: int, rounds: int, steps: int) -> list[list[Any]]:
    variants: list[tuple[int, str | None]] = [(0, None), (2, None)]
    if knows_augment():
        variants += [(0, "standard"), (2, "standard")]
    got: dict[tuple[int, str | None], list[float]] = {}
    for rnd in range(rounds):
        for workers, aug in variants if rnd % 2 == 0 else variants[::-1]:
            c.say(f"round {rnd + 1}/{rounds}: throughput, {workers} workers, augment {aug or 'none'}")
            v = steps_per_s(work, n, workers, aug, steps, rnd)
            if v is not None:
                got.setdefault((workers, aug), []).append(v)
    rows = [[label(n), w, a or "none", c.median(got.get((w, a), []))] for w, a in variants]
    if not knows_augment():
        rows.append([label(n), "-", "standard", "skipped: data.augment is not in this build"])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="1k,10k,50k,200k", help="image counts, smallest first (e.g. 1k,10k)")
    ap.add_argument("--sources", default=",".join(SOURCES), help=f"any of {', '.join(SOURCES)}")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of every measurement, taking turns")
    ap.add_argument("--quick", action="store_true", help="smoke run: 200 and 1k images, one round")
    ap.add_argument("--skip", default="", help="parts to skip: prepare,start,position,throughput")
    ap.add_argument("--workdir", type=Path, help="scratch folder (generated data is reused from it)")
    args = ap.parse_args(argv)
    sizes = sorted(parse_size(s) for s in ("200,1k" if args.quick else args.sizes).split(","))
    sources = [s for s in args.sources.split(",") if s]
    bad = [s for s in sources if s not in SOURCES]
    if bad:
        ap.error(f"unknown source {bad[0]}: choose from {', '.join(SOURCES)}")
    rounds = 1 if args.quick else args.rounds
    skip = set(args.skip.split(",")) - {""}
    work = c.work_dir("data-scale", args.workdir)
    c.banner("Data at scale: start -> first step, resume position, throughput")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    misses: list[str] = []
    if "prepare" not in skip:
        print("## Data preparation in a fresh process (data.build: list, fingerprint, split), s\n")
        rows = part0(work, sizes, sources, rounds)
        print(c.table(["source", "images", "cold", "µs/image", "warm", "µs/image warm"], rows) + "\n")
    if "start" not in skip:
        rows, misses = part1(work, sizes, sources, rounds)
        print("## Start -> first step (s, median of rounds)\n")
        print(c.table(["source", "images", *CASES], rows) + "\n")
    if "position" not in skip:
        n = 1000 if args.quick else 10_000
        print("## Resume -> first new step by position in the epoch (s)\n")
        print(c.table(["images", "resumed at", "seconds"], part2(work, n, rounds)) + "\n")
    if "throughput" not in skip:
        n = 1000 if args.quick else 10_000
        print("## Throughput (optimizer steps/s, batch 64)\n")
        rows = part3(work, n, rounds, 12 if args.quick else 30)
        print(c.table(["images", "dataloader workers", "augment", "steps/s"], rows) + "\n")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"workdir: {work}")
    for m in misses:
        print(f"MISS: {m}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
