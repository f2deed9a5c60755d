"""The resume guard (worker/guard.py) on real files: what it refuses, what it only warns about, and
what it does with a guard file that is damaged or was written by an older version."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from supervisor.schema import Config, load_config
from worker import guard


def _cfg(make_config: Any, data: dict[str, Any] | None = None, name: str = "config.yaml") -> Config:
    cfg = load_config(make_config({"data": data or {}}, name=name))
    (cfg.output_dir / "run").mkdir(parents=True, exist_ok=True)
    return cfg


def test_augmentation_and_preprocessing_changes_warn_naming_each_and_resume(
    make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    before = _cfg(make_config)
    guard.record(before.output_dir, before, "fp")
    after = _cfg(
        make_config,
        {"augment": "standard", "image_mean": [0.4], "image_std": [0.2]},
        name="changed.yaml",
    )
    with caplog.at_level(logging.WARNING, logger="vit_train"):
        guard.check(after.output_dir, after, "fp")  # no exception: these are not resume-critical
    text = caplog.text
    assert "data.augment changed: 'none' -> 'standard'" in text
    assert "data.image_mean changed: None -> [0.4]" in text and "data.image_std changed: None -> [0.2]" in text
    assert "data.pair_augment" not in text and "data.image_size" not in text  # unchanged: not named


def test_a_critical_change_is_still_refused(make_config: Any) -> None:
    before = _cfg(make_config)
    guard.record(before.output_dir, before, "fp")
    with pytest.raises(guard.IncompatibleCheckpoint, match=r"data_fingerprint: 'fp' -> 'other'"):
        guard.check(before.output_dir, before, "other")


def test_a_guard_from_an_older_version_warns_about_nothing_new_and_gains_the_keys(
    make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(make_config, {"augment": "standard"})
    full = guard.current(cfg, "fp")
    old = {"critical": full["critical"], "soft": {k: v for k, v in full["soft"].items() if not k.startswith("data.")}}
    guard.path(cfg.output_dir).write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="vit_train"):
        guard.check(cfg.output_dir, cfg, "fp")
    assert "changed" not in caplog.text  # it never recorded the augmentation: nothing to compare with
    assert json.loads(guard.path(cfg.output_dir).read_text())["soft"]["data.augment"] == "standard"


@pytest.mark.parametrize(
    "content",
    ["[1, 2]", '"text"', "{not json", '{"critical": 7}', '{"critical": ["model_name"]}', '{"soft": {}}'],
)
def test_a_malformed_guard_is_kept_aside_and_replaced_never_a_crash(
    make_config: Any, caplog: pytest.LogCaptureFixture, content: str
) -> None:
    cfg = _cfg(make_config)
    guard.path(cfg.output_dir).write_text(content)
    with caplog.at_level(logging.WARNING, logger="vit_train"):
        guard.check(cfg.output_dir, cfg, "fp")
    assert "is malformed" in caplog.text
    aside = guard.path(cfg.output_dir).with_name(guard.path(cfg.output_dir).name + ".malformed")
    assert aside.read_text() == content  # kept, not lost
    assert json.loads(guard.path(cfg.output_dir).read_text()) == json.loads(json.dumps(guard.current(cfg, "fp")))


def test_a_soft_section_of_the_wrong_type_is_ignored(make_config: Any, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg(make_config)
    guard.path(cfg.output_dir).write_text(json.dumps({"critical": guard.current(cfg, "fp")["critical"], "soft": 3}))
    with caplog.at_level(logging.WARNING, logger="vit_train"):
        guard.check(cfg.output_dir, cfg, "fp")
    assert "changed" not in caplog.text
    assert isinstance(json.loads(guard.path(cfg.output_dir).read_text())["soft"], dict)
