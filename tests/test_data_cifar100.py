"""CIFAR-100 from its python pickles, read with the data-only unpickler."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from compatzoo.data import Cifar100Params, make_cifar100
from compatzoo.errors import DatasetError


def write_split(path: Path, labels: list[int], seed: int) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    with path.open("wb") as fh:
        pickle.dump({b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * len(labels)}, fh)
    return data


@pytest.fixture()
def cifar_root(tmp_path: Path) -> tuple[Path, np.ndarray]:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = write_split(folder / "train", [0, 1, 2, 3, 0, 1, 2, 3, 99], seed=0)
    write_split(folder / "test", [0, 1, 2, 3, 99, 3], seed=1)
    return tmp_path, train


def test_loads_fct_protocol(cifar_root: tuple[Path, np.ndarray]) -> None:
    root, train_rows = cifar_root
    data = make_cifar100(Cifar100Params(root=root))
    assert len(data.train) == 9 and len(data.query) == 6
    assert data.gallery is None and data.num_classes == 100
    # rows are R, G, B planes of 32x32
    assert torch.equal(data.train.images[1, 2], torch.from_numpy(train_rows[1, 2048:].reshape(32, 32)))
    image, label, _ = data.train[1]
    assert image.shape == (3, 32, 32) and label == 1


def test_root_may_point_at_the_pickle_folder_and_classes_filters(cifar_root: tuple[Path, np.ndarray]) -> None:
    root, _ = cifar_root
    data = make_cifar100(Cifar100Params(root=root / "cifar-100-python", classes=3))
    assert set(data.train.labels) == {0, 1, 2} and set(data.query.labels) == {0, 1, 2}
    assert data.num_classes == 3


def test_missing_files_say_where_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cifar-100-python") as err:
        make_cifar100(Cifar100Params(root=tmp_path))
    assert "download" in str(err.value)


def test_wrong_shape_is_reported_as_corrupt(cifar_root: tuple[Path, np.ndarray]) -> None:
    root, _ = cifar_root
    with (root / "cifar-100-python" / "test").open("wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}, fh)
    with pytest.raises(DatasetError, match="corrupt"):
        make_cifar100(Cifar100Params(root=root))


def test_truncated_pickle_is_reported(cifar_root: tuple[Path, np.ndarray]) -> None:
    root, _ = cifar_root
    path = root / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetError, match="truncated"):
        make_cifar100(Cifar100Params(root=root))


def test_pickle_with_code_is_refused(cifar_root: tuple[Path, np.ndarray]) -> None:
    root, _ = cifar_root
    with (root / "cifar-100-python" / "train").open("wb") as fh:
        pickle.dump({b"data": Path("x"), b"fine_labels": [0]}, fh)
    with pytest.raises(DatasetError, match="not a data-only pickle"):
        make_cifar100(Cifar100Params(root=root))
