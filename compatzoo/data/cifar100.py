"""CIFAR-100 from a local copy of the official python pickles, in FCT's protocol.

FCT trains on the train split and evaluates retrieval on the test split as both query
and gallery, leaving each query out of its own ranking (``gallery=None``). The pickles
are read with compatzoo's data-only unpickler, never with ``pickle.load``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from compatzoo.data.datasets import RetrievalData, TensorImages, channel_stats, retrieval_info
from compatzoo.data.preprocess import Preprocess
from compatzoo.errors import DatasetError
from compatzoo.safe_pickle import load_data_pickle
from compatzoo.registry import with_params

NUM_CLASSES = 100
LAYOUT = "<root>/cifar-100-python/{train,test} (or root pointing at cifar-100-python/ itself)"


class Cifar100Params(BaseModel):
    """Where the pickles are; ``classes`` keeps only the first N fine classes."""

    model_config = ConfigDict(extra="forbid")

    root: Path
    classes: int | None = Field(None, ge=2, le=NUM_CLASSES)


def _find_folder(root: Path) -> Path:
    for folder in (root / "cifar-100-python", root):
        if (folder / "train").is_file() and (folder / "test").is_file():
            return folder
    raise DatasetError(
        f"no CIFAR-100 python pickles under {root}. Expected {LAYOUT}; download and extract "
        "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"
    )


def _field(batch: dict[Any, Any], key: str) -> Any:
    """Python-2 pickles decode keys as bytes or str depending on the encoding used."""
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise KeyError(key)


def _load_split(path: Path) -> tuple[torch.Tensor, np.ndarray]:
    batch = load_data_pickle(path)
    try:
        data = np.asarray(_field(batch, "data"), dtype=np.uint8)
        labels = np.asarray(_field(batch, "fine_labels"), dtype=np.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(
            f"{path} is not a CIFAR-100 batch (needs 'data' and 'fine_labels'): {exc}; download it again"
        ) from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DatasetError(
            f"{path} has data of shape {data.shape} and {len(labels)} labels; expected (N, 3072) "
            "uint8 rows and N labels. The file is corrupt: download it again"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DatasetError(f"{path} has fine labels outside 0..99; the file is corrupt: download it again")
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each a 32x32 image.
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


@with_params(Cifar100Params)
def make_cifar100(params: Cifar100Params) -> RetrievalData:
    """Train split for training; test split as leave-one-out query set (gallery None)."""
    folder = _find_folder(params.root.expanduser())
    num_classes = params.classes or NUM_CLASSES
    splits = {}
    for name in ("train", "test"):
        images, labels = _load_split(folder / name)
        keep = labels < num_classes
        splits[name] = (images[torch.from_numpy(keep)], labels[keep])
    if len(splits["train"][1]) == 0:
        raise DatasetError(f"{folder / 'train'} has no images of the first {num_classes} classes")
    mean, std = channel_stats(splits["train"][0])
    train = TensorImages(*splits["train"], mean, std)
    query = TensorImages(*splits["test"], mean, std)
    info = retrieval_info("cifar100", params.model_dump(mode="json"), train, query, None)
    info["protocol"] = "leave-one-out"
    return RetrievalData(train, query, None, int(train.labels.max()) + 1, "cifar100", info,
                         Preprocess(image_size=32, mean=mean, std=std))


# What a dry run (`compatzoo run --dry-run`) needs, known without reading the pickles.
make_cifar100.num_classes_of = lambda params: params.classes or NUM_CLASSES
make_cifar100.image_size_of = lambda params: 32
