"""The run configuration: the one module that knows the YAML keys.

Both sides read it: the supervisor (policy, disk reserve, hang timeouts) and the
worker (model, data, ``TrainingArguments``). It must stay importable without
torch, transformers or wandb.

Every section is a dataclass with one docstring line per field. Loading is
strict: an unknown key is an error that suggests the near miss, a wrong type or
an out-of-range value is an error that names the key, the value and what would
be valid. Errors are :class:`ConfigError` with a one-line message; the entry
points print it and exit with code 2 before anything is written.

Relative paths in the file (``training.output_dir``, ``data.path``, ``snapshot.root``,
``supervisor.metrics.textfile``) are resolved against the directory of the config
file, so the same file means the same run whatever the current directory is (a
shell, a systemd unit, ``status``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(Exception):
    """A user error in the config: one line that says what is wrong and how to fix it."""


CONCAT_MODES = ("none", "concat", "subtract", "abs_diff", "multiply")
SCRATCH = "scratch"


@dataclass
class ScratchViTConfig:
    """Architecture of a from-scratch ViT (used when ``model.model_name`` is ``scratch``)."""

    image_size: int = 224
    """Input height and width in pixels."""
    patch_size: int = 16
    """Patch height and width in pixels; must divide ``image_size``."""
    num_channels: int = 3
    """Image channels (1 for grey, 3 for RGB)."""
    hidden_size: int = 768
    """Width of the transformer."""
    num_hidden_layers: int = 12
    """Number of encoder blocks."""
    num_attention_heads: int = 12
    """Attention heads; must divide ``hidden_size``."""
    intermediate_size: int = 3072
    """Width of the MLP inside each block."""
    hidden_dropout_prob: float = 0.0
    """Dropout after attention and MLP."""
    attention_probs_dropout_prob: float = 0.0
    """Dropout on attention weights."""

    def __post_init__(self) -> None:
        for name in (
            "image_size",
            "patch_size",
            "num_channels",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        ):
            _check_min(f"model.scratch.{name}", getattr(self, name), 1)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            _check_range(f"model.scratch.{name}", getattr(self, name), 0.0, 1.0, hi_open=True)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.scratch.patch_size {self.patch_size} does not divide image_size {self.image_size}: "
                "choose a patch size that divides the image size"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.scratch.num_attention_heads {self.num_attention_heads} does not divide hidden_size "
                f"{self.hidden_size}: choose a head count that divides the hidden size"
            )


@dataclass
class ModelConfig:
    """Which ViT to train and how image pairs are fused."""

    model_name: str = SCRATCH
    """A hub id or local path of a pretrained ViT, or ``scratch`` for ``model.scratch``."""
    num_labels: int = 2
    """Number of classes."""
    concat_mode: Literal["none", "concat", "subtract", "abs_diff", "multiply"] = "none"
    """``none`` for single images; for image pairs how the two embeddings are fused."""
    scratch: ScratchViTConfig = field(default_factory=ScratchViTConfig)
    """Architecture used when ``model_name`` is ``scratch``."""

    def __post_init__(self) -> None:
        _check_min("model.num_labels", self.num_labels, 2)
        if not self.model_name.strip():
            raise ConfigError("model.model_name is empty: give a hub id, a local path or 'scratch'")


@dataclass
class DataConfig:
    """Where the images come from and how they are split."""

    source: Literal["digits", "image_folder", "pairs_csv", "hf_dataset"] = "digits"
    """``digits`` (scikit-learn's built-in handwritten digits), ``image_folder`` (one subfolder per class),
    ``pairs_csv`` (rows of ``image_a,image_b,label``) or ``hf_dataset`` (a HuggingFace ``datasets``
    directory, see ``hf_format``)."""
    path: str | None = None
    """The image folder, the CSV file or the dataset directory; not used for ``digits``."""
    hf_format: Literal["auto", "save_to_disk", "imagefolder"] = "auto"
    """How ``hf_dataset`` reads ``path``: ``save_to_disk`` (a Dataset or DatasetDict written by
    ``save_to_disk``), ``imagefolder`` (image files read by ``datasets``' imagefolder builder), or
    ``auto`` (``save_to_disk`` when the folder holds its ``state.json``/``dataset_dict.json``)."""
    image_column: str = "image"
    """``hf_dataset``: the column of images (an ``Image`` feature); for pairs the first image."""
    image_column_b: str | None = None
    """``hf_dataset`` pairs (``model.concat_mode`` other than ``none``): the column of second images."""
    label_column: str = "label"
    """``hf_dataset``: the column of labels (a ``ClassLabel`` gives the class names, else integers 0..N-1)."""
    on_corrupt_image: Literal["fail", "skip"] = "fail"
    """An image that cannot be decoded mid-run: ``fail`` (data error naming the file; the supervisor does
    not retry) or ``skip`` (use the next readable sample instead, the same for every worker and resume,
    and count it in the logs, ``run/skipped_images.jsonl`` and the exit report)."""
    image_root: str | None = None
    """Folder that relative image paths in a pairs CSV are relative to (default: the CSV's folder)."""
    train_test_split: float = 0.2
    """Fraction of the data held out for evaluation."""
    random_seed: int = 42
    """Seed of the train/eval split."""
    image_size: int | None = None
    """Pixels the images are resized to (default: the model's image size)."""
    limit: int | None = None
    """Use only the first N examples (after a seeded shuffle); for quick experiments."""

    # -- augmentation and preprocessing (worker/augment.py)
    augment: Literal["none", "standard", "trivial_augment"] = "none"
    """Random augmentation of training images: ``none``; ``standard`` (random resized crop to the image
    size, horizontal flip); ``trivial_augment`` (standard, then one TrivialAugment op). With either,
    evaluation images are resized and center-cropped. Each draw depends only on (``training.seed``,
    epoch, sample index), so a resume, a restart at another batch size or another
    ``dataloader_num_workers`` sees the same augmented samples."""
    pair_augment: Literal["independent", "same"] = "independent"
    """Image pairs: each image gets its own random draw (``independent``), or both get the same one
    (``same``: same crop, same flip)."""
    image_mean: list[float] | None = None
    """Per-channel mean subtracted after scaling pixels to [0, 1] (default: the pretrained model's image
    processor; 0.5 per channel for ``scratch``)."""
    image_std: list[float] | None = None
    """Per-channel standard deviation the pixels are divided by (default as ``image_mean``)."""

    def __post_init__(self) -> None:
        _check_range("data.train_test_split", self.train_test_split, 0.0, 1.0, lo_open=True, hi_open=True)
        if self.source != "digits" and not self.path:
            raise ConfigError(f"data.path is required when data.source is '{self.source}'")
        if self.image_size is not None:
            _check_min("data.image_size", self.image_size, 1)
        if self.limit is not None:
            _check_min("data.limit", self.limit, 4)
        for name in ("image_column", "label_column"):
            if not getattr(self, name).strip():
                raise ConfigError(f"data.{name} is empty: give the name of a column of the dataset")
        if self.image_column_b is not None and self.image_column_b == self.image_column:
            raise ConfigError(
                f"data.image_column_b is {self.image_column_b!r}, the same as data.image_column: "
                "a pair needs two different image columns"
            )
        self._check_preprocessing()

    def _check_preprocessing(self) -> None:
        if self.pair_augment != "independent" and self.augment == "none":
            raise ConfigError(
                f"data.pair_augment is {self.pair_augment} but data.augment is none: "
                "choose an augmentation, or drop pair_augment"
            )
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if values is not None and not values:
                raise ConfigError(f"data.{name} is an empty list: give one value per image channel, or leave it out")
        if (self.image_mean is None) != (self.image_std is None):
            given, missing = ("image_mean", "image_std") if self.image_std is None else ("image_std", "image_mean")
            raise ConfigError(
                f"data.{given} is set but data.{missing} is not: give both (one value per channel), or neither"
            )
        if self.image_mean is not None and self.image_std is not None:
            if len(self.image_mean) != len(self.image_std):
                raise ConfigError(
                    f"data.image_mean has {len(self.image_mean)} values but data.image_std has "
                    f"{len(self.image_std)}: give one value per image channel in each"
                )
            for i, v in enumerate(self.image_std):
                if v <= 0:
                    raise ConfigError(f"data.image_std[{i}] is {v}; every standard deviation must be above 0")


@dataclass
class TrainingConfig:
    """Maps one to one onto HuggingFace ``TrainingArguments`` (same names, same meaning)."""

    output_dir: str = "out/run"
    """The run directory: checkpoints, heartbeat, exit reports, tracker files, supervisor state."""
    num_train_epochs: float = 3.0
    """Epochs to train; training always runs all of them (no early stopping)."""
    max_steps: int = -1
    """If positive, overrides ``num_train_epochs``."""
    per_device_train_batch_size: int = 32
    """Batch per device and micro-step. The supervisor lowers it after an out-of-memory."""
    per_device_eval_batch_size: int = 64
    """Batch per device for evaluation."""
    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step. The supervisor raises it when it lowers the batch."""
    learning_rate: float = 5e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.0
    """Fraction of steps used for linear warm-up (ignored when ``warmup_steps`` > 0)."""
    warmup_steps: int = 0
    """Warm-up steps."""
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "cosine"
    """Learning-rate schedule."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    logging_steps: int = 10
    """Log loss and learning rate every N optimizer steps."""
    eval_strategy: Literal["no", "steps", "epoch"] = "epoch"
    """When to evaluate."""
    eval_steps: int | None = None
    """Evaluate every N steps (with ``eval_strategy: steps``)."""
    save_strategy: Literal["no", "steps", "epoch"] = "steps"
    """When to checkpoint. A stop signal and the last step always checkpoint."""
    save_steps: int = 500
    """Checkpoint every N optimizer steps (with ``save_strategy: steps``)."""
    save_total_limit: int | None = 3
    """Keep at most this many checkpoints (the best one is always kept); at least 2."""
    load_best_model_at_end: bool = False
    """Load the best checkpoint's weights when training ends (needs matching save and eval strategies)."""
    metric_for_best_model: Literal["f1", "accuracy", "loss"] = "f1"
    """Metric that picks the best checkpoint (macro F1, accuracy or eval loss)."""
    greater_is_better: bool | None = None
    """Whether a larger metric is better (default: true, false for loss)."""
    dataloader_num_workers: int = 0
    """DataLoader worker processes."""
    seed: int = 42
    """Seed of model initialisation, data order and dropout."""
    fp16: bool = False
    """Mixed precision with float16 (GPU)."""
    bf16: bool = False
    """Mixed precision with bfloat16."""
    tf32: bool | None = None
    """Allow TF32 matmuls on Ampere and later (None: leave torch's default)."""
    full_determinism: bool = False
    """Deterministic algorithms everywhere (slower; for bit-exact GPU resumes)."""
    optim: str = "adamw_torch"
    """Optimizer name as ``TrainingArguments.optim`` knows it."""

    def __post_init__(self) -> None:
        _check_range("training.num_train_epochs", self.num_train_epochs, 0.0, math.inf, lo_open=True)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(
                f"training.max_steps {self.max_steps} is invalid: use -1 (epochs decide) or a positive count"
            )
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_steps",
        ):
            _check_min(f"training.{name}", getattr(self, name), 1)
        _check_range("training.learning_rate", self.learning_rate, 0.0, 10.0, lo_open=True)
        _check_min("training.weight_decay", self.weight_decay, 0.0)
        _check_range("training.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        _check_min("training.warmup_steps", self.warmup_steps, 0)
        _check_min("training.max_grad_norm", self.max_grad_norm, 0.0)
        _check_min("training.dataloader_num_workers", self.dataloader_num_workers, 0)
        if self.save_total_limit is not None:
            _check_min(
                "training.save_total_limit",
                self.save_total_limit,
                2,
                why="one checkpoint is never enough: a kill during a save must leave an older good one",
            )
        if self.eval_strategy == "steps":
            if self.eval_steps is None:
                raise ConfigError("training.eval_steps is required with eval_strategy: steps")
            _check_min("training.eval_steps", self.eval_steps, 1)
        if self.fp16 and self.bf16:
            raise ConfigError("training.fp16 and training.bf16 are both true: choose one")
        if self.load_best_model_at_end:
            if self.save_strategy == "no" or self.eval_strategy == "no":
                raise ConfigError(
                    "training.load_best_model_at_end needs save_strategy and eval_strategy other than 'no'"
                )
            if self.save_strategy != self.eval_strategy:
                raise ConfigError(
                    f"training.load_best_model_at_end needs save_strategy ({self.save_strategy}) "
                    f"equal to eval_strategy ({self.eval_strategy})"
                )
            if self.save_strategy == "steps" and self.save_steps % (self.eval_steps or 1):
                raise ConfigError(
                    f"training.save_steps {self.save_steps} must be a multiple of eval_steps {self.eval_steps} "
                    "with load_best_model_at_end"
                )
        if self.greater_is_better is None:
            self.greater_is_better = self.metric_for_best_model != "loss"

    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step on one device: per-device batch × accumulation."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps


@dataclass
class TrackingConfig:
    """The experiment tracker (one run across every restart)."""

    backend: Literal["wandb", "none"] = "wandb"
    """``wandb`` or ``none``."""
    mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode: ``offline`` works with no network (sync later with ``wandb sync``)."""
    project: str = "vit-supervisor"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team or user)."""
    run_name: str | None = None
    """Display name of the run (default: the output directory's name)."""
    flush_interval_s: float = 2.0
    """How often the tracker's log is forced to disk: a hard kill loses at most this much tracker data."""

    def __post_init__(self) -> None:
        _check_range("tracking.flush_interval_s", self.flush_interval_s, 0.1, 60.0)


@dataclass
class DiskConfig:
    """Free-disk checks before every save and every launch."""

    reserve_mb: float = 512.0
    """Space that must stay free on the output directory's filesystem on top of the checkpoint."""
    on_low: Literal["wait", "stop"] = "wait"
    """Too little space: ``wait`` (pause and re-check) or ``stop`` (exit with reason disk_low)."""
    recheck_s: float = 10.0
    """How often to re-check while waiting for space."""

    def __post_init__(self) -> None:
        _check_min("disk.reserve_mb", self.reserve_mb, 0.0)
        _check_range("disk.recheck_s", self.recheck_s, 0.05, 3600.0)


LOOPBACK = "127.0.0.1"
"""Where ``supervisor.metrics.listen`` binds when it names only a port."""


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, ``:port`` or a port alone (loopback) as (host, port); ConfigError otherwise."""
    text = value.strip()
    example = "e.g. 9400 (loopback), 127.0.0.1:9400, 0.0.0.0:9400 or [::1]:9400"
    if text.isdigit():
        host, port = LOOPBACK, text
    elif text.startswith("["):
        inside, sep, rest = text[1:].partition("]")
        if not sep or not inside or not rest.startswith(":"):
            raise ConfigError(f"supervisor.metrics.listen {value!r} is not [IPv6]:port; {example}")
        host, port = inside, rest[1:]
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ConfigError(f"supervisor.metrics.listen {value!r} is not host:port or a port; {example}")
        host = host or LOOPBACK
    if not host or any(c.isspace() for c in host):
        raise ConfigError(f"supervisor.metrics.listen {value!r} has no usable host; {example}")
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"supervisor.metrics.listen {value!r}: the port must be a number from 0 to 65535 "
            f"(0: any free port, logged at start); {example}"
        )
    return host, int(port)


@dataclass
class MetricsConfig:
    """Prometheus metrics of the supervisor (:mod:`supervisor.metrics`); both outputs are off by default."""

    listen: str | None = None
    """``host:port`` of an HTTP endpoint serving ``/metrics`` (a port alone binds to loopback only;
    ``0.0.0.0:PORT`` for every interface). A port that cannot be bound stops ``start`` with exit 2."""
    textfile: str | None = None
    """A ``.prom`` file for node_exporter's textfile collector, rewritten atomically every
    ``textfile_interval_s`` and at each state change; its folder must exist and be writable."""
    textfile_interval_s: float = 5.0
    """How often the textfile is rewritten while nothing changes state."""

    def __post_init__(self) -> None:
        if self.listen is not None:
            parse_listen(self.listen)
        if self.textfile is not None:
            if not self.textfile.strip():
                raise ConfigError("supervisor.metrics.textfile is empty: give a path ending in .prom, or leave it out")
            name = Path(self.textfile).name
            if not name.endswith(".prom") or name == ".prom":
                raise ConfigError(
                    f"supervisor.metrics.textfile {self.textfile!r} must be a file name ending in .prom "
                    "(node_exporter's textfile collector reads only those), e.g. "
                    "/var/lib/prometheus/node-exporter/vit-NAME.prom"
                )
        _check_range("supervisor.metrics.textfile_interval_s", self.textfile_interval_s, 0.5, 300.0)

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) of the HTTP endpoint; None when it is off."""
        return parse_listen(self.listen) if self.listen is not None else None

    @property
    def enabled(self) -> bool:
        return self.listen is not None or self.textfile is not None


@dataclass
class SupervisorConfig:
    """Restart policy of ``vit-supervisor`` (the worker ignores this section)."""

    backoff_initial_s: float = 1.0
    """Wait before the first restart after a crash."""
    backoff_factor: float = 2.0
    """Each consecutive failure multiplies the wait by this."""
    backoff_max_s: float = 60.0
    """Longest wait between restarts."""
    max_failures_without_progress: int = 5
    """Give up after this many consecutive attempts that trained no new step."""
    oom_batch_factor: float = 0.5
    """After an out-of-memory the per-device batch is multiplied by this (0.5 halves it)."""
    min_per_device_batch: int = 1
    """Never lower the per-device batch below this; an OOM at the minimum fails the run."""
    allow_effective_batch_change: bool = False
    """If no per-device batch divides the effective batch, allow a change of effective batch."""
    hang_timeout_s: float = 600.0
    """No new optimizer step for this long while training → the worker is killed and restarted."""
    startup_timeout_s: float = 900.0
    """Allowance for start-up (imports, data, checkpoint load) before the first step."""
    eval_timeout_s: float = 1800.0
    """Allowance while the worker evaluates or saves."""
    term_grace_s: float = 60.0
    """After SIGTERM, wait this long for the worker's checkpoint before SIGKILL."""
    restart_on_external_signal: bool = True
    """Restart a worker that died from a SIGINT/SIGTERM the supervisor did not send."""
    heartbeat_interval_s: float = 1.0
    """Least time between two heartbeat writes of the worker."""
    standby: bool = True
    """Keep a pre-warmed standby worker (imported, data and model prepared, no GPU memory) that takes
    over at once when the active worker dies. Single-process launcher only."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Prometheus metrics: an HTTP endpoint and/or a textfile for node_exporter (both off by default)."""

    def __post_init__(self) -> None:
        _check_min("supervisor.backoff_initial_s", self.backoff_initial_s, 0.0)
        _check_min("supervisor.backoff_factor", self.backoff_factor, 1.0)
        _check_min("supervisor.backoff_max_s", self.backoff_max_s, 0.0)
        _check_min("supervisor.max_failures_without_progress", self.max_failures_without_progress, 1)
        _check_range("supervisor.oom_batch_factor", self.oom_batch_factor, 0.0, 1.0, lo_open=True, hi_open=True)
        _check_min("supervisor.min_per_device_batch", self.min_per_device_batch, 1)
        for name in ("hang_timeout_s", "startup_timeout_s", "eval_timeout_s", "term_grace_s"):
            _check_range(f"supervisor.{name}", getattr(self, name), 0.0, math.inf, lo_open=True)
        _check_range("supervisor.heartbeat_interval_s", self.heartbeat_interval_s, 0.0, 60.0)


@dataclass
class SnapshotConfig:
    """Training-state snapshots in host shared memory: a crash the host survives loses at most
    ``every_steps`` optimizer steps instead of everything since the last disk checkpoint."""

    every_steps: int | Literal["auto"] = "auto"
    """``auto`` (the default): as often as costs at most 2 % of training time, measured as the
    run goes (every step when that fits); N: every N optimizer steps; 0: off."""
    root: str | None = None
    """Folder on a tmpfs that holds the stores (default ``/dev/shm``); each run's store is
    ``<root>/vit-supervisor-<uid>/<run>-<hash>-rank<r>``, so runs sharing a root never collide."""

    def __post_init__(self) -> None:
        if self.every_steps != "auto":
            if isinstance(self.every_steps, bool) or not isinstance(self.every_steps, int):
                raise ConfigError(
                    f"snapshot.every_steps is {_show(self.every_steps)}; it must be auto, a whole number of steps, "
                    "or 0 (off)"
                )
            _check_min("snapshot.every_steps", self.every_steps, 0, "0 turns snapshots off, auto picks the interval")
        if self.root is not None and not self.root.strip():
            raise ConfigError("snapshot.root is empty: give a folder on a tmpfs, or leave it out for /dev/shm")

    @property
    def enabled(self) -> bool:
        """Whether the worker takes snapshots at all (``every_steps`` is not 0)."""
        return self.every_steps != 0


DEFAULT_RDZV_ENDPOINT = "127.0.0.1:29500"


@dataclass
class DistributedConfig:
    """Multi-GPU and multi-node training through torchrun (with ``launcher: torchrun``)."""

    nproc_per_node: int = 1
    """Worker processes (ranks) on this machine: usually its GPU count."""
    nnodes: int = 1
    """Machines in the job; each runs its own supervisor with its own ``node_rank``."""
    node_rank: int = 0
    """This machine's index, 0 .. nnodes-1 (node 0 hosts global rank 0: heartbeat, checkpoints, tracker)."""
    rdzv_endpoint: str = DEFAULT_RDZV_ENDPOINT
    """host:port of node 0, where the ranks meet (multi-node only; one node uses a free local port).
    With ``from_slurm`` only the port is read (the host is the job's first node), and left at the
    default the port is one derived from the job id, so that jobs sharing a node do not collide."""
    rdzv_id: str | None = None
    """Job id shared by all nodes (default: the output directory's name)."""
    from_slurm: bool = False
    """Inside a SLURM job (one ``srun`` task per node): take nnodes, node_rank, the rendezvous host and id,
    and on GPU nodes the process count, from SLURM's variables (see :mod:`supervisor.slurm_env`)."""

    def __post_init__(self) -> None:
        if self.from_slurm:
            self._check_from_slurm()
        _check_min("distributed.nproc_per_node", self.nproc_per_node, 1)
        _check_min("distributed.nnodes", self.nnodes, 1)
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(
                f"distributed.node_rank is {self.node_rank}; it must be in [0, {self.nnodes - 1}] "
                f"for nnodes {self.nnodes}"
            )
        host, _, port = self.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(
                f"distributed.rdzv_endpoint {self.rdzv_endpoint!r} must be host:port, e.g. 10.0.0.1:29500"
            )

    def _check_from_slurm(self) -> None:
        """SLURM places the node: a value the config also gives would be silently overridden."""
        given = [
            f"{name} ({value})"
            for name, value, default in (
                ("nnodes", self.nnodes, 1),
                ("node_rank", self.node_rank, 0),
                ("rdzv_id", self.rdzv_id, None),
            )
            if value != default
        ]
        if given:
            raise ConfigError(
                f"distributed.from_slurm is true and the config also sets distributed.{', '.join(given)}: "
                "SLURM gives these; drop them from the config (or set from_slurm: false)"
            )

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


@dataclass
class SlurmConfig:
    """Inside a SLURM allocation (``SLURM_JOB_ID`` set); ignored elsewhere (see supervisor/slurm.py)."""

    requeue_signal: Literal["USR1", "USR2"] = "USR1"
    """What ``#SBATCH --signal=B:<signal>@N`` sends before the time limit or a preemption: the worker
    checkpoints at the end of its step, the job is requeued (``scontrol requeue``), the supervisor
    exits. The other of the two keeps logging a status line, as outside SLURM."""


@dataclass
class Config:
    """A whole run: what to train, where, and how to keep it alive."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """TrainingArguments."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking."""
    disk: DiskConfig = field(default_factory=DiskConfig)
    """Disk-space checks."""
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    """Restart policy."""
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    """Shared-memory training-state snapshots."""
    launcher: Literal["python", "torchrun"] = "python"
    """``python``: one worker process; ``torchrun``: one process per GPU (and node), see ``distributed``."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """torchrun settings."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """Running under SLURM: the time-limit signal."""
    source_path: str = ""
    """Absolute path of the YAML file this was read from (set by the loader, not a YAML key)."""

    def __post_init__(self) -> None:
        if self.model.model_name == SCRATCH and self.data.image_size not in (None, self.model.scratch.image_size):
            raise ConfigError(
                f"data.image_size {self.data.image_size} differs from model.scratch.image_size "
                f"{self.model.scratch.image_size}: drop data.image_size or make them equal"
            )
        pairs = self.data.source == "pairs_csv" or (
            self.data.source == "hf_dataset" and self.data.image_column_b is not None
        )
        if pairs and self.model.concat_mode == "none":
            what = "pairs_csv" if self.data.source == "pairs_csv" else "hf_dataset with data.image_column_b"
            raise ConfigError(
                f"data.source is {what} but model.concat_mode is none: "
                f"set concat_mode to one of {', '.join(CONCAT_MODES[1:])}"
            )
        if not pairs and self.model.concat_mode != "none":
            raise ConfigError(
                f"model.concat_mode is {self.model.concat_mode} but data.source is {self.data.source}: "
                "image pairs need data.source: pairs_csv, or hf_dataset with data.image_column_b "
                "(or set concat_mode: none)"
            )
        if self.data.image_column_b is not None and self.data.source != "hf_dataset":
            raise ConfigError(
                f"data.image_column_b is set but data.source is {self.data.source}: it is read only for hf_dataset"
            )
        if self.launcher == "python" and self.distributed.from_slurm:
            raise ConfigError(
                "distributed.from_slurm is true but launcher is python: set launcher: torchrun "
                "(a single-process run under SLURM needs no placement; drop from_slurm)"
            )
        if self.launcher == "python" and self.distributed.world_size > 1:
            raise ConfigError(
                f"distributed asks for {self.distributed.world_size} processes but launcher is "
                "python: set launcher: torchrun"
            )
        if self.data.source == "digits" and self.model.num_labels != 10:
            raise ConfigError(f"model.num_labels is {self.model.num_labels} but the digits data set has 10 classes")
        self._check_preprocessing()

    def _check_preprocessing(self) -> None:
        """Preprocessing settings that depend on the model (a pretrained model's channels are checked by the worker)."""
        if self.data.pair_augment != "independent" and self.model.concat_mode == "none":
            raise ConfigError(
                f"data.pair_augment is {self.data.pair_augment} but model.concat_mode is none: "
                "pair_augment applies to image pairs only; drop it"
            )
        mean = self.data.image_mean
        if mean is None:
            return
        if self.model.model_name == SCRATCH:
            channels = self.model.scratch.num_channels
            if len(mean) != channels:
                raise ConfigError(
                    f"data.image_mean and data.image_std have {len(mean)} values but model.scratch.num_channels "
                    f"is {channels}: give one value per channel"
                )
        elif len(mean) not in (1, 3):
            raise ConfigError(
                f"data.image_mean and data.image_std have {len(mean)} values: give one per image channel "
                "(3 for RGB, 1 for grey)"
            )

    @property
    def output_dir(self) -> Path:
        return Path(self.training.output_dir)

    @property
    def node_rank(self) -> int:
        """This machine's node in a multi-node torchrun job (0 otherwise)."""
        return self.distributed.node_rank if self.launcher == "torchrun" else 0

    @property
    def image_size(self) -> int:
        return self.data.image_size or self.model.scratch.image_size

    def resume_critical(self) -> dict[str, Any]:
        """Settings a checkpoint depends on; the data fingerprint is added by the worker."""
        return {
            "model_name": self.model.model_name,
            "num_labels": self.model.num_labels,
            "concat_mode": self.model.concat_mode,
            "train_test_split": self.data.train_test_split,
            "random_seed": self.data.random_seed,
        }


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str], *, check_paths: bool = True) -> Config:
    """Read, validate and resolve a YAML config. Raises ConfigError with a one-line message."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    if p.is_dir():
        raise ConfigError(f"config path {p} is a directory: give the YAML file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {p} cannot be read as text: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {p} is not valid YAML{where}: {problem}") from None
    if raw is None:
        # An empty file (or one of comments only) is far more likely a mistake than a wish for
        # every default; an explicit ``{}`` still means "all defaults".
        raise ConfigError(
            f"config file {p} is empty: give at least the sections you need (model, data, training, ...), "
            "e.g. start from configs/demo.yaml"
        )
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {p} must be a YAML mapping of sections (model, data, training, ...), "
            f"not a {type(raw).__name__}"
        )
    cfg = from_dict(raw)
    base = p.resolve().parent
    cfg.source_path = str(p.resolve())
    cfg.training.output_dir = str(_resolve(base, cfg.training.output_dir))
    if cfg.data.path:
        cfg.data.path = str(_resolve(base, cfg.data.path))
    if cfg.data.image_root:
        cfg.data.image_root = str(_resolve(base, cfg.data.image_root))
    if cfg.snapshot.root:
        cfg.snapshot.root = str(_resolve(base, cfg.snapshot.root))
    if cfg.supervisor.metrics.textfile:
        cfg.supervisor.metrics.textfile = str(_resolve(base, cfg.supervisor.metrics.textfile))
    if cfg.model.model_name != SCRATCH and (
        cfg.model.model_name.startswith((".", "/", "~")) or (base / cfg.model.model_name).is_dir()
    ):
        # A path (explicit, or a folder beside the config) rather than a hub id like "google/vit-base".
        cfg.model.model_name = str(_resolve(base, cfg.model.model_name))
    if check_paths:
        check_model_path(cfg)
        check_data_paths(cfg)
        check_output_dir(cfg)
    return cfg


def check_metrics_textfile(cfg: Config) -> None:
    """``supervisor.metrics.textfile``'s folder must exist and be writable (node_exporter's textfile
    directory is made by its package or by hand, never by us). Checked by ``vit-supervisor start``
    only: a worker must never fail over the supervisor's metrics (the supervisor logs a textfile it
    cannot write and carries on)."""
    path = cfg.supervisor.metrics.textfile
    if path is None:
        return
    folder = Path(path).parent
    if Path(path).is_dir():
        raise ConfigError(f"supervisor.metrics.textfile {path} is a folder: give a file name ending in .prom")
    if not folder.is_dir():
        raise ConfigError(
            f"supervisor.metrics.textfile {path}: the folder {folder} does not exist; create it, or point the "
            "setting at node_exporter's --collector.textfile.directory"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(
            f"supervisor.metrics.textfile {path}: the folder {folder} is not writable by this user; "
            "fix its permissions (under systemd: add it to ReadWritePaths=)"
        )


def check_model_path(cfg: Config) -> None:
    """A local model path that does not exist is a config error (a hub id is checked by the worker)."""
    name = cfg.model.model_name
    if name != SCRATCH and name.startswith("/") and not Path(name).exists():
        raise ConfigError(
            f"model.model_name {name} is a path that does not exist: "
            "give a folder saved with save_pretrained, a hub id, or 'scratch'"
        )


def check_output_dir(cfg: Config) -> None:
    """The run directory must be (or become) a writable folder; checked before anything is written."""
    out = Path(cfg.training.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"training.output_dir {out} exists but is not a folder: choose another output_dir")
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"training.output_dir {out} cannot be created: {existing} is a file, not a folder")
    read_only = False
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        pass
    if read_only or not os.access(existing, os.W_OK | os.X_OK):
        what = "is" if existing == out else f"cannot be created: {existing} is"
        raise ConfigError(
            f"training.output_dir {out} {what} not writable{' (read-only filesystem)' if read_only else ''}: "
            "fix its permissions or choose another output_dir"
        )


def check_data_paths(cfg: Config) -> None:
    """Missing data is a config error, reported before anything is written."""
    if cfg.data.source == "digits":
        return
    path = Path(cfg.data.path or "")
    if cfg.data.source == "image_folder" and not path.is_dir():
        raise ConfigError(f"data.path {path} is not a folder: image_folder needs one subfolder of images per class")
    if cfg.data.source == "pairs_csv" and not path.is_file():
        raise ConfigError(f"data.path {path} does not exist: pairs_csv needs a CSV of image_a,image_b,label")
    if cfg.data.source == "hf_dataset":
        check_hf_dataset_path(cfg)
    if cfg.data.image_root and not Path(cfg.data.image_root).is_dir():
        raise ConfigError(f"data.image_root {cfg.data.image_root} is not a folder")


SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")
"""Files ``datasets.save_to_disk`` writes at the top of a DatasetDict / a Dataset directory."""


def hf_format(cfg: Config) -> str:
    """``save_to_disk`` or ``imagefolder``: ``data.hf_format`` with ``auto`` resolved from the folder."""
    if cfg.data.hf_format != "auto":
        return cfg.data.hf_format
    path = Path(cfg.data.path or "")
    return "save_to_disk" if any((path / m).is_file() for m in SAVED_DATASET_MARKERS) else "imagefolder"


def check_hf_dataset_path(cfg: Config) -> None:
    """The dataset folder exists and is what ``data.hf_format`` says (columns are checked by the worker)."""
    path = Path(cfg.data.path or "")
    if not path.exists():
        raise ConfigError(
            f"data.path {path} does not exist: hf_dataset needs a folder written by datasets' save_to_disk "
            "or a folder of images"
        )
    if not path.is_dir():
        raise ConfigError(f"data.path {path} is a file: hf_dataset needs a folder (save_to_disk output or images)")
    if cfg.data.hf_format == "save_to_disk" and not any((path / m).is_file() for m in SAVED_DATASET_MARKERS):
        raise ConfigError(
            f"data.path {path} was not written by save_to_disk (no {' or '.join(SAVED_DATASET_MARKERS)}): "
            "give the folder you passed to save_to_disk, or set data.hf_format: imagefolder"
        )


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from a plain mapping (as YAML gives it), strictly."""
    cfg: Config = _build(Config, raw, "", exclude={"source_path"})
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain mapping (for the run state and reports)."""
    return dataclasses.asdict(cfg)


def _all_keys() -> dict[str, str]:
    """Every dotted key, by its last part, for suggestions across sections."""
    out: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "source_path":
                continue
            dotted = f"{prefix}{f.name}"
            out.setdefault(f.name, dotted)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], dotted + ".")

    walk(Config, "")
    return out


def _build(cls: type, raw: Any, prefix: str, exclude: frozenset[str] | set[str] = frozenset()) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys, not {_show(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in exclude]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in names:
            raise ConfigError(_unknown_key_message(str(key), prefix, names))
        kwargs[key] = _coerce(f"{prefix}{key}", value, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise


def _unknown_key_message(key: str, prefix: str, names: list[str]) -> str:
    dotted = f"{prefix}{key}"
    near = difflib.get_close_matches(key, names, n=1, cutoff=0.75)
    if near:
        return f"unknown config key '{dotted}': did you mean '{prefix}{near[0]}'?"
    everywhere = _all_keys()
    if key in everywhere:
        return f"unknown config key '{dotted}': '{key}' belongs in '{everywhere[key]}'"
    near = difflib.get_close_matches(key, list(everywhere), n=1, cutoff=0.8)
    if near:
        return f"unknown config key '{dotted}': did you mean '{everywhere[near[0]]}'?"
    section = prefix.rstrip(".") or "the top level"
    return f"unknown config key '{dotted}': valid keys in {section} are {', '.join(names)}"


def _coerce(dotted: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(dotted, value, inner[0])
        for member in inner:  # e.g. int | Literal["auto"]: the first member that takes the value
            try:
                return _coerce(dotted, value, member)
            except ConfigError:
                pass
        raise ConfigError(f"{dotted} is {_show(value)}; valid values are {' or '.join(map(_describe, inner))}")
    if origin is Literal:
        if value not in args:
            near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"{dotted} is {_show(value)}; valid values are {', '.join(map(str, args))}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{dotted} must be a list, e.g. [0.5, 0.5, 0.5], not {_show(value)}")
        return [_coerce(f"{dotted}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, dotted + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{dotted} must be true or false, not {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{dotted} must be a whole number, not {_show(value)}")
        return value
    if tp is float:
        number = _as_float(value)
        if number is None:
            raise ConfigError(f"{dotted} must be a number, not {_show(value)}")
        if not math.isfinite(number):
            # NaN compares false with every bound and inf passes every lower bound: refuse both here.
            raise ConfigError(f"{dotted} is {_show(value)}; it must be a finite number")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{dotted} must be a string, not {_show(value)}")
        return str(value)
    raise ConfigError(f"{dotted}: unsupported type {tp}")  # pragma: no cover - schema bug


def _describe(tp: Any) -> str:
    """What a value of ``tp`` looks like in YAML, for an error message."""
    if typing.get_origin(tp) is Literal:
        return ", ".join(map(str, typing.get_args(tp)))
    return {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _as_float(value: Any) -> float | None:
    """A YAML number as a float; YAML 1.1 reads 5e-5 as a string, so numeric strings count too."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _show(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return repr(value)


def _check_min(name: str, value: float, lo: float, why: str = "") -> None:
    if value < lo:
        extra = f" ({why})" if why else ""
        raise ConfigError(f"{name} is {value}; it must be at least {lo}{extra}")


def _check_range(
    name: str, value: float, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> None:
    bad = value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi)
    if bad or math.isnan(value):
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ConfigError(f"{name} is {value}; it must be in {left}{lo}, {hi}{right}")
