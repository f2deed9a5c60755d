"""Bad data is refused up front or classified as data_error, never retried as a crash (issue 11, bug 9)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from supervisor.schema import load_config
from tests.conftest import worker_env
from tests.test_worker_e2e import _digit_pngs, vit_train, write_cfg
from worker import data as data_mod

PAIRS = {"model": {"num_labels": 2, "concat_mode": "abs_diff"}, "data": {"source": "pairs_csv", "limit": None}}


def pairs_csv(
    tmp_path: Path, rows: list[list[str]], *, bom: bool = False, header: str = "image_a,image_b,label"
) -> Path:
    files = _digit_pngs(tmp_path / "images", per_class=2)
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        f.write(header + "\n")
        w = csv.writer(f)
        for i in range(8):
            (a, la), (b, lb) = files[i], files[i + 1]
            w.writerow([a.relative_to(tmp_path), b.relative_to(tmp_path), int(la == lb)])
        for row in rows:
            w.writerow(row)
    return path


def build(tmp_path: Path, csv_path: Path) -> data_mod.Splits:
    cfg = write_cfg(tmp_path / "c.yaml", {**PAIRS, "data": {**PAIRS["data"], "path": csv_path.name}})
    return data_mod.build(load_config(cfg))


def test_pairs_csv_with_a_utf8_bom_reads_its_header(tmp_path: Path) -> None:
    splits = build(tmp_path, pairs_csv(tmp_path, [], bom=True))
    assert len(splits.train) + len(splits.eval) == 8


@pytest.mark.parametrize(
    "row,expect",
    [
        (["images/class_0/1.png"], "line 10"),
        (["images/class_0/1.png", "images/class_1/1.png"], "line 10"),
        (["images/class_0/1.png", "images/class_1/1.png", ""], "line 10"),
        (["images/class_0/1.png", "", "1"], "line 10"),
        (["images/class_0/1.png", "images/class_1/1.png", "1", "extra"], "line 10"),
    ],
    ids=["one_field", "two_fields", "empty_label", "empty_image", "extra_field"],
)
def test_pairs_csv_with_a_bad_row_is_a_data_error_naming_the_line(tmp_path: Path, row: list[str], expect: str) -> None:
    with pytest.raises(data_mod.DataError) as e:
        build(tmp_path, pairs_csv(tmp_path, [row]))
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_pairs_csv_with_a_blank_line_skips_it(tmp_path: Path) -> None:
    path = pairs_csv(tmp_path, [])
    path.write_text(path.read_text() + "\n\n")
    assert len(build(tmp_path, path).train) > 0


def corrupt_image_folder(tmp_path: Path) -> Path:
    _digit_pngs(tmp_path / "images", per_class=8)
    bad = tmp_path / "images" / "class_4" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    return bad


@pytest.mark.e2e
@pytest.mark.parametrize("workers", [0, 1], ids=["in_process", "dataloader_worker"])
def test_a_corrupt_image_met_mid_epoch_is_a_data_error_naming_the_file(tmp_path: Path, workers: int) -> None:
    bad = corrupt_image_folder(tmp_path)
    cfg = write_cfg(
        tmp_path / "c.yaml",
        {
            "data": {"source": "image_folder", "path": "images", "limit": None, "train_test_split": 0.1},
            "training": {"max_steps": 200, "dataloader_num_workers": workers, "eval_strategy": "no"},
        },
    )
    p = vit_train(cfg)
    log, _ = p.communicate(timeout=180)
    assert p.returncode == 2, log[-3000:]
    report = json.loads((tmp_path / "out" / "run" / "exit_report.json").read_text())
    assert report["reason"] == "data_error"
    assert str(bad) in report["message"] and "\n" not in report["message"]


@pytest.mark.e2e
@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "no_network"])
def test_a_hub_model_that_cannot_be_fetched_is_a_config_error_in_seconds(tmp_path: Path, offline: bool) -> None:
    cfg = write_cfg(tmp_path / "c.yaml", {"model": {"model_name": "no-such-org/no-such-vit-xyz"}})
    env = worker_env()
    if not offline:
        env.pop("HF_HUB_OFFLINE", None)
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens: an unreachable hub, as with no network
    t0 = time.monotonic()
    p = vit_train(cfg, env=env)
    log, _ = p.communicate(timeout=120)
    took = time.monotonic() - t0
    assert p.returncode == 2, log[-3000:]
    report = json.loads((tmp_path / "out" / "run" / "exit_report.json").read_text())
    assert report["reason"] == "config_error" and "no-such-org/no-such-vit-xyz" in report["message"]
    assert took < 30, f"took {took:.1f}s"


@pytest.mark.e2e
def test_a_corrupt_image_met_in_the_final_evaluation_is_a_data_error(tmp_path: Path) -> None:
    _digit_pngs(tmp_path / "images", per_class=8)
    cfg = write_cfg(
        tmp_path / "c.yaml",
        {
            "data": {"source": "image_folder", "path": "images", "limit": None},
            "training": {"max_steps": 3, "eval_strategy": "no"},
        },
    )
    bad = data_mod.build(load_config(cfg)).eval.items[0]  # type: ignore[attr-defined]
    bad.write_bytes(b"")
    p = vit_train(cfg)
    log, _ = p.communicate(timeout=180)
    assert p.returncode == 2, log[-3000:]
    report = json.loads((tmp_path / "out" / "run" / "exit_report.json").read_text())
    assert report["reason"] == "data_error" and str(bad) in report["message"]
