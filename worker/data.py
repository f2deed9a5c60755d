"""Data sets: scikit-learn's digits, an image folder, or a CSV of image pairs.

Every source yields examples ``(pixels, label)`` (pairs: ``(pixels_a, pixels_b, label)``),
split deterministically from ``train_test_split`` and ``random_seed``, with a
fingerprint of what was read (files, sizes, labels) that the resume guard records.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import stat
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from torch.utils.data import Dataset

from supervisor import protocol
from supervisor.schema import Config
from worker import listing
from worker.augment import Transform, split_transforms

log = logging.getLogger("vit_train")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataError(Exception):
    """The data cannot be used as configured (missing files, unreadable images, bad CSV)."""


def error_message(exc: DataError) -> str:
    """The one-line message of a DataError, also when a DataLoader worker raised it.

    torch re-raises a worker's exception in the main process with the worker's whole
    traceback as its message; the original message is its last line.
    """
    lines = str(exc).strip().splitlines() or [""]
    prefix = f"{DataError.__module__}.{DataError.__qualname__}: "
    for line in reversed(lines):
        if line.startswith(prefix):
            return line[len(prefix) :]
    return lines[0]


@dataclass
class Splits:
    train: Dataset[Any]
    eval: Dataset[Any]
    fingerprint: str
    num_classes: int
    class_names: list[str]


class TransformedDataset(Dataset[Any]):
    """A data set whose ``__getitem__(i)`` passes each [0, 1] image through ``self.transform(image, i, slot)``
    (slot 0, and 1 for the second image of a pair): the model's size and normalisation, and an
    augmentation whose draws depend on (seed, epoch, ``i``, slot) only. Every source's data sets are one.
    """

    transform: Transform

    def set_epoch(self, epoch: int) -> None:
        """The epoch starting (the Trainer's callback calls it before the epoch's DataLoader workers start)."""
        self.transform.set_epoch(epoch)


class ImageDataset(TransformedDataset):
    """Single images as ``{"pixel_values": (C,H,W) float, "labels": int}``.

    ``pixels`` (or what ``loader`` reads from ``items``) are [0, 1] images; ``transform`` augments,
    sizes and normalises them, sample ``i``'s randomness depending only on (seed, epoch, ``i``).
    """

    def __init__(
        self,
        pixels: torch.Tensor | None,
        labels: np.ndarray,
        transform: Transform,
        loader: Any = None,
        items: list[Any] | None = None,
    ) -> None:
        self.pixels = pixels
        self.labels = labels
        self.transform = transform
        self.loader = loader
        self.items = items

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        # items are given whenever pixels are not
        px = self.pixels[i] if self.pixels is not None else self.loader(self.items[i])  # type: ignore[index]
        return {"pixel_values": self.transform(px, i), "labels": int(self.labels[i])}


class PairDataset(TransformedDataset):
    """Image pairs as ``{"pixel_values": (2,C,H,W) float, "labels": int}``; the two images are slots 0
    and 1 of sample ``i`` (their own draws, or one shared draw with ``data.pair_augment: same``)."""

    def __init__(self, pairs: list[tuple[Path, Path]], labels: np.ndarray, loader: Any, transform: Transform) -> None:
        self.pairs = pairs
        self.labels = labels
        self.loader = loader
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        a, b = self.pairs[i]
        images = [self.transform(self.loader(p), i, slot) for slot, p in enumerate((a, b))]
        return {"pixel_values": torch.stack(images), "labels": int(self.labels[i])}


def build(cfg: Config) -> Splits:
    """Read the configured data set and split it (raises DataError, or ModelUnavailable when the
    preprocessing of ``model.model_name`` cannot be read)."""
    from worker import model as model_mod

    prep = model_mod.preprocessing(cfg)
    d = cfg.data
    tf = split_transforms(prep, d.augment, cfg.training.seed, d.pair_augment == "same")
    src = d.source
    if src == "digits":
        splits = _digits(cfg, tf)
    elif src == "image_folder":
        splits = _image_folder(cfg, tf)
    elif src == "hf_dataset":
        from worker import hf_source

        splits = hf_source.build(cfg, tf)
    else:
        splits = _pairs(cfg, tf)
    if cfg.data.on_corrupt_image == "skip":
        global _skip_log
        _skip_log = SkipLog(protocol.run_dir(cfg.output_dir) / SKIPPED_IMAGES, _PROCESS_TOKEN)
        splits.train = SkipCorrupt(splits.train, _skip_log, "train")
        splits.eval = SkipCorrupt(splits.eval, _skip_log, "eval")
    return splits


# --------------------------------------------------------------------------- corrupt images

SKIPPED_IMAGES = "skipped_images.jsonl"
"""One JSON line per skipped sample, in the run folder (appended by whichever process met it)."""
MAX_CONSECUTIVE_SKIPS = 64
"""This many unreadable samples in a row is not a few bad files but missing data (an unmounted
disk): fail as a data error instead of skipping through the whole epoch."""


@dataclass(frozen=True)
class SkipLog:
    """Where skips are recorded, and the token of this process (counts only ours)."""

    path: Path
    token: str

    def note(self, split: str, index: int, message: str) -> None:
        line = json.dumps(
            {"time": time.time(), "token": self.token, "split": split, "index": index, "message": message}
        )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One write of one short line with O_APPEND: lines of DataLoader workers do not interleave.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("Could not record the skip in %s: %s", self.path, exc)

    def count(self) -> int:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return 0
        return sum(1 for line in text.splitlines() if f'"token": "{self.token}"' in line)


_skip_log: SkipLog | None = None
_PROCESS_TOKEN = uuid.uuid4().hex
"""Marks this process's skips (and its DataLoader workers'): a standby that builds the data again
before taking over, or an earlier attempt's lines in the same file, must not change the count."""


def skipped_images() -> int | None:
    """Samples skipped as unreadable since this process built its data (None: skipping is off)."""
    return _skip_log.count() if _skip_log is not None else None


class SkipCorrupt(Dataset[Any]):
    """``data.on_corrupt_image: skip``: an unreadable sample is replaced by the next readable one.

    The replacement depends on the index only (i+1, i+2, ... wrapping around), so every
    DataLoader worker, every resume and every batch size draws the same one; the cost is
    that the replacing sample is seen twice in the epoch. Each skip is logged and recorded.
    """

    def __init__(self, inner: Dataset[Any], skips: SkipLog, split: str) -> None:
        self.inner = inner
        self.skips = skips
        self.split = split

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # items, labels, ... of the wrapped dataset
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __getitem__(self, i: int) -> Any:
        n = len(self)
        first = ""
        for k in range(min(n, MAX_CONSECUTIVE_SKIPS)):
            j = (i + k) % n
            try:
                return self.inner[j]
            except DataError as exc:
                msg = error_message(exc)
                first = first or msg
                log.warning(
                    "Skipping an unreadable %s sample %d (%s); trying sample %d", self.split, j, msg, (j + 1) % n
                )
                self.skips.note(self.split, j, msg)
        raise DataError(
            f"{min(n, MAX_CONSECUTIVE_SKIPS)} {self.split} samples in a row from index {i} cannot be read, "
            f"the first: {first} (is the data's disk missing? data.on_corrupt_image: skip only covers a few bad files)"
        )


def split_indices(
    n: int, labels: np.ndarray, test_fraction: float, seed: int, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic, stratified where every class has at least two examples."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    if limit is not None and limit < n:
        idx = np.random.RandomState(seed).permutation(n)[:limit]
        idx.sort()
    sub = labels[idx]
    counts = np.bincount(sub) if len(sub) else np.array([])
    stratify = sub if len(counts) and counts[counts > 0].min() >= 2 else None
    n_test = max(1, round(len(idx) * test_fraction))
    if stratify is not None and n_test < len(np.unique(sub)):
        stratify = None
    if n_test >= len(idx):
        raise DataError(f"data.train_test_split {test_fraction} leaves no training examples out of {len(idx)}")
    train, test = train_test_split(idx, test_size=n_test, random_state=seed, shuffle=True, stratify=stratify)
    return np.asarray(train), np.asarray(test)


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _digits(cfg: Config, tf: tuple[Transform, Transform]) -> Splits:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = d.images.astype(np.float32) / 16.0  # (n, 8, 8) in [0, 1]
    labels = d.target.astype(np.int64)
    size = tf[0].prep.image_size
    x = torch.from_numpy(images).unsqueeze(1)
    if size != 8 and not tf[0].resizes_itself:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    fp = _fingerprint(
        {
            "source": "digits",
            "n": len(labels),
            "sha": hashlib.sha256(d.images.tobytes()).hexdigest(),
            "labels": hashlib.sha256(labels.tobytes()).hexdigest(),
            "limit": cfg.data.limit,
        }
    )
    tr, te = split_indices(len(labels), labels, cfg.data.train_test_split, cfg.data.random_seed, cfg.data.limit)
    return Splits(
        ImageDataset(x[tr], labels[tr], tf[0]),
        ImageDataset(x[te], labels[te], tf[1]),
        fp,
        10,
        [str(i) for i in range(10)],
    )


class ImageLoader:
    """Opens an image file as a (C,H,W) tensor in [0, 1], resized to ``size`` × ``size`` (``None``: its
    own size, for an augmentation that crops); picklable for DataLoader workers."""

    def __init__(self, size: int | None, channels: int) -> None:
        self.size = size
        self.channels = channels

    def __call__(self, path: Path) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(path) as f:
                im = f.convert("L" if self.channels == 1 else "RGB")
                if self.size is not None:
                    im = im.resize((self.size, self.size), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            # PIL reports a corrupt file with any of these, depending on the format and the damage.
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"cannot read image {path}: {first}") from None
        t = torch.from_numpy(arr)
        t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
        return t.contiguous()


def _loader(tf: tuple[Transform, Transform]) -> ImageLoader:
    prep = tf[0].prep
    return ImageLoader(None if tf[0].resizes_itself else prep.image_size, prep.channels)


@dataclass
class FolderListing:
    """An image folder's classes and files (relative paths, sorted as ``sorted(rglob)`` sorts them)."""

    classes: list[str]
    files: list[str]
    labels: np.ndarray
    sizes: list[int]
    fingerprints: dict[str, str]
    """The data fingerprint by ``json.dumps(data.limit)``, for those computed when listing."""


def _folder_fingerprint(files: list[str], sizes: list[int], labels: list[int], limit: int | None) -> str:
    # The same value as before the listing was cached: runs started then still resume.
    entries = [[f, s, y] for f, s, y in zip(files, sizes, labels, strict=True)]
    return _fingerprint({"source": "image_folder", "limit": limit, "files": entries})


def list_image_folder(root: Path, limit: int | None = None) -> tuple[list[listing.Stamp], dict[str, Any]]:
    """Walk the class folders: the directory stamps and the listing's payload (see :mod:`worker.listing`),
    with the fingerprint for ``limit`` (the costliest part of a warm start at 200k images otherwise)."""
    dirs = [listing.stamp(root, "")]
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[str] = []
    sizes: list[int] = []
    counts: list[int] = []
    for c in classes:
        found: list[tuple[list[str], str, int]] = []
        # Symlinked folders are not followed, symlinked files are (as Path.rglob and is_file do).
        for here, subdirs, names in os.walk(root / c):
            rel_dir = os.path.relpath(here, root)
            dirs.append(listing.stamp(root, rel_dir))
            subdirs.sort()
            for name in names:
                if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                    continue
                full = os.path.join(here, name)
                try:
                    st = os.stat(full)
                except OSError:
                    continue  # a dangling symlink is not an image
                if stat.S_ISREG(st.st_mode):
                    if "\n" in name:
                        raise DataError(f"image file name {os.path.join(here, name)!r} holds a line break: rename it")
                    rel = f"{rel_dir}/{name}"
                    found.append((rel.split("/"), rel, st.st_size))
        found.sort(key=lambda t: t[0])
        files.extend(t[1] for t in found)
        sizes.extend(t[2] for t in found)
        counts.append(len(found))
    labels = [k for k, n in enumerate(counts) for _ in range(n)]
    fps = {json.dumps(limit): _folder_fingerprint(files, sizes, labels, limit)}
    return dirs, {"classes": classes, "counts": counts, "files": "\n".join(files), "sizes": sizes, "fingerprints": fps}


def _check_folder_payload(payload: Any) -> FolderListing:
    """A listing payload as a FolderListing; a cache file that lies about any of it is a miss."""
    classes, counts, sizes = payload["classes"], payload["counts"], payload["sizes"]
    files = payload["files"].split("\n") if payload["files"] else []
    if not (isinstance(classes, list) and isinstance(counts, list) and isinstance(sizes, list)):
        raise listing.CacheMiss("a malformed payload")
    if len(counts) != len(classes) or sum(counts) != len(files) or len(sizes) != len(files):
        raise listing.CacheMiss("counts that do not add up")
    if any(type(v) is not int or v < 0 for v in counts) or (
        sizes and (np.asarray(sizes).dtype.kind not in "iu" or min(sizes) < 0)
    ):
        raise listing.CacheMiss("a negative or non-integer count or size")
    if any(not isinstance(c, str) or not c or "/" in c or "\n" in c or c.startswith(".") for c in classes):
        raise listing.CacheMiss("a malformed class name")
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), counts)
    # Every path stays inside its own class folder: a crafted cache cannot point elsewhere.
    blob = "\n" + payload["files"] + "\n"
    if any(bad in blob for bad in ("/../", "/..\n", "//", "/\n", "\n/")):
        raise listing.CacheMiss("a path that leaves its folder")
    if len(set(classes)) != len(classes):
        raise listing.CacheMiss("a class named twice")
    # Each class's block of lines, as one string: n lines that all start with "<class>/" hold n
    # occurrences of "\n<class>/". Counted in C: a loop over 200k paths cost more than the listing.
    start = pos = 0
    for c, n in zip(classes, counts, strict=True):
        width = sum(map(len, files[start : start + n])) + n
        if blob.count(f"\n{c}/", pos, pos + width) != n:
            raise listing.CacheMiss(f"a path outside its class folder {c}")
        start, pos = start + n, pos + width
    fps = payload.get("fingerprints", {})
    if not isinstance(fps, dict) or not all(isinstance(v, str) for v in fps.values()):
        raise listing.CacheMiss("malformed fingerprints")
    return FolderListing(classes, files, labels, sizes, fps)


def _image_folder(cfg: Config, tf: tuple[Transform, Transform]) -> Splits:
    root = Path(cfg.data.path or "")
    cache = listing.cache_file(cfg.output_dir, "image_folder", root)
    found, hit = listing.cached(
        cache, "image_folder", root, _check_folder_payload, lambda: list_image_folder(root, cfg.data.limit)
    )
    log.info("Image folder %s: %d images (listing %s)", root, len(found.files), "cached" if hit else "made")
    classes = found.classes
    if not classes:
        raise DataError(f"data.path {root} has no class subfolders: put the images of each class in its own folder")
    if len(classes) != cfg.model.num_labels:
        raise DataError(
            f"data.path {root} has {len(classes)} class folders ({', '.join(classes[:5])}...) "
            f"but model.num_labels is {cfg.model.num_labels}"
        )
    if len(found.files) < 4:
        raise DataError(f"data.path {root} holds {len(found.files)} images; at least 4 are needed")
    lab = found.labels
    fp = found.fingerprints.get(json.dumps(cfg.data.limit)) or _folder_fingerprint(
        found.files, found.sizes, lab.tolist(), cfg.data.limit
    )
    tr, te = split_indices(len(found.files), lab, cfg.data.train_test_split, cfg.data.random_seed, cfg.data.limit)
    loader = _loader(tf)
    return Splits(
        ImageDataset(None, lab[tr], tf[0], loader, FolderFiles(root, found.files, tr)),  # type: ignore[arg-type]
        ImageDataset(None, lab[te], tf[1], loader, FolderFiles(root, found.files, te)),  # type: ignore[arg-type]
        fp,
        len(classes),
        classes,
    )


class FolderFiles(Sequence[Path]):
    """The paths of one split, made on access: 200k Path objects cost more than the listing itself."""

    def __init__(self, root: Path, files: list[str], index: np.ndarray) -> None:
        self.root = root
        self.files = files
        self.rows = index

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, i: int) -> Path: ...
    @overload
    def __getitem__(self, i: slice) -> list[Path]: ...
    def __getitem__(self, i: int | slice) -> Path | list[Path]:
        if isinstance(i, slice):
            return [self.root / self.files[j] for j in self.rows[i]]
        return self.root / self.files[self.rows[i]]


def _pair_row(csv_path: Path, line: int, row: dict[str | Any, Any], base: Path) -> tuple[Path, Path, str]:
    """One CSV row as (image_a, image_b, label); a short, long or blank-celled row is an error naming its line."""
    if None in row:  # DictReader's key for fields beyond the header
        raise DataError(f"{csv_path} line {line} has more fields than the header: quote paths that contain commas")
    cells = {k: (row.get(k) or "").strip() for k in ("image_a", "image_b", "label")}
    empty = [k for k, v in cells.items() if not v]
    if empty:
        raise DataError(f"{csv_path} line {line} has no {', '.join(empty)} (every row needs image_a,image_b,label)")
    a, b = base / cells["image_a"], base / cells["image_b"]
    for p in (a, b):
        if not p.is_file():
            raise DataError(f"{csv_path} line {line}: image {p} does not exist")
    return a, b, cells["label"]


def _pairs(cfg: Config, tf: tuple[Transform, Transform]) -> Splits:
    csv_path = Path(cfg.data.path or "")
    base = Path(cfg.data.image_root) if cfg.data.image_root else csv_path.parent
    pairs: list[tuple[Path, Path]] = []
    raw_labels: list[str] = []
    try:
        # utf-8-sig: a spreadsheet's byte-order mark would otherwise glue itself to "image_a".
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            need = {"image_a", "image_b", "label"}
            if not reader.fieldnames or not need <= set(reader.fieldnames):
                raise DataError(
                    f"{csv_path} must have a header row with columns image_a,image_b,label (found {reader.fieldnames})"
                )
            for row in reader:
                a, b, label = _pair_row(csv_path, reader.line_num, row, base)
                pairs.append((a, b))
                raw_labels.append(label)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {csv_path}: {exc}") from None
    classes = sorted(
        set(raw_labels), key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s)
    )
    if len(classes) > cfg.model.num_labels:
        raise DataError(f"{csv_path} has {len(classes)} distinct labels but model.num_labels is {cfg.model.num_labels}")
    lab = np.asarray([classes.index(s) for s in raw_labels], dtype=np.int64)
    if len(pairs) < 4:
        raise DataError(f"{csv_path} holds {len(pairs)} pairs; at least 4 are needed")
    sizes = {p: p.stat().st_size for ab in pairs for p in ab}
    fp = _fingerprint(
        {
            "source": "pairs_csv",
            "limit": cfg.data.limit,
            "csv": hashlib.sha256(csv_path.read_bytes()).hexdigest(),
            "files": sorted(
                [str(p.relative_to(base)) if p.is_relative_to(base) else str(p), s] for p, s in sizes.items()
            ),
        }
    )
    tr, te = split_indices(len(pairs), lab, cfg.data.train_test_split, cfg.data.random_seed, cfg.data.limit)
    loader = _loader(tf)
    return Splits(
        PairDataset([pairs[i] for i in tr], lab[tr], loader, tf[0]),
        PairDataset([pairs[i] for i in te], lab[te], loader, tf[1]),
        fp,
        len(classes),
        classes,
    )
