"""ViT classifiers: single images (plain ``ViTForImageClassification``) or image pairs.

Pairs go through one shared ViT backbone; the two [CLS] embeddings are fused by
``concat_mode`` and classified by a linear head. Both kinds are ``PreTrainedModel``
subclasses, so ``save_pretrained``/``from_pretrained`` (and therefore plain
transformers) read their checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification, ViTModel, ViTPreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from supervisor.schema import SCRATCH, Config


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
        self.classifier = nn.Linear(width, config.num_labels)
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
        vc = ViTConfig(
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
    vc = ViTConfig.from_pretrained(cfg.model.model_name)
    vc.num_labels = cfg.model.num_labels
    vc.id2label, vc.label2id = id2label, label2id
    vc.concat_mode = cfg.model.concat_mode
    return cls.from_pretrained(cfg.model.model_name, config=vc, ignore_mismatched_sizes=True)
