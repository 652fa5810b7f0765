"""In-memory datasets and subsets: global labels, fast batches equal per-item access."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compatzoo.data import LabeledImages, SubsetImages, TensorImages


@pytest.fixture()
def dataset() -> TensorImages:
    images = torch.arange(6 * 3 * 2 * 2, dtype=torch.int64).remainder(256).to(torch.uint8).view(6, 3, 2, 2)
    return TensorImages(images, [5, 5, 7, 7, 9, 9], mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_items_are_normalised_floats_with_global_labels(dataset: TensorImages) -> None:
    image, label, index = dataset[3]
    expected = (dataset.images[3].float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(image, expected)
    assert (label, index) == (7, 3)
    assert dataset.classes.tolist() == [5, 7, 9]


def test_get_batch_matches_items(dataset: TensorImages) -> None:
    images, labels = dataset.get_batch(np.array([4, 0, 4]))
    torch.testing.assert_close(images, torch.stack([dataset[4][0], dataset[0][0], dataset[4][0]]))
    assert labels.tolist() == [9, 5, 9] and labels.dtype == torch.int64


def test_subset_keeps_global_labels_and_renumbers_indices(dataset: TensorImages) -> None:
    sub = dataset.subset([5, 2])
    assert isinstance(sub, TensorImages)
    assert sub.labels.tolist() == [9, 7]
    image, label, index = sub[1]
    torch.testing.assert_close(image, dataset[2][0])
    assert (label, index) == (7, 1)


def test_generic_subset_and_batch_fallback(dataset: TensorImages) -> None:
    class Plain(LabeledImages):
        labels = dataset.labels

        def __getitem__(self, i: int):
            return dataset[i]

    sub = Plain().subset([1, 4, 5]).subset([2, 0])
    assert isinstance(sub, SubsetImages)
    images, labels = sub.get_batch([0, 1])
    torch.testing.assert_close(images, dataset.get_batch([5, 1])[0])
    assert labels.tolist() == [9, 5]
    assert sub[1][2] == 1


def test_out_of_range_indices_are_rejected(dataset: TensorImages) -> None:
    with pytest.raises(IndexError):
        dataset.get_batch([6])


def test_rejects_non_uint8_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        TensorImages(torch.zeros(2, 3, 4, 4), [0, 1], (0.5,) * 3, (0.5,) * 3)
