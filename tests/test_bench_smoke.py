"""The benchmark scripts' CPU-side pieces: gpu_check's no-GPU exit, its pure logic, the shared helpers.

The benchmarks themselves drive real processes for minutes; here only what runs in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import common  # noqa: E402
import gpu_check  # noqa: E402

SCRIPTS = [
    "exactness",
    "checkpoint_overhead",
    "lost_work",
    "recovery",
    "goodput",
    "footprint",
    "gpu_check",
    "step_cost",
    "data_scale",
    "snapshot_cost",
    "slurm",
]
GB = 1e9


# ----------------------------------------------------------------------------- gpu_check without a GPU


def test_gpu_check_without_a_gpu_exits_77_with_one_line() -> None:
    probe = gpu_check.probe_gpu()
    if probe.get("available"):
        pytest.skip("this machine has a CUDA GPU")
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py")], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert r.returncode == gpu_check.NO_GPU_EXIT == 77, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("no CUDA GPU here: "), r.stdout
    assert "is_available() False" in lines[0]


def test_no_gpu_line_names_the_cause() -> None:
    assert gpu_check.no_gpu_line({"torch": "2.13.0+cpu", "cuda_build": None, "available": False}) == (
        "no CUDA GPU here: torch 2.13.0+cpu reports torch.cuda.is_available() False "
        "(CUDA build: none (CPU-only build)); this check needs one"
    )
    assert gpu_check.no_gpu_line({"error": "No module named 'torch'"}).startswith(
        "no CUDA GPU here: could not ask torch (No module named 'torch')"
    )


# ----------------------------------------------------------------------------- batch from memory


def test_next_pow2() -> None:
    assert [gpu_check.next_pow2(x) for x in (0, 1, 2, 3, 800, 1024, 1025)] == [1, 1, 2, 4, 1024, 1024, 2048]


def test_digits_train_size_matches_the_workers_split() -> None:
    import numpy as np
    from sklearn.datasets import load_digits

    from worker.data import split_indices

    labels = load_digits().target.astype(np.int64)
    train, _ = split_indices(len(labels), labels, gpu_check.TEST_SPLIT, 7)
    assert gpu_check.digits_train_size() == len(train) == 1617


def test_oom_batch_on_an_80gb_card_is_bf16_and_lowered_once_to_a_fitting_batch() -> None:
    plan = gpu_check.plan_oom_phase(int(80 * GB), 1617)
    assert plan.bf16 and plan.batch == 2048 and not plan.note
    assert plan.batch >= 2 * 80 * GB / gpu_check.FP32_BYTES_PER_SAMPLE  # well above memory / 0.2 GB
    assert plan.expected_bytes >= 1.5 * 80 * GB
    assert plan.lowered == 256 and 256 * gpu_check.BF16_BYTES_PER_SAMPLE < 80 * GB


def test_oom_batch_on_a_141gb_card_falls_back_to_fp32_because_the_digits_cap_the_batch() -> None:
    plan = gpu_check.plan_oom_phase(int(141 * GB), 1617)
    assert not plan.bf16 and plan.batch == 2048 and not plan.note
    assert min(plan.batch, 1617) * gpu_check.FP32_BYTES_PER_SAMPLE >= 1.5 * 141 * GB


def test_oom_batch_says_so_when_the_data_cannot_fill_the_card() -> None:
    plan = gpu_check.plan_oom_phase(int(400 * GB), 1617)
    assert "may not run out of memory" in plan.note


def test_oom_batch_overrides() -> None:
    plan = gpu_check.plan_oom_phase(int(80 * GB), 1617, force_batch=512, force_bf16=False)
    assert (plan.batch, plan.bf16, plan.lowered) == (512, False, 64)
    assert gpu_check.plan_oom_phase(int(80 * GB), 1617, force_batch=32).lowered == gpu_check.MIN_BATCH


# ----------------------------------------------------------------------------- state file and exit reports


def _attempt(n: int, batch: int, accum: int, reason: str, start: float) -> dict:
    return {
        "attempt": n,
        "pid": 100 + n,
        "start": start,
        "end": start + 5,
        "reason": reason,
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": accum,
    }


def _state(*attempts: dict, state: str = "completed") -> dict:
    return {"state": state, "effective_batch": 2048, "attempts": list(attempts)}


GOOD_REPORTS = {
    1: {
        "reason": "oom",
        "exception_type": "OutOfMemoryError",
        "time": 1005.0,
        "per_device_train_batch_size": 2048,
        "gradient_accumulation_steps": 1,
        "gpu_mem_peak_bytes": 75 * 2**30,
    },
    2: {
        "reason": "completed",
        "time": 1050.0,
        "per_device_train_batch_size": 256,
        "gradient_accumulation_steps": 8,
        "gpu_mem_peak_bytes": 30 * 2**30,
    },
}


def test_oom_phase_passes_when_lowered_with_the_same_effective_batch_and_completed() -> None:
    st = _state(_attempt(1, 2048, 1, "oom", 1000.0), _attempt(2, 256, 8, "completed", 1005.4))
    assert gpu_check.check_oom_phase(st, GOOD_REPORTS, 2048) == []
    assert gpu_check.oom_reactions(st, GOOD_REPORTS) == pytest.approx([0.4])


def test_oom_phase_misses_are_named() -> None:
    no_oom = _state(_attempt(1, 2048, 1, "completed", 1000.0))
    assert any("no attempt ran out of memory" in m for m in gpu_check.check_oom_phase(no_oom, {}, 2048))
    changed = _state(_attempt(1, 2048, 1, "oom", 1000.0), _attempt(2, 256, 4, "completed", 1006.0))
    assert any("accumulation changed" in m for m in gpu_check.check_oom_phase(changed, GOOD_REPORTS, 2048))
    failed = _state(_attempt(1, 2048, 1, "oom", 1000.0), _attempt(2, 256, 8, "oom", 1006.0), state="failed")
    misses = gpu_check.check_oom_phase(failed, GOOD_REPORTS, 2048)
    assert any("state 'failed'" in m for m in misses) and any("last attempt ended with 'oom'" in m for m in misses)
    cpu = {**GOOD_REPORTS, 1: {**GOOD_REPORTS[1], "exception_type": "RuntimeError"}}
    ok = _state(_attempt(1, 2048, 1, "oom", 1000.0), _attempt(2, 256, 8, "completed", 1006.0))
    assert any("not OutOfMemoryError" in m for m in gpu_check.check_oom_phase(ok, cpu, 2048))
    assert gpu_check.check_oom_phase(_state(), {}, 2048)[-1] == "state.json lists no attempts"


def test_attempt_reports_reads_exit_k_json(tmp_path: Path) -> None:
    (tmp_path / "exit-1.json").write_text(json.dumps(GOOD_REPORTS[1]))
    (tmp_path / "exit-2.json").write_text("{not json")
    (tmp_path / "exit_report.json").write_text(json.dumps(GOOD_REPORTS[2]))
    assert gpu_check.attempt_reports(tmp_path) == {1: GOOD_REPORTS[1]}


def test_memory_table_rows_and_formatting() -> None:
    rows = gpu_check.memory_rows([("attempt 1", GOOD_REPORTS[1]), ("cpu", {"reason": "completed"})])
    assert rows == [["attempt 1", 2048, 1, "oom", 75.0], ["cpu", None, None, "completed", None]]
    text = common.table(["run", "batch", "accum", "outcome", "peak GiB"], rows)
    lines = text.splitlines()
    assert lines[0].startswith("| run ") and set(lines[1]) <= {"|", "-"}
    assert "| 75.00 " in lines[2] and "| -  " in lines[3]
    assert len({len(line) for line in lines}) == 1  # columns line up


# ----------------------------------------------------------------------------- shared helpers


def test_fmt_keeps_about_three_significant_digits() -> None:
    assert [common.fmt(x) for x in (None, 0.0, 0.01234, 1.234, 12.345, 1234.5, 7, "x")] == [
        "-",
        "0",
        "0.0123",
        "1.23",
        "12.35",
        "1234",
        "7",
        "x",
    ]


def test_committed_checkpoint_lines_are_parsed() -> None:
    log = (
        "2026-11-28 02:58:01,455 INFO vit_train: Committed checkpoint checkpoint-30 (0.3 MiB, 0.01s)\n"
        "noise\nINFO vit_train: Committed checkpoint checkpoint-500 (982.1 MiB, 3.99s)\n"
    )
    assert common.committed_checkpoints(log) == [(30, 0.3, 0.01), (500, 982.1, 3.99)]


def test_deep_update_merges_without_touching_the_base() -> None:
    merged = common.deep_update(common.TINY, {"training": {"max_steps": 7}})
    assert merged["training"]["max_steps"] == 7 and merged["training"]["save_steps"] == 5
    assert "max_steps" not in common.TINY["training"]


def test_every_benchmark_script_answers_help() -> None:
    for name in SCRIPTS:
        r = subprocess.run(
            [sys.executable, str(REPO / "bench" / f"{name}.py"), "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert r.returncode == 0 and "usage:" in r.stdout, (name, r.stderr[-2000:])


def test_run_progress_reads_the_heartbeat_and_the_state_file(tmp_path: Path) -> None:
    assert common.run_progress(tmp_path) == (None, None, None, None, None)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "heartbeat.json").write_text(json.dumps({"global_step": 7, "state": "training", "pid": 42}))
    (tmp_path / "run" / "state.json").write_text(json.dumps({"state": "running", "attempt": 2}))
    assert common.run_progress(tmp_path) == (7, "training", 42, "running", 2)


def test_bench_waits_raise_timeout_error_naming_a_stall() -> None:
    with pytest.raises(TimeoutError, match="timed out after 0s without progress waiting for step 9"):
        common.wait_for(lambda: None, 0.05, "step 9", progress=lambda: 1)
    assert common.wait_for(lambda: 3, 0.05, "a value") == 3
