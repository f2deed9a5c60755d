"""Data sets: scikit-learn's digits, an image folder, or a CSV of image pairs.

Every source yields examples ``(pixels, label)`` (pairs: ``(pixels_a, pixels_b, label)``),
split deterministically from ``train_test_split`` and ``random_seed``, with a
fingerprint of what was read (files, sizes, labels) that the resume guard records.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from supervisor.schema import Config
from worker.augment import Transform, split_transforms

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
        return _digits(cfg, tf)
    if src == "image_folder":
        return _image_folder(cfg, tf)
    return _pairs(cfg, tf)


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


def _image_folder(cfg: Config, tf: tuple[Transform, Transform]) -> Splits:
    root = Path(cfg.data.path or "")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"data.path {root} has no class subfolders: put the images of each class in its own folder")
    if len(classes) != cfg.model.num_labels:
        raise DataError(
            f"data.path {root} has {len(classes)} class folders ({', '.join(classes[:5])}...) "
            f"but model.num_labels is {cfg.model.num_labels}"
        )
    files: list[Path] = []
    labels: list[int] = []
    for li, c in enumerate(classes):
        for f in sorted((root / c).rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                files.append(f)
                labels.append(li)
    if len(files) < 4:
        raise DataError(f"data.path {root} holds {len(files)} images; at least 4 are needed")
    lab = np.asarray(labels, dtype=np.int64)
    fp = _fingerprint(
        {
            "source": "image_folder",
            "limit": cfg.data.limit,
            "files": [[str(f.relative_to(root)), f.stat().st_size, int(y)] for f, y in zip(files, lab, strict=True)],
        }
    )
    tr, te = split_indices(len(files), lab, cfg.data.train_test_split, cfg.data.random_seed, cfg.data.limit)
    loader = _loader(tf)
    return Splits(
        ImageDataset(None, lab[tr], tf[0], loader, [files[i] for i in tr]),
        ImageDataset(None, lab[te], tf[1], loader, [files[i] for i in te]),
        fp,
        len(classes),
        classes,
    )


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
