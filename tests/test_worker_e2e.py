"""The worker end to end: real processes, real SIGKILLs, real checkpoints, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY, copy_run_dir, deep_update, heartbeat, read_json, vit_train, wait_for

pytestmark = pytest.mark.e2e

TIMEOUT = 120
LOCK_FILES = ("supervisor.lock", "worker.lock")  # rewritten with the holder's pid by every start, like the heartbeat


def write_cfg(path: Path, overrides: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(deep_update(TINY, overrides or {})))
    return path


def run_to_end(*args: object, env: dict | None = None, expect: int = 0) -> str:
    p = vit_train(*args, env=env)
    out, _ = p.communicate(timeout=TIMEOUT)
    assert p.returncode == expect, f"exit {p.returncode}, expected {expect}:\n{out[-4000:]}"
    return out


def kill_at_step(cfg: Path, out: Path, step: int, *extra: str) -> None:
    p = vit_train(cfg, *extra)
    try:
        wait_for(
            lambda: (heartbeat(out).get("global_step") or 0) >= step or p.poll() is not None,
            TIMEOUT,
            f"step {step}",
            interval=0.005,
        )
    finally:
        p.kill()
        p.communicate()


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def max_abs_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.mark.parametrize("variant", ["mid_epoch", "epoch_boundary", "dataloader_workers"])
def test_sigkill_then_resume_ends_bit_identical_to_uninterrupted_run(
    tmp_path: Path, reference_tiny: Path, variant: str
) -> None:
    over: dict = {}
    kill_step = 12  # newest checkpoint is 10: mid epoch (19 steps per epoch)
    if variant == "epoch_boundary":
        over = {"training": {"save_strategy": "epoch"}}
        kill_step = 22  # newest checkpoint is 19, the end of epoch 1
    if variant == "dataloader_workers":
        over = {"training": {"dataloader_num_workers": 2}}
    cfg = write_cfg(tmp_path / "c.yaml", over)
    out = tmp_path / "out"
    kill_at_step(cfg, out, kill_step)
    assert not (out / "checkpoint-38").exists()
    log = run_to_end(cfg, "--resume")
    # From the newest disk checkpoint, or (snapshots being on by default) from a newer snapshot.
    assert "Training will resume from checkpoint" in log or "Training will resume from snapshot" in log
    assert max_abs_diff(out / "checkpoint-38", reference_tiny) == 0.0


def test_auto_detects_checkpoint_without_resume_flag(tmp_path: Path, short_run: Path) -> None:
    copy_run_dir(short_run, tmp_path / "out")
    cfg = write_cfg(tmp_path / "c.yaml", {"training": {"max_steps": 12}})
    log = run_to_end(cfg)
    assert "Auto-detected checkpoint:" in log and "checkpoint-5" in log
    assert (tmp_path / "out" / "checkpoint-12").is_dir()


def test_broken_newest_checkpoint_is_set_aside_and_older_good_one_used(tmp_path: Path) -> None:
    # Snapshots off: the snapshot of step 10 would (rightly) be resumed instead of any disk checkpoint.
    off = {"snapshot": {"every_steps": 0}}
    cfg = write_cfg(tmp_path / "c.yaml", {"training": {"max_steps": 10, "save_steps": 5}, **off})
    out = tmp_path / "out"
    run_to_end(cfg)
    newest = out / "checkpoint-10"
    (newest / "optimizer.pt").unlink()  # stock Trainer would silently restart the optimizer here
    cfg.write_text(yaml.safe_dump(deep_update(TINY, {"training": {"max_steps": 15}, **off})))
    log = run_to_end(cfg, "--resume")
    assert "Set aside broken checkpoint checkpoint-10" in log and "missing optimizer.pt" in log
    assert "Training will resume from checkpoint: " + str(out / "checkpoint-5") in log
    aside = list((out / "set-aside").glob("checkpoint-10.*"))
    assert len(aside) == 1 and "optimizer.pt" in (aside[0] / "REASON.txt").read_text()
    assert (out / "checkpoint-15").is_dir()


def test_checkpoint_flag_with_invalid_checkpoint_is_an_error_naming_the_problem(
    tmp_path: Path, short_run: Path
) -> None:
    copy_run_dir(short_run, tmp_path / "out")
    cfg = write_cfg(tmp_path / "c.yaml", {"training": {"max_steps": 5}})
    ck = tmp_path / "out" / "checkpoint-5"
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    log = run_to_end(cfg, "--checkpoint", ck, expect=2)
    assert "is not usable" in log and "model.safetensors" in log
    report = read_json(tmp_path / "out" / "run" / "exit_report.json")
    assert report and report["reason"] == "config_error"
    assert ck.is_dir(), "an explicitly named checkpoint is reported, not moved"


def test_resume_guard_names_each_changed_key_and_touches_nothing(tmp_path: Path, short_run: Path) -> None:
    out = copy_run_dir(short_run, tmp_path / "out")
    cfg = write_cfg(tmp_path / "c.yaml", {"training": {"max_steps": 5}})
    before = sorted(
        (p.relative_to(out), p.stat().st_mtime_ns)
        for p in out.rglob("*")
        if p.name not in ("run", "exit_report.json", "heartbeat.json", *LOCK_FILES)
    )
    changed = {"data": {"random_seed": 8, "train_test_split": 0.3}, "training": {"max_steps": 10}}
    cfg.write_text(yaml.safe_dump(deep_update(TINY, changed)))
    log = run_to_end(cfg, "--resume", expect=2)
    assert "random_seed: 7 -> 8" in log and "train_test_split: 0.25 -> 0.3" in log
    after = sorted(
        (p.relative_to(out), p.stat().st_mtime_ns)
        for p in out.rglob("*")
        if p.name not in ("run", "exit_report.json", "heartbeat.json", *LOCK_FILES)
    )
    assert before == after
    assert read_json(out / "run" / "exit_report.json")["reason"] == "incompatible_checkpoint"


def test_learning_rate_change_warns_and_more_epochs_just_continue(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path / "c.yaml", {"training": {"num_train_epochs": 1}})
    run_to_end(cfg)
    cfg.write_text(yaml.safe_dump(deep_update(TINY, {"training": {"num_train_epochs": 2, "learning_rate": 1e-3}})))
    log = run_to_end(cfg, "--resume")
    assert "learning_rate changed: 0.002 -> 0.001" in log
    assert (tmp_path / "out" / "checkpoint-38").is_dir()


def test_wandb_keeps_one_offline_run_across_restarts(tmp_path: Path) -> None:
    cfg = write_cfg(
        tmp_path / "c.yaml", {"tracking": {"backend": "wandb", "mode": "offline"}, "training": {"max_steps": 20}}
    )
    out = tmp_path / "out"
    kill_at_step(cfg, out, 8)
    run_to_end(cfg, "--resume")
    run_id = (out / "run" / "tracker_run_id").read_text().strip()
    runs = sorted((out / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    for r in runs:
        assert r.name.endswith(run_id) and (r / f"run-{run_id}.wandb").stat().st_size > 0
    assert read_json(out / "run" / "exit_report.json")["tracker_run_id"] == run_id


def test_stock_trainer_resume_skips_vit_encoder_weights_but_ours_restores_all(tmp_path: Path, short_run: Path) -> None:
    """The defect this project exists to beat, shown on a real checkpoint."""
    import torch
    from transformers import Trainer, TrainingArguments

    from supervisor.schema import load_config
    from worker import checkpoint as ckpt
    from worker import model as model_mod

    cfg_path = write_cfg(tmp_path / "c.yaml", {"training": {"max_steps": 5}})
    ck = short_run / "checkpoint-5"  # read only
    cfg = load_config(cfg_path)
    saved = model_mod.model_class(cfg).from_pretrained(str(ck)).state_dict()

    def fresh() -> torch.nn.Module:
        torch.manual_seed(123)
        return model_mod.build(cfg, [str(i) for i in range(10)])

    stock = fresh()
    Trainer(model=stock, args=TrainingArguments(output_dir=str(tmp_path / "x"), report_to=[]))._load_from_checkpoint(
        str(ck)
    )
    stale = [k for k, v in stock.state_dict().items() if not torch.equal(v, saved[k])]
    assert any(".layers." in k for k in stale), "stock resume is expected to miss encoder weights"

    ours = fresh()
    ckpt.load_weights_strict(ours, ck)
    assert all(torch.equal(v, saved[k]) for k, v in ours.state_dict().items())


def _digit_pngs(root: Path, per_class: int = 12) -> list[tuple[Path, int]]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    files = []
    counts = {i: 0 for i in range(10)}
    for img, lab in zip(d.images, d.target, strict=False):
        if counts[int(lab)] >= per_class:
            continue
        counts[int(lab)] += 1
        f = root / f"class_{lab}" / f"{counts[int(lab)]}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).astype("uint8")).save(f)
        files.append((f, int(lab)))
    return files


def test_image_folder_trains_and_checkpoint_loads_with_plain_transformers(tmp_path: Path) -> None:
    from transformers import ViTForImageClassification

    _digit_pngs(tmp_path / "images")
    cfg = write_cfg(
        tmp_path / "c.yaml",
        {"data": {"source": "image_folder", "path": "images", "limit": None}, "training": {"max_steps": 6}},
    )
    run_to_end(cfg)
    m, info = ViTForImageClassification.from_pretrained(
        str(tmp_path / "out" / "checkpoint-6"), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert m.config.id2label[3] == "class_3"


def test_image_pairs_train_with_shared_backbone_and_resume(tmp_path: Path) -> None:
    import csv
    import random

    from worker.model import ViTPairForImageClassification

    files = _digit_pngs(tmp_path / "images", per_class=6)
    rng = random.Random(0)
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_a", "image_b", "label"])
        for _ in range(120):
            (a, la), (b, lb) = rng.choice(files), rng.choice(files)
            w.writerow([a.relative_to(tmp_path), b.relative_to(tmp_path), int(la == lb)])
    over = {
        "model": {"num_labels": 2, "concat_mode": "abs_diff"},
        "data": {"source": "pairs_csv", "path": "pairs.csv", "limit": None},
        "training": {"max_steps": 8, "save_steps": 4},
    }
    cfg = write_cfg(tmp_path / "c.yaml", over)
    out = tmp_path / "out"
    kill_at_step(cfg, out, 5)
    run_to_end(cfg, "--resume")
    m, info = ViTPairForImageClassification.from_pretrained(str(out / "checkpoint-8"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert m.concat_mode == "abs_diff"


def test_changed_save_interval_applies_after_resume(tmp_path: Path) -> None:
    """trainer_state.json carries the old intervals; the config in force must win."""
    cfg = write_cfg(tmp_path / "c.yaml", {"training": {"max_steps": 4, "save_steps": 1, "save_total_limit": None}})
    run_to_end(cfg)
    cfg.write_text(
        yaml.safe_dump(deep_update(TINY, {"training": {"max_steps": 10, "save_steps": 100, "save_total_limit": None}}))
    )
    run_to_end(cfg, "--resume")
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "out").glob("checkpoint-*"))
    assert steps == [1, 2, 3, 4, 10]  # no checkpoint at 5..9: the new interval is in force
