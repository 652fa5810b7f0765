"""Image folders: both evaluation layouts, class ids by name, actionable layout errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compatzoo.data import ImageFolderParams, make_image_folder
from compatzoo.errors import DatasetError


def write_images(folder: Path, n: int, colour: tuple[int, int, int], size: tuple[int, int] = (12, 8)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, colour).save(folder / f"img{i}.png")


@pytest.fixture()
def query_gallery_root(tmp_path: Path) -> Path:
    write_images(tmp_path / "train" / "cat", 3, (255, 0, 0))
    write_images(tmp_path / "train" / "apple", 2, (0, 255, 0))
    write_images(tmp_path / "query" / "zebra", 1, (0, 0, 255))
    write_images(tmp_path / "query" / "cat", 1, (255, 0, 0))
    write_images(tmp_path / "gallery" / "zebra", 2, (0, 0, 255))
    write_images(tmp_path / "gallery" / "cat", 2, (255, 0, 0))
    write_images(tmp_path / "gallery" / "moth", 2, (9, 9, 9))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    return tmp_path


def test_query_gallery_layout_and_class_ids(query_gallery_root: Path) -> None:
    data = make_image_folder(ImageFolderParams(root=query_gallery_root, image_size=8))
    # train classes sorted by name: apple=0, cat=1; unseen ones follow: moth=2, zebra=3
    np.testing.assert_array_equal(data.train.labels, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(data.query.labels, [1, 3])
    np.testing.assert_array_equal(data.gallery.labels, [1, 1, 2, 2, 3, 3])
    assert data.num_classes == 2
    assert data.info["protocol"] == "query-gallery" and data.info["unseen_classes"] == 2


def test_images_are_resized_cropped_and_normalised(query_gallery_root: Path) -> None:
    params = ImageFolderParams(root=query_gallery_root, image_size=8, mean=(0, 0, 0), std=(1, 1, 1))
    data = make_image_folder(params)
    image, label, index = data.train[2]
    assert image.shape == (3, 8, 8) and label == 1 and index == 2
    torch.testing.assert_close(image[:, 4, 4], torch.tensor([1.0, 0.0, 0.0]))
    images, labels = data.train.subset([2, 0]).get_batch([0, 1])
    assert images.shape == (2, 3, 8, 8)
    assert labels.tolist() == [1, 0]


def test_val_layout_is_leave_one_out(tmp_path: Path) -> None:
    write_images(tmp_path / "train" / "a", 2, (1, 2, 3))
    write_images(tmp_path / "val" / "a", 2, (1, 2, 3))
    write_images(tmp_path / "val" / "b", 3, (4, 5, 6))
    data = make_image_folder(ImageFolderParams(root=tmp_path, image_size=8))
    assert data.gallery is None
    np.testing.assert_array_equal(data.query.labels, [0, 0, 1, 1, 1])
    assert data.info["protocol"] == "leave-one-out"


def test_missing_root_names_the_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist") as err:
        make_image_folder(ImageFolderParams(root=tmp_path / "nowhere"))
    assert "<root>/train/<class>/" in str(err.value)
    assert "<root>/val/<class>/" in str(err.value)


def test_missing_train_lists_what_was_found(tmp_path: Path) -> None:
    write_images(tmp_path / "images" / "a", 1, (0, 0, 0))
    with pytest.raises(DatasetError, match="no train/ folder") as err:
        make_image_folder(ImageFolderParams(root=tmp_path))
    assert "images/" in str(err.value)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: write_images(root / "query" / "a", 1, (0, 0, 0)), "no gallery/"),
        (lambda root: None, "no evaluation split"),
        (lambda root: (root / "val" / "a").mkdir(parents=True), "has no images"),
    ],
)
def test_incomplete_evaluation_layouts(tmp_path: Path, make, message: str) -> None:
    write_images(tmp_path / "train" / "a", 1, (0, 0, 0))
    make(tmp_path)
    with pytest.raises(DatasetError, match=message):
        make_image_folder(ImageFolderParams(root=tmp_path))


def test_unreadable_image_is_reported_with_its_path(tmp_path: Path) -> None:
    write_images(tmp_path / "train" / "a", 1, (0, 0, 0))
    write_images(tmp_path / "val" / "a", 1, (0, 0, 0))
    (tmp_path / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    data = make_image_folder(ImageFolderParams(root=tmp_path, image_size=8))
    with pytest.raises(DatasetError, match="broken.jpg"):
        data.train[0]
