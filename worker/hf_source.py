"""``data.source: hf_dataset``: a HuggingFace ``datasets`` directory as training data.

Two layouts (``data.hf_format``, ``auto`` picks from the folder):

- ``save_to_disk``: a ``Dataset`` or ``DatasetDict`` written by ``save_to_disk``; opened
  memory-mapped with ``load_from_disk`` (instant at any size).
- ``imagefolder``: a folder of images read by ``datasets``' ``imagefolder`` builder (class
  subfolders, optionally under ``train/`` and ``test/``/``validation/``). The builder
  lists and stats every file (about 0.1 ms per image, 20 s at 200k); its result (Arrow
  files of paths and labels, under ``run/data-cache/hf``) is remembered with a
  :mod:`worker.listing` stamp of the folder tree, so a restart or a standby opens those
  Arrow files directly instead of building again.

Splits: the dataset's own ``train`` and ``validation`` (or ``valid``, ``val``, ``test``)
when it has them, else ``data.train_test_split`` of its one split. The resume guard's
fingerprint is the dataset's own: for ``save_to_disk`` the ``_fingerprint`` its
``state.json`` records (stable across processes, kept by a copy or a move of the
folder) with the Arrow files' names and sizes; for ``imagefolder`` a hash of the class
names, the image paths relative to the folder and the labels (the builder's own
fingerprint includes absolute paths and file times, so a moved folder would refuse to
resume).
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from supervisor.schema import Config, ConfigError, hf_format
from worker import listing

log = logging.getLogger("vit_train")

EVAL_SPLITS = ("validation", "valid", "val", "test", "eval")
"""Split names taken as the evaluation split, in this order of preference."""


@dataclass
class Opened:
    """The dataset's splits as ``datasets.Dataset`` objects, and what identifies them."""

    train: Any
    eval: Any | None
    identity: dict[str, Any]
    where: str
    """The folder and its splits, for messages."""
    names: tuple[str, str | None]
    """The train and eval split names (eval None: split off train by ``data.train_test_split``)."""


def _datasets() -> Any:
    # Only local folders are read: never let a missing file turn into a hub request.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    return datasets


def open_dataset(cfg: Config) -> Opened:
    """Open the configured dataset (raises ConfigError naming what is wrong)."""
    root = Path(cfg.data.path or "")
    if not root.is_dir():
        raise ConfigError(f"data.path {root} is not a folder: hf_dataset needs a save_to_disk folder or images")
    if hf_format(cfg) == "save_to_disk":
        return _saved(root)
    return _imagefolder(cfg, root)


def _pick(splits: dict[str, Any], where: str, identity: dict[str, Any]) -> Opened:
    """The train and eval (or None) splits of a DatasetDict's splits."""
    if "train" not in splits:
        if len(splits) == 1:
            ((name, only),) = splits.items()
            return Opened(only, None, identity, f"{where} [{name}]", (name, None))
        raise ConfigError(
            f"data.path {where} has splits {', '.join(splits)} but no 'train': rename the training split to train"
        )
    ev = next((n for n in EVAL_SPLITS if n in splits), None)
    desc = f"{where} [train{', ' + ev if ev else ''}]"
    return Opened(splits["train"], splits[ev] if ev else None, identity, desc, ("train", ev))


def _saved(root: Path) -> Opened:
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(root))
    except (FileNotFoundError, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"data.path {root} cannot be opened with datasets.load_from_disk: {first}") from None
    parts = dict(ds) if isinstance(ds, datasets.DatasetDict) else {"all": ds}

    def ident(d: Any) -> dict[str, Any]:
        files = [Path(f["filename"]) for f in d.cache_files]
        return {"fingerprint": d._fingerprint, "files": [[f.name, f.stat().st_size] for f in files]}

    opened = _pick(parts, str(root), {})
    opened.identity = {
        "format": "save_to_disk",
        "train": ident(opened.train),
        "eval": ident(opened.eval) if opened.eval is not None else None,
    }
    return opened


def _imagefolder_patterns(root: Path) -> dict[str, str]:
    """``data_files`` for the builder: one pattern per split folder, or the whole tree as train.

    Explicit patterns spare the builder its pattern inference (dozens of globs of the whole
    tree: 6x slower than one)."""
    base = glob.escape(str(root))
    subdirs = {p.name for p in root.iterdir() if p.is_dir()}
    if "train" in subdirs:
        out = {"train": f"{base}/train/**"}
        ev = next((n for n in EVAL_SPLITS if n in subdirs), None)
        if ev:
            out[ev] = f"{base}/{ev}/**"
        return out
    return {"train": f"{base}/**"}


def _build_imagefolder(cfg: Config, root: Path) -> tuple[list[listing.Stamp], dict[str, Any]]:
    datasets = _datasets()
    dirs = [
        listing.stamp(root, os.path.relpath(here, root) if here != str(root) else "") for here, _, _ in os.walk(root)
    ]
    cache_dir = listing.cache_file(cfg.output_dir, "hf", root).parent / "hf"
    try:
        dd = datasets.load_dataset("imagefolder", data_files=_imagefolder_patterns(root), cache_dir=str(cache_dir))
    except (FileNotFoundError, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"data.path {root} cannot be read by datasets' imagefolder builder: {first}") from None
    splits = {}
    for name, d in dd.items():
        files = [f["filename"] for f in d.cache_files]
        splits[name] = {"files": files, "sizes": [os.stat(f).st_size for f in files], "id": _folder_id(d, root)}
    return dirs, {"splits": splits}


def _folder_id(d: Any, root: Path) -> str:
    """Class names, paths relative to the folder, labels: what the imagefolder split holds."""
    h = hashlib.sha256(repr(d.features.to_dict()).encode())
    tbl = d.with_format("arrow")[:]
    for name in tbl.column_names:
        col = tbl.column(name)
        if name == "label" or not hasattr(col.type, "get_field_index") or col.type.get_field_index("path") < 0:
            h.update(repr(col.to_pylist()).encode())
            continue
        prefix = str(root) + os.sep
        for p in col.combine_chunks().field("path").to_pylist():
            h.update(((p[len(prefix) :] if p and p.startswith(prefix) else str(p)) + "\n").encode())
    return h.hexdigest()[:16]


def _imagefolder(cfg: Config, root: Path) -> Opened:
    datasets = _datasets()

    def check(payload: Any) -> dict[str, Any]:
        splits = payload["splits"]
        if not isinstance(splits, dict) or "train" not in splits:
            raise listing.CacheMiss("no train split")
        for s in splits.values():
            for f, size in zip(s["files"], s["sizes"], strict=True):
                if not isinstance(f, str) or not os.path.isfile(f) or os.stat(f).st_size != size:
                    raise listing.CacheMiss("its Arrow files are gone or changed")
            if not isinstance(s["id"], str):
                raise listing.CacheMiss("a malformed identity")
        return splits

    cache = listing.cache_file(cfg.output_dir, "hf_imagefolder", root)
    splits, hit = listing.cached(cache, "hf_imagefolder", root, check, lambda: _build_imagefolder(cfg, root))
    opened = {
        name: datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in s["files"]])
        if len(s["files"]) > 1
        else datasets.Dataset.from_file(s["files"][0])
        for name, s in splits.items()
    }
    log.info("Dataset %s via imagefolder (%s)", root, "cached" if hit else "built")
    identity = {"format": "imagefolder", "splits": {n: s["id"] for n, s in sorted(splits.items())}}
    return _pick(opened, str(root), identity)


# --------------------------------------------------------------------------- columns and labels


def image_columns(cfg: Config) -> list[str]:
    return [cfg.data.image_column] + ([cfg.data.image_column_b] if cfg.data.image_column_b else [])


def check_columns(cfg: Config, d: Any, where: str) -> list[str] | None:
    """Raise ConfigError on a missing or mistyped column; the class names of a ClassLabel, else None."""
    datasets = _datasets()
    features = d.features
    have = ", ".join(features)
    for key, col in [*(("image_column" if i == 0 else "image_column_b", c) for i, c in enumerate(image_columns(cfg)))]:
        if col not in features:
            raise ConfigError(f"data.{key} {col!r} is not a column of {where}; its columns are {have}")
        if not isinstance(features[col], datasets.Image):
            raise ConfigError(
                f"data.{key} {col!r} of {where} holds {type(features[col]).__name__}, not images: "
                "choose a column with an Image feature (or cast it with cast_column(..., Image()))"
            )
    lab = cfg.data.label_column
    if lab not in features:
        raise ConfigError(f"data.label_column {lab!r} is not a column of {where}; its columns are {have}")
    feat = features[lab]
    if isinstance(feat, datasets.ClassLabel):
        return list(feat.names)
    if not (isinstance(feat, datasets.Value) and feat.dtype.startswith(("int", "uint"))):
        raise ConfigError(
            f"data.label_column {lab!r} of {where} holds {feat!r}: labels must be a ClassLabel or integers 0..N-1"
        )
    return None


def labels_of(cfg: Config, d: Any, where: str) -> np.ndarray:
    """The label column as int64; a missing label or one outside ``model.num_labels`` is a ConfigError."""
    n = cfg.model.num_labels
    y = np.asarray(d.with_format("arrow")[cfg.data.label_column].to_numpy(zero_copy_only=False))
    if y.dtype == object or np.issubdtype(y.dtype, np.floating):  # nulls come back as None or NaN
        bad = int(np.flatnonzero(np.asarray([v is None or v != v for v in y]))[0])
        raise ConfigError(f"{where} row {bad} has no {cfg.data.label_column}: every row needs a label")
    y = y.astype(np.int64)
    outside = np.flatnonzero((y < 0) | (y >= n))
    if len(outside):
        i = int(outside[0])
        raise ConfigError(
            f"{where} row {i} has {cfg.data.label_column} {int(y[i])}, outside 0..{n - 1} for model.num_labels {n} "
            f"({len(outside)} such rows): raise model.num_labels or fix the labels"
        )
    return y


def class_names(cfg: Config, opened: Opened) -> list[str]:
    """Check both splits' columns; the class names (a ClassLabel's, else "0".."N-1")."""
    names = check_columns(cfg, opened.train, opened.where)
    if opened.eval is not None:
        check_columns(cfg, opened.eval, opened.where)
    n = cfg.model.num_labels
    if names is None:
        return [str(i) for i in range(n)]
    if len(names) != n:
        raise ConfigError(
            f"data.label_column {cfg.data.label_column!r} of {opened.where} has {len(names)} classes "
            f"({', '.join(names[:5])}{'...' if len(names) > 5 else ''}) but model.num_labels is {n}"
        )
    return names


def check(cfg: Config) -> None:
    """Everything a ConfigError can be found from, before the worker writes anything."""
    if hf_format(cfg) == "imagefolder":
        _check_imagefolder(cfg, Path(cfg.data.path or ""))
        return
    opened = open_dataset(cfg)
    class_names(cfg, opened)
    labels_of(cfg, opened.train, opened.where)
    if opened.eval is not None:
        labels_of(cfg, opened.eval, opened.where)


def _check_imagefolder(cfg: Config, root: Path) -> None:
    """The imagefolder builder's columns are known without building it: ``image`` and ``label``
    (a ClassLabel of the class folders' names)."""
    where = f"data.path {root} (imagefolder)"
    if cfg.data.image_column_b is not None:
        raise ConfigError(f"data.image_column_b is set but {where} has one image per row: pairs need save_to_disk")
    for key, want in (("image_column", "image"), ("label_column", "label")):
        if getattr(cfg.data, key) != want:
            raise ConfigError(
                f"data.{key} {getattr(cfg.data, key)!r} is not a column of {where}; its columns are image, label"
            )
    base = root / "train" if (root / "train").is_dir() else root
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"{where} has no class subfolders: put the images of each class in its own folder")
    if len(classes) != cfg.model.num_labels:
        raise ConfigError(
            f"{where} has {len(classes)} class folders ({', '.join(classes[:5])}{'...' if len(classes) > 5 else ''}) "
            f"but model.num_labels is {cfg.model.num_labels}"
        )


# --------------------------------------------------------------------------- rows as images


class NamedBytes(io.BytesIO):
    """An image's encoded bytes that print as where they came from (error messages name the row)."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name

    def __format__(self, spec: str) -> str:
        return self.name

    def __repr__(self) -> str:  # PIL's "cannot identify image file %r"
        return repr(self.name)


class Column(Sequence[Any]):
    """One image column of some rows, read on access (never all at once, never the skipped ones).

    Yields a Path for an image stored by path, a :class:`NamedBytes` for one stored inline;
    the datasets ``Dataset`` pickles by file reference, so DataLoader workers share the mapping.
    """

    def __init__(self, d: Any, column: str, rows: np.ndarray, where: str) -> None:
        self.d = d.select_columns([column]).with_format("arrow")
        self.column = column
        self.rows = rows
        self.where = where

    def __len__(self) -> int:
        return len(self.rows)

    def cell(self, i: int) -> Any:
        row = int(self.rows[i])
        value = self.d[row].column(0)[0].as_py()
        if not value or not (value.get("bytes") or value.get("path")):
            from worker.data import DataError

            raise DataError(f"{self.where} row {row} has no image in column {self.column}")
        if value.get("bytes"):
            name = f"{self.where} row {row} ({self.column}{': ' + value['path'] if value.get('path') else ''})"
            return NamedBytes(value["bytes"], name)
        return Path(value["path"])

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self.cell(j) for j in range(len(self))[i]]
        return self.cell(i)


class ColumnPairs(Sequence[tuple[Any, Any]]):
    """Two image columns read together, as PairDataset expects its pairs."""

    def __init__(self, a: Column, b: Column) -> None:
        self.a = a
        self.b = b

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [(self.a.cell(j), self.b.cell(j)) for j in range(len(self))[i]]
        return self.a.cell(i), self.b.cell(i)


def _subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.RandomState(seed).permutation(n)[:limit])


def build(cfg: Config, tf: Any) -> Any:
    """The Splits of the configured dataset (ConfigError as DataError: the worker reports it); ``tf`` is
    the (train, eval) pair of :class:`worker.augment.Transform` that :func:`worker.data.build` made."""
    from worker import data as data_mod

    try:
        opened = open_dataset(cfg)
        names = class_names(cfg, opened)
        y_train = labels_of(cfg, opened.train, opened.where)
        eval_d = opened.eval if opened.eval is not None else opened.train
        y_eval = labels_of(cfg, opened.eval, opened.where) if opened.eval is not None else y_train
    except ConfigError as exc:
        raise data_mod.DataError(str(exc)) from None
    seed, limit = cfg.data.random_seed, cfg.data.limit
    if opened.eval is None:
        tr, te = data_mod.split_indices(len(y_train), y_train, cfg.data.train_test_split, seed, limit)
    else:  # the dataset's own splits; ``limit`` caps each of them
        tr, te = _subsample(len(y_train), limit, seed), _subsample(len(y_eval), limit, seed)
    fp = data_mod._fingerprint(
        {
            "source": "hf_dataset",
            "limit": limit,
            "dataset": opened.identity,
            "columns": [*image_columns(cfg), cfg.data.label_column],
        }
    )
    loader = data_mod._loader(tf)
    root = cfg.data.path
    train_name, eval_name = opened.names
    return data_mod.Splits(
        _dataset(cfg, opened.train, tr, y_train[tr], loader, tf[0], f"{root} [{train_name}]"),
        _dataset(cfg, eval_d, te, y_eval[te], loader, tf[1], f"{root} [{eval_name or train_name}]"),
        fp,
        len(names),
        names,
    )


def _dataset(cfg: Config, d: Any, rows: np.ndarray, labels: np.ndarray, loader: Any, transform: Any, where: str) -> Any:
    from worker import data as data_mod

    cols = [Column(d, c, rows, where) for c in image_columns(cfg)]
    if len(cols) == 2:
        return data_mod.PairDataset(ColumnPairs(cols[0], cols[1]), labels, loader, transform)  # type: ignore[arg-type]
    return data_mod.ImageDataset(None, labels, transform, loader, cols[0])  # type: ignore[arg-type]
