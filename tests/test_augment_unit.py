"""Augmentation and preprocessing without a training run: draws as pure functions of
(seed, epoch, index, slot), across calls, DataLoader workers and fresh processes; pairs;
normalisation; the pretrained model's image processor; strict config values."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from supervisor.schema import ConfigError, from_dict
from tests.conftest import TINY, deep_update
from worker import augment
from worker import data as data_mod
from worker import model as model_mod
from worker.augment import EpochCallback, Preprocessing, Transform, sample_seed

GREY8 = Preprocessing(image_size=8, channels=1, mean=(0.5,), std=(0.5,), origin="test")
RGB16 = Preprocessing(image_size=16, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), origin="t")


def image(seed: int, shape: tuple[int, ...] = (1, 11, 9)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g)


def dataset(augment: str = "standard", n: int = 24, *, train: bool = True) -> data_mod.ImageDataset:
    pixels = torch.stack([image(i) for i in range(n)])
    tf = Transform(GREY8, augment, train=train, seed=3)
    return data_mod.ImageDataset(pixels, np.arange(n) % 10, tf)


def by_index(
    ds: data_mod.ImageDataset, order: list[int], batch: int, workers: int, **kw: Any
) -> dict[int, torch.Tensor]:
    loader = DataLoader(ds, batch_size=batch, sampler=order, num_workers=workers, **kw)
    got = torch.cat([b["pixel_values"] for b in loader])
    return dict(zip(order, got, strict=True))


# ----------------------------------------------------------------------------- draws


@pytest.mark.parametrize("augment_name", ["standard", "trivial_augment"])
def test_same_seed_epoch_index_gives_the_same_tensor_whatever_ran_before(augment_name: str) -> None:
    tf = Transform(GREY8, augment_name, train=True, seed=3)
    tf.set_epoch(2)
    first = tf(image(0), 5)
    torch.manual_seed(999)  # the global stream must not matter
    for i in range(10):
        tf(image(i), i)  # nor what other samples drew
    again = Transform(GREY8, augment_name, train=True, seed=3)
    again.set_epoch(2)
    assert torch.equal(first, tf(image(0), 5))
    assert torch.equal(first, again(image(0), 5))
    assert first.shape == (1, 8, 8)


def test_another_epoch_index_or_seed_draws_otherwise() -> None:
    tf = Transform(GREY8, "standard", train=True, seed=3)
    base = tf(image(0), 5)
    tf.set_epoch(1)
    assert not torch.equal(base, tf(image(0), 5))
    tf.set_epoch(0)
    assert not torch.equal(base, tf(image(0), 6))
    assert not torch.equal(base, Transform(GREY8, "standard", train=True, seed=4)(image(0), 5))
    assert len({sample_seed(3, e, i) for e in range(5) for i in range(200)}) == 1000


def test_augmentation_leaves_the_training_loops_random_stream_alone() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    Transform(GREY8, "trivial_augment", train=True, seed=3)(image(0), 1)
    Transform(GREY8, "standard", train=False)(image(0), 1)
    assert torch.equal(before, torch.get_rng_state())


def test_same_samples_whatever_the_batch_order_and_worker_count() -> None:
    ds = dataset()
    ds.set_epoch(1)
    order = list(np.random.RandomState(0).permutation(len(ds)))
    direct = {i: ds[i]["pixel_values"] for i in range(len(ds))}
    for batch, workers, seq in ((16, 0, order), (8, 2, order), (5, 2, order[::-1]), (3, 1, sorted(order))):
        got = by_index(ds, seq, batch, workers)
        assert all(torch.equal(got[i], direct[i]) for i in range(len(ds))), (batch, workers)


def test_same_samples_in_a_freshly_spawned_process() -> None:
    """A DataLoader worker started by ``spawn`` is a new interpreter: it re-imports everything and
    gets the dataset pickled, as a restarted worker would."""
    ds = dataset("trivial_augment", n=6)
    ds.set_epoch(3)
    got = by_index(ds, [4, 1, 5], 2, 1, multiprocessing_context="spawn")
    assert all(torch.equal(got[i], ds[i]["pixel_values"]) for i in (4, 1, 5))


def test_the_epoch_reaches_dataloader_workers_started_after_it_is_set() -> None:
    ds = dataset()
    at0 = by_index(ds, [0, 1, 2], 3, 2)
    ds.set_epoch(1)
    at1 = by_index(ds, [0, 1, 2], 3, 2)
    assert not any(torch.equal(at0[i], at1[i]) for i in range(3))


def test_evaluation_is_a_deterministic_resize_and_center_crop() -> None:
    tf = Transform(GREY8, "trivial_augment", train=False)
    img = image(0, (1, 32, 48))
    out = tf(img, 0)
    tf.set_epoch(7)
    assert torch.equal(out, tf(img, 99)) and out.shape == (1, 8, 8)
    # A centred disc stays centred: the crop is the middle of the resized image (32x48 -> 16x24 -> 14x14).
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(48.0), indexing="ij")
    disc = (((yy - 15.5) ** 2 + (xx - 23.5) ** 2) < 64).float().unsqueeze(0)
    centre = Transform(Preprocessing(14, 1, (0.5,), (0.5,), "t"), "standard", train=False)(disc, 0)[0]
    assert centre.shape == (14, 14) and float(centre[7, 7]) > 0.9 and float(centre[0, 0]) == -1.0
    assert torch.allclose(centre, centre.flip(0), atol=1e-5) and torch.allclose(centre, centre.flip(1), atol=1e-5)


def test_no_augmentation_is_the_plain_resize_and_normalisation() -> None:
    img = image(0, (1, 8, 8))
    for train in (True, False):
        assert torch.equal(Transform(GREY8, "none", train=train)(img, 3), (img - 0.5) / 0.5)
    big = Transform(GREY8, "none", train=True)(image(0, (1, 16, 16)), 0)
    assert big.shape == (1, 8, 8)


def test_normalisation_uses_the_per_channel_mean_and_std_and_widens_grey() -> None:
    img = image(1, (1, 16, 16))
    out = Transform(RGB16, "none", train=True)(img, 0)
    assert out.shape == (3, 16, 16)
    for c in range(3):
        assert torch.allclose(out[c], (img[0] - RGB16.mean[c]) / RGB16.std[c])
    with pytest.raises(ValueError, match="2 channels"):
        Transform(RGB16, "none", train=True)(image(1, (2, 16, 16)), 0)


@pytest.mark.parametrize("channels", [1, 3])
def test_trivial_augment_runs_on_grey_and_colour_images(channels: int) -> None:
    prep = Preprocessing(12, channels, (0.5,) * channels, (0.5,) * channels, "t")
    tf = Transform(prep, "trivial_augment", train=True, seed=0)
    for i in range(60):  # enough draws to meet every op of the policy
        out = tf(image(i, (channels, 20, 14)), i)
        assert out.shape == (channels, 12, 12) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- pairs


class _SamePicture:
    """A pair loader stub: both paths open as the same picture, so any difference is the augmentation's."""

    def __call__(self, path: Path) -> torch.Tensor:
        return image(0)


def pairs(same: bool) -> data_mod.PairDataset:
    tf = Transform(GREY8, "standard", train=True, seed=3, pairs_same=same)
    return data_mod.PairDataset([(Path("a"), Path("b"))] * 8, np.zeros(8, dtype=np.int64), _SamePicture(), tf)


def test_pair_images_get_their_own_draws_by_default() -> None:
    ds = pairs(same=False)
    differ = [not torch.equal(ds[i]["pixel_values"][0], ds[i]["pixel_values"][1]) for i in range(8)]
    assert sum(differ) >= 6  # an 8x8 crop can repeat by chance, not for most pairs
    assert torch.equal(ds[3]["pixel_values"], ds[3]["pixel_values"])


def test_pair_augment_same_gives_both_images_one_draw() -> None:
    ds = pairs(same=True)
    for i in range(8):
        px = ds[i]["pixel_values"]
        assert px.shape == (2, 1, 8, 8) and torch.equal(px[0], px[1])
    assert not torch.equal(ds[0]["pixel_values"], ds[1]["pixel_values"])


# ----------------------------------------------------------------------------- the epoch


@pytest.mark.parametrize(("state_epoch", "expected"), [(None, 0), (0.0, 0), (1.0, 1), (10 / 19, 0), (1 + 6 / 19, 1)])
def test_epoch_callback_gives_the_dataset_the_whole_epochs_done(state_epoch: float | None, expected: int) -> None:
    ds = dataset()
    EpochCallback(ds).on_epoch_begin(None, SimpleNamespace(epoch=state_epoch), None)
    assert ds.transform.epoch == expected


# ----------------------------------------------------------------------------- config


def cfg_error(overrides: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        from_dict(deep_update(TINY, overrides))
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"data": {"augment": "randaugment"}}, "valid values are none, standard, trivial_augment"),
        ({"data": {"augment": "standard", "pair_augment": "same"}}, "pair_augment applies to image pairs only"),
        ({"data": {"pair_augment": "same"}}, "data.augment is none"),
        ({"data": {"pair_augment": "shared"}}, "valid values are independent, same"),
        ({"data": {"image_mean": [0.5]}}, "data.image_std is not"),
        ({"data": {"image_mean": [0.5], "image_std": [0.5, 0.5]}}, "image_std has 2"),
        ({"data": {"image_mean": [0.5], "image_std": [0.0]}}, "data.image_std[0] is 0.0"),
        ({"data": {"image_mean": [0.5, 0.5], "image_std": [1, 1]}}, "model.scratch.num_channels is 1"),
        ({"data": {"image_mean": 0.5, "image_std": 0.5}}, "data.image_mean must be a list"),
        ({"data": {"image_mean": ["x"], "image_std": [1]}}, "data.image_mean[0] must be a number"),
        ({"data": {"image_mean": [], "image_std": []}}, "data.image_mean is an empty list"),
        ({"data": {"image_mean": [0.5, 0.5], "image_std": [1, 1]}, "model": {"model_name": "m"}}, "3 for RGB"),
    ],
)
def test_bad_augmentation_and_preprocessing_values_are_one_line_errors(overrides: dict, expected: str) -> None:
    assert expected in cfg_error(overrides)


def test_valid_augmentation_config_loads() -> None:
    pair = {
        "model": {"num_labels": 2, "concat_mode": "concat", "scratch": {"num_channels": 3}},
        "data": {"source": "pairs_csv", "path": "p.csv", "augment": "trivial_augment", "pair_augment": "same"},
    }
    cfg = from_dict(
        deep_update(TINY, {**pair, "data": {**pair["data"], "image_mean": [0.1] * 3, "image_std": [2] * 3}})
    )
    assert cfg.data.augment == "trivial_augment" and cfg.data.image_std == [2.0, 2.0, 2.0]


# ----------------------------------------------------------------------------- preprocessing


def save_small_vit(d: Path) -> Path:
    """A small ViT saved like a hub checkpoint, whose image processor has ImageNet's mean and std
    (not ViT's default 0.5) and 16 px images."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    vc = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    ViTForImageClassification(vc).save_pretrained(d)
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=RGB16.mean, image_std=RGB16.std).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_small_vit(tmp_path_factory.mktemp("pretrained") / "vit")


def pretrained_cfg(path: Path, **data: Any) -> Any:
    return from_dict(deep_update(TINY, {"model": {"model_name": str(path)}, "data": data}))


def test_pretrained_model_brings_its_processors_size_mean_and_std(pretrained: Path) -> None:
    prep = model_mod.preprocessing(pretrained_cfg(pretrained))
    assert (prep.image_size, prep.channels, prep.mean, prep.std) == (16, 3, RGB16.mean, RGB16.std)
    splits = data_mod.build(pretrained_cfg(pretrained))
    px = splits.train[0]["pixel_values"]
    assert px.shape == (3, 16, 16)
    # Every channel is the same grey picture, normalised with its own channel's values.
    grey = px[0] * RGB16.std[0] + RGB16.mean[0]
    for c in (1, 2):
        assert torch.allclose(px[c], (grey - RGB16.mean[c]) / RGB16.std[c], atol=1e-5)
    assert float(grey.min()) >= -1e-5 and float(grey.max()) <= 1 + 1e-5  # back in [0, 1]: the right values undone


def test_config_overrides_the_processors_values(pretrained: Path) -> None:
    prep = model_mod.preprocessing(pretrained_cfg(pretrained, image_mean=[0.1, 0.2, 0.3], image_std=[1, 2, 3]))
    assert prep.mean == (0.1, 0.2, 0.3) and prep.std == (1.0, 2.0, 3.0) and "data.image_mean" in prep.origin


def test_config_values_must_match_the_pretrained_models_channels(pretrained: Path) -> None:
    with pytest.raises(model_mod.PreprocessingMismatch, match="takes 3-channel images"):
        model_mod.preprocessing(pretrained_cfg(pretrained, image_mean=[0.5], image_std=[0.5]))


def test_a_model_without_processor_falls_back_to_vits_defaults(
    pretrained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((pretrained / name).read_bytes())
    prep = model_mod.preprocessing(pretrained_cfg(bare))
    assert prep.mean == (0.5,) * 3 and prep.std == (0.5,) * 3 and prep.image_size == 16
    assert "no preprocessor_config.json" in caplog.text


def test_scratch_keeps_vits_default_normalisation() -> None:
    prep = model_mod.preprocessing(from_dict(deep_update(TINY, {})))
    assert (prep.image_size, prep.channels, prep.mean, prep.std) == (8, 1, (0.5,), (0.5,))
    assert augment.VIT_MEAN == 0.5


@pytest.mark.parametrize("name", ["augment.yaml", "augment-pretrained.yaml"])
def test_shipped_augmentation_configs_are_valid(name: str) -> None:
    from supervisor.schema import load_config
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / name, check_paths=False)  # the pretrained example's data is not here
    assert cfg.data.augment != "none" and cfg.training.dataloader_num_workers >= 2
