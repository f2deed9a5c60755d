"""ViT classifiers: single images (plain ``ViTForImageClassification``) or image pairs.

Pairs go through one shared ViT backbone; the two [CLS] embeddings are fused by
``concat_mode`` and classified by a linear head. Both kinds are ``PreTrainedModel``
subclasses, so ``save_pretrained``/``from_pretrained`` (and therefore plain
transformers) read their checkpoints.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification, ViTModel, ViTPreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from supervisor.schema import SCRATCH, Config
from worker.augment import VIT_MEAN, VIT_STD, Preprocessing

log = logging.getLogger("vit_train")


def fuse(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """Fuse two embeddings (B, H) into one feature (B, H) or (B, 2H)."""
    if mode == "concat":
        return torch.cat([a, b], dim=-1)
    if mode == "subtract":
        return a - b
    if mode == "abs_diff":
        return (a - b).abs()
    if mode == "multiply":
        return a * b
    raise ValueError(f"unknown concat_mode {mode!r}")


class ViTPairForImageClassification(ViTPreTrainedModel):
    """Classifies an image pair: ``pixel_values`` is (B, 2, C, H, W)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.concat_mode = getattr(config, "concat_mode", "concat")
        self.vit = ViTModel(config, add_pooling_layer=False)
        width = config.hidden_size * (2 if self.concat_mode == "concat" else 1)
        self.classifier = nn.Linear(width, config.num_labels or 2)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: object
    ) -> ImageClassifierOutput:
        if pixel_values.ndim != 5 or pixel_values.shape[1] != 2:
            raise ValueError(f"expected pixel_values of shape (B, 2, C, H, W), got {tuple(pixel_values.shape)}")
        b = pixel_values.shape[0]
        flat = pixel_values.flatten(0, 1)
        cls = self.vit(pixel_values=flat).last_hidden_state[:, 0]
        cls = cls.view(b, 2, -1)
        logits = self.classifier(fuse(cls[:, 0], cls[:, 1], self.concat_mode))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float(), labels)
        return ImageClassifierOutput(loss=loss, logits=logits)


def model_class(cfg: Config) -> type[ViTPreTrainedModel]:
    return ViTForImageClassification if cfg.model.concat_mode == "none" else ViTPairForImageClassification


def build(cfg: Config, class_names: list[str]) -> ViTPreTrainedModel:
    """A fresh model: from-scratch weights, or pretrained backbone with a new head."""
    cls = model_class(cfg)
    id2label = {i: n for i, n in enumerate(class_names)}
    id2label.update({i: str(i) for i in range(len(class_names), cfg.model.num_labels)})
    label2id = {n: i for i, n in id2label.items()}
    if cfg.model.model_name == SCRATCH:
        s = cfg.model.scratch
        vc = ViTConfig(  # num_labels, id2label, label2id: PretrainedConfig kwargs
            image_size=s.image_size,
            patch_size=s.patch_size,
            num_channels=s.num_channels,
            hidden_size=s.hidden_size,
            num_hidden_layers=s.num_hidden_layers,
            num_attention_heads=s.num_attention_heads,
            intermediate_size=s.intermediate_size,
            hidden_dropout_prob=s.hidden_dropout_prob,
            attention_probs_dropout_prob=s.attention_probs_dropout_prob,
            num_labels=cfg.model.num_labels,
            id2label=id2label,
            label2id=label2id,
        )
        vc.concat_mode = cfg.model.concat_mode
        return cls(vc)
    name = cfg.model.model_name
    vc, local_only = _pretrained_config(name)
    vc.num_labels = cfg.model.num_labels
    vc.id2label, vc.label2id = id2label, label2id
    vc.concat_mode = cfg.model.concat_mode
    try:
        return cls.from_pretrained(name, config=vc, ignore_mismatched_sizes=True, local_files_only=local_only)
    except OSError as exc:
        raise ModelUnavailable(
            f"model.model_name {name!r}: the weights cannot be loaded ({_first_line(exc)})"
        ) from None


class ModelUnavailable(Exception):
    """``model.model_name`` cannot be loaded: not a model folder, not cached, or not on a reachable hub.

    A config error: retrying cannot fix it, and must not take minutes of network retries to say so.
    """


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _pretrained_config(name: str) -> tuple[Any, bool]:
    """The model's config, and whether its weights should come from the local cache only.

    The cache is tried first, without any network; the hub only when it is allowed
    (no ``HF_HUB_OFFLINE``) and answers within seconds. Otherwise a missing model fails
    at once, naming it, instead of after the hub client's retries.
    """
    try:
        return ViTConfig.from_pretrained(name, local_files_only=True), True
    except OSError as exc:
        local_error = _first_line(exc)
    if os.path.isdir(name):
        raise ModelUnavailable(f"model.model_name {name} is not a saved model folder ({local_error})")
    if hub_offline():
        raise ModelUnavailable(
            f"model.model_name {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
            f"download it first (huggingface-cli download {name}) or give a local path"
        )
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if not reachable(endpoint):
        raise ModelUnavailable(
            f"model.model_name {name!r} is not in the local Hugging Face cache and the hub ({endpoint}) "
            "cannot be reached: download it on a connected machine or give a local path"
        )
    try:
        return ViTConfig.from_pretrained(name), False
    except OSError as exc:
        raise ModelUnavailable(f"model.model_name {name!r} cannot be loaded: {_first_line(exc)}") from None


class PreprocessingMismatch(ModelUnavailable):
    """The configured or stored preprocessing does not fit the model (a config error, like ModelUnavailable)."""


def preprocessing(cfg: Config) -> Preprocessing:
    """Image size, channels, mean and std the model is fed with.

    ``scratch``: the config's architecture and ViT's default normalisation (0.5, i.e. [-1, 1]). A
    pretrained model: its config's size and channels, the mean and std of its image processor
    (``preprocessor_config.json``: a local folder, or the local Hugging Face cache as for the
    weights). ``data.image_size``, ``data.image_mean`` and ``data.image_std`` override both.
    """
    d = cfg.data
    name = cfg.model.model_name
    if name == SCRATCH:
        s = cfg.model.scratch
        size, channels = s.image_size, s.num_channels
        mean, std, origin = (VIT_MEAN,) * channels, (VIT_STD,) * channels, "scratch: ViT's default normalisation"
    else:
        vc, local_only = _pretrained_config(name)
        size, channels = int(vc.image_size), int(vc.num_channels)
        mean, std, origin = _processor_values(name, local_only, size, channels)
    if d.image_size is not None:
        size = d.image_size
    if d.image_mean is not None and d.image_std is not None:
        mean, std = tuple(d.image_mean), tuple(d.image_std)
        origin = "data.image_mean and data.image_std"
        if len(mean) != channels:
            raise PreprocessingMismatch(
                f"data.image_mean and data.image_std have {len(mean)} values but model.model_name {name} takes "
                f"{channels}-channel images: give {channels} values each"
            )
    prep = Preprocessing(image_size=size, channels=channels, mean=mean, std=std, origin=origin)
    log.info("Preprocessing: %s", prep.describe())
    return prep


def _processor_values(
    name: str, local_only: bool, size: int, channels: int
) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, where they came from) of a pretrained model's image processor; ViT's defaults when
    it has none (a checkpoint saved without its processor)."""
    from transformers import AutoImageProcessor

    try:
        # The PIL backend: only the values are read, and torchvision (the default) may not load.
        proc = AutoImageProcessor.from_pretrained(name, local_files_only=local_only, backend="pil")
    except (OSError, ValueError) as exc:
        why = "no preprocessor_config.json" if isinstance(exc, OSError) else _first_line(exc)
        log.warning(
            "model.model_name %s has no usable image processor (%s): normalising with ViT's default mean and "
            "std 0.5; set data.image_mean and data.image_std if the model was trained otherwise",
            name,
            why,
        )
        return (VIT_MEAN,) * channels, (VIT_STD,) * channels, "ViT's default: the model has no image processor"
    origin = f"the image processor of {name}"
    proc_size = _processor_size(proc)
    if proc_size is not None and proc_size != size:
        log.warning(
            "The image processor of %s resizes to %d px but the model takes %d px: using %d",
            name,
            proc_size,
            size,
            size,
        )
    if not getattr(proc, "do_normalize", True):
        return (0.0,) * channels, (1.0,) * channels, f"{origin} (no normalisation)"
    mean = _per_channel(getattr(proc, "image_mean", None), VIT_MEAN, channels)
    std = _per_channel(getattr(proc, "image_std", None), VIT_STD, channels)
    if len(mean) != channels or len(std) != channels:
        raise PreprocessingMismatch(
            f"the image processor of model.model_name {name} has {len(mean)} mean and {len(std)} std values "
            f"but the model takes {channels}-channel images: set data.image_mean and data.image_std"
        )
    return mean, std, origin


def _processor_size(proc: Any) -> int | None:
    """The square size an image processor produces, when it says (crop size first, then size)."""
    for attr in ("crop_size", "size"):
        sz = getattr(proc, attr, None)
        if attr == "crop_size" and not getattr(proc, "do_center_crop", False):
            continue
        if sz is None:
            continue
        get = sz.get if isinstance(sz, dict) else (lambda k, o=sz: getattr(o, k, None))
        h, w, short = get("height"), get("width"), get("shortest_edge")
        if h and w and h == w:
            return int(h)
        if short:
            return int(short)
    return None


def _per_channel(values: Any, default: float, channels: int) -> tuple[float, ...]:
    if values is None:
        return (default,) * channels
    if isinstance(values, (int, float)):
        return (float(values),) * channels
    return tuple(float(v) for v in values)


def hub_offline() -> bool:
    return any(
        os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` (name lookup included)."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    # A name lookup ignores socket timeouts: bound the whole probe from outside.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)
