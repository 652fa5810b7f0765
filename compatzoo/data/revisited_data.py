"""Revisited Oxford5k / Paris6k (Radenovic et al. 2018) as query and gallery.

The images come from revisitop's folders and the truth from its ``gnd_<name>.pkl``, read
with the data-only unpickler. Queries are cropped to their bounding box before resizing,
as revisitop does. The papers train on GLDv2 and evaluate here (``gldv2``'s ``revisited``
block); the ``revisited`` dataset pairs these sets with a class-folder training set.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from compatzoo.data.datasets import RetrievalData, RevisitedTruth, retrieval_info
from compatzoo.data.image_folder import FileImages, ImageParams, _scan_split
from compatzoo.data.preprocess import Preprocess
from compatzoo.errors import DatasetError
from compatzoo.registry import with_params
from compatzoo.retrieval.revisited import load_revisited_gnd

LAYOUT = """\
  <root>/<name>/jpg/<image>.jpg         every query and gallery image (name: roxford5k | rparis6k)
  <root>/<name>/gnd_<name>.pkl          revisitop's ground truth: imlist, qimlist, gnd
  (root may also point at <root>/<name> itself)"""
#: missing images listed by name in an error; the rest are counted
SHOWN = 5


class RevisitedEval(BaseModel):
    """Which Revisited set to evaluate on, and where revisitop's folders are."""

    model_config = ConfigDict(extra="forbid")

    root: Path
    name: Literal["roxford5k", "rparis6k"]


class RevisitedParams(ImageParams, RevisitedEval):
    """Revisited Oxford/Paris evaluation with ``train``: one folder of images per class
    (the image-folder ``train/`` layout), since Revisited has no training set."""

    train: Path


def landmark_of(image_name: str) -> str:
    """``all_souls_000013`` -> ``all_souls``: the name without its trailing number."""
    return re.sub(r"_\d+$", "", image_name)


def _find_folder(root: Path, name: str) -> Path:
    folder = root / name if (root / name).is_dir() else root
    missing = [what for what, path in (("jpg/ folder", folder / "jpg"),
                                       (f"gnd_{name}.pkl", folder / f"gnd_{name}.pkl")) if not path.exists()]
    if missing:
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())[:20] if folder.is_dir() else []
        raise DatasetError(
            f"{folder} has no {' and no '.join(missing)}. Expected\n{LAYOUT}\nFound in {folder}: "
            f"{found or 'nothing'}. Download the images and gnd file of {name} with revisitop's "
            "script (https://github.com/filipradenovic/revisitop)"
        )
    return folder


def _query_boxes(gnd: list[dict[str, Any]], source: Path) -> np.ndarray:
    """The ``bbx`` of every query as ``(Q, 4)``; a box must have x1 < x2 and y1 < y2."""
    boxes = np.zeros((len(gnd), 4))
    for i, entry in enumerate(gnd):
        box = entry.get("bbx")
        try:
            boxes[i] = np.asarray(box, dtype=np.float64).reshape(4)
        except (TypeError, ValueError):
            raise DatasetError(
                f"{source}: gnd[{i}]['bbx'] is {box!r}; expected the query's box [x1, y1, x2, y2]. "
                "Download the gnd file again"
            ) from None
        x1, y1, x2, y2 = boxes[i]
        if not (all(map(math.isfinite, boxes[i])) and x1 < x2 and y1 < y2):
            raise DatasetError(f"{source}: gnd[{i}]['bbx'] {list(boxes[i])} is not a box "
                               "with x1 < x2 and y1 < y2; download the gnd file again")
    return boxes


def load_revisited(where: RevisitedEval, preprocess: Preprocess, first_label: int = 0
                   ) -> tuple[FileImages, FileImages, RevisitedTruth]:
    """Query (cropped to its boxes) and gallery images in the gnd's order, and the truth.

    Revisited has no classes: each image gets the id of its landmark name prefix
    (``all_souls_000013`` -> ``all_souls``), numbered from ``first_label`` by sorted name
    so they cannot be mistaken for training classes. These labels are only bookkeeping;
    the retrieval truth is the returned :class:`RevisitedTruth`.
    """
    folder = _find_folder(where.root.expanduser(), where.name)
    gnd_path = folder / f"gnd_{where.name}.pkl"
    data = load_revisited_gnd(gnd_path)
    names = {"query": [str(n) for n in data["qimlist"]], "gallery": [str(n) for n in data["imlist"]]}
    missing = [n for split in names.values() for n in split if not (folder / "jpg" / f"{n}.jpg").is_file()]
    if missing:
        total = sum(map(len, names.values()))
        raise DatasetError(
            f"{gnd_path} lists {total} images but {len(missing)} are not in {folder / 'jpg'} "
            f"(first {min(SHOWN, len(missing))}: {', '.join(m + '.jpg' for m in missing[:SHOWN])}). "
            "The jpg/ folder does not match this gnd file: download both again with revisitop's "
            "script"
        )
    landmarks = sorted({landmark_of(n) for split in names.values() for n in split})
    label_of = {landmark: first_label + i for i, landmark in enumerate(landmarks)}

    def images(split: str, boxes: np.ndarray | None = None) -> FileImages:
        paths = [folder / "jpg" / f"{n}.jpg" for n in names[split]]
        labels = np.array([label_of[landmark_of(n)] for n in names[split]], dtype=np.int64)
        return FileImages(paths, labels, preprocess, boxes)

    query = images("query", _query_boxes(data["gnd"], gnd_path))
    return query, images("gallery"), RevisitedTruth.from_gnd(data["gnd"], where.name)


def revisited_data(name: str, params: BaseModel, train: FileImages, num_classes: int,
                   where: RevisitedEval, preprocess: Preprocess, **info: Any) -> RetrievalData:
    """``train`` evaluated on Revisited ``where``: the bundle every loader with a
    ``revisited`` block returns."""
    query, gallery, truth = load_revisited(where, preprocess, first_label=num_classes)
    record = retrieval_info(name, params.model_dump(mode="json"), train, query, gallery)
    record |= {"protocol": f"revisited-{where.name}", **info}
    return RetrievalData(train, query, gallery, num_classes, name, record, preprocess, truth)


@with_params(RevisitedParams)
def make_revisited(params: RevisitedParams) -> RetrievalData:
    """Train on the class folders of ``params.train`` (ids 0..C-1 by sorted name);
    evaluate on Revisited ``params.name`` with its easy/hard/junk truth."""
    train_dir = params.train.expanduser()
    if not train_dir.is_dir():
        raise DatasetError(f"train folder {train_dir} does not exist or is not a folder; point "
                           "train at a folder with one sub-folder of images per class")
    classes = _scan_split(train_dir, train_dir)
    preprocess = params.preprocess()
    paths = [f for files in classes.values() for f in files]
    labels = np.repeat(np.arange(len(classes)), [len(files) for files in classes.values()])
    train = FileImages(paths, labels, preprocess)
    where = RevisitedEval(root=params.root, name=params.name)
    return revisited_data("revisited", params, train, len(classes), where, preprocess)
