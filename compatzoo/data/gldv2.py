"""Google Landmarks v2 (Weyand et al. 2020) for training, Revisited Oxford/Paris to evaluate.

BCT, RACT and BiCT train on GLDv2 and report mAP on ROxford5k/RParis6k; RACT and BiCT use
the cleaned list (``train_clean.csv``, 1.6M images of 81k landmarks). The CSV is read with
pyarrow, so even the 4.1M rows of ``train.csv`` take seconds, and image paths are built from
the ids on access: millions of items cost a few bytes each, not a ``Path`` object each.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
from pydantic import Field

from compatzoo.data.datasets import RetrievalData
from compatzoo.data.image_folder import FileImages, ImageFolderParams
from compatzoo.data.revisited_data import RevisitedEval, revisited_data
from compatzoo.errors import DatasetError
from compatzoo.registry import with_params

logger = logging.getLogger(__name__)

LAYOUT = """\
  <root>/train_clean.csv   columns landmark_id,images (images: space-separated ids)   csv: clean
  <root>/train.csv         columns id,url,landmark_id                                  csv: full
  <root>/train/<a>/<b>/<c>/<abc...>.jpg   image <abc...>, under its first three characters"""
#: csv param -> (file name, columns compatzoo reads)
CSV_FILES = {"clean": ("train_clean.csv", ("landmark_id", "images")),
             "full": ("train.csv", ("id", "landmark_id"))}
#: missing images listed by id in an error; the rest are counted
SHOWN = 5


class GldV2Params(ImageFolderParams):
    """Where GLDv2 is, which list to train on, an optional subset, and the evaluation set.

    ``min_images_per_class`` and ``max_classes`` (the first classes by landmark id) make a
    smaller training set; both count the images the CSV lists. ``skip_missing`` trains on
    the listed images that are on disk (a partial download) instead of failing.
    """

    csv: Literal["clean", "full"] = "clean"
    min_images_per_class: int = Field(1, ge=1)
    max_classes: int | None = Field(None, ge=1)
    skip_missing: bool = False
    revisited: RevisitedEval


class ImageIdPaths(Sequence[Path]):
    """``<folder>/a/b/c/abc....jpg`` of each id, built on access from ASCII ids."""

    def __init__(self, folder: Path, ids: np.ndarray) -> None:
        self.folder = folder
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int | slice) -> Path | list[Path]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        name = self.ids[i].decode()
        return self.folder / name[0] / name[1] / name[2] / f"{name}.jpg"


def _read_header(path: Path) -> list[str]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        return next(csv.reader(fh), [])


def read_gldv2_csv(root: Path, which: str) -> tuple[np.ndarray, np.ndarray]:
    """Image ids (ASCII bytes) and their landmark ids, in the CSV's order."""
    name, columns = CSV_FILES[which]
    path = root / name
    if not path.is_file():
        other = next((k for k, (n, _) in CSV_FILES.items() if (root / n).is_file()), None)
        hint = f"set csv: {other} to use {CSV_FILES[other][0]}, or " if other else ""
        raise DatasetError(f"no {name} in {root} (csv: {which}). Expected\n{LAYOUT}\n"
                           f"{hint}download {name} from https://github.com/cvdfoundation/google-landmark")
    header = _read_header(path)
    if not set(columns) <= set(header):
        raise DatasetError(f"{path} has columns {header}; expected {list(columns)} "
                           f"(GLDv2's {name}). Download it again or point csv at the right list")
    types = {"id": pa.string(), "images": pa.string(), "landmark_id": pa.int64()}
    try:
        table = pv.read_csv(path, convert_options=pv.ConvertOptions(
            include_columns=list(columns), column_types={c: types[c] for c in columns}))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}. The file is corrupt: download it again") from exc
    if table["landmark_id"].null_count:
        raise DatasetError(f"{path} has {table['landmark_id'].null_count} rows without a landmark_id; "
                           "download it again")
    landmarks = table["landmark_id"].to_numpy()
    if which == "clean":
        lists = pc.utf8_split_whitespace(table["images"])
        landmarks = np.repeat(landmarks, pc.list_value_length(lists).fill_null(0).to_numpy())
        ids = pc.list_flatten(lists)
    else:
        ids = table["id"]
    try:
        ids = ids.to_numpy(zero_copy_only=False).astype("S")
    except UnicodeEncodeError as exc:
        raise DatasetError(f"{path} has an image id that is not ASCII ({exc}); GLDv2 ids are hex "
                           "strings: download the file again") from exc
    listed = ids != b""
    ids, landmarks = ids[listed], landmarks[listed]
    if not len(ids):
        raise DatasetError(f"{path} lists no images; download it again")
    short = np.char.str_len(ids) < 3
    if short.any():
        raise DatasetError(f"{path} has {short.sum()} image ids shorter than 3 characters "
                           f"(first: {ids[short][:SHOWN].astype(str).tolist()}); GLDv2 ids are hex "
                           "strings stored under their first three characters")
    return ids, landmarks


def find_present(folder: Path, ids: np.ndarray) -> np.ndarray:
    """Which ids have their jpg in ``folder``: each leaf folder holding one is listed once
    (4,096 at most) rather than one stat per image."""
    found: list[bytes] = []
    for prefix in np.unique(ids.astype("S3")):
        a, b, c = prefix.decode()
        try:
            found += os.listdir(os.fsencode(folder / a / b / c))
        except (FileNotFoundError, NotADirectoryError):
            pass
    return np.isin(np.char.add(ids, b".jpg"), np.array(found, dtype="S"))


def select_classes(ids: np.ndarray, landmarks: np.ndarray, min_images: int,
                   max_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The images of landmarks with at least ``min_images``, the first ``max_classes`` of them."""
    names, counts = np.unique(landmarks, return_counts=True)
    kept = names[counts >= min_images][:max_classes]
    keep = np.isin(landmarks, kept)
    return ids[keep], landmarks[keep]


@with_params(GldV2Params)
def make_gldv2(params: GldV2Params) -> RetrievalData:
    """Train on GLDv2 (landmark ids -> class ids 0..C-1 by sorted landmark id); query and
    gallery are Revisited ``params.revisited`` with its easy/hard/junk truth."""
    root = params.root.expanduser()
    if not root.is_dir():
        raise DatasetError(f"GLDv2 root {root} does not exist or is not a folder. Expected\n{LAYOUT}")
    ids, landmarks = read_gldv2_csv(root, params.csv)
    ids, landmarks = select_classes(ids, landmarks, params.min_images_per_class, params.max_classes)
    if not len(ids):
        raise DatasetError(f"no landmark in {root / CSV_FILES[params.csv][0]} has "
                           f"{params.min_images_per_class} images or more; lower min_images_per_class")
    images_dir = root / "train"
    present = find_present(images_dir, ids)
    missing = ids[~present]
    if len(missing) and not params.skip_missing:
        shown = ", ".join(str(p) for p in ImageIdPaths(images_dir, missing[:SHOWN]))
        raise DatasetError(
            f"{len(missing)} of the {len(ids)} images listed in {CSV_FILES[params.csv][0]} are not "
            f"under {images_dir} (first {min(SHOWN, len(missing))}: {shown}). Download and "
            "extract the missing images_*.tar files, or set skip_missing: true to train on the "
            "images present"
        )
    if len(missing):
        logger.warning("gldv2: %d of %d listed images are missing; training on the %d present",
                       len(missing), len(ids), int(present.sum()))
        ids, landmarks = ids[present], landmarks[present]
        if not len(ids):
            raise DatasetError(f"none of the listed images is under {images_dir}. Expected\n{LAYOUT}")
    classes, labels = np.unique(landmarks, return_inverse=True)
    preprocess = params.preprocess()
    train = FileImages(ImageIdPaths(images_dir, ids), labels, preprocess)
    return revisited_data("gldv2", params, train, len(classes), params.revisited, preprocess,
                          missing_images=len(missing))


#: landmarks each list holds (GLDv2 paper; RACT table 1 and BiCT table 2 for the clean one)
LANDMARKS = {"clean": 81_313, "full": 203_094}


def _classes_of(params: GldV2Params) -> int | None:
    """The training classes, known without reading the CSV while every listed landmark
    is kept (a dry run sizes the heads with it); None when filters make it data-dependent."""
    if params.min_images_per_class > 1 or params.skip_missing:
        return None
    return min(LANDMARKS[params.csv], params.max_classes or LANDMARKS[params.csv])


make_gldv2.num_classes_of = _classes_of
