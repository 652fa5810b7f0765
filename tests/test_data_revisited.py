"""Revisited Oxford/Paris: revisitop's folders, query crops, bookkeeping labels, the gnd truth."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compatzoo.data import FileImages, RevisitedParams, make_revisited
from compatzoo.data.preprocess import FitSquare, Preprocess, pil_to_uint8
from compatzoo.data.revisited_data import RevisitedEval, load_revisited
from compatzoo.errors import DatasetError
from compatzoo.retrieval import evaluate_revisited

PREPROCESS = Preprocess(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
GALLERY = ["all_souls_000001", "all_souls_000002", "radcliffe_camera_000001",
           "radcliffe_camera_000002", "oxford_000100"]
QUERIES = ["all_souls_000013", "radcliffe_camera_000010"]
GND = [
    {"bbx": [4.0, 2.0, 20.0, 14.0], "easy": [0], "hard": [1], "junk": [4]},
    {"bbx": [10.5, 6.2, 31.0, 23.9], "easy": [2, 3], "hard": [], "junk": []},
]


def jpeg_bytes(seed: int, size: tuple[int, int] = (16, 16)) -> bytes:
    """A noise JPEG: every pixel differs, so a wrong crop or image cannot pass."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_revisited(root: Path, name: str = "roxford5k", gnd: list | None = None,
                    gallery: list[str] = GALLERY) -> Path:
    """revisitop's layout: <root>/<name>/jpg/*.jpg and <root>/<name>/gnd_<name>.pkl."""
    folder = root / name
    (folder / "jpg").mkdir(parents=True)
    for seed, image in enumerate(GALLERY + QUERIES):
        size = (32, 24) if image in QUERIES else (16, 16)
        (folder / "jpg" / f"{image}.jpg").write_bytes(jpeg_bytes(seed, size))
    with (folder / f"gnd_{name}.pkl").open("wb") as fh:
        pickle.dump({"imlist": gallery, "qimlist": QUERIES, "gnd": GND if gnd is None else gnd}, fh)
    return folder


def decoded(path: Path, box=None) -> torch.Tensor:
    """The expected model input, computed directly with PIL."""
    with Image.open(path) as img:
        return PREPROCESS.normalise(pil_to_uint8(FitSquare(16)(img.crop(box) if box else img)))


def test_query_and_gallery_follow_the_gnd_order_with_bookkeeping_labels(tmp_path: Path) -> None:
    folder = write_revisited(tmp_path)
    query, gallery, truth = load_revisited(RevisitedEval(root=tmp_path, name="roxford5k"),
                                           PREPROCESS, first_label=10)
    assert len(query) == 2 and len(gallery) == 5
    assert [p.name for p in gallery.paths] == [f"{n}.jpg" for n in GALLERY]
    # landmarks by sorted name: all_souls=10, oxford=11, radcliffe_camera=12
    np.testing.assert_array_equal(gallery.labels, [10, 10, 12, 12, 11])
    np.testing.assert_array_equal(query.labels, [10, 12])
    assert truth.dataset == "roxford5k" and len(truth.gnd) == 2
    np.testing.assert_array_equal(truth.gnd[0]["junk"], [4])
    assert truth.gnd[1]["hard"].dtype == np.int64 and truth.gnd[1]["hard"].size == 0
    images, _ = gallery.get_batch([4, 0])
    torch.testing.assert_close(images[1], FileImages([folder / "jpg" / "all_souls_000001.jpg"],
                                                     np.zeros(1), PREPROCESS)[0][0])
    torch.testing.assert_close(images[0], decoded(folder / "jpg" / "oxford_000100.jpg"))


def test_queries_are_cropped_to_their_box_before_resizing(tmp_path: Path) -> None:
    folder = write_revisited(tmp_path)
    query, _, _ = load_revisited(RevisitedEval(root=tmp_path, name="roxford5k"), PREPROCESS)
    images, _ = query.get_batch([0, 1])
    for i, name in enumerate(QUERIES):
        path = folder / "jpg" / f"{name}.jpg"
        torch.testing.assert_close(images[i], decoded(path, GND[i]["bbx"]))
        assert not torch.allclose(images[i], decoded(path))  # the crop made a difference


def test_revisited_dataset_trains_on_class_folders(tmp_path: Path) -> None:
    write_revisited(tmp_path / "revisitop")
    for name, seed in (("bridge", 0), ("tower", 1)):
        (tmp_path / "train" / name).mkdir(parents=True)
        (tmp_path / "train" / name / "a.jpg").write_bytes(jpeg_bytes(seed))
    data = make_revisited(RevisitedParams(root=tmp_path / "revisitop" / "roxford5k",
                                          name="roxford5k", train=tmp_path / "train", image_size=16))
    assert data.num_classes == 2 and data.train.labels.tolist() == [0, 1]
    assert data.query.labels.min() >= 2  # never a training class
    assert data.info["protocol"] == "revisited-roxford5k"
    assert data.relevance is not None and data.preprocess.image_size == 16
    rng = np.random.default_rng(0)
    scores = evaluate_revisited(rng.normal(size=(2, 4)), rng.normal(size=(5, 4)), data.relevance.gnd)
    assert set(scores) == {"easy", "medium", "hard"}


def test_missing_gnd_file_says_what_is_expected(tmp_path: Path) -> None:
    folder = write_revisited(tmp_path)
    (folder / "gnd_roxford5k.pkl").unlink()
    with pytest.raises(DatasetError, match="gnd_roxford5k.pkl") as err:
        load_revisited(RevisitedEval(root=tmp_path, name="roxford5k"), PREPROCESS)
    assert "revisitop" in str(err.value) and "jpg/" in str(err.value)


def test_gnd_that_does_not_match_jpg_counts_the_missing_images(tmp_path: Path) -> None:
    extra = [f"magdalen_{i:06d}" for i in range(9)]
    write_revisited(tmp_path, gallery=GALLERY + extra)
    with pytest.raises(DatasetError, match="9 are not in") as err:
        load_revisited(RevisitedEval(root=tmp_path, name="roxford5k"), PREPROCESS)
    message = str(err.value)
    assert "magdalen_000000.jpg" in message and "magdalen_000008" not in message
    assert "does not match" in message


@pytest.mark.parametrize("bbx", [None, [1, 2, 3], [5.0, 2.0, 4.0, 9.0]])
def test_a_query_without_a_usable_box_is_refused(tmp_path: Path, bbx) -> None:
    gnd = [dict(GND[0], bbx=bbx), GND[1]]
    write_revisited(tmp_path, gnd=gnd)
    with pytest.raises(DatasetError, match=r"gnd\[0\]\['bbx'\]"):
        load_revisited(RevisitedEval(root=tmp_path, name="roxford5k"), PREPROCESS)


def test_gnd_indices_outside_the_gallery_are_refused(tmp_path: Path) -> None:
    write_revisited(tmp_path, gnd=[dict(GND[0], easy=[7]), GND[1]])
    with pytest.raises(DatasetError, match="does not match this gallery"):
        load_revisited(RevisitedEval(root=tmp_path, name="roxford5k"), PREPROCESS)
