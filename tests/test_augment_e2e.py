"""Random augmentation end to end: real workers with 2 DataLoader workers, real SIGKILL/SIGTERM,
resumes that reproduce the uninterrupted run's weights bit for bit and its augmented samples one by one.

Every run goes through tests/record_samples_worker.py, which records a hash of each training
sample as the model receives it, in order; so a test compares the samples themselves, not only
the weights they produce.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import (
    PYTHON,
    REPO,
    TINY,
    deep_update,
    heartbeat,
    read_json,
    resumed_from,
    wait_exit,
    wait_for,
    worker_env,
)
from tests.test_augment_unit import save_small_vit
from tests.test_worker_e2e import max_abs_diff

pytestmark = pytest.mark.e2e

STALL = 120  # seconds without a new step before a wait fails (the machine is shared and slow)
AUGMENTED = {"data": {"augment": "standard"}, "training": {"dataloader_num_workers": 2}}
FINAL = 38  # TINY: 300 training samples, batch 16 -> 19 steps an epoch, 2 epochs
SAMPLES_PER_EPOCH = 300
RECORDER = REPO / "tests" / "record_samples_worker.py"


def write_cfg(path: Path, overrides: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(deep_update(deep_update(TINY, AUGMENTED), overrides or {})))
    return path


def start(record: Path, cfg: Path, *args: str) -> subprocess.Popen[str]:
    log = open(record.with_suffix(".log"), "w")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(
        [PYTHON, str(RECORDER), str(record), str(cfg), *args],
        env=worker_env(),
        text=True,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=REPO,
    )


def log_of(record: Path) -> str:
    return record.with_suffix(".log").read_text(errors="replace")[-4000:]


def run_to_end(record: Path, cfg: Path, *args: str) -> None:
    out = cfg.parent / "out"
    p = start(record, cfg, *args)
    code = wait_exit(p, STALL, "the worker to finish", progress=lambda: heartbeat(out).get("global_step"))
    assert code == 0, f"exit {code}:\n{log_of(record)}"


def stop_at_step(record: Path, cfg: Path, step: int, sig: signal.Signals) -> int:
    """Start a run, send ``sig`` once it has passed ``step``; return the exit code."""
    out = cfg.parent / "out"
    p = start(record, cfg)
    try:
        wait_for(
            lambda: (heartbeat(out).get("global_step") or 0) >= step or p.poll() is not None,
            STALL,
            f"step {step}",
            interval=0.005,
            progress=lambda: heartbeat(out).get("global_step"),
        )
        assert p.poll() is None, f"the run ended before step {step}:\n{log_of(record)}"
        p.send_signal(sig)
        return wait_exit(p, STALL, f"the worker to exit after {sig.name}")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def samples(record: Path) -> list[str]:
    return record.read_text().split()


def resumed_step(record: Path) -> tuple[str, int]:
    """Where the run recorded in ``record`` resumed: ('snapshot' | 'checkpoint', step), from its log."""
    return resumed_from(record.with_suffix(".log").read_text(errors="replace"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The augmented run, uninterrupted: its final checkpoint and every sample it trained on."""
    d = tmp_path_factory.mktemp("augmented-reference")
    cfg = write_cfg(d / "c.yaml")
    record = d / "samples.txt"
    run_to_end(record, cfg)
    final = d / "out" / f"checkpoint-{FINAL}"
    assert final.is_dir()
    return final, samples(record)


def test_augmentation_changes_every_sample_between_epochs(reference: tuple[Path, list[str]]) -> None:
    """Without augmentation both epochs would hold the same 300 samples; with it, hardly any recurs
    (an 8x8 image has few distinct crops: a draw may repeat the same crop and flip)."""
    _, seen = reference
    assert len(seen) == 2 * SAMPLES_PER_EPOCH
    first, second = set(seen[:SAMPLES_PER_EPOCH]), set(seen[SAMPLES_PER_EPOCH:])
    assert len(first & second) <= SAMPLES_PER_EPOCH // 20


@pytest.mark.parametrize(
    ("sig", "step"),
    [
        (signal.SIGKILL, 27),  # mid-epoch 2: resumes on accelerate's batch-skipping loader
        (signal.SIGTERM, 12),  # mid-epoch 1: the worker saves this step, then the resume crosses an epoch
    ],
    ids=["sigkill-mid-epoch-2", "sigterm-mid-epoch-1"],
)
def test_stop_mid_epoch_then_resume_ends_bit_identical_with_the_same_samples(
    tmp_path: Path, reference: tuple[Path, list[str]], sig: signal.Signals, step: int
) -> None:
    final, seen = reference
    cfg = write_cfg(tmp_path / "c.yaml")
    out = tmp_path / "out"
    code = stop_at_step(tmp_path / "first.txt", cfg, step, sig)
    assert code == (3 if sig == signal.SIGTERM else -signal.SIGKILL), log_of(tmp_path / "first.txt")
    run_to_end(tmp_path / "second.txt", cfg, "--resume")
    # A disk checkpoint or, after the SIGKILL, the newer shared-memory snapshot (on by default)
    _, resumed_from = resumed_step(tmp_path / "second.txt")
    assert step - 5 <= resumed_from < FINAL and resumed_from % 19, "the resume must start mid-epoch"
    after = samples(tmp_path / "second.txt")
    before = samples(tmp_path / "first.txt")
    done = len(seen) - len(after)  # samples the checkpoint had trained on
    assert before[:done] == seen[:done]
    assert after == seen[done:]
    assert done == (resumed_from // 19) * SAMPLES_PER_EPOCH + (resumed_from % 19) * 16
    assert max_abs_diff(out / f"checkpoint-{FINAL}", final) == 0.0


def test_restart_at_half_the_batch_trains_on_the_same_augmented_samples_in_order(
    tmp_path: Path, reference: tuple[Path, list[str]]
) -> None:
    """What the supervisor does after an out-of-memory: half the per-device batch, twice the accumulation."""
    _, seen = reference
    cfg = write_cfg(tmp_path / "c.yaml")
    out = tmp_path / "out"
    stop_at_step(tmp_path / "first.txt", cfg, 27, signal.SIGKILL)
    half = ("--per-device-train-batch-size", "8", "--gradient-accumulation-steps", "2")
    run_to_end(tmp_path / "second.txt", cfg, "--resume", *half)
    _, resumed_from = resumed_step(tmp_path / "second.txt")
    report = read_json(out / "run" / "exit_report.json")
    assert report["per_device_train_batch_size"] == 8 and report["gradient_accumulation_steps"] == 2
    after = samples(tmp_path / "second.txt")
    done = (resumed_from // 19) * SAMPLES_PER_EPOCH + (resumed_from % 19) * 16
    assert len(after) == len(seen) - done
    assert after == seen[done:]
    assert (out / f"checkpoint-{FINAL}").is_dir()


def test_pretrained_model_trains_on_its_processors_normalisation(tmp_path: Path) -> None:
    """A local pretrained ViT (16 px, ImageNet mean/std in its preprocessor_config.json) with trivial_augment."""
    from transformers import ViTForImageClassification

    model = save_small_vit(tmp_path / "vit")
    over = {
        "model": {"model_name": str(model)},
        "data": {"augment": "trivial_augment"},
        "training": {"max_steps": 4, "save_steps": 2},
    }
    cfg = write_cfg(tmp_path / "c.yaml", over)
    record = tmp_path / "samples.txt"
    run_to_end(record, cfg)
    log = record.with_suffix(".log").read_text(errors="replace")  # the whole log: the line is near its start
    assert "Preprocessing: 16x16 px, 3 channel(s), mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]" in log
    assert f"(the image processor of {model})" in log
    assert len(samples(record)) == 4 * 16
    m = ViTForImageClassification.from_pretrained(str(tmp_path / "out" / "checkpoint-4"))
    assert m.config.image_size == 16 and m.config.num_labels == 10
