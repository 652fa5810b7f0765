"""The synthetic benchmark: deterministic, correctly split, cacheable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from compatzoo.data import SyntheticParams, TensorImages, make_synthetic

SMALL = {
    "num_train_classes": 12,
    "num_test_classes": 5,
    "train_images_per_class": 4,
    "query_per_class": 2,
    "gallery_per_class": 3,
    "image_size": 16,
}


@pytest.fixture(scope="module")
def small():
    return make_synthetic(SyntheticParams(**SMALL))


def test_shapes_sizes_and_label_ranges(small) -> None:
    assert isinstance(small.train, TensorImages)
    assert small.train.images.shape == (48, 3, 16, 16)
    assert small.train.images.dtype == torch.uint8
    assert len(small.query) == 10 and len(small.gallery) == 15
    assert small.num_classes == 12
    np.testing.assert_array_equal(np.unique(small.train.labels), np.arange(12))
    np.testing.assert_array_equal(np.bincount(small.train.labels), [4] * 12)
    np.testing.assert_array_equal(np.unique(small.query.labels), np.arange(12, 17))
    np.testing.assert_array_equal(np.unique(small.gallery.labels), np.arange(12, 17))


def test_test_classes_are_unseen_in_training(small) -> None:
    assert set(small.train.labels).isdisjoint(small.query.labels)
    assert set(small.train.labels).isdisjoint(small.gallery.labels)


def test_seen_test_classes_are_new_images_of_training_objects(small) -> None:
    seen = make_synthetic(SyntheticParams(**SMALL, test_classes="seen"))
    np.testing.assert_array_equal(np.unique(seen.query.labels), [0, 2, 4, 6, 8])  # spread
    np.testing.assert_array_equal(np.unique(seen.gallery.labels), [0, 2, 4, 6, 8])
    assert torch.equal(seen.train.images, small.train.images)     # training set unchanged
    gallery_of_0 = seen.gallery.images[seen.gallery.labels == 0]
    train_of_0 = seen.train.images[seen.train.labels == 0]
    assert not any(torch.equal(g, t) for g in gallery_of_0 for t in train_of_0)  # new views
    assert SyntheticParams(**SMALL).content_hash() != SyntheticParams(
        **SMALL, test_classes="seen").content_hash()
    with pytest.raises(ValidationError, match="lower num_test_classes"):
        SyntheticParams(**{**SMALL, "num_test_classes": 13}, test_classes="seen")


def test_images_are_normalised_with_train_statistics(small) -> None:
    x, y = small.train.get_batch(np.arange(len(small.train)))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2
    assert small.query.mean == small.train.mean


def test_same_seed_same_images_other_seed_other_images(small) -> None:
    again = make_synthetic(SyntheticParams(**SMALL))
    other = make_synthetic(SyntheticParams(**SMALL, seed=1))
    assert torch.equal(again.train.images, small.train.images)
    assert torch.equal(again.gallery.images, small.gallery.images)
    assert not torch.equal(other.train.images, small.train.images)


def test_test_split_does_not_depend_on_training_size(small) -> None:
    bigger = make_synthetic(SyntheticParams(**(SMALL | {"train_images_per_class": 6})))
    assert torch.equal(bigger.query.images, small.query.images)


def test_images_of_a_class_vary_and_classes_differ(small) -> None:
    images = small.train.images.float()
    same_class = (images[0] - images[1]).abs().mean()
    assert same_class > 5  # nuisances change the picture (0..255 scale)
    class_means = images.view(12, 4, -1).mean(dim=1)
    assert torch.cdist(class_means, class_means).fill_diagonal_(float("inf")).min() > 0


def test_cache_roundtrip(tmp_path: Path, small) -> None:
    params = SyntheticParams(**SMALL, cache_dir=str(tmp_path))
    first = make_synthetic(params)
    files = list(tmp_path.glob("synthetic-*.safetensors"))
    assert len(files) == 1 and params.content_hash() in files[0].name
    cached = make_synthetic(params)
    assert torch.equal(cached.train.images, small.train.images)
    assert torch.equal(first.query.images, cached.query.images)
    assert cached.info["content_hash"] == params.content_hash()


def test_info_records_seed_and_sizes(small) -> None:
    assert small.info["seed"] == 0
    assert small.info["sizes"]["gallery_images"] == 15
    assert "cache_dir" not in small.info["params"]


def test_params_reject_unknown_fields_and_bad_ranges() -> None:
    with pytest.raises(ValidationError, match="num_train_clases"):
        SyntheticParams(num_train_clases=10)
    with pytest.raises(ValidationError, match="min_parts"):
        SyntheticParams(min_parts=6, max_parts=4)


def test_unreadable_cache_is_regenerated(tmp_path: Path, small) -> None:
    params = SyntheticParams(**SMALL, cache_dir=str(tmp_path))
    cache = tmp_path / f"synthetic-{params.content_hash()}.safetensors"
    cache.write_bytes(b"garbage")
    assert torch.equal(make_synthetic(params).train.images, small.train.images)
    assert cache.stat().st_size > 1000  # rewritten with the real tensors
