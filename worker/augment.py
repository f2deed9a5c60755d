"""Image preprocessing: the model's size and normalisation, and random augmentation that resumes exactly.

Every random draw is a pure function of (seed, epoch, sample index, image slot): the
transform seeds a private copy of torch's CPU generator from a hash of those four numbers
around each sample's augmentation, and puts the global generator back afterwards. So
neither the order in which samples are read, nor the DataLoader worker that reads them,
nor the batch they end up in changes what a sample looks like: a run killed at any step
and resumed, or restarted at half the per-device batch, or with another
``dataloader_num_workers``, trains on the same augmented pixels. The training loop's own
random stream (dropout, the sampler's shuffle) is never touched.

The augmentations are kornia's (``kornia.augmentation``): pure torch, so they run with
the CPU and CUDA builds of the pinned torch alike (torchvision's compiled operators do
not load with the CPU build pinned here). kornia draws its parameters from torch's global
generator, which is why the generator is forked and seeded per sample rather than handed
a ``torch.Generator``.

The dataset must know the epoch. accelerate forwards ``DataLoader.set_epoch`` to the
dataset only when the sampler has no ``set_epoch`` of its own, and not at all on the
loader that skips the first batches of a resumed epoch; :class:`EpochCallback` therefore
sets it from the Trainer's state at the start of every epoch, before the epoch's
DataLoader workers are started (they are not persistent: each epoch's workers copy the
dataset with its epoch).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback

# Evaluation with augmentation: resize the short side to size / EVAL_CROP_FRACTION, then take the
# center size × size (timm's and torchvision's reference recipes use 0.875: 224 from 256).
EVAL_CROP_FRACTION = 0.875

# The default normalisation of ViT image processors: [0, 1] -> [-1, 1].
VIT_MEAN = 0.5
VIT_STD = 0.5


@dataclass(frozen=True)
class Preprocessing:
    """What every image becomes before the model sees it: size × size pixels, ``channels`` channels,
    ``(x - mean) / std`` per channel after scaling to [0, 1]."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    origin: str
    """Where the values come from, for the log (``scratch``, the processor's file, the config)."""

    def describe(self) -> str:
        def fmt(xs: Sequence[float]) -> str:
            return "[" + ", ".join(f"{x:.4g}" for x in xs) + "]"

        return (
            f"{self.image_size}x{self.image_size} px, {self.channels} channel(s), "
            f"mean {fmt(self.mean)}, std {fmt(self.std)} ({self.origin})"
        )


def sample_seed(seed: int, epoch: int, index: int, slot: int = 0) -> int:
    """The seed of one image's draw: a hash of (seed, epoch, index, slot), so neighbouring samples
    and epochs get unrelated streams."""
    digest = hashlib.blake2b(struct.pack("<4q", seed, epoch, index, slot), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are 64-bit; keep it positive


class Transform:
    """Turns a [0, 1] image ``(C, H, W)`` into the model's input: augmented (training, when an
    augmentation is configured), sized, with the model's channels, normalised.

    Picklable (DataLoader workers get a copy); the kornia modules are built on first use.
    """

    def __init__(
        self, prep: Preprocessing, augment: str = "none", *, train: bool, seed: int = 0, pairs_same: bool = False
    ) -> None:
        if augment not in ("none", "standard", "trivial_augment"):
            raise ValueError(f"unknown augmentation {augment!r}")
        self.prep = prep
        self.augment = augment
        self.train = train
        self.seed = seed
        self.pairs_same = pairs_same
        self.epoch = 0
        # Built now when there are any, so that forked DataLoader workers (new ones every epoch)
        # inherit kornia already imported instead of importing it each.
        self._ops: list[torch.nn.Module] | None = self._build() if augment != "none" else None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ops": None}

    @property
    def random(self) -> bool:
        return self.train and self.augment != "none"

    @property
    def resizes_itself(self) -> bool:
        """Whether images should reach it at their own size (a crop) rather than already resized."""
        return self.augment != "none"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, image: torch.Tensor, index: int, slot: int = 0) -> torch.Tensor:
        x = image
        if self.augment == "none":
            size = self.prep.image_size
            if tuple(x.shape[-2:]) != (size, size):
                x = torch.nn.functional.interpolate(
                    x.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False
                ).squeeze(0)
        else:
            x = self._kornia(x, index, slot)
        return self._normalise(x)

    def _kornia(self, x: torch.Tensor, index: int, slot: int) -> torch.Tensor:
        if self._ops is None:
            self._ops = self._build()
        # Forked even when nothing is random: the global generator must come out as it went in.
        with torch.random.fork_rng(devices=[]):
            if self.random:
                s = 0 if self.pairs_same else slot
                torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index, s))
            y = x.unsqueeze(0)
            for op in self._ops:
                y = op(y)
        return y.squeeze(0)

    def _build(self) -> list[torch.nn.Module]:
        import kornia.augmentation as K

        size = self.prep.image_size
        if not self.train:
            return [
                K.Resize(max(size, round(size / EVAL_CROP_FRACTION)), side="short", antialias=True),
                K.CenterCrop(size),
            ]
        ops: list[torch.nn.Module] = [K.RandomResizedCrop((size, size)), K.RandomHorizontalFlip()]
        if self.augment == "trivial_augment":
            ops.append(K.auto.TrivialAugment())
        return ops

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        p = self.prep
        if x.shape[0] != p.channels:
            if x.shape[0] != 1:
                raise ValueError(f"an image with {x.shape[0]} channels cannot feed a {p.channels}-channel model")
            x = x.expand(p.channels, -1, -1)
        mean = torch.tensor(p.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(p.std, dtype=x.dtype).view(-1, 1, 1)
        out = (x - mean) / std
        return out.contiguous()


def split_transforms(prep: Preprocessing, augment: str, seed: int, pairs_same: bool) -> tuple[Transform, Transform]:
    """The training and the evaluation transform of one configuration."""
    return (
        Transform(prep, augment, train=True, seed=seed, pairs_same=pairs_same),
        Transform(prep, augment, train=False, seed=seed),
    )


class EpochCallback(TrainerCallback):
    """Tells the training set which epoch starts (its augmentation depends on it).

    The Trainer's state at ``on_epoch_begin``: ``epoch`` is the whole number of epochs done,
    also when a resume lands mid-epoch (it then holds the checkpoint's fraction, whose floor is
    the epoch being resumed).
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if hasattr(self.dataset, "set_epoch"):
            # The small margin absorbs float noise in the fraction a checkpoint stored.
            self.dataset.set_epoch(math.floor((state.epoch or 0.0) + 1e-9))
