#!/usr/bin/env python3
"""Real GPU check (issue 7): CUDA out-of-memory, batch lowering and exact resume on an actual GPU.

    python bench/gpu_check.py                 # under 8 minutes on one H100-class GPU
    python bench/gpu_check.py --keep DIR      # keep the run folders (default: a temp dir, kept on a miss)
    python bench/gpu_check.py --dry-run-cpu   # no GPU: the same plumbing with a small model and a CPU OOM

Self-contained: writes its configs into a scratch folder; the data is scikit-learn's digits
(shipped with the package) upsampled by the worker to 224 px, 3 channels; the model is a
from-scratch ViT-base (224 px, patch 16, 12 layers, 768 wide; no hub). Exit codes: 0 every
check passed, 1 a check missed, 77 no CUDA GPU here (one line on stdout, nothing else run).

1. OOM: ``vit-supervisor start`` with a per-device batch derived from the GPU's memory so that
   it really runs out of memory (ViT-B/16 training needs about 0.2 GB a sample in fp32, about
   half in bf16; the batch is the power of two at least twice the card's memory ÷ that; the
   digits cap a batch at 1,617 samples, so on a card too big for that in bf16 the phase runs
   in fp32), ``oom_batch_factor`` 0.125, ``min_per_device_batch`` 8, 3 optimizer steps.
   Checks in ``run/state.json`` and the exit reports: an attempt ended in a CUDA OOM, the batch
   was lowered, per-device batch × accumulation never changed, the run completed.
2. Exact resume: ``full_determinism``, no TF32, no bf16, batch 32, 40 steps, a checkpoint
   every 10: an uninterrupted ``vit-train`` reference, then the same config under
   ``vit-supervisor start`` with a SIGKILL to the worker mid-run; final weights compared
   (pass at 0.0; otherwise the max abs difference must be within ``--tolerance`` and is stated).
3. Figures: GPU memory peak per batch size (exit reports' ``gpu_mem_peak_bytes``), save time
   and size of a ViT-base checkpoint (``save_seconds``, ``checkpoint_bytes``), time from the
   worker's death to its first new optimizer step, the supervisor's reaction to the OOM (exit
   report written → next attempt launched, from ``state.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import itertools

import common as c

from supervisor import protocol

NO_GPU_EXIT = 77
GB = 1e9
FP32_BYTES_PER_SAMPLE = 0.2 * GB  # ViT-B/16, 224 px, AdamW training, fp32 activations
BF16_BYTES_PER_SAMPLE = 0.1 * GB  # about half with bf16 autocast
DIGITS = 1797
TEST_SPLIT = 0.1
OOM_FACTOR = 0.125
MIN_BATCH = 8
OOM_STEPS = 3
EXACT_BATCH = 32
EXACT_STEPS = 40
EXACT_SAVE_STEPS = 10
KILL_STEP = 25  # after checkpoint-20, before the end

PROBE = """
import json, torch
d = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "available": torch.cuda.is_available()}
if d["available"]:
    p = torch.cuda.get_device_properties(0)
    d.update(name=p.name, total_memory=p.total_memory, count=torch.cuda.device_count())
print(json.dumps(d))
"""


# ----------------------------------------------------------------------------- pure logic (unit-tested)


def no_gpu_line(probe: dict[str, Any]) -> str:
    """The one line printed where there is no CUDA GPU."""
    if probe.get("error"):
        return f"no CUDA GPU here: could not ask torch ({probe['error']})"
    build = probe.get("cuda_build") or "none (CPU-only build)"
    return (
        f"no CUDA GPU here: torch {probe.get('torch')} reports torch.cuda.is_available() False "
        f"(CUDA build: {build}); this check needs one"
    )


def next_pow2(x: float) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 if x <= 1 else 2 ** math.ceil(math.log2(x))


def digits_train_size(test_split: float = TEST_SPLIT, n: int = DIGITS) -> int:
    """Training examples of the digits after the worker's split (worker/data.py split_indices)."""
    return n - max(1, round(n * test_split))


@dataclass(frozen=True)
class OomPlan:
    batch: int
    """per_device_train_batch_size of the first attempt (accumulation 1: also the effective batch)."""
    bf16: bool
    expected_bytes: float
    """Estimated need of the first attempt's real batch (capped by the data set)."""
    lowered: int
    """The per-device batch the supervisor should pick after the first OOM."""
    note: str = ""


def plan_oom_phase(
    total_memory: int,
    n_train: int,
    *,
    margin: float = 2.0,
    need: float = 1.5,
    force_batch: int | None = None,
    force_bf16: bool | None = None,
) -> OomPlan:
    """Choose the first attempt's batch (and precision) so that it surely runs out of memory.

    The batch is the power of two at least ``margin`` × memory ÷ bytes per sample; a batch
    larger than the data set only holds ``n_train`` samples, so bf16 is used where
    ``min(batch, n_train)`` samples still need ``need`` × the memory, else fp32.
    """
    options = [True, False] if force_bf16 is None else [force_bf16]
    plan = None
    for bf16 in options:
        per = BF16_BYTES_PER_SAMPLE if bf16 else FP32_BYTES_PER_SAMPLE
        batch = force_batch or next_pow2(margin * total_memory / per)
        expected = min(batch, n_train) * per
        lowered = max(MIN_BATCH, math.floor(batch * OOM_FACTOR))
        plan = OomPlan(batch, bf16, expected, lowered)
        if expected >= need * total_memory:
            return plan
    assert plan is not None
    return OomPlan(
        plan.batch,
        plan.bf16,
        plan.expected_bytes,
        plan.lowered,
        note=f"the data set caps a batch at {n_train} samples (about {plan.expected_bytes / GB:.0f} GB), "
        f"less than {need:g} x this card's {total_memory / GB:.0f} GB: it may not run out of memory",
    )


def attempt_reports(run_dir: Path) -> dict[int, dict[str, Any]]:
    """{attempt: exit report} from the supervisor's ``run/exit-K.json`` files."""
    out = {}
    for p in run_dir.glob("exit-*.json"):
        tail = p.stem.split("-", 1)[1]
        rep = protocol.read_json(p)
        if tail.isdigit() and rep is not None:
            out[int(tail)] = rep
    return out


def check_oom_phase(
    state: dict[str, Any],
    reports: dict[int, dict[str, Any]],
    first_batch: int,
    oom_types: tuple[str, ...] = ("OutOfMemoryError",),
) -> list[str]:
    """Misses of phase 1, from ``state.json`` and the attempts' exit reports (empty: all good)."""
    misses = []
    attempts = state.get("attempts") or []
    if state.get("state") != "completed":
        misses.append(
            f"the supervised run ended in state {state.get('state')!r}, not 'completed' "
            f"(last error: {state.get('last_error')})"
        )
    if not attempts:
        return [*misses, "state.json lists no attempts"]
    effective = state.get("effective_batch") or first_batch
    products = {
        (a.get("per_device_train_batch_size") or 0) * (a.get("gradient_accumulation_steps") or 0) for a in attempts
    }
    if products != {effective}:
        misses.append(
            f"per-device batch x accumulation changed across attempts: {sorted(products)} (configured {effective})"
        )
    ooms = [a for a in attempts if a.get("reason") == "oom"]
    if not ooms:
        misses.append(
            f"no attempt ran out of memory at per-device batch {first_batch} "
            "(raise --oom-batch, or use --oom-precision fp32)"
        )
    for a in ooms:
        rep = reports.get(a["attempt"]) or {}
        if rep.get("exception_type") not in oom_types:
            misses.append(
                f"attempt {a['attempt']} reported reason oom with exception {rep.get('exception_type')!r}, "
                f"not {' or '.join(oom_types)}"
            )
    batches = [a.get("per_device_train_batch_size") or 0 for a in attempts]
    if ooms and not min(batches) < first_batch:
        misses.append(f"the per-device batch was never lowered below {first_batch}: {batches}")
    if any(b > a for a, b in itertools.pairwise(batches)):
        misses.append(f"the per-device batch went up between attempts: {batches}")
    last = attempts[-1]
    if last.get("reason") != "completed":
        misses.append(f"the last attempt ended with {last.get('reason')!r}, not 'completed'")
    return misses


def oom_reactions(state: dict[str, Any], reports: dict[int, dict[str, Any]]) -> list[float]:
    """Seconds from each OOM exit report's write to the launch of the next attempt."""
    attempts = state.get("attempts") or []
    out = []
    for a, nxt in itertools.pairwise(attempts):
        rep = reports.get(a.get("attempt"))
        if a.get("reason") == "oom" and rep and rep.get("time") and nxt.get("start"):
            out.append(float(nxt["start"]) - float(rep["time"]))
    return out


def memory_rows(labelled: list[tuple[str, dict[str, Any]]]) -> list[list[Any]]:
    """Table rows (run, per-device batch, accumulation, precision, outcome, peak GiB) from exit reports."""
    rows = []
    for label, rep in labelled:
        peak = rep.get("gpu_mem_peak_bytes")
        rows.append(
            [
                label,
                rep.get("per_device_train_batch_size"),
                rep.get("gradient_accumulation_steps"),
                rep.get("reason"),
                peak / 2**30 if isinstance(peak, (int, float)) else None,
            ]
        )
    return rows


# ----------------------------------------------------------------------------- the check


def probe_gpu() -> dict[str, Any]:
    """Ask torch in a child process, so this one never holds a CUDA context."""
    try:
        r = subprocess.run([c.PY, "-c", PROBE], capture_output=True, text=True, timeout=120, cwd=c.REPO)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1][:200]}


# --dry-run-cpu: the same plumbing on a CPU with a small model and a real allocator OOM
# (VIT_MEMORY_HEADROOM_MB caps each worker's address space), to test this script without a GPU.
DRY_ARCH = {
    "image_size": 32,
    "patch_size": 2,
    "num_channels": 1,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
DRY_HEADROOM_MB = "400"
DRY_OOM_BATCH = 1024


def vit_base_config(
    output_dir: str,
    training: dict[str, Any],
    supervisor: dict[str, Any] | None = None,
    arch: dict[str, int] | None = None,
) -> dict[str, Any]:
    return {
        "model": {"model_name": "scratch", "num_labels": 10, "scratch": dict(arch or c.VIT_BASE)},
        "data": {"source": "digits", "train_test_split": TEST_SPLIT, "random_seed": 7, "limit": None},
        "training": {
            "output_dir": output_dir,
            "learning_rate": 1e-4,
            "warmup_ratio": 0.0,
            "logging_steps": 1,
            "eval_strategy": "no",
            "save_strategy": "steps",
            "save_total_limit": 3,
            "per_device_eval_batch_size": 64,
            "seed": 3,
            "dataloader_num_workers": 0,
            "gradient_accumulation_steps": 1,
            **training,
        },
        "tracking": {"backend": "none"},
        "disk": {"reserve_mb": 1024, "recheck_s": 1.0},
        "supervisor": {
            "backoff_initial_s": 0.0,
            "heartbeat_interval_s": 0.0,
            "term_grace_s": 60,
            "hang_timeout_s": 300,
            "startup_timeout_s": 300,
            **(supervisor or {}),
        },
    }


def write(path: Path, cfg: dict[str, Any]) -> Path:
    return c.write_config(path, cfg, base={})


def supervise(cfg: Path, log: Path, environ: dict[str, str], timeout: float) -> int:
    p = c.spawn(c.supervisor_argv(cfg), log, environ)
    try:
        return c.wait_exit(p, timeout, c.output_dir(cfg))
    except TimeoutError:
        c.kill_group(p, signal.SIGTERM, wait=60)
        c.kill_group(p)
        return -1


def phase_oom(work: Path, environ: dict[str, str], total: int, a: argparse.Namespace) -> dict[str, Any]:
    force_bf16 = None if a.oom_precision == "auto" else a.oom_precision == "bf16"
    if a.dry_run_cpu:
        force_bf16, a.oom_batch = False, a.oom_batch or DRY_OOM_BATCH
        environ = dict(environ, VIT_MEMORY_HEADROOM_MB=DRY_HEADROOM_MB)
    plan = plan_oom_phase(total, digits_train_size(), force_batch=a.oom_batch, force_bf16=force_bf16)
    print(
        f"phase 1: per-device batch {plan.batch} in {'bf16' if plan.bf16 else 'fp32'} (needs about "
        f"{plan.expected_bytes / GB:.0f} GB of this card's {total / GB:.0f} GB); expect "
        f"{plan.batch} -> {plan.lowered} x {plan.batch // plan.lowered} accumulation",
        flush=True,
    )
    if plan.note:
        print(f"phase 1: warning: {plan.note}", flush=True)
    cfg = write(
        work / "oom.yaml",
        vit_base_config(
            "oom",
            {
                "max_steps": OOM_STEPS,
                "per_device_train_batch_size": plan.batch,
                "save_steps": 100,
                "bf16": plan.bf16,
                "tf32": None if a.dry_run_cpu else True,
            },
            {"oom_batch_factor": OOM_FACTOR, "min_per_device_batch": MIN_BATCH},
            arch=DRY_ARCH if a.dry_run_cpu else None,
        ),
    )
    t0 = time.monotonic()
    code = supervise(cfg, work / "oom-supervisor.log", environ, a.phase_timeout)
    out = c.output_dir(cfg)
    state = protocol.read_json(protocol.state_path(out)) or {}
    reports = attempt_reports(protocol.run_dir(out))
    oom_types = ("OutOfMemoryError", "RuntimeError") if a.dry_run_cpu else ("OutOfMemoryError",)
    misses = check_oom_phase(state, reports, plan.batch, oom_types)
    if code != 0:
        misses.append(f"vit-supervisor start exited {code} (0 = completed)")
    return {"plan": plan, "state": state, "reports": reports, "misses": misses, "wall": time.monotonic() - t0}


def phase_exact(work: Path, environ: dict[str, str], a: argparse.Namespace) -> dict[str, Any]:
    training = {
        "max_steps": EXACT_STEPS,
        "per_device_train_batch_size": EXACT_BATCH,
        "save_steps": EXACT_SAVE_STEPS,
        "full_determinism": True,
        "tf32": None if a.dry_run_cpu else False,
        "bf16": False,
    }
    arch = DRY_ARCH if a.dry_run_cpu else None
    ref_cfg = write(work / "exact-ref.yaml", vit_base_config("exact-ref", training, arch=arch))
    sup_cfg = write(work / "exact-sup.yaml", vit_base_config("exact-sup", training, arch=arch))
    ref_out, out = c.output_dir(ref_cfg), c.output_dir(sup_cfg)
    misses: list[str] = []
    t0 = time.monotonic()
    rc = c.run_worker(ref_cfg, log=work / "exact-ref.log", environ=environ, timeout=a.phase_timeout)
    ref_wall = time.monotonic() - t0
    if rc != 0:
        return {"misses": [f"the reference vit-train run exited {rc}; see {work / 'exact-ref.log'}"]}
    print(f"phase 2: reference run done in {ref_wall:.0f}s", flush=True)

    watch = c.StepWatch(out).start()
    sup = c.spawn(c.supervisor_argv(sup_cfg), work / "exact-sup.log", environ)
    kill: dict[str, Any] = {}
    try:

        def due() -> Any:
            hb = c.heartbeat(out)
            step = hb.get("global_step") or 0
            st = protocol.read_json(protocol.state_path(out)) or {}
            standby = bool((st.get("standby") or {}).get("ready"))
            if hb.get("state") == protocol.HB_TRAINING and (step >= KILL_STEP or (standby and step > EXACT_SAVE_STEPS)):
                return hb["pid"], step, standby
            if sup.poll() is not None:
                raise RuntimeError(f"the supervisor exited ({sup.returncode}) before the kill")
            return None

        pid, step, standby = c.wait_for(due, a.phase_timeout, f"step {KILL_STEP}", progress=lambda: c.run_progress(out))
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        resume = c.newest_checkpoint_step(out)
        kill = {"pid": pid, "step": step, "standby_ready": standby, "resume": resume}
        print(
            f"phase 2: SIGKILL to worker pid {pid} at step {step} (standby ready: {standby}); "
            f"newest checkpoint {resume}",
            flush=True,
        )
        first = c.wait_for(
            lambda: watch.first_step_after(t_kill, pid, resume),
            a.phase_timeout,
            "a new step",
            progress=lambda: c.run_progress(out),
        )
        kill["recovery_s"] = first[0] - t_kill
        code = c.wait_exit(sup, a.phase_timeout, out)
    except (TimeoutError, RuntimeError, subprocess.TimeoutExpired) as exc:
        misses.append(f"phase 2 under the supervisor: {exc}")
        code = None
    finally:
        watch.stop()
        if sup.poll() is None:
            c.kill_group(sup, signal.SIGTERM, wait=60)
            c.kill_group(sup)
    state = protocol.read_json(protocol.state_path(out)) or {}
    if code != 0 or state.get("state") != "completed":
        misses.append(f"the supervised run ended with exit {code}, state {state.get('state')!r}")
    diff = None
    final = f"checkpoint-{EXACT_STEPS}"
    if (out / final).is_dir() and (ref_out / final).is_dir():
        worst, differ, total = c.weight_diff(
            c.load_weights(out / final, sup_cfg), c.load_weights(ref_out / final, ref_cfg)
        )
        diff = {"max_abs": worst, "differ": differ, "total": total}
        if worst > a.tolerance:
            misses.append(
                f"resumed weights differ from the reference by {worst:.3g} (max abs), "
                f"beyond --tolerance {a.tolerance:g}; {differ}/{total} tensors differ"
            )
    else:
        misses.append(f"{final} missing in {out} or {ref_out}")
    reports = attempt_reports(protocol.run_dir(out))
    return {
        "misses": misses,
        "kill": kill,
        "diff": diff,
        "state": state,
        "reports": reports,
        "ref_report": c.exit_report(ref_out),
        "ref_wall": ref_wall,
    }


def figures(p1: dict[str, Any], p2: dict[str, Any], device: str, tolerance: float) -> str:
    labelled = []
    for k, rep in sorted((p1.get("reports") or {}).items()):
        prec = "bf16" if p1["plan"].bf16 else "fp32"
        labelled.append((f"phase 1 attempt {k} ({prec})", rep))
    if p2.get("ref_report"):
        labelled.append(("phase 2 reference (fp32)", p2["ref_report"]))
    for k, rep in sorted((p2.get("reports") or {}).items()):
        labelled.append((f"phase 2 supervised attempt {k} (fp32)", rep))
    out = [
        f"GPU: {device}",
        "",
        c.table(["run", "per-device batch", "accumulation", "outcome", "GPU memory peak GiB"], memory_rows(labelled)),
    ]
    saves = list((p2.get("ref_report") or {}).get("save_seconds") or [])
    size = (p2.get("ref_report") or {}).get("checkpoint_bytes")
    reactions = oom_reactions(p1.get("state") or {}, p1.get("reports") or {})
    kill = p2.get("kill") or {}
    diff = p2.get("diff") or {}
    exact = (
        "-"
        if not diff
        else "0.0 (bit-exact)"
        if diff["max_abs"] == 0
        else f"{diff['max_abs']:.3g} ({diff['differ']}/{diff['total']} tensors; tolerance {tolerance:g} "
        f"{'met' if diff['max_abs'] <= tolerance else 'MISSED'})"
    )
    rows = [
        ["ViT-base checkpoint size (MiB)", size / 2**20 if size else None],
        ["ViT-base checkpoint save, median s (fp32 reference run)", c.median(saves)],
        ["ViT-base checkpoint save, per save s", ", ".join(f"{s:.2f}" for s in saves) or "-"],
        ["worker SIGKILL → first new optimizer step, s", kill.get("recovery_s")],
        [
            "  killed at step / resumed from / standby was ready",
            f"{kill.get('step')} / {kill.get('resume')} / {kill.get('standby_ready')}" if kill else "-",
        ],
        [
            "supervisor reaction to the OOM (exit report → next launch), s",
            ", ".join(f"{r:.2f}" for r in reactions) or "-",
        ],
        ["final weights, resumed vs uninterrupted (max abs diff)", exact],
        ["phase 1 wall s (OOM, lowering, 3 steps)", p1.get("wall")],
        ["phase 2 reference wall s (40 steps)", p2.get("ref_wall")],
    ]
    out += ["", c.table(["figure", "value"], rows)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", type=Path, default=None, help="run in this folder and keep it")
    ap.add_argument(
        "--oom-batch", type=int, default=None, help="phase 1's first per-device batch (default: from memory)"
    )
    ap.add_argument("--oom-precision", choices=("auto", "bf16", "fp32"), default="auto")
    ap.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest max-abs weight difference accepted in phase 2 when not bit-exact (default 1e-4)",
    )
    ap.add_argument("--phase-timeout", type=float, default=300.0)
    ap.add_argument(
        "--dry-run-cpu",
        action="store_true",
        help="no GPU: run the same phases on the CPU with a small model and an address-space OOM "
        "(tests this script's plumbing; proves nothing about CUDA)",
    )
    a = ap.parse_args(argv)
    if a.dry_run_cpu:
        probe = {
            "available": True,
            "name": "CPU dry run (no GPU)",
            "total_memory": 8 * 2**30,
            "torch": "-",
            "cuda_build": None,
        }
    else:
        probe = probe_gpu()
    if not probe.get("available"):
        print(no_gpu_line(probe), flush=True)
        return NO_GPU_EXIT
    c.banner("GPU check: CUDA OOM, batch lowering, exact resume")
    device = (
        f"{probe['name']}, {probe['total_memory'] / 2**30:.0f} GiB (torch {probe['torch']}, CUDA {probe['cuda_build']})"
    )
    print(f"device: {device}\n", flush=True)
    work = c.work_dir("gpu-check", a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="vit-gpu-check-"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    # One GPU per worker: with several visible, the Trainer would wrap the model in DataParallel.
    environ = c.env(
        XDG_STATE_HOME=str(work / "state"), CUDA_VISIBLE_DEVICES=visible, OMP_NUM_THREADS="1" if a.dry_run_cpu else "4"
    )
    t0 = time.monotonic()
    p1 = phase_oom(work, environ, int(probe["total_memory"]), a)
    print(f"phase 1: {'ok' if not p1['misses'] else 'MISSED'} in {p1['wall']:.0f}s", flush=True)
    p2 = phase_exact(work, environ, a)
    print(f"phase 2: {'ok' if not p2['misses'] else 'MISSED'}\n", flush=True)
    print(figures(p1, p2, device, a.tolerance))
    misses = p1["misses"] + p2["misses"]
    print(f"\ntotal wall {time.monotonic() - t0:.0f}s; run folders in {work}")
    if misses:
        print("\nGPU CHECK FAILED:")
        for m in misses:
            print("  -", m)
        return 1
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    print("\ngpu check: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
