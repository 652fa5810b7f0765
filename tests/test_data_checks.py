"""Dataset checks: every unreadable image in one error, labels that leave nothing to score."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compatzoo.data import (
    FileImages,
    ImageFolderParams,
    SyntheticParams,
    TensorImages,
    make_image_folder,
    make_synthetic,
)
from compatzoo.data.checks import check_retrieval_labels, scan_images
from compatzoo.errors import DatasetError


def write_jpegs(folder: Path, n: int, colour: tuple[int, int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (10, 8), colour).save(folder / f"img{i}.jpg")


def truncated_jpeg(path: Path) -> None:
    """The first half of a noisy JPEG: the header parses, the pixels do not."""
    noise = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    for split, n in (("train", 3), ("query", 1), ("gallery", 2)):
        write_jpegs(tmp_path / split / "cat", n, (200, 30, 30))
        write_jpegs(tmp_path / split / "dog", n, (30, 30, 200))
    return tmp_path


def splits(root: Path) -> dict:
    data = make_image_folder(ImageFolderParams(root=root, image_size=8))
    return {"train": data.train, "old-train": data.train.subset(np.arange(4)),
            "query": data.query, "gallery": data.gallery}


@pytest.mark.parametrize("workers", [0, 2])
def test_clean_folder_passes(root: Path, workers: int) -> None:
    scan_images(splits(root), workers=workers, progress=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_unreadable_file_in_one_error(root: Path, workers: int) -> None:
    truncated = root / "train" / "cat" / "img0.jpg"  # also in old-train
    truncated_jpeg(truncated)
    empty = root / "query" / "dog" / "empty.jpg"
    empty.write_bytes(b"")
    text = root / "gallery" / "cat" / "notes.png"
    text.write_text("not an image")
    with pytest.raises(DatasetError) as caught:
        scan_images(splits(root), workers=workers, progress=False)
    message = str(caught.value)
    for path in (truncated, empty, text):
        assert str(path) in message
    assert message.startswith("3 of 14 images cannot be decoded")  # subset files once
    assert f"train, old-train: {truncated} (OSError" in message
    assert f"query: {empty} (UnidentifiedImageError" in message
    assert "Remove or replace" in message


def test_long_lists_are_capped(tmp_path: Path) -> None:
    write_jpegs(tmp_path / "train" / "a", 1, (1, 2, 3))
    write_jpegs(tmp_path / "val" / "a", 2, (1, 2, 3))
    for i in range(55):
        (tmp_path / "train" / "a" / f"bad{i:02d}.jpg").write_bytes(b"")
    data = make_image_folder(ImageFolderParams(root=tmp_path, image_size=8))
    with pytest.raises(DatasetError, match="55 of 58 images") as caught:
        scan_images({"train": data.train, "val": data.query, "gallery": data.gallery},
                    workers=0, progress=False)
    message = str(caught.value)
    assert "bad49.jpg" in message and "bad50.jpg" not in message
    assert "and 5 more" in message


def test_subset_items_are_decoded_once(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = []
    original = FileImages.__getitem__

    def counting(self, i):
        decoded.append(str(self.paths[i]))
        return original(self, i)

    monkeypatch.setattr(FileImages, "__getitem__", counting)
    scan_images(splits(root), workers=0, progress=False)
    assert len(decoded) == len(set(decoded)) == 12


def test_in_memory_datasets_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_synthetic(SyntheticParams(num_train_classes=4, num_test_classes=2,
                                          train_images_per_class=2, query_per_class=1,
                                          gallery_per_class=2, image_size=8))

    def fail(self, i):
        raise AssertionError("an in-memory image was decoded")

    monkeypatch.setattr(TensorImages, "__getitem__", fail)
    start = time.perf_counter()
    scan_images({"train": data.train, "old-train": data.train.subset([0, 1]),
                 "query": data.query, "gallery": data.gallery}, workers=2, progress=False)
    assert time.perf_counter() - start < 1.0


def test_disjoint_query_and_gallery_labels_fail(tmp_path: Path) -> None:
    write_jpegs(tmp_path / "train" / "cat", 2, (1, 2, 3))
    write_jpegs(tmp_path / "query" / "zebra", 1, (1, 2, 3))
    write_jpegs(tmp_path / "query" / "yak", 1, (1, 2, 3))
    write_jpegs(tmp_path / "gallery" / "moth", 2, (1, 2, 3))
    data = make_image_folder(ImageFolderParams(root=tmp_path, image_size=8))
    with pytest.raises(DatasetError, match="share no label") as caught:
        check_retrieval_labels(data)
    message = str(caught.value)
    assert "Query: 2 classes ('yak', 'zebra')" in message
    assert "gallery: 1 class ('moth')" in message
    assert "same class names" in message


def test_partial_overlap_passes(tmp_path: Path) -> None:
    write_jpegs(tmp_path / "train" / "cat", 2, (1, 2, 3))
    write_jpegs(tmp_path / "query" / "cat", 2, (1, 2, 3))
    write_jpegs(tmp_path / "query" / "yak", 1, (1, 2, 3))
    write_jpegs(tmp_path / "gallery" / "cat", 2, (1, 2, 3))
    write_jpegs(tmp_path / "gallery" / "moth", 2, (1, 2, 3))
    data = make_image_folder(ImageFolderParams(root=tmp_path, image_size=8))
    summary = check_retrieval_labels(data)
    assert summary == {"queries": 3, "with_positive": 2, "query_classes": 2,
                       "gallery_classes": 2, "shared_classes": 1}


def test_leave_one_out_needs_a_class_with_two_images(tmp_path: Path) -> None:
    write_jpegs(tmp_path / "train" / "cat", 2, (1, 2, 3))
    write_jpegs(tmp_path / "val" / "cat", 1, (1, 2, 3))
    write_jpegs(tmp_path / "val" / "yak", 1, (1, 2, 3))
    data = make_image_folder(ImageFolderParams(root=tmp_path, image_size=8))
    with pytest.raises(DatasetError, match="single image") as caught:
        check_retrieval_labels(data)
    assert "'cat', 'yak'" in str(caught.value)

    write_jpegs(tmp_path / "val" / "yak", 2, (1, 2, 3))  # now yak has img0 and img1
    data = make_image_folder(ImageFolderParams(root=tmp_path, image_size=8))
    assert check_retrieval_labels(data)["with_positive"] == 2


def test_synthetic_labels_pass() -> None:
    data = make_synthetic(SyntheticParams(num_train_classes=4, num_test_classes=2,
                                          train_images_per_class=2, query_per_class=1,
                                          gallery_per_class=2, image_size=8))
    summary = check_retrieval_labels(data)
    assert summary["with_positive"] == summary["queries"] == 2
