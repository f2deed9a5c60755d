"""Image folders at scale: the cached listing (invalidated by any change to the tree, a hostile
cache ignored), a mid-epoch resume that reads only what it trains on, corrupt images (fail or skip)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from supervisor.schema import load_config
from tests.conftest import PYTHON, REPO, heartbeat, resumed_from, vit_train, wait_for, worker_env
from tests.test_worker_e2e import _digit_pngs, write_cfg
from worker import checkpoint as ckpt
from worker import data as data_mod
from worker import listing

TIMEOUT = 180


def backdate(root: Path, seconds: float = 60) -> None:
    """Make every directory look untouched for a while, so the listing may be cached (not racy)."""
    then = time.time() - seconds
    for here, _, _ in os.walk(root):
        os.utime(here, (then, then))


def folder_cfg(tmp_path: Path, **data: object) -> Path:
    return write_cfg(
        tmp_path / "c.yaml",
        {"data": {"source": "image_folder", "path": "images", "limit": None, **data}, "training": {"max_steps": 3}},
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    _digit_pngs(tmp_path / "images", per_class=4)
    backdate(tmp_path / "images")
    return tmp_path / "images"


class Listings:
    """Counts how often the folder is really listed (a cache miss)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = data_mod.list_image_folder

        def counting(root: Path, *args: object) -> object:
            self.calls += 1
            return real(root, *args)

        monkeypatch.setattr(data_mod, "list_image_folder", counting)


def build(cfg: Path) -> data_mod.Splits:
    return data_mod.build(load_config(cfg))


def cache_path(cfg: Path) -> Path:
    c = load_config(cfg)
    return listing.cache_file(c.output_dir, "image_folder", Path(c.data.path or ""))


def test_a_second_build_reuses_the_listing_with_the_same_fingerprint(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, seen = folder_cfg(tmp_path), Listings(monkeypatch)
    first = build(cfg)
    assert seen.calls == 1 and cache_path(cfg).is_file()
    second = build(cfg)
    assert seen.calls == 1, "the cached listing was not used"
    assert second.fingerprint == first.fingerprint
    assert list(second.train.items) == list(first.train.items)  # type: ignore[attr-defined]


@pytest.mark.parametrize("change", ["add", "remove", "rename", "new_subfolder", "move_between_classes"])
def test_any_change_to_the_tree_makes_a_new_listing_and_fingerprint(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    cfg, seen = folder_cfg(tmp_path), Listings(monkeypatch)
    before = build(cfg).fingerprint
    one = folder / "class_3" / "2.png"
    if change == "add":
        shutil.copy(one, folder / "class_3" / "extra.png")
    elif change == "remove":
        one.unlink()
    elif change == "rename":
        one.rename(folder / "class_3" / "renamed.png")
    elif change == "new_subfolder":
        (folder / "class_3" / "more").mkdir()
        shutil.copy(one, folder / "class_3" / "more" / "x.png")
    else:
        one.rename(folder / "class_4" / "moved.png")
    after = build(cfg)
    assert seen.calls == 2, "the change was not noticed"
    assert after.fingerprint != before
    cache_path(cfg).unlink()
    assert build(cfg).fingerprint == after.fingerprint  # the same as a listing made from nothing


def test_a_change_to_a_nested_folder_is_noticed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _digit_pngs(tmp_path / "images", per_class=4)
    nested = tmp_path / "images" / "class_2" / "deep"
    nested.mkdir()
    shutil.copy(tmp_path / "images" / "class_2" / "1.png", nested / "a.png")
    backdate(tmp_path / "images")
    cfg, seen = folder_cfg(tmp_path), Listings(monkeypatch)
    before = build(cfg).fingerprint
    (nested / "a.png").unlink()
    assert build(cfg).fingerprint != before and seen.calls == 2


def test_a_folder_changed_just_now_is_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A change within the same mtime tick as the listing would be invisible to the stamps.
    _digit_pngs(tmp_path / "images", per_class=4)
    cfg = folder_cfg(tmp_path)
    build(cfg)
    assert not cache_path(cfg).exists()


def _read(path: Path) -> tuple[dict, dict]:
    head, _, body = path.read_bytes().partition(b"\n")
    return json.loads(head), json.loads(body)


def _write(path: Path, header: dict, payload: dict, *, sign: bool = True) -> None:
    body = json.dumps(payload).encode()
    if sign:  # as an attacker could: the digest only guards against damage, the checks do the rest
        header["digest"] = listing._digest(header, body)
    path.write_bytes(json.dumps(header).encode() + b"\n" + body)


def _escape(header: dict, payload: dict) -> None:
    files = payload["files"].split("\n")
    files[0] = "class_0/../../../../etc/passwd"
    payload["files"] = "\n".join(files)


def _wrong_class(header: dict, payload: dict) -> None:
    files = payload["files"].split("\n")
    files[0] = "class_9/" + files[0].split("/", 1)[1]
    payload["files"] = "\n".join(files)


def _counts(header: dict, payload: dict) -> None:
    payload["counts"][0] += 5


def _sizes(header: dict, payload: dict) -> None:
    payload["sizes"][0] = "big"


def _stamp(header: dict, payload: dict) -> None:
    header["dirs"][0][2] -= 1


def _other_root(header: dict, payload: dict) -> None:
    header["root"] = "/somewhere/else"


def _fingerprints(header: dict, payload: dict) -> None:
    payload["fingerprints"] = {"null": 42}


EDITS = {
    "escape": _escape,
    "wrong_class": _wrong_class,
    "counts": _counts,
    "sizes": _sizes,
    "stamp": _stamp,
    "other_root": _other_root,
    "fingerprints": _fingerprints,
}


@pytest.mark.parametrize("damage", ["garbage", "empty", "json_list", "digest", "truncated", *EDITS])
def test_a_damaged_or_hostile_cache_is_ignored_and_replaced(
    tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    cfg, seen = folder_cfg(tmp_path), Listings(monkeypatch)
    honest = build(cfg)
    path = cache_path(cfg)
    if damage == "garbage":
        path.write_bytes(b"\x00\xff not json")
    elif damage == "empty":
        path.write_text("")
    elif damage == "json_list":
        path.write_text("[1, 2, 3]\n[]")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-20])
    elif damage == "digest":
        header, payload = _read(path)
        payload["files"] = payload["files"].replace("1.png", "9.png")
        _write(path, header, payload, sign=False)
    else:
        header, payload = _read(path)
        EDITS[damage](header, payload)
        _write(path, header, payload)
    again = build(cfg)
    assert seen.calls == 2, f"the {damage} cache was trusted"
    assert again.fingerprint == honest.fingerprint
    assert all(Path(p).is_relative_to(folder) for p in again.train.items)  # type: ignore[attr-defined]
    assert listing.load(path, "image_folder", folder, data_mod._check_folder_payload)  # rewritten, usable


# --------------------------------------------------------------------------- corrupt images, skipped


def test_skip_replaces_an_unreadable_sample_by_the_next_readable_one_deterministically(tmp_path: Path) -> None:
    _digit_pngs(tmp_path / "images", per_class=4)
    cfg = folder_cfg(tmp_path, on_corrupt_image="skip")
    splits = build(cfg)
    train = splits.train
    bad = [3, 4]  # two in a row: sample 3 and 4 both become sample 5
    for i in bad:
        train.items[i].write_bytes(b"not an image")  # type: ignore[attr-defined]
    again = build(cfg).train  # another "worker" or a resume: the same replacement
    for ds in (train, again):
        s3, s4, s5 = ds[3], ds[4], ds[5]
        assert s3["pixel_values"].equal(s5["pixel_values"]) and s3["labels"] == s5["labels"]
        assert s4["pixel_values"].equal(s5["pixel_values"]) and s4["labels"] == s5["labels"]
    lines = [json.loads(x) for x in (tmp_path / "out" / "run" / data_mod.SKIPPED_IMAGES).read_text().splitlines()]
    assert {x["index"] for x in lines} == {3, 4}
    assert any(str(train.items[3]) in x["message"] for x in lines)  # type: ignore[attr-defined]
    # Counted per meeting, for this process: in each build ds[3] meets 3 and 4, ds[4] meets 4.
    assert data_mod.skipped_images() == 6


def test_skip_gives_up_when_everything_is_unreadable(tmp_path: Path) -> None:
    _digit_pngs(tmp_path / "images", per_class=4)
    cfg = folder_cfg(tmp_path, on_corrupt_image="skip")
    train = build(cfg).train
    for p in train.items:  # type: ignore[attr-defined]
        p.write_bytes(b"")
    with pytest.raises(data_mod.DataError, match="in a row"):
        train[0]


def corrupt_run(tmp_path: Path, policy: str, workers: int) -> tuple[int, str, Path]:
    _digit_pngs(tmp_path / "images", per_class=8)
    bad = tmp_path / "images" / "class_4" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    cfg = write_cfg(
        tmp_path / "c.yaml",
        {
            "data": {"source": "image_folder", "path": "images", "limit": None, "on_corrupt_image": policy},
            "training": {"num_train_epochs": 2, "dataloader_num_workers": workers, "save_steps": 50},
        },
    )
    p = vit_train(cfg)
    log, _ = p.communicate(timeout=TIMEOUT)
    return p.returncode, log, bad


@pytest.mark.e2e
@pytest.mark.parametrize("workers", [0, 2], ids=["in_process", "two_dataloader_workers"])
def test_skip_trains_past_a_corrupt_image_and_counts_it_in_the_exit_report(tmp_path: Path, workers: int) -> None:
    code, log, bad = corrupt_run(tmp_path, "skip", workers)
    assert code == 0, log[-3000:]
    report = json.loads((tmp_path / "out" / "run" / "exit_report.json").read_text())
    assert report["reason"] == "completed"
    # Two epochs and a final evaluation: the file is met at least twice wherever it is.
    assert report["skipped_images"] >= 2, report
    recorded = (tmp_path / "out" / "run" / data_mod.SKIPPED_IMAGES).read_text().splitlines()
    assert len(recorded) == report["skipped_images"] and all(str(bad) in x for x in recorded)
    assert "Skipping an unreadable" in log and str(bad) in log


@pytest.mark.e2e
def test_fail_stops_at_the_corrupt_image_as_a_data_error_the_supervisor_does_not_retry(tmp_path: Path) -> None:
    from supervisor import protocol

    code, log, bad = corrupt_run(tmp_path, "fail", 0)
    assert code == protocol.EXIT_USER_ERROR, log[-3000:]
    report = json.loads((tmp_path / "out" / "run" / "exit_report.json").read_text())
    assert report["reason"] == "data_error" and str(bad) in report["message"]
    assert report["skipped_images"] is None
    assert protocol.REASON_DATA_ERROR in protocol.NON_RETRYABLE_REASONS


# --------------------------------------------------------------------------- resume reads only what it trains on

READS_WRAPPER = """
import sys
sys.path.insert(0, {repo!r})
from worker import data
real = data.ImageLoader.__call__
def logged(self, path):
    with open({log!r}, "a") as f:
        f.write(str(path) + "\\n")
    return real(self, path)
data.ImageLoader.__call__ = logged
from worker.cli import entry
entry(sys.argv[1:])
"""


@pytest.mark.e2e
def test_a_resume_mid_epoch_never_reads_the_samples_it_skips(tmp_path: Path) -> None:
    _digit_pngs(tmp_path / "images", per_class=40)  # 400 images: 300 train, 19 steps of 16
    cfg = write_cfg(
        tmp_path / "c.yaml",
        {
            "data": {"source": "image_folder", "path": "images", "limit": None},
            "training": {"num_train_epochs": 1, "save_steps": 5, "eval_strategy": "no"},
        },
    )
    out = tmp_path / "out"
    p = vit_train(cfg)
    try:
        wait_for(lambda: (out / "checkpoint-5").is_dir() or p.poll() is not None, TIMEOUT, "checkpoint-5")
    finally:
        p.kill()
        p.communicate()
    newest = ckpt.newest_good(out)
    saved = ckpt.step_of(newest) if newest else None
    assert saved is not None and saved < 19, f"no mid-epoch checkpoint to resume ({saved})"
    splits = build(cfg)
    train = {str(x) for x in splits.train.items}  # type: ignore[attr-defined]
    reads = tmp_path / "reads.txt"
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(READS_WRAPPER.format(repo=str(REPO), log=str(reads)))
    r = subprocess.run(
        [PYTHON, str(wrapper), str(cfg), "--resume"],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    # The step it resumed from: the newest checkpoint, or a snapshot taken after it before the kill.
    kind, resumed = resumed_from(r.stdout + r.stderr)
    assert kind in ("checkpoint", "snapshot") and saved <= resumed < 19, (kind, resumed, saved)
    read_train = [x for x in reads.read_text().splitlines() if x in train]
    # The rest of the one epoch, each sample read once; the resumed steps' samples never.
    assert len(read_train) == len(train) - 16 * resumed, (len(read_train), resumed)
    assert len(set(read_train)) == len(read_train)
    assert heartbeat(out).get("global_step") == 19
