"""SLURM's environment -> this supervisor's torchrun node (supervisor/slurm_env.py, launch.resolve).

Environments are dicts shaped like the ones a real SLURM 22.05 sets (recorded from a batch script
and from ``srun`` tasks); only the ``scontrol`` comparison and the USR1 check start processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from supervisor import launch, protocol, slurm_env
from supervisor.schema import ConfigError, DistributedConfig, load_config
from supervisor.slurm_env import Lookups
from tests.conftest import REPO, TINY, deep_update

# What sbatch --ntasks=2 gives the batch script (one node), and what `srun` adds for its tasks.
BATCH = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOBID": "4242",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_NODELIST": "gpu[07-08]",
    "SLURM_NNODES": "2",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NODEID": "0",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NTASKS": "2",
    "SLURM_TASKS_PER_NODE": "1(x2)",
}


def task(procid: int, nodeid: int, localid: int, **more: str) -> dict[str, str]:
    """An ``srun`` task's environment (2 tasks over 2 nodes unless ``more`` says otherwise)."""
    env = {
        **BATCH,
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_PROCID": str(procid),
        "SLURM_NODEID": str(nodeid),
        "SLURM_LOCALID": str(localid),
    }
    env.update(more)
    return env


ONE_NODE = {
    "SLURM_JOB_NODELIST": "vitnode",
    "SLURM_NODELIST": "vitnode",
    "SLURM_STEP_NODELIST": "vitnode",
    "SLURM_NNODES": "1",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURM_STEP_NUM_NODES": "1",
}


def names(resolvable: bool = True, addr: str | None = None, hostnames: list[str] | None = None) -> Lookups:
    """Lookups without scontrol or DNS: ``hostnames`` as scontrol's answer (None: scontrol missing)."""
    return Lookups(hostnames=lambda _: hostnames, node_addr=lambda _: addr, resolves=lambda _: resolvable)


# ----------------------------------------------------------------------------- nodes and ranks


def test_one_task_per_node_takes_node_rank_from_the_node_id() -> None:
    assert slurm_env.node_counts(task(1, 1, 0)) == (2, 1, False)
    assert slurm_env.node_counts(task(0, 0, 0)) == (2, 0, False)


def test_several_tasks_on_one_node_take_node_rank_from_the_task_rank() -> None:
    # Two tasks on one machine: SLURM_NODEID is 0 for both; SLURM_PROCID tells them apart.
    env = task(1, 0, 1, **ONE_NODE)
    assert slurm_env.node_counts(env) == (2, 1, True)
    assert slurm_env.node_counts(task(0, 0, 0, **ONE_NODE)) == (2, 0, True)


def test_the_batch_script_of_a_one_node_job_is_one_node() -> None:
    env = {k: v for k, v in {**BATCH, **ONE_NODE}.items() if not k.startswith("SLURM_STEP")}
    assert slurm_env.node_counts(env) == (1, 0, False)


def test_the_batch_script_of_a_multi_node_job_is_told_to_use_srun() -> None:
    with pytest.raises(ConfigError, match=r"has 2 nodes .* runs once, in the batch script: .*srun --ntasks-per-node=1"):
        slurm_env.node_counts(BATCH)


@pytest.mark.parametrize(
    ("env", "words"),
    [
        (task(2, 1, 0), "SLURM_PROCID 2 is not below SLURM_STEP_NUM_TASKS 2"),
        (task(0, 0, 0, SLURM_JOB_NUM_NODES="3"), "SLURM_NNODES is 2 but SLURM_JOB_NUM_NODES is 3"),
        (task(1, 2, 0), "SLURM_NODEID is '2'; with 2 node(s) it must be 0 .. 1"),
        (task(0, 0, 0, SLURM_STEP_NUM_TASKS="1"), "SLURM_STEP_NUM_TASKS 1 is below the step's node count 2"),
        (task(0, 0, 0, SLURM_STEP_NUM_TASKS="two"), "SLURM_STEP_NUM_TASKS is 'two', not a count"),
        ({**task(0, 0, 0), "SLURM_PROCID": ""}, "SLURM_STEP_NUM_TASKS is set but SLURM_PROCID is not"),
    ],
)
def test_inconsistent_variables_are_one_line_naming_them(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError) as e:
        slurm_env.placement(env, DistributedConfig(from_slurm=True), names())
    assert words in str(e.value) and "\n" not in str(e.value)


def test_outside_slurm_from_slurm_is_an_error_that_says_what_to_do() -> None:
    with pytest.raises(ConfigError, match=r"not a SLURM job \(no SLURM_JOB_ID\): run it with sbatch"):
        slurm_env.placement({"HOME": "/root"}, DistributedConfig(from_slurm=True), names())


def test_job_key_is_the_array_task_for_arrays_and_the_job_id_otherwise() -> None:
    assert slurm_env.job_key(BATCH) == "4242"
    array = {**BATCH, "SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "8"}
    assert slurm_env.job_key(array) == "4242_8"


# ----------------------------------------------------------------------------- node lists


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("vitnode", ["vitnode"]),
        ("node[01-03,7]", ["node01", "node02", "node03", "node7"]),  # each range keeps its own width
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[008-010]", ["n008", "n009", "n010"]),
        ("login1,gpu[1-2],cpu3", ["login1", "gpu1", "gpu2", "cpu3"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("rack2-node[4,6]-ib", ["rack2-node4-ib", "rack2-node6-ib"]),  # more than SLURM 22.05 reads
        ("a,,b", ["a", "b"]),
    ],
)
def test_the_fallback_expands_slurms_compact_node_lists(nodelist: str, hosts: list[str]) -> None:
    assert slurm_env.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", ",", "n[3-1]", "n[a-b]", "n[1-2", "n[]"])
def test_a_node_list_the_fallback_cannot_read_is_a_config_error(nodelist: str) -> None:
    with pytest.raises(ConfigError, match="SLURM node list"):
        slurm_env.expand_nodelist(nodelist)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="SLURM's scontrol is not installed here")
def test_the_fallback_agrees_with_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `scontrol show hostnames` needs a slurm.conf to read, not a running cluster.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=unit\nSlurmctldHost=localhost\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    assert slurm_env.scontrol_hostnames("a[1-2]") == ["a1", "a2"]
    for nodelist in ("node[01-03,7]", "n[8-10]", "n[008-010]", "login1,gpu[1-2],cpu3", "r[1-2]n[1-2]", "a,,b"):
        assert slurm_env.expand_nodelist(nodelist) == slurm_env.scontrol_hostnames(nodelist), nodelist


def test_the_rendezvous_host_is_the_first_node_by_scontrol_else_by_the_fallback() -> None:
    assert slurm_env.first_host("gpu[07-08]", names(hostnames=["gpu07", "gpu08"])) == "gpu07"
    assert slurm_env.first_host("gpu[07-08]", names(hostnames=None)) == "gpu07"  # no scontrol (a container)


def test_a_node_name_that_does_not_resolve_is_reached_at_slurms_node_addr() -> None:
    assert slurm_env.first_host("vitnode", names(resolvable=False, addr="127.0.0.1")) == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"first node 'vitnode' .* does not resolve here and scontrol gives no"):
        slurm_env.first_host("vitnode", names(resolvable=False, addr=None))


# ----------------------------------------------------------------------------- processes per node and ports


def test_processes_per_node_follow_slurms_gpus_else_the_config() -> None:
    assert slurm_env.nproc_per_node(task(0, 0, 0), 2, shared_node=False) == 2  # CPU job: the config's
    gpus = task(0, 0, 0, SLURM_GPUS_ON_NODE="4")
    assert slurm_env.nproc_per_node(gpus, 1, shared_node=False) == 4
    assert slurm_env.nproc_per_node(gpus, 4, shared_node=False) == 4
    with pytest.raises(ConfigError, match=r"nproc_per_node is 2 but SLURM gave this node 4 GPU\(s\)"):
        slurm_env.nproc_per_node(gpus, 2, shared_node=False)
    with pytest.raises(ConfigError, match="several supervisor tasks share it"):
        slurm_env.nproc_per_node(gpus, 1, shared_node=True)


def test_the_port_is_derived_from_the_job_id_unless_the_config_gives_one() -> None:
    p = slurm_env.placement(task(1, 1, 0), DistributedConfig(from_slurm=True), names())
    assert p.port == slurm_env.PORT_BASE + 4242 % slurm_env.PORT_SPAN
    given = DistributedConfig(from_slurm=True, rdzv_endpoint="ignored:31000")
    assert slurm_env.placement(task(1, 1, 0), given, names()).rdzv_endpoint == "gpu07:31000"


def test_a_placement_reads_as_one_line() -> None:
    p = slurm_env.placement(task(1, 0, 1, **ONE_NODE), DistributedConfig(from_slurm=True), names())
    assert p.describe() == (
        f"SLURM job 4242: node 1 of 2 (from SLURM_PROCID: several tasks per node), 1 process(es) per node, "
        f"rendezvous vitnode:{p.port}"
    )


# ----------------------------------------------------------------------------- the config and the launch


def write(tmp_path: Path, overrides: dict[str, Any]) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(deep_update(TINY, {"training": {"output_dir": str(tmp_path / "out")}, **overrides})))
    return p


SLURM_TORCHRUN = {"launcher": "torchrun", "distributed": {"from_slurm": True}}


def test_from_slurm_needs_torchrun_and_leaves_the_placement_to_slurm(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="from_slurm is true but launcher is python: set launcher: torchrun"):
        load_config(write(tmp_path, {"distributed": {"from_slurm": True}}))
    both = deep_update(SLURM_TORCHRUN, {"distributed": {"nnodes": 2, "node_rank": 1}})
    with pytest.raises(ConfigError, match=r"also sets distributed.nnodes \(2\), node_rank \(1\): SLURM gives these"):
        load_config(write(tmp_path, both))


def test_resolve_fills_the_distributed_section_and_the_launch_uses_it(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, SLURM_TORCHRUN))
    assert launch.resolve(load_config(write(tmp_path, {})), task(1, 1, 0)) == (load_config(write(tmp_path, {})), None)
    placed_cfg, placed = launch.resolve(cfg, task(1, 1, 0), names(hostnames=["gpu07", "gpu08"]))
    assert placed is not None and (placed.nnodes, placed.node_rank, placed.job) == (2, 1, "4242")
    # Node 1's supervisor keeps its own state, logs and locks, as a config giving node_rank: 1 does.
    assert placed_cfg.node_rank == 1
    assert protocol.supervisor_dir(placed_cfg.training.output_dir, placed_cfg.node_rank) == tmp_path / "out/run/node-1"
    argv = launch.launcher_argv(placed_cfg, "python3")
    port = slurm_env.PORT_BASE + 4242 % slurm_env.PORT_SPAN
    for flag in ("--nnodes=2", "--node_rank=1", "--master_addr=gpu07", f"--master_port={port}", "--rdzv_id=4242"):
        assert flag in argv
    assert argv[-2:] == ["-m", "worker"] and "--standalone" not in argv


def test_a_one_node_slurm_job_runs_torchrun_standalone(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, deep_update(SLURM_TORCHRUN, {"distributed": {"nproc_per_node": 2}})))
    batch = {k: v for k, v in {**BATCH, **ONE_NODE}.items() if not k.startswith("SLURM_STEP")}
    placed_cfg, placed = launch.resolve(cfg, batch, names())
    assert placed is not None and placed_cfg.distributed.world_size == 2 and placed_cfg.node_rank == 0
    assert "--standalone" in launch.launcher_argv(placed_cfg, "python3")


def test_start_outside_slurm_exits_2_with_one_line_before_writing_anything(tmp_path: Path) -> None:
    cfg = write(tmp_path, SLURM_TORCHRUN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(
        [sys.executable, "-m", "supervisor.cli", "start", str(cfg)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not a SLURM job (no SLURM_JOB_ID)" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_torchrun_is_started_with_sigusr1_ignored_in_the_same_process() -> None:
    # SLURM's step-wide USR1 must not kill torchrun; exec keeps the pid the supervisor watches.
    probe = (
        "import os, signal; os.kill(os.getpid(), signal.SIGUSR1); print(os.getpid(), signal.getsignal(signal.SIGUSR1))"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", launch.IGNORE_USR1, "-c", probe], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and out.split() == [str(p.pid), str(signal.SIG_IGN)]
