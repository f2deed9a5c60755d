"""Checkpoints: committed atomically, validated before they are trusted, never silently deleted.

A checkpoint keeps the HuggingFace layout (``checkpoint-N/`` with ``config.json``,
``model.safetensors``, ``optimizer.pt``, ``scheduler.pt``, ``trainer_state.json``,
``rng_state.pth``, ``training_args.bin``) so plain transformers reads it. It is
written under ``.staging-checkpoint-N`` (outside the ``checkpoint-*`` pattern that
rotation and ``get_last_checkpoint`` glob), every file fsynced, a manifest of
sizes and SHA-256 written last, then renamed into place. A directory named
``checkpoint-N`` is therefore complete, or was not written by us.

A checkpoint that fails validation is moved to ``set-aside/`` with a REASON.txt;
the next older good one is used.

Rotation (``save_total_limit``) is ours, not transformers': it deletes only
folders named exactly ``checkpoint-N`` that carry our manifest, keeping the
newest ones and the best. A user's ``checkpoint-10.bak/`` or a checkpoint
copied in from elsewhere is never deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from supervisor import protocol

log = logging.getLogger("vit_train")

MANIFEST = "vit_checkpoint.json"
STAGING_PREFIX = ".staging-checkpoint-"
SET_ASIDE = "set-aside"
REQUIRED = (
    "config.json",
    "model.safetensors",
    "trainer_state.json",
    "optimizer.pt",
    "scheduler.pt",
    "training_args.bin",
)


class CheckpointInvalid(Exception):
    """This checkpoint must not be trusted; the message says why."""


def step_of(path: Path) -> int | None:
    return protocol.checkpoint_step(path)


def is_ours(path: Path) -> bool:
    """A checkpoint this project committed: exactly ``checkpoint-N``, a real folder, with our manifest.

    Only these may ever be deleted: a user's ``checkpoint-10.bak/`` or a checkpoint copied in
    from a plain transformers run is not ours to remove.
    """
    return step_of(path) is not None and not path.is_symlink() and path.is_dir() and (path / MANIFEST).is_file()


def list_checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders, newest (highest N) first."""
    if not output_dir.is_dir():
        return []
    found = [(step, p) for p in output_dir.iterdir() if (step := step_of(p)) is not None and p.is_dir()]
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def staging_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"{STAGING_PREFIX}{step}"


def commit(staging: Path, final: Path, step: int) -> int:
    """Seal ``staging`` (fsync every file, write the manifest) and rename it to ``final``.

    Returns the checkpoint's size in bytes.
    """
    files: dict[str, dict[str, Any]] = {}
    for f in sorted(p for p in staging.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        files[str(f.relative_to(staging))] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    manifest = {"format": 1, "step": step, "created": time.time(), "files": files}
    protocol.atomic_write_json(staging / MANIFEST, manifest, durable=False)
    protocol.fsync_dir(staging)
    if final.exists():
        # Only reachable if a foreign checkpoint of the same step sits there; keep it.
        set_aside(final, "replaced by a newly committed checkpoint of the same step")
    os.rename(staging, final)
    protocol.fsync_dir(final.parent)
    return int(sum(v["size"] for v in files.values())) + (final / MANIFEST).stat().st_size


def validate(path: Path, *, deep: bool = True) -> dict[str, Any]:
    """Check everything a resume relies on. Returns the parsed trainer state.

    Raises CheckpointInvalid naming the first problem found.
    """
    if not path.is_dir():
        raise CheckpointInvalid(f"{path} is not a directory")
    step = step_of(path)
    present = {p.name for p in path.iterdir()}
    if not present:
        raise CheckpointInvalid("the directory is empty")
    missing = [n for n in REQUIRED if n not in present]
    if not any(n == "rng_state.pth" or n.startswith("rng_state_") for n in present):
        missing.append("rng_state.pth")
    if missing:
        raise CheckpointInvalid(f"missing {', '.join(missing)}")
    manifest = None
    if MANIFEST in present:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointInvalid(f"{MANIFEST} is unreadable: {exc}") from None
        for name, meta in files.items():
            f = path / name
            if not f.is_file():
                raise CheckpointInvalid(f"{name} is listed in the manifest but missing")
            size = f.stat().st_size
            if size != meta["size"]:
                raise CheckpointInvalid(f"{name} has {size} bytes, the manifest says {meta['size']} (truncated?)")
            if deep and sha256_file(f) != meta["sha256"]:
                raise CheckpointInvalid(f"{name} does not match its SHA-256 in the manifest (corrupted)")
    try:
        state: dict[str, Any] = json.loads((path / "trainer_state.json").read_text())
        gstep = int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointInvalid(f"trainer_state.json does not parse: {exc}") from None
    if step is not None and gstep != step:
        raise CheckpointInvalid(f"trainer_state.json says global_step {gstep} but the folder is {path.name}")
    if deep:
        _load_payloads(path)
    return state


def _load_payloads(path: Path) -> None:
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
            if not keys:
                raise CheckpointInvalid("model.safetensors holds no tensors")
            for k in keys:
                f.get_tensor(k)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointInvalid(f"model.safetensors does not load: {exc}") from None
    for name in ("optimizer.pt", "scheduler.pt"):
        try:
            obj = torch.load(path / name, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad pickle/zip
            raise CheckpointInvalid(f"{name} does not load: {type(exc).__name__}: {exc}") from None
        if name == "optimizer.pt" and not (isinstance(obj, dict) and "state" in obj and "param_groups" in obj):
            raise CheckpointInvalid("optimizer.pt is not an optimizer state")


def set_aside(path: Path, why: str) -> Path:
    """Move a checkpoint out of the ``checkpoint-*`` namespace, keeping it for inspection."""
    dest_root = path.parent / SET_ASIDE
    dest_root.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    dest = dest_root / f"{path.name}.{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = dest_root / f"{path.name}.{stamp}.{n}"
    os.rename(path, dest)
    try:
        (dest / "REASON.txt").write_text(f"{why}\n")
    except OSError:
        pass
    protocol.fsync_dir(path.parent)
    log.warning("Set aside broken checkpoint %s -> %s: %s", path.name, dest, why)
    return dest


def newest_good(output_dir: Path) -> Path | None:
    """The newest checkpoint that validates; broken newer ones are set aside."""
    for ckpt in list_checkpoints(output_dir):
        try:
            validate(ckpt)
        except CheckpointInvalid as exc:
            set_aside(ckpt, str(exc))
            continue
        return ckpt
    return None


def clean_staging(output_dir: Path) -> None:
    """Remove uncommitted staging folders left by a process that died mid-save.

    They were never committed (the rename is the commit), so nothing in them is
    a checkpoint; the removal is logged.
    """
    if not output_dir.is_dir():
        return
    for p in output_dir.iterdir():
        if p.name.startswith(STAGING_PREFIX) and p.is_dir():
            log.info("Removing uncommitted checkpoint staging folder %s (its save never completed)", p.name)
            shutil.rmtree(p, ignore_errors=True)


def rotation_candidates(output_dir: Path, keep: int, best: str | None) -> list[Path]:
    """Checkpoints that rotation to ``keep`` would delete: oldest first, only our own
    (:func:`is_ours`), never the newest or the best."""
    ckpts = [c for c in reversed(list_checkpoints(output_dir)) if is_ours(c)]  # oldest first
    if len(ckpts) <= keep:
        return []
    newest = ckpts[-1]
    best_path = Path(best).resolve() if best else None
    victims = [c for c in ckpts if c != newest and (best_path is None or c.resolve() != best_path)]
    excess = len(ckpts) - keep
    return victims[:excess]


def rotate(output_dir: Path, keep: int, best: str | None) -> list[Path]:
    """Delete our oldest checkpoints beyond ``keep``, never the newest or the best; return them.

    Replaces transformers' ``rotate_checkpoints``, which matches any name containing
    ``checkpoint-<digits>`` and so would delete a user's ``checkpoint-10.bak/``.
    """
    victims = rotation_candidates(output_dir, keep, best)
    for victim in victims:
        log.info("Rotating out checkpoint %s (save_total_limit %d)", victim.name, keep)
        shutil.rmtree(victim)
    return victims


def estimate_bytes(model: Any, optimizer_states_per_param: int = 2) -> int:
    """Checkpoint size before the first save: weights + optimizer moments + 10% and 1 MiB slack."""
    n = 0
    for p in model.parameters():
        n += p.numel() * p.element_size()
    total = n * (1 + optimizer_states_per_param)
    return int(total * 1.1) + (1 << 20)


def load_weights_strict(model: Any, checkpoint: Path) -> None:
    """Load every tensor of ``checkpoint`` into ``model``; any missing, unexpected or
    mismatched key is an error.

    ``from_pretrained`` maps the on-disk names to the in-memory ones (transformers 5
    renames ViT's encoder keys); the stock Trainer's ``load_state_dict(strict=False)``
    does not, and silently leaves the encoder untrained.
    """
    cls = type(model)
    loaded, info = cls.from_pretrained(str(checkpoint), output_loading_info=True)
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(map(str, info.get(kind) or []))
        if keys:
            problems.append(f"{kind.replace('_', ' ')}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
    if problems:
        raise CheckpointInvalid(f"weights in {checkpoint} do not fit the model ({'; '.join(problems)})")
    state = loaded.state_dict()
    target = model.state_dict()
    if set(state) != set(target):
        raise CheckpointInvalid(
            f"weights in {checkpoint} do not fit the model (key sets differ: {sorted(set(state) ^ set(target))[:4]})"
        )
    for k, v in state.items():
        if v.shape != target[k].shape:
            raise CheckpointInvalid(
                f"weight {k} in {checkpoint} has shape {tuple(v.shape)}, the model needs {tuple(target[k].shape)}"
            )
    model.load_state_dict(state, strict=True)
    del loaded
