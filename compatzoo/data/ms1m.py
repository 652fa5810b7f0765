"""MS1M (and any InsightFace RecordIO face package) as a retrieval dataset, without MXNet.

MixBCT trains its face models on MS1M as InsightFace packages it: ``train.rec`` +
``train.idx``, 112x112 aligned JPEG faces. Record 0 is a header whose label is
``[first identity record, end of identity records]``; the images are records
``1 .. label[0] - 1`` (as InsightFace's ``MXFaceDataset`` reads them), and each identity
record ``label[0] .. label[1] - 1`` holds the ``[start, end)`` keys of one identity's
images. A sample's label is its image header's label (the first value of an array label).

Labels are found from the identity records (one image header read per identity, so
opening MS1M does not read its 5.8M images); every image's header label is checked against
it when the image is read. Packages without identity records, or with ``scan_headers``,
read every image header instead. A package whose record 0 is not a header (``flag == 0``)
is read like ``MXFaceDataset`` does: every key of the index is an image.

The experiment protocol is label-based retrieval, so query and gallery come from the same
.rec: ``eval_classes`` identities (among those with at least two images) are held out at
random with ``seed``; each one's images are shuffled with the same generator, the first
half (rounded down) is the query, the rest the gallery. The other identities are the
training set (``max_classes``: the first N of them by label; ``max_images_per_class``: the
first K images of each, in record order). Training identities get ids 0..T-1 in label
order, held-out ones T, T+1, ... (labels of the .rec are kept in ``source_labels``).
IJB-C 1:1 verification, MixBCT's face test, is :mod:`compatzoo.data.ijbc`.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from compatzoo.data.datasets import LabeledImages, RetrievalData, retrieval_info
from compatzoo.data.image_folder import ImageParams, load_pixels
from compatzoo.data.preprocess import FitSquare, Preprocess
from compatzoo.data.recordio import IndexedRecordIO, first_label, unpack
from compatzoo.errors import DatasetError
from compatzoo.registry import with_params

log = logging.getLogger(__name__)

#: InsightFace normalises faces to [-1, 1]
FACE_MEAN = (0.5, 0.5, 0.5)
FACE_STD = (0.5, 0.5, 0.5)
LAYOUT = "<root>/train.rec + <root>/train.idx (an InsightFace face package, e.g. faces_emore/)"


class FaceImageParams(ImageParams):
    """Face crops as InsightFace feeds them: 112x112, pixels scaled to [-1, 1]."""

    image_size: int = Field(112, ge=8, description="faces are 112x112; other sizes are resized")
    mean: tuple[float, float, float] = FACE_MEAN
    std: tuple[float, float, float] = FACE_STD


class MS1MParams(FaceImageParams):
    """Where the package is, how faces are prepared, and the held-out retrieval split."""

    root: Path = Field(description="folder holding train.rec and train.idx")
    eval_classes: int = Field(1000, ge=1, description="identities held out for query/gallery")
    max_classes: int | None = Field(None, ge=2, description="train on the first N identities")
    max_images_per_class: int | None = Field(None, ge=1,
                                             description="first K images of each train identity")
    seed: int = Field(0, description="choice of held-out identities and their query/gallery halves")
    scan_headers: bool = Field(False, description="read every image header for labels instead "
                                                  "of the identity records (slow on MS1M)")


class RecordImages(LabeledImages):
    """Face images in a RecordIO file, decoded on access.

    ``source_labels`` are the labels in the image headers: each read checks its record
    against them, so a .rec whose identity records disagree with its images fails loudly.
    """

    def __init__(self, reader: IndexedRecordIO, keys: np.ndarray, labels: np.ndarray,
                 source_labels: np.ndarray, preprocess: Preprocess) -> None:
        self.reader = reader
        self.keys = np.asarray(keys, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.source_labels = np.asarray(source_labels, dtype=np.int64)
        self.preprocess = preprocess
        self._fit = FitSquare(preprocess.image_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        key = int(self.keys[i])
        where = f"{self.reader.rec_path} record {key}"
        header, encoded = unpack(self.reader.read(key), where)
        if first_label(header) != self.source_labels[i]:
            raise DatasetError(
                f"{where} has label {first_label(header):g} but the package's identity records "
                f"put it under label {self.source_labels[i]}; set scan_headers: true to take "
                "labels from the image headers"
            )
        pixels = load_pixels(io.BytesIO(encoded), self._fit, name=f"of {where}")
        return self.preprocess.normalise(pixels), int(self.labels[i]), int(i)


def _label(value: float, where: str) -> int:
    if not (value >= 0 and float(value).is_integer()):
        raise DatasetError(f"{where} has label {value!r}; expected a non-negative integer class "
                           "id. Is this a face classification package?")
    return int(value)


def _scan_labels(reader: IndexedRecordIO, keys: np.ndarray) -> np.ndarray:
    return np.array([_label(first_label(reader.read_header(int(k))), f"{reader.rec_path} record {k}")
                     for k in keys], dtype=np.int64)


def _identity_ranges(reader: IndexedRecordIO, first: int, end: int,
                     image_keys: np.ndarray) -> list[tuple[int, int]] | None:
    """``[start, end)`` image keys of each identity record, or None when they do not
    partition the image records (then every header is read instead)."""
    if end <= first or len(reader.missing(np.arange(first, end))):
        return None
    ranges = []
    for key in range(first, end):
        header = reader.read_header(key)
        if header.flag < 2:
            return None
        ranges.append((int(header.label[0]), int(header.label[1])))
    covered = np.concatenate([np.arange(a, b) for a, b in ranges]) if ranges else np.empty(0)
    return ranges if np.array_equal(covered, image_keys) else None


def read_package(reader: IndexedRecordIO, scan_headers: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    """Keys of the image records, their labels, and where the labels came from."""
    header_key = int(reader.keys[0])
    header0 = reader.read_header(header_key)
    if header0.flag == 0:  # no header record: every record is an image
        keys = reader.keys.copy()
        return keys, _scan_labels(reader, keys), "image-headers"
    end_images = int(header0.label[0])
    keys = np.arange(header_key + 1, end_images, dtype=np.int64)
    missing = reader.missing(keys)
    if not len(keys) or len(missing):
        raise DatasetError(
            f"{reader.rec_path}: header record {header_key} says images are records "
            f"{header_key + 1}..{end_images - 1}, but {reader.idx_path} "
            + (f"lacks {len(missing)} of them, e.g. {missing[0]}" if len(keys) else "lists none")
            + "; the .idx does not belong to this .rec: download both again"
        )
    if not scan_headers and header0.flag >= 2:
        ranges = _identity_ranges(reader, end_images, int(header0.label[1]), keys)
        if ranges is not None:
            labels = np.concatenate([
                np.full(b - a, _label(first_label(reader.read_header(a)), f"{reader.rec_path} record {a}"))
                for a, b in ranges if b > a
            ])
            return keys, labels, "identity-records"
        log.warning("%s: identity records do not cover the images; reading every image header",
                    reader.rec_path)
    return keys, _scan_labels(reader, keys), "image-headers"


def split_identities(labels: np.ndarray, eval_classes: int, max_classes: int | None,
                     max_images_per_class: int | None, seed: int) -> dict[str, np.ndarray]:
    """Positions into ``labels`` of train/query/gallery items, and their new class ids.

    Returns ``{split: positions, split + "_labels": ids}`` for train, query and gallery,
    plus ``num_classes`` (T) and ``held_out`` (the held-out source labels, sorted).
    """
    order = np.argsort(labels, kind="stable")
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    eligible = classes[counts >= 2]
    if eval_classes > len(eligible) or len(classes) - eval_classes < 2:
        raise DatasetError(
            f"eval_classes={eval_classes} identities cannot be held out: the package has "
            f"{len(classes)} identities, {len(eligible)} of them with the 2+ images a query and "
            "a gallery need, and at least 2 must stay for training; lower eval_classes"
        )
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(eligible, size=eval_classes, replace=False))
    train_classes = np.setdiff1d(classes, held)[:max_classes]
    rank = np.arange(len(labels)) - np.repeat(starts, counts)  # position within its class
    keep = np.zeros(len(labels), dtype=bool)
    keep[order] = np.isin(labels[order], train_classes) & (
        rank < (max_images_per_class or len(labels)))
    train = np.flatnonzero(keep)
    query, gallery, query_ids, gallery_ids = [], [], [], []
    for new_id, c in enumerate(np.searchsorted(classes, held), start=len(train_classes)):
        members = rng.permutation(order[starts[c]:starts[c] + counts[c]])
        half = len(members) // 2
        query.append(members[:half])
        gallery.append(members[half:])
        query_ids.append(np.full(half, new_id))
        gallery_ids.append(np.full(len(members) - half, new_id))
    return {
        "train": train, "train_labels": np.searchsorted(train_classes, labels[train]),
        "query": np.concatenate(query), "query_labels": np.concatenate(query_ids),
        "gallery": np.concatenate(gallery), "gallery_labels": np.concatenate(gallery_ids),
        "num_classes": np.int64(len(train_classes)), "held_out": held,
    }


@with_params(MS1MParams)
def make_ms1m(params: MS1MParams) -> RetrievalData:
    """Train on the package's identities; retrieve among held-out ones (see the module)."""
    root = params.root.expanduser()
    if not (root / "train.rec").is_file():
        found = sorted(p.name for p in root.iterdir())[:20] if root.is_dir() else []
        raise DatasetError(f"no train.rec in {root}. Expected {LAYOUT}; found {found or 'nothing'}")
    reader = IndexedRecordIO(root / "train.rec", root / "train.idx")
    keys, source, labels_from = read_package(reader, params.scan_headers)
    split = split_identities(source, params.eval_classes, params.max_classes,
                             params.max_images_per_class, params.seed)
    preprocess = params.preprocess()

    def images(name: str) -> RecordImages:
        at = split[name]
        return RecordImages(reader, keys[at], split[name + "_labels"], source[at], preprocess)

    train, query, gallery = images("train"), images("query"), images("gallery")
    info = retrieval_info("ms1m", params.model_dump(mode="json"), train, query, gallery)
    info |= {"protocol": "query-gallery", "labels_from": labels_from,
             "package_images": len(keys), "package_classes": len(np.unique(source))}
    return RetrievalData(train, query, gallery, int(split["num_classes"]), "ms1m", info, preprocess)


# A dry run sizes the heads without opening the package: the class count is only known
# when max_classes caps it (packages differ: MS1MV2 has 85,742 identities, MS1MV3 93,431).
make_ms1m.num_classes_of = lambda params: params.max_classes
