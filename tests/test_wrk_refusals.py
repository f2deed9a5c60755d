"""Bad settings are refused up front with one line naming the key (issue 11, bug 9)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from supervisor.schema import ConfigError, load_config
from tests.conftest import REPO, TINY, deep_update, worker_env


def write(tmp_path: Path, cfg: object, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return p


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def with_value(tmp_path: Path, section: str, key: str, literal: str) -> Path:
    """TINY with ``section.key`` set to a YAML literal such as ``.nan`` (safe_dump cannot write those)."""
    cfg = deep_update(TINY, {section: {key: "PLACEHOLDER"}})
    return write(tmp_path, yaml.safe_dump(cfg).replace("PLACEHOLDER", literal))


@pytest.mark.parametrize("literal", [".nan", ".inf", "-.inf", ".NaN", "'nan'", "'inf'", "1e999"])
@pytest.mark.parametrize(
    "section,key",
    [
        ("training", "learning_rate"),
        ("training", "num_train_epochs"),
        ("training", "weight_decay"),
        ("disk", "reserve_mb"),
        ("supervisor", "hang_timeout_s"),
        ("supervisor", "term_grace_s"),
    ],
)
def test_nan_and_infinite_numbers_are_refused_naming_the_key(
    tmp_path: Path, section: str, key: str, literal: str
) -> None:
    msg = refusal(with_value(tmp_path, section, key, literal))
    assert f"{section}.{key}" in msg and "finite" in msg


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_an_empty_config_file_says_it_is_empty(tmp_path: Path, text: str) -> None:
    assert "is empty" in refusal(write(tmp_path, text))


def test_output_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a folder")
    msg = refusal(write(tmp_path, deep_update(TINY, {"training": {"output_dir": "taken"}})))
    assert "training.output_dir" in msg and "not a folder" in msg


def test_output_dir_below_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a folder")
    msg = refusal(write(tmp_path, deep_update(TINY, {"training": {"output_dir": "taken/run"}})))
    assert "training.output_dir" in msg and "taken" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_output_dir_that_is_not_writable_is_refused(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        msg = refusal(write(tmp_path, deep_update(TINY, {"training": {"output_dir": "ro/run"}})))
    finally:
        ro.chmod(0o755)
    assert "training.output_dir" in msg and "not writable" in msg


def test_output_dir_that_the_user_cannot_write_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root here, which writes anywhere: let os.access answer as for an ordinary user.
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real(p, mode, **kw))
    msg = refusal(write(tmp_path, deep_update(TINY, {"training": {"output_dir": "ro/run"}})))
    assert "training.output_dir" in msg and "not writable" in msg


@pytest.mark.parametrize("name", ["./models/vit-missing", "/nonexistent/vit-model", "~/no-such-vit-model-xyz"])
def test_a_missing_local_model_path_is_refused(tmp_path: Path, name: str) -> None:
    msg = refusal(write(tmp_path, deep_update(TINY, {"model": {"model_name": name}})))
    assert "model.model_name" in msg and "does not exist" in msg


def test_vit_train_refuses_nan_in_one_line_exit_2_fast_and_writes_nothing(tmp_path: Path) -> None:
    cfg = with_value(tmp_path, "training", "learning_rate", ".nan")
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "worker", str(cfg)], capture_output=True, text=True, cwd=REPO, env=worker_env()
    )
    took = time.monotonic() - t0
    assert p.returncode == 2, p.stderr
    assert "training.learning_rate" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert took < 10


def test_vit_train_on_an_empty_config_file_says_it_is_empty(tmp_path: Path) -> None:
    cfg = write(tmp_path, "")
    p = subprocess.run(
        [sys.executable, "-m", "worker", str(cfg)], capture_output=True, text=True, cwd=REPO, env=worker_env()
    )
    assert p.returncode == 2 and "is empty" in p.stderr, p.stderr


@pytest.mark.parametrize(
    "over,key",
    [
        ({"training": {"output_dir": "taken"}}, "training.output_dir"),
        ({"model": {"model_name": "./no-such-model"}}, "model.model_name"),
    ],
    ids=["output_dir_is_a_file", "missing_local_model"],
)
def test_vit_train_refuses_bad_paths_in_one_line_exit_2_before_any_import(tmp_path: Path, over: dict, key: str) -> None:
    (tmp_path / "taken").write_text("a file")
    cfg = write(tmp_path, deep_update(TINY, over))
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "worker", str(cfg)], capture_output=True, text=True, cwd=REPO, env=worker_env()
    )
    assert p.returncode == 2 and key in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert (tmp_path / "taken").read_text() == "a file" and not (tmp_path / "out").exists()
    assert time.monotonic() - t0 < 10
