"""A worker's start-up stays lean (worker/startup.py): a plain run never imports HuggingFace
``datasets``, imports with the collector off and trains with it on."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor.schema import load_config
from tests.conftest import PYTHON, REPO, note_real_process, worker_env
from worker import startup

# A whole real run through the worker's entry point, in a fresh interpreter: what it imported by
# the end (training, evaluation and saves included) and the collector's state.
PROBE = """
import gc, json, sys
from worker.cli import main
code = main([sys.argv[1]])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {not_imported})
print(json.dumps({{"code": code, "heavy": heavy, "gc": gc.isenabled(), "frozen": gc.get_freeze_count()}}))
"""


@pytest.mark.e2e
def test_a_plain_run_never_imports_datasets_and_trains_with_the_collector_on(
    make_config: Callable[..., Path],
) -> None:
    cfg = make_config({"training": {"max_steps": 6, "save_steps": 3}})
    note_real_process("worker")
    done = subprocess.run(
        [PYTHON, "-c", PROBE.format(not_imported=set(startup.NOT_IMPORTED)), str(cfg)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=worker_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["code"] == 0, done.stderr[-3000:]
    assert probe["heavy"] == [], f"a plain worker imported {probe['heavy']}"
    assert probe["gc"] is True and probe["frozen"] > 100_000


def test_the_hook_acts_once_just_before_its_module_is_imported(tmp_path: Path) -> None:
    (tmp_path / "startup_probe_mod.py").write_text("import sys\nSEEN = sys.modules.get('startup_probe_flag')\n")
    calls: list[str] = []

    def action() -> None:
        calls.append("called")
        sys.modules["startup_probe_flag"] = sys  # any module: the probe records what it saw on import

    hook = startup._BeforeImport("startup_probe_mod", action)
    sys.path.insert(0, str(tmp_path))
    sys.meta_path.insert(0, hook)
    try:
        import startup_probe_mod  # type: ignore[import-not-found]

        assert calls == ["called"] and startup_probe_mod.SEEN is sys
        assert hook not in sys.meta_path
    finally:
        sys.path.remove(str(tmp_path))
        if hook in sys.meta_path:
            sys.meta_path.remove(hook)
        sys.modules.pop("startup_probe_mod", None)
        sys.modules.pop("startup_probe_flag", None)


def test_an_hf_dataset_run_keeps_datasets(make_config: Callable[..., Path], tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    hf = load_config(make_config({"data": {"source": "hf_dataset", "path": "ds", "limit": None}}), check_paths=False)
    plain = load_config(make_config({}, name="plain.yaml"))
    before = list(sys.meta_path)
    try:
        startup.skip_unused_imports(hf)
        assert sys.meta_path == before
        if "transformers.trainer" not in sys.modules:  # imported already: nothing left to skip
            startup.skip_unused_imports(plain)
            assert [type(f) for f in sys.meta_path if f not in before] == [startup._BeforeImport]
    finally:
        sys.meta_path[:] = before


def test_imports_run_without_the_collector_and_leave_it_as_it_was() -> None:
    was = gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            with startup.imports_without_gc():
                assert not gc.isenabled()
            assert gc.isenabled() is enabled and gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
        (gc.enable if was else gc.disable)()
