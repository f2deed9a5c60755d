"""Config validation: one clear line per mistake, exit 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from supervisor.schema import ConfigError, from_dict, load_config
from tests.conftest import REPO, TINY, deep_update


def write(tmp_path: Path, cfg: object, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return p


def error_for(tmp_path: Path, overrides: dict) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, deep_update(TINY, overrides)))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_demo_config_is_valid() -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.model.num_labels == 10 and cfg.training.effective_batch == 32
    assert Path(cfg.training.output_dir).is_absolute()


@pytest.mark.parametrize("name", ["tiny.yaml", "gpu-vit-base.yaml"])
def test_shipped_configs_are_valid(name: str) -> None:
    cfg = load_config(REPO / "configs" / name, check_paths=False)  # the GPU example's data is not here
    assert cfg.training.save_total_limit and cfg.training.save_total_limit >= 2


def test_torchrun_settings_are_checked(tmp_path: Path) -> None:
    msg = error_for(tmp_path, {"launcher": "torchrun", "distributed": {"nnodes": 2, "node_rank": 2}})
    assert "distributed.node_rank is 2" in msg
    msg = error_for(tmp_path, {"distributed": {"nproc_per_node": 2}})
    assert "set launcher: torchrun" in msg


def test_unknown_key_suggests_the_near_miss(tmp_path: Path) -> None:
    msg = error_for(tmp_path, {"training": {"per_device_train_batch_sise": 8}})
    assert "training.per_device_train_batch_sise" in msg
    assert "did you mean 'training.per_device_train_batch_size'" in msg


def test_key_in_the_wrong_section_names_the_right_one(tmp_path: Path) -> None:
    msg = error_for(tmp_path, {"model": {"learning_rate": 0.1}})
    assert "training.learning_rate" in msg


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    msg = error_for(tmp_path, {"training": {"per_device_train_batch_size": "big"}})
    assert "training.per_device_train_batch_size" in msg and "'big'" in msg and "whole number" in msg


def test_bool_is_not_a_number(tmp_path: Path) -> None:
    assert "whole number" in error_for(tmp_path, {"training": {"save_steps": True}})


def test_out_of_range_value(tmp_path: Path) -> None:
    msg = error_for(tmp_path, {"data": {"train_test_split": 1.5}})
    assert "data.train_test_split is 1.5" in msg and "(0.0, 1.0)" in msg


def test_bad_choice_lists_valid_values(tmp_path: Path) -> None:
    msg = error_for(tmp_path, {"model": {"concat_mode": "concatenate"}})
    assert "concat, subtract, abs_diff" in msg


def test_save_total_limit_of_one_is_refused(tmp_path: Path) -> None:
    assert "at least 2" in error_for(tmp_path, {"training": {"save_total_limit": 1}})


def test_missing_data_path(tmp_path: Path) -> None:
    msg = error_for(tmp_path, {"data": {"source": "image_folder", "path": "nowhere"}})
    assert "data.path" in msg and "nowhere" in msg


def test_non_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(write(tmp_path, "model: [unclosed\n  training: {"))


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_scientific_notation_learning_rate_is_a_number() -> None:
    cfg = from_dict({"model": {"num_labels": 10}, "training": {"learning_rate": "5e-5"}})
    assert cfg.training.learning_rate == 5e-5


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, deep_update(TINY, {"training": {"output_dir": "runs/a"}})))
    assert cfg.training.output_dir == str(tmp_path / "runs" / "a")


def test_worker_cli_reports_bad_config_in_one_line_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    cfg = write(tmp_path, deep_update(TINY, {"training": {"learning_rte": 0.1, "output_dir": "out"}}))
    r = subprocess.run([sys.executable, "-m", "worker", str(cfg)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "did you mean 'training.learning_rate'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_snapshots_are_on_by_default_with_auto_and_every_steps_is_checked(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, TINY))
    assert cfg.snapshot.every_steps == "auto" and cfg.snapshot.enabled and cfg.snapshot.root is None
    assert load_config(write(tmp_path, deep_update(TINY, {"snapshot": {"every_steps": 3}}))).snapshot.every_steps == 3
    assert not load_config(write(tmp_path, deep_update(TINY, {"snapshot": {"every_steps": 0}}))).snapshot.enabled
    assert "snapshot.every_steps is -1" in error_for(tmp_path, {"snapshot": {"every_steps": -1}})
    for bad in ("often", 1.5, True, "5"):
        msg = error_for(tmp_path, {"snapshot": {"every_steps": bad}})
        assert "snapshot.every_steps" in msg and "a whole number or auto" in msg, msg


def test_snapshot_root_resolves_against_the_config_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, deep_update(TINY, {"snapshot": {"every_steps": 5, "root": "shm"}})))
    assert cfg.snapshot.root == str(tmp_path / "shm")
