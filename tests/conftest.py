"""Shared fixtures: small real configs, real processes, deadlines instead of sleeps."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# A tiny from-scratch ViT on a slice of the digits: a worker process reaches its first
# step in a few seconds (mostly imports) and trains ~20 steps a second on 2 cores.
TINY: dict[str, Any] = {
    "model": {
        "model_name": "scratch",
        "num_labels": 10,
        "scratch": {
            "image_size": 8, "patch_size": 2, "num_channels": 1, "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        },
    },
    "data": {"source": "digits", "train_test_split": 0.25, "random_seed": 7, "limit": 400},
    "training": {
        "output_dir": "out",
        "num_train_epochs": 2,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 100,
        "learning_rate": 2.0e-3,
        "warmup_ratio": 0.1,
        "logging_steps": 5,
        "eval_strategy": "epoch",
        "save_strategy": "steps",
        "save_steps": 5,
        "save_total_limit": 3,
        "seed": 3,
    },
    "tracking": {"backend": "none"},
    "disk": {"reserve_mb": 0, "recheck_s": 0.2},
    "supervisor": {
        "backoff_initial_s": 0.2, "backoff_max_s": 1.0, "heartbeat_interval_s": 0.0,
        "term_grace_s": 20, "hang_timeout_s": 60, "startup_timeout_s": 120,
    },
}


def deep_update(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = v
    return out


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a tiny config into tmp_path (with overrides merged in) and return its path."""

    def _make(overrides: dict[str, Any] | None = None, name: str = "config.yaml") -> Path:
        cfg = deep_update(TINY, overrides or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return _make


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    env.update(extra)
    return env


def vit_train(*args: str | os.PathLike[str], env: dict[str, str] | None = None,
              **popen: Any) -> subprocess.Popen[str]:
    """Start a real worker process (``python -m worker``) in its own session."""
    return subprocess.Popen([PYTHON, "-m", "worker", *map(str, args)], env=env or worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=REPO, **popen)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def heartbeat(out: Path) -> dict[str, Any]:
    return read_json(out / "run" / "heartbeat.json") or {}


@pytest.fixture(scope="session")
def reference_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The final checkpoint of an uninterrupted TINY run: what every exact resume must reproduce."""
    d = tmp_path_factory.mktemp("reference")
    cfg = d / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    p = vit_train(cfg)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    final = d / "out" / "checkpoint-38"
    assert final.is_dir()
    return final
