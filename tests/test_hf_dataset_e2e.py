"""``data.source: hf_dataset``: save_to_disk datasets (single images and pairs, with and without
their own splits) and image folders read through datasets' imagefolder builder, all offline;
bad columns and labels refused in one line before anything is written; training end to end
with an exact resume."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from supervisor.schema import load_config
from tests.conftest import PYTHON, REPO, deep_update, heartbeat, resumed_from, vit_train, wait_for, worker_env
from tests.test_data_scale import backdate
from tests.test_worker_e2e import _digit_pngs, max_abs_diff, write_cfg
from worker import data as data_mod
from worker import hf_source

TIMEOUT = 180
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _datasets() -> Any:
    import datasets

    datasets.disable_progress_bars()
    return datasets


def digits_dataset(n: int = 200, *, class_label: bool = True, pairs: bool = False, labels: Any = None) -> Any:
    """``n`` 8x8 grey digits as a datasets.Dataset (image, [image_b,] label)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    datasets = _datasets()
    d = load_digits()
    ims = [Image.fromarray((x * 255 / 16).astype("uint8")) for x in d.images[:n]]
    y = list(map(int, d.target[:n])) if labels is None else labels
    cols: dict[str, Any] = {"image": ims, "label": y}
    feats: dict[str, Any] = {
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=NAMES) if class_label else datasets.Value("int64"),
    }
    if pairs:
        cols["image_b"] = ims[1:] + ims[:1]
        feats["image_b"] = datasets.Image()
    return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))


def hf_cfg(tmp_path: Path, path: str, over: dict | None = None, **data: Any) -> Path:
    base = {
        "data": {"source": "hf_dataset", "path": path, "limit": None, **data},
        "training": {"max_steps": 12, "eval_strategy": "no"},
    }
    return write_cfg(tmp_path / "c.yaml", deep_update(base, over or {}))


def build(cfg: Path) -> data_mod.Splits:
    return data_mod.build(load_config(cfg))


# --------------------------------------------------------------------------- reading


def test_a_saved_dataset_without_splits_is_split_by_train_test_split_with_classlabel_names(tmp_path: Path) -> None:
    digits_dataset(200).save_to_disk(str(tmp_path / "ds"))
    splits = build(hf_cfg(tmp_path, "ds"))
    assert (len(splits.train), len(splits.eval)) == (150, 50)  # TINY's train_test_split 0.25
    assert splits.class_names == NAMES and splits.num_classes == 10
    x = splits.train[0]
    assert x["pixel_values"].shape == (1, 8, 8) and 0 <= x["labels"] < 10


def test_a_saved_dataset_dict_uses_its_own_train_and_validation_splits(tmp_path: Path) -> None:
    datasets = _datasets()
    full = digits_dataset(200)
    datasets.DatasetDict({"train": full.select(range(170)), "validation": full.select(range(170, 200))}).save_to_disk(
        str(tmp_path / "ds")
    )
    splits = build(hf_cfg(tmp_path, "ds"))
    assert (len(splits.train), len(splits.eval)) == (170, 30)
    assert splits.eval[0]["labels"] == int(full[170]["label"])


def test_a_dataset_dict_with_a_test_split_evaluates_on_it(tmp_path: Path) -> None:
    digits_dataset(200).train_test_split(test_size=40, seed=0).save_to_disk(str(tmp_path / "ds"))
    splits = build(hf_cfg(tmp_path, "ds"))
    assert (len(splits.train), len(splits.eval)) == (160, 40)


def test_integer_labels_without_classlabel_are_named_by_number(tmp_path: Path) -> None:
    digits_dataset(100, class_label=False).save_to_disk(str(tmp_path / "ds"))
    assert build(hf_cfg(tmp_path, "ds")).class_names == [str(i) for i in range(10)]


def test_pairs_come_from_two_image_columns(tmp_path: Path) -> None:
    digits_dataset(100, pairs=True).save_to_disk(str(tmp_path / "ds"))
    cfg = hf_cfg(tmp_path, "ds", {"model": {"concat_mode": "abs_diff"}}, image_column_b="image_b")
    splits = build(cfg)
    x = splits.train[0]
    assert x["pixel_values"].shape == (2, 1, 8, 8)
    assert not x["pixel_values"][0].equal(x["pixel_values"][1])


def fingerprint_in_a_new_process(cfg: Path) -> str:
    code = "import sys; from supervisor.schema import load_config; from worker import data; "
    code += "print(data.build(load_config(sys.argv[1])).fingerprint)"
    r = subprocess.run(
        [PYTHON, "-c", code, str(cfg)], capture_output=True, text=True, cwd=REPO, env=worker_env(), timeout=TIMEOUT
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.e2e
def test_the_fingerprint_is_the_datasets_own_stable_across_processes_and_a_move(tmp_path: Path) -> None:
    digits_dataset(100).save_to_disk(str(tmp_path / "ds"))
    cfg = hf_cfg(tmp_path, "ds")
    here = build(cfg).fingerprint
    assert fingerprint_in_a_new_process(cfg) == here
    shutil.move(tmp_path / "ds", tmp_path / "moved")  # a copy to a faster disk must still resume
    assert build(hf_cfg(tmp_path, "moved")).fingerprint == here
    other = tmp_path / "other"
    digits_dataset(100).map(lambda r: {"label": (r["label"] + 1) % 10}).save_to_disk(str(other))
    assert build(hf_cfg(tmp_path, "other")).fingerprint != here


@pytest.mark.e2e
def test_an_image_folder_through_the_imagefolder_builder(tmp_path: Path) -> None:
    _digit_pngs(tmp_path / "images", per_class=6)
    cfg = hf_cfg(tmp_path, "images")
    splits = build(cfg)
    assert splits.class_names == [f"class_{i}" for i in range(10)]
    assert len(splits.train) + len(splits.eval) == 60
    pixels, label = splits.train[0]["pixel_values"], splits.train[0]["labels"]
    assert pixels.shape == (1, 8, 8)
    path = splits.train.items[0]  # type: ignore[attr-defined]
    assert Path(path).parent.name == f"class_{label}"
    assert fingerprint_in_a_new_process(cfg) == splits.fingerprint


def test_an_image_folder_with_train_and_test_folders_uses_them_as_splits(tmp_path: Path) -> None:
    _digit_pngs(tmp_path / "images" / "train", per_class=5)
    _digit_pngs(tmp_path / "images" / "test", per_class=2)
    splits = build(hf_cfg(tmp_path, "images"))
    assert (len(splits.train), len(splits.eval)) == (50, 20)
    assert all("/test/" in str(p) for p in splits.eval.items)  # type: ignore[attr-defined]


def test_a_warm_imagefolder_opens_the_remembered_arrow_files_and_notices_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _digit_pngs(tmp_path / "images", per_class=6)
    backdate(tmp_path / "images")
    cfg = hf_cfg(tmp_path, "images")
    first = build(cfg)
    builds = []
    real = hf_source._build_imagefolder
    monkeypatch.setattr(hf_source, "_build_imagefolder", lambda *a: builds.append(1) or real(*a))
    assert build(cfg).fingerprint == first.fingerprint and builds == []
    shutil.copy(tmp_path / "images" / "class_1" / "1.png", tmp_path / "images" / "class_1" / "new.png")
    third = build(cfg)
    assert builds == [1] and third.fingerprint != first.fingerprint
    assert len(third.train) + len(third.eval) == 61


# --------------------------------------------------------------------------- refusals through the real CLI


def refused(cfg: Path, tmp_path: Path) -> str:
    p = subprocess.run(
        [PYTHON, "-m", "worker", str(cfg)], capture_output=True, text=True, cwd=REPO, env=worker_env(), timeout=TIMEOUT
    )
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert not (tmp_path / "out").exists(), "something was written"
    return lines[0]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "case,expect",
    [
        ("missing_directory", ["data.path", "does not exist"]),
        ("a_file", ["data.path", "is a file"]),
        ("not_save_to_disk", ["data.path", "save_to_disk"]),
        ("bad_image_column", ["data.image_column 'picture'", "columns are image, label"]),
        ("bad_label_column", ["data.label_column 'target'", "columns are image, label"]),
        ("label_column_not_labels", ["data.label_column 'image'", "ClassLabel or integers"]),
        ("image_column_not_images", ["data.image_column 'label'", "not images"]),
        ("label_outside_num_labels", ["row 7", "label 12", "outside 0..9"]),
        ("classlabel_count", ["3 classes", "model.num_labels is 10"]),
        ("imagefolder_class_count", ["4 class folders", "model.num_labels is 10"]),
        ("imagefolder_bad_column", ["data.label_column 'target'", "image, label"]),
        ("pairs_without_second_column", ["data.image_column_b 'other'", "not a column"]),
    ],
)
def test_bad_datasets_are_refused_in_one_line_exit_2_writing_nothing(
    tmp_path: Path, case: str, expect: list[str]
) -> None:
    datasets = _datasets()
    data: dict[str, Any] = {}
    over: dict[str, Any] = {}
    path = "ds"
    if case == "missing_directory":
        path = "nowhere"
    elif case == "a_file":
        (tmp_path / "ds").write_text("not a folder")
    elif case == "not_save_to_disk":
        (tmp_path / "ds").mkdir()
        data["hf_format"] = "save_to_disk"
    elif case == "label_outside_num_labels":
        labels = [i % 10 for i in range(40)]
        labels[7] = 12
        digits_dataset(40, class_label=False, labels=labels).save_to_disk(str(tmp_path / "ds"))
    elif case == "classlabel_count":
        ds = digits_dataset(40).map(lambda r: {"label": r["label"] % 3})
        ds.cast_column("label", datasets.ClassLabel(names=["a", "b", "c"])).save_to_disk(str(tmp_path / "ds"))
    elif case.startswith("imagefolder"):
        _digit_pngs(tmp_path / "ds", per_class=2)
        if case == "imagefolder_class_count":
            for extra in range(4, 10):
                shutil.rmtree(tmp_path / "ds" / f"class_{extra}")
        else:
            data["label_column"] = "target"
    else:
        digits_dataset(40).save_to_disk(str(tmp_path / "ds"))
        data.update(
            {
                "bad_image_column": {"image_column": "picture"},
                "bad_label_column": {"label_column": "target"},
                "label_column_not_labels": {"label_column": "image"},
                "image_column_not_images": {"image_column": "label"},
                "pairs_without_second_column": {"image_column_b": "other"},
            }[case]
        )
        if case == "pairs_without_second_column":
            over = {"model": {"concat_mode": "concat"}}
    line = refused(hf_cfg(tmp_path, path, over, **data), tmp_path)
    for part in expect:
        assert part in line, line


# --------------------------------------------------------------------------- training


@pytest.mark.e2e
def test_training_on_a_saved_dataset_resumes_exactly_after_a_kill(tmp_path: Path) -> None:
    digits_dataset(200).save_to_disk(str(tmp_path / "ds"))
    over = {"training": {"max_steps": 16, "save_steps": 4, "output_dir": "ref"}}
    ref = hf_cfg(tmp_path, "ds", over)
    p = vit_train(ref)
    log, _ = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, log[-3000:]
    cfg = hf_cfg(tmp_path, "ds", {"training": {"max_steps": 16, "save_steps": 4}})
    out = tmp_path / "out"
    p = vit_train(cfg)
    try:
        wait_for(lambda: (heartbeat(out).get("global_step") or 0) >= 6 or p.poll() is not None, TIMEOUT, "step 6")
    finally:
        p.kill()
        p.communicate()
    p = vit_train(cfg, "--resume")
    log, _ = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, log[-3000:]
    source, step = resumed_from(log)  # a disk checkpoint, or the newer snapshot (on by default)
    assert source in ("checkpoint", "snapshot") and step >= 4, (source, step)
    assert max_abs_diff(tmp_path / "ref" / "model", out / "model") == 0.0


@pytest.mark.e2e
def test_training_on_pairs_from_a_saved_dataset_completes(tmp_path: Path) -> None:
    digits_dataset(120, pairs=True).save_to_disk(str(tmp_path / "ds"))
    cfg = hf_cfg(
        tmp_path, "ds", {"model": {"concat_mode": "concat"}, "training": {"max_steps": 4}}, image_column_b="image_b"
    )
    p = vit_train(cfg)
    log, _ = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, log[-3000:]
    assert json.loads((tmp_path / "out" / "run" / "exit_report.json").read_text())["reason"] == "completed"


@pytest.mark.e2e
@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_a_corrupt_row_of_a_saved_dataset_is_named_or_skipped(tmp_path: Path, policy: str) -> None:
    datasets = _datasets()
    ds = digits_dataset(80)
    rows = ds.cast_column("image", datasets.Image(decode=False)).to_list()
    rows[5]["image"] = {"bytes": b"\x89PNG garbage", "path": "broken.png"}
    broken = datasets.Dataset.from_list(rows, features=ds.features)
    broken.save_to_disk(str(tmp_path / "ds"))
    over = {"training": {"num_train_epochs": 1, "max_steps": -1, "eval_strategy": "epoch"}}
    p = vit_train(hf_cfg(tmp_path, "ds", over, on_corrupt_image=policy))
    log, _ = p.communicate(timeout=TIMEOUT)
    report = json.loads((tmp_path / "out" / "run" / "exit_report.json").read_text())
    if policy == "fail":
        assert p.returncode == 2, log[-3000:]
        assert report["reason"] == "data_error" and "row 5 (image: broken.png)" in report["message"]
    else:
        assert p.returncode == 0, log[-3000:]
        assert report["reason"] == "completed" and report["skipped_images"] >= 1


@pytest.mark.e2e
def test_datasets_never_goes_to_the_network(tmp_path: Path) -> None:
    _digit_pngs(tmp_path / "images", per_class=3)
    env = worker_env()
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        env.pop(k, None)
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens: any request would fail or hang
    cfg = hf_cfg(tmp_path, "images", {"training": {"max_steps": 2}})
    p = vit_train(cfg, env=env)
    log, _ = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, log[-3000:]


def test_limit_caps_each_of_the_datasets_own_splits(tmp_path: Path) -> None:
    datasets = _datasets()
    full = digits_dataset(200)
    datasets.DatasetDict({"train": full.select(range(150)), "test": full.select(range(150, 200))}).save_to_disk(
        str(tmp_path / "ds")
    )
    splits = build(hf_cfg(tmp_path, "ds", limit=20))
    assert (len(splits.train), len(splits.eval)) == (20, 20)
    assert np.all(np.diff(np.asarray(splits.train.items.rows)) > 0)  # type: ignore[attr-defined]
