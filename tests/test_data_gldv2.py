"""Google Landmarks v2: both CSV lists, nested image folders, subsets, Revisited evaluation,
and errors that name what was expected and found."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_revisited import PREPROCESS, jpeg_bytes, write_revisited

from compatzoo.data import FileImages, GldV2Params, make_gldv2
from compatzoo.errors import DatasetError
from compatzoo.specs import load_spec

#: landmark id -> image ids (GLDv2 ids are 16 hex digits)
LANDMARKS = {
    42: ["0a1b2c3d4e5f6071", "0a1b99aa00bb11cc", "f00dfeedbeef0001"],
    7: ["1234567890abcdef", "12345678aaaaaaaa"],
    100: ["abcdef0123456789"],
}
FULL_ONLY = {5: ["5555555555555555"]}  # in train.csv, dropped from train_clean.csv


def image_path(root: Path, image_id: str) -> Path:
    return root / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def write_gldv2(root: Path) -> Path:
    """GLDv2's files: both CSV lists, images under their first three characters, and a
    Revisited Oxford folder beside them for evaluation."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [(image_id, landmark) for landmark, ids in (LANDMARKS | FULL_ONLY).items() for image_id in ids]
    (root / "train.csv").write_text("id,url,landmark_id\n" + "".join(
        f"{image_id},https://upload.wikimedia.org/{image_id}.jpg,{landmark}\n" for image_id, landmark in rows))
    (root / "train_clean.csv").write_text("landmark_id,images\n" + "".join(
        f"{landmark},{' '.join(ids)}\n" for landmark, ids in LANDMARKS.items()))
    for seed, (image_id, _) in enumerate(rows):
        path = image_path(root, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(seed))
    write_revisited(root / "revisitop")
    return root


def params(root: Path, **overrides) -> GldV2Params:
    return GldV2Params(root=root, image_size=16, mean=PREPROCESS.mean, std=PREPROCESS.std,
                       revisited={"root": root / "revisitop", "name": "roxford5k"}, **overrides)


@pytest.fixture()
def gldv2_root(tmp_path: Path) -> Path:
    return write_gldv2(tmp_path / "gldv2")


def test_clean_list_trains_on_contiguous_class_ids_and_evaluates_on_revisited(gldv2_root: Path) -> None:
    data = make_gldv2(params(gldv2_root))
    # landmarks by sorted id: 7 -> 0, 42 -> 1, 100 -> 2; images in the CSV's order
    np.testing.assert_array_equal(data.train.labels, [1, 1, 1, 0, 0, 2])
    assert data.num_classes == 3 and data.name == "gldv2"
    assert data.train.paths[0] == image_path(gldv2_root, "0a1b2c3d4e5f6071")
    assert len(data.query) == 2 and len(data.gallery) == 5
    assert data.query.labels.min() >= 3  # bookkeeping labels never collide with train classes
    assert data.relevance is not None and data.relevance.dataset == "roxford5k"
    assert data.info["protocol"] == "revisited-roxford5k" and data.info["sizes"]["train_images"] == 6
    images, labels = data.train.get_batch([5, 0])
    assert images.shape == (2, 3, 16, 16) and labels.tolist() == [2, 1]
    for row, image_id in zip(images, ["abcdef0123456789", "0a1b2c3d4e5f6071"]):
        reference = FileImages([image_path(gldv2_root, image_id)], np.zeros(1), PREPROCESS)
        torch.testing.assert_close(row, reference[0][0])


def test_full_list_reads_train_csv(gldv2_root: Path) -> None:
    data = make_gldv2(params(gldv2_root, csv="full"))
    assert len(data.train) == 7 and data.num_classes == 4
    np.testing.assert_array_equal(data.train.labels, [2, 2, 2, 1, 1, 3, 0])


def test_a_subset_by_class_size_and_count(gldv2_root: Path) -> None:
    data = make_gldv2(params(gldv2_root, min_images_per_class=2))
    np.testing.assert_array_equal(data.train.labels, [1, 1, 1, 0, 0])  # landmark 100 dropped
    data = make_gldv2(params(gldv2_root, max_classes=1))
    assert len(data.train) == 2 and data.num_classes == 1  # landmark 7, the first by id
    with pytest.raises(DatasetError, match="lower min_images_per_class"):
        make_gldv2(params(gldv2_root, min_images_per_class=9))


def test_csv_without_the_expected_columns_names_those_found(gldv2_root: Path) -> None:
    (gldv2_root / "train_clean.csv").write_text("landmark,image_list\n1,abc\n")
    with pytest.raises(DatasetError, match=r"has columns \['landmark', 'image_list'\]") as err:
        make_gldv2(params(gldv2_root))
    assert "['landmark_id', 'images']" in str(err.value)


def test_a_landmark_id_that_is_not_a_number_is_reported(gldv2_root: Path) -> None:
    (gldv2_root / "train_clean.csv").write_text("landmark_id,images\nseven,1234567890abcdef\n")
    with pytest.raises(DatasetError, match="cannot read .*train_clean.csv"):
        make_gldv2(params(gldv2_root))


def test_missing_csv_points_at_the_other_list(gldv2_root: Path) -> None:
    (gldv2_root / "train_clean.csv").unlink()
    with pytest.raises(DatasetError, match="no train_clean.csv") as err:
        make_gldv2(params(gldv2_root))
    assert "csv: full" in str(err.value)


def test_missing_images_are_counted_and_a_few_shown(gldv2_root: Path) -> None:
    missing = [f"9{i:015x}" for i in range(12)]
    with (gldv2_root / "train_clean.csv").open("a") as fh:
        fh.write(f"8,{' '.join(missing)}\n")
    with pytest.raises(DatasetError, match="12 of the 18 images") as err:
        make_gldv2(params(gldv2_root))
    message = str(err.value)
    assert str(image_path(gldv2_root, missing[0])) in message
    assert missing[5] not in message and "skip_missing" in message
    data = make_gldv2(params(gldv2_root, skip_missing=True))
    assert len(data.train) == 6 and data.num_classes == 3 and data.info["missing_images"] == 12


def test_a_bad_revisited_block_fails_at_construction(gldv2_root: Path) -> None:
    (gldv2_root / "revisitop" / "roxford5k" / "gnd_roxford5k.pkl").unlink()
    with pytest.raises(DatasetError, match="gnd_roxford5k.pkl"):
        make_gldv2(params(gldv2_root))


def test_a_tiny_gldv2_spec_validates(tmp_path: Path) -> None:
    encoder = {"name": "tiny-cnn", "params": {"widths": [4, 8], "embedding_dim": 8}}
    train = {"epochs": 1, "batch_size": 4, "optimizer": "adam", "lr": 0.01}
    dataset = {"root": str(tmp_path / "gldv2"), "image_size": 16, "max_classes": 100,
               "revisited": {"root": str(tmp_path / "revisitop"), "name": "rparis6k"}}
    spec = load_spec({
        "name": "gldv2-tiny",
        "data": {"dataset": {"name": "gldv2", "params": dataset},
                 "allocation": {"name": "extended-class", "params": {"fraction": 0.5}}},
        "old": {"encoder": encoder, "head": "cosface", "train": train},
        "new_defaults": {"encoder": encoder, "head": "cosface", "train": train},
        "new": [{"name": "bct", "losses": ["classification", "bct"]}],
        "evaluation": {"metrics": ["map@100"]},
    })
    params = spec.data.dataset.validated
    assert isinstance(params, GldV2Params) and params.csv == "clean"
    assert params.revisited.name == "rparis6k"
