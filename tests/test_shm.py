"""supervisor/shm.py and the snapshot part of `status`: stores found, headers read defensively,
space estimated, and removal that deletes only what is a store's own (real files in tmp_path)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from supervisor import shm, status
from supervisor.record import RunRecord, save
from supervisor.schema import from_dict


def header(**over: Any) -> dict[str, Any]:
    h: dict[str, Any] = {
        "format": 1,
        "generation": 3,
        "slot": 0,
        "step": 12,
        "size": 5000,
        "checksum": "crc32",
        "crc32": 1234,
        "identity": {"world_size": 1},
        "time": time.time() - 5,
        "pid": 4242,
    }
    h.update(over)
    return h


def make_store(out: Path, base: Path, rank: int = 0, hdr: dict[str, Any] | bytes | None = None) -> Path:
    """A store as the worker leaves it: two slots and a header (the slots' bytes are not checked here)."""
    root = shm.default_root(out, rank, base)
    root.mkdir(parents=True, exist_ok=True)
    (root / "slot-0").write_bytes(b"a" * 5000)
    (root / "slot-1").write_bytes(b"b" * 4000)
    raw = hdr if isinstance(hdr, bytes) else json.dumps(header() if hdr is None else hdr).encode()
    (root / "header.json").write_bytes(raw)
    return root


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "out"
    out.mkdir()
    return out, tmp_path / "shm"


# ----------------------------------------------------------------------------- where


def test_default_root_is_per_user_and_per_run_and_follows_the_real_path(tmp_path: Path) -> None:
    out = tmp_path / "my run"
    out.mkdir()
    link = tmp_path / "link"
    link.symlink_to(out)
    root = shm.default_root(out, 3, tmp_path)
    assert root.parent == tmp_path / f"vit-supervisor-{os.getuid()}"
    assert root.name.startswith("my_run-") and root.name.endswith("-rank3")
    assert shm.default_root(link, 3, tmp_path) == root
    assert shm.default_root(tmp_path / "other", 3, tmp_path) != root
    assert shm.default_root(out).parent.parent == Path("/dev/shm")


def test_run_stores_lists_every_rank_of_this_run_only(run: tuple[Path, Path], tmp_path: Path) -> None:
    out, base = run
    r1, r0 = make_store(out, base, 1), make_store(out, base, 0)
    other = tmp_path / "other"
    other.mkdir()
    make_store(other, base, 0)
    prefix = r0.name.removesuffix("-rank0")
    for name in (f"{prefix}-rank0-x", f"{prefix}-rank01", f"{prefix}-rankX", f"{prefix}x-rank0"):
        (base / f"vit-supervisor-{os.getuid()}" / name).mkdir()
    assert shm.run_stores(out, base) == [r0, r1]
    assert shm.run_stores(tmp_path / "never", base) == []
    assert shm.run_stores(out, tmp_path / "no-such-base") == []


# ----------------------------------------------------------------------------- headers


def test_a_good_header_gives_step_time_size_and_ignores_unknown_keys(run: tuple[Path, Path]) -> None:
    out, base = run
    t = time.time() - 5
    root = make_store(out, base, hdr=header(time=t, previous={"slot": 1, "step": 11}, extra=[1, 2]))
    info = shm.read_store(root)
    assert (info.step, info.time, info.size, info.problem, info.rank) == (12, t, 5000, None, 0)
    assert info.used_bytes == 9000 + len((root / "header.json").read_bytes())


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (json.dumps(header(step="12")).encode(), "no usable step"),
        (json.dumps(header(step=True)).encode(), "no usable step"),
        (json.dumps(header(step=12.0)).encode(), "no usable step"),
        (json.dumps(header(step=-1)).encode(), "no usable step"),
        (json.dumps(header(step=2**70)).encode(), "no usable step"),
        (json.dumps(header(time="yesterday", size=None)).encode(), "no usable time, size"),
        (json.dumps(header(time=1e300)).encode(), "no usable time"),
        (json.dumps(header(time=False)).encode(), "no usable time"),
        (json.dumps({k: v for k, v in header().items() if k != "step"}).encode(), "no usable step"),
        (b"[1, 2, 3]", "not a JSON object"),
        (b"null", "not a JSON object"),
        (b'{"step": 1', "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b"", "not JSON"),
        (b"[" * 30000 + b"]" * 30000, "not JSON"),  # deep nesting: RecursionError, caught
        (b"{" + b" " * (shm.MAX_HEADER + 10) + b"}", "larger than"),
    ],
)
def test_a_hostile_header_is_a_problem_never_an_exception(run: tuple[Path, Path], content: bytes, problem: str) -> None:
    out, base = run
    info = shm.read_store(make_store(out, base, hdr=content))
    assert info.problem is not None and problem in info.problem, info
    assert info.used_bytes >= 9000  # the slots are still counted: they take memory


def test_a_huge_header_is_not_read(run: tuple[Path, Path]) -> None:
    out, base = run
    root = make_store(out, base)
    with open(root / "header.json", "wb") as f:  # 8 GiB, sparse: reading it would take the test down
        f.truncate(8 << 30)
    t0 = time.monotonic()
    info = shm.read_store(root)
    assert info.problem is not None and "larger than" in info.problem
    assert time.monotonic() - t0 < 5


def test_a_header_that_is_a_symlink_a_folder_or_a_fifo_is_not_followed_or_opened(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    out, base = run
    root = make_store(out, base)
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps(header(step=99)))
    (root / "header.json").unlink()
    (root / "header.json").symlink_to(outside)
    info = shm.read_store(root)
    assert info.step is None and info.problem and "unreadable" in info.problem
    (root / "header.json").unlink()
    (root / "header.json").mkdir()
    assert "unreadable" in (shm.read_store(root).problem or "")
    (root / "header.json").rmdir()
    os.mkfifo(root / "header.json")  # a plain open() would block forever
    assert "unreadable" in (shm.read_store(root).problem or "")


def test_a_store_that_is_not_a_folder_reads_as_a_problem(run: tuple[Path, Path]) -> None:
    out, base = run
    root = shm.default_root(out, 0, base)
    root.parent.mkdir(parents=True)
    root.write_text("not a folder")
    info = shm.read_store(root)
    assert info.problem is not None and info.step is None and info.used_bytes == 0
    assert shm.read_store(base / "missing").problem == "no header.json"


# ----------------------------------------------------------------------------- space


def cfg_of(tmp_path: Path, **model: Any) -> Any:
    cfg = from_dict({"model": {"num_labels": 10, **model}, "training": {"output_dir": str(tmp_path / "out")}})
    return cfg


def test_the_store_formula_is_two_slots_and_slack() -> None:
    assert shm.needed_bytes(0) == 3 * shm.SLACK
    assert shm.needed_bytes(10**9) == 2 * (10**9 + shm.SLACK) + shm.SLACK


def test_the_estimate_comes_from_the_newest_checkpoint_when_there_is_one(tmp_path: Path) -> None:
    cfg = cfg_of(tmp_path)
    for step, size in ((5, 100), (40, 3000)):
        ck = tmp_path / "out" / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        (ck / "model.safetensors").write_bytes(b"m" * size)
        (ck / "optimizer.pt").write_bytes(b"o" * 2 * size)
        (ck / "trainer_state.json").write_bytes(b"{}")
    (tmp_path / "out" / "checkpoint-40" / "sub").mkdir()  # folders are not part of a snapshot
    est = shm.estimate_state(cfg)
    assert (est.state_bytes, est.source, est.guess) == (9002, "checkpoint-40", False)
    assert est.needed == shm.needed_bytes(9002)


def test_the_estimate_of_a_scratch_model_is_its_parameters_times_twelve_bytes(tmp_path: Path) -> None:
    cfg = cfg_of(tmp_path)  # the default scratch architecture: ViT-Base/16 at 224 px
    est = shm.estimate_state(cfg)
    # ViT-B/16 with a 10-class head has 85,806,346 parameters (transformers' count; the worker-side
    # test checks the arithmetic against torch for other shapes).
    assert est.source == "model.scratch" and not est.guess
    assert est.state_bytes == 85_806_346 * 12 + shm.SMALL_FILES


def test_the_estimate_of_a_local_pretrained_model_reads_its_config_json(tmp_path: Path) -> None:
    model = tmp_path / "vit-tiny"
    model.mkdir()
    arch = {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64, "image_size": 8, "patch_size": 2}
    (model / "config.json").write_text(json.dumps({**arch, "num_channels": 1, "model_type": "vit"}))
    est = shm.estimate_state(cfg_of(tmp_path, model_name=str(model)))
    params = shm.vit_parameters(**arch, num_channels=1, num_labels=10)
    assert est.state_bytes == params * 12 + shm.SMALL_FILES and str(model) in est.source and not est.guess


def test_the_estimate_of_a_cached_hub_model_reads_the_cache_and_an_unknown_one_is_a_guess(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    blob = cache / "models--org--vit-small" / "blobs" / "abc"
    blob.parent.mkdir(parents=True)
    blob.write_text(json.dumps({"hidden_size": 384, "num_hidden_layers": 12, "intermediate_size": 1536}))
    snap = cache / "models--org--vit-small" / "snapshots" / "rev1"
    snap.mkdir(parents=True)
    (snap / "config.json").symlink_to(blob)  # how huggingface_hub lays out its cache
    est = shm.estimate_state(cfg_of(tmp_path, model_name="org/vit-small"))
    assert not est.guess and "config.json" in est.source
    assert est.state_bytes < shm.estimate_state(cfg_of(tmp_path)).state_bytes  # ViT-S < ViT-B
    unknown = shm.estimate_state(cfg_of(tmp_path, model_name="org/not-downloaded"))
    assert unknown.guess and unknown.source.startswith("a guess")
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"hidden_size": "wide"}))
    assert shm.estimate_state(cfg_of(tmp_path, model_name=str(bad))).guess


def test_a_shortfall_says_what_is_needed_what_is_free_and_how_to_fix_it() -> None:
    est = shm.Estimate(700 << 20, "checkpoint-40")
    line = shm.shortfall(64 << 20, est.needed, Path("/dev/shm"), est)
    assert line is not None and "\n" not in line
    for part in ("/dev/shm has 64.0 MiB free", "need 1.4 GiB", "checkpoint-40", "--shm-size=3g", "snapshot.root"):
        assert part in line, line
    assert "snapshot.every_steps: 0" in line
    assert shm.shortfall(est.needed, est.needed, Path("/dev/shm"), est) is None


def test_torchrun_needs_one_full_store_on_node_0_and_small_ones_for_other_ranks(tmp_path: Path) -> None:
    cfg = from_dict(
        {
            "launcher": "torchrun",
            "model": {"num_labels": 10},
            "distributed": {"nproc_per_node": 4},
            "training": {"output_dir": str(tmp_path)},
        }
    )
    est = shm.Estimate(10 << 20, "x")
    small = shm.needed_bytes(shm.SMALL_FILES)
    assert shm.run_needed_bytes(cfg, est) == est.needed + 3 * small
    cfg.distributed.nnodes, cfg.distributed.node_rank = 2, 1
    assert shm.run_needed_bytes(cfg, est) == 4 * small


def test_free_bytes_looks_up_to_an_existing_folder(tmp_path: Path) -> None:
    assert shm.free_bytes(tmp_path / "a" / "b" / "c") == shm.free_bytes(tmp_path) > 0


# ----------------------------------------------------------------------------- removal


def test_remove_deletes_every_rank_and_leftover_temporary_headers(run: tuple[Path, Path]) -> None:
    out, base = run
    roots = [make_store(out, base, r) for r in (0, 1)]
    (roots[0] / ".header.json.abc123_x.tmp").write_bytes(b"{}")
    done = shm.remove_stores(out, base)
    assert sorted(done.removed) == sorted(map(str, roots)) and done.kept == []
    assert done.freed_bytes >= 2 * 9000
    assert not any(r.exists() for r in roots) and shm.run_stores(out, base) == []
    assert shm.remove_stores(out, base).removed == []  # nothing left: a no-op


def test_remove_leaves_what_it_does_not_recognise_and_says_so(run: tuple[Path, Path], tmp_path: Path) -> None:
    out, base = run
    root = make_store(out, base)
    (root / "notes.txt").write_text("someone's")
    (root / "sub").mkdir()
    other = tmp_path / "other"
    other_root = make_store(other, base)
    done = shm.remove_stores(out, base)
    assert done.removed == [] and len(done.kept) == 1 and "notes.txt" in done.kept[0] and "sub" in done.kept[0]
    assert (root / "notes.txt").exists() and (root / "sub").is_dir()
    assert not (root / "slot-0").exists()  # our own files are gone: their memory is freed
    assert (other_root / "slot-0").exists()  # another run's store is never touched


def test_remove_never_follows_symlinks_out(run: tuple[Path, Path], tmp_path: Path) -> None:
    out, base = run
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("header.json", "slot-0", "slot-1"):
        (victim / name).write_text("precious")
    # The store folder itself a symlink to a folder of look-alike files.
    root = shm.default_root(out, 0, base)
    root.parent.mkdir(parents=True)
    root.symlink_to(victim)
    # Rank 1: a real folder whose slot is a symlink to a file outside.
    root1 = make_store(out, base, 1)
    (root1 / "slot-1").unlink()
    (root1 / "slot-1").symlink_to(victim / "slot-1")
    done = shm.remove_stores(out, base)
    assert sorted(p.name for p in victim.iterdir()) == ["header.json", "slot-0", "slot-1"]
    assert all((victim / n).read_text() == "precious" for n in ("header.json", "slot-0", "slot-1"))
    assert root.is_symlink() and (root1 / "slot-1").is_symlink()
    assert any(str(root) in k for k in done.kept) and any("slot-1" in k for k in done.kept)


def test_remove_refuses_a_user_folder_that_is_a_symlink(run: tuple[Path, Path], tmp_path: Path) -> None:
    out, base = run
    elsewhere = tmp_path / "elsewhere"
    real_root = make_store(out, elsewhere)
    base.mkdir()
    (base / f"vit-supervisor-{os.getuid()}").symlink_to(real_root.parent)
    done = shm.remove_stores(out, base)
    assert done.removed == [] and done.kept and (real_root / "slot-0").exists()


def test_a_file_in_place_of_a_store_folder_is_kept(run: tuple[Path, Path]) -> None:
    out, base = run
    root = shm.default_root(out, 0, base)
    root.parent.mkdir(parents=True)
    root.write_text("a file, not a store")
    done = shm.remove_stores(out, base)
    assert root.read_text() == "a file, not a store" and done.kept and done.removed == []


@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder owned by another user needs root")
def test_remove_never_touches_a_folder_owned_by_another_user(run: tuple[Path, Path]) -> None:
    out, base = run
    root = make_store(out, base)
    os.chown(root, 65534, 65534)
    done = shm.remove_stores(out, base)
    assert (root / "slot-0").exists() and done.kept and "not owned" in done.kept[0]


# ----------------------------------------------------------------------------- status


def status_run(tmp_path: Path, snapshot_root: Path) -> Path:
    """A run directory with a state file whose config points snapshot.root at ``snapshot_root``."""
    out = tmp_path / "out"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"model:\n  num_labels: 10\ntraining:\n  output_dir: out\nsnapshot:\n  every_steps: 1\n  root: {snapshot_root}\n"
    )
    save(out, 0, RunRecord(state="completed", config=str(cfg), supervisor_pid=999999999))
    return out


def test_status_shows_the_newest_snapshots_step_age_and_size(tmp_path: Path) -> None:
    base = tmp_path / "shm"
    out = status_run(tmp_path, base)
    make_store(out, base, hdr=header(step=12, time=time.time() - 65, size=5000))
    v = status.view(out)
    snap = v["snapshot"]
    assert snap["step"] == 12 and snap["size"] == 5000 and 64 <= snap["age_s"] < 600 and snap["problem"] is None
    assert json.loads(json.dumps(v, default=str))["snapshot"]["step"] == 12  # --json carries it
    line = next(ln for ln in status.render(v).splitlines() if "snapshot:" in ln)
    assert "step 12" in line and "1m0" in line and "ago" in line and "4.9 KiB" in line


def test_status_of_a_multi_rank_run_shows_the_step_every_rank_holds(tmp_path: Path) -> None:
    base = tmp_path / "shm"
    out = status_run(tmp_path, base)
    make_store(out, base, 0, header(step=12))
    make_store(out, base, 1, header(step=11, size=300))
    snap = status.view(out)["snapshot"]
    assert snap["step"] == 11 and snap["size"] == 5300 and [s["rank"] for s in snap["stores"]] == [0, 1]


@pytest.mark.parametrize("content", [b"{not json", json.dumps(header(step="x")).encode(), b"[]"])
def test_status_says_unreadable_for_a_hostile_header_never_a_traceback(tmp_path: Path, content: bytes) -> None:
    base = tmp_path / "shm"
    out = status_run(tmp_path, base)
    make_store(out, base, hdr=content)
    v = status.view(out)
    assert v["snapshot"]["problem"] and v["snapshot"]["step"] is None
    assert "snapshot:    unreadable (rank 0: header.json" in status.render(v)


def test_status_without_a_store_or_with_an_unreadable_config_shows_no_snapshot(tmp_path: Path) -> None:
    base = tmp_path / "shm"
    out = status_run(tmp_path, base)
    v = status.view(out)
    assert v["snapshot"] is None and "snapshot:" not in status.render(v)
    (tmp_path / "config.yaml").write_bytes(b"\x00\xff: [")  # the config edited into garbage: /dev/shm is looked at
    assert status.view(out)["snapshot"] is None


# ----------------------------------------------------------------------------- against the real model (torch)


@pytest.mark.parametrize(
    ("concat_mode", "scratch"),
    [
        ("none", {"image_size": 8, "patch_size": 2, "num_channels": 1, "hidden_size": 32, "num_hidden_layers": 2}),
        ("concat", {"image_size": 16, "patch_size": 4, "num_channels": 3, "hidden_size": 48, "num_hidden_layers": 3}),
        ("subtract", {"image_size": 12, "patch_size": 3, "num_channels": 2, "hidden_size": 24, "num_hidden_layers": 1}),
    ],
)
def test_the_parameter_arithmetic_matches_the_workers_model_and_a_real_checkpoint(
    tmp_path: Path, concat_mode: str, scratch: dict[str, int]
) -> None:
    torch = pytest.importorskip("torch")
    import io

    import safetensors.torch

    from worker import model as model_mod
    from worker.snapshot import SnapshotStore

    data = {"source": "pairs_csv", "path": str(tmp_path / "pairs.csv")} if concat_mode != "none" else {}
    scratch = {**scratch, "num_attention_heads": 2, "intermediate_size": 2 * scratch["hidden_size"]}
    labels = 10 if concat_mode == "none" else 3
    cfg = from_dict(
        {
            "model": {"num_labels": labels, "concat_mode": concat_mode, "scratch": scratch},
            "data": data,
            "training": {"output_dir": str(tmp_path / "out")},
        }
    )
    model = model_mod.build(cfg, [str(i) for i in range(labels)])
    params = sum(p.numel() for p in model.parameters())
    arch = {k: v for k, v in scratch.items() if k != "num_attention_heads"}
    assert params == shm.vit_parameters(**arch, num_labels=labels, concat_mode=concat_mode)
    # The estimate is what a checkpoint of it takes: weights + AdamW's two moments, fp32.
    opt = torch.optim.AdamW(model.parameters())
    model.train()
    shape = (2, 2, scratch["num_channels"], scratch["image_size"], scratch["image_size"])
    pixels = torch.zeros(shape if concat_mode != "none" else shape[1:])
    model(pixel_values=pixels, labels=torch.zeros(2, dtype=torch.long)).loss.backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    measured = len(safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()})) + len(
        buf.getvalue()
    )
    est = shm.estimate_state(cfg)
    assert measured <= est.state_bytes <= measured + shm.SMALL_FILES + measured // 5
    assert SnapshotStore.needed_bytes(measured) == shm.needed_bytes(measured)


def test_a_standby_honours_a_go_line_that_says_disk_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor import protocol
    from worker import standby

    monkeypatch.setattr(standby, "set_process_name", lambda name: None)  # keep pytest's own name
    for key in (protocol.ENV_SUPERVISOR_PID, protocol.ENV_ATTEMPT, protocol.ENV_EXIT_REPORT):
        monkeypatch.setenv(key, "")  # restored after the test; the go sets them
    for snapshots, every in ((True, 5), (False, 0)):
        cfg = from_dict({"model": {"num_labels": 10}, "snapshot": {"every_steps": 5}})
        order = protocol.LaunchOrder(3, str(tmp_path / "exit-3.json"), 1, 16, 1, snapshots=snapshots)
        assert standby._become_worker(cfg, order.to_line()) == order
        assert cfg.snapshot.every_steps == every
        assert ("--no-snapshots" in order.argv()) is not snapshots
