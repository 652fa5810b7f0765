"""Retrieval datasets from a local folder tree of images, one folder per class.

Images are read lazily with PIL, so a folder larger than memory works; each is resized
and centre-cropped to a square ``image_size`` and normalised (ImageNet statistics by
default, matching pretrained torchvision/open_clip backbones).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from compatzoo.data.datasets import LabeledImages, RetrievalData, retrieval_info
from compatzoo.data.preprocess import FitSquare, Preprocess, pil_to_uint8
from compatzoo.errors import DatasetError
from compatzoo.registry import with_params

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LAYOUT = """\
  <root>/train/<class>/*.jpg|png|...       training images, one folder per class
  and either
  <root>/query/<class>/...  + <root>/gallery/<class>/...   query/gallery retrieval
  or
  <root>/val/<class>/...                    leave-one-out retrieval (each image queries the rest)"""


class ImageParams(BaseModel):
    """How images are prepared; shared by every dataset that decodes image files."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(224, ge=8)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def preprocess(self) -> Preprocess:
        return Preprocess(image_size=self.image_size, mean=self.mean, std=self.std)


class ImageFolderParams(ImageParams):
    """Where the folder tree is and how images are prepared."""

    root: Path


def load_pixels(source: Path | BinaryIO, fit: FitSquare, box: Sequence[float] | None = None,
                name: str | None = None) -> torch.Tensor:
    """uint8 ``(3, S, S)`` of an image file (or file object): cropped to ``box``
    ``(x1, y1, x2, y2)`` if given, as revisitop crops its queries, then fitted square.
    The one decode every dataset of image files goes through."""
    try:
        with Image.open(source) as img:
            square = fit(img.crop(tuple(box)) if box is not None else img)
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"cannot read image {name or source} ({exc}); replace or delete the file") from exc
    return pil_to_uint8(square)


class FileImages(LabeledImages):
    """Images on disk, decoded on access.

    ``paths`` may be any sequence of paths (a lazy one keeps millions of files cheap);
    ``boxes`` ``(N, 4)``, if given, crops each image to its ``(x1, y1, x2, y2)`` first.
    """

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, preprocess: Preprocess,
                 boxes: np.ndarray | None = None) -> None:
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.preprocess = preprocess
        self.boxes = None if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        self._fit = FitSquare(preprocess.image_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        box = None if self.boxes is None else self.boxes[i]
        pixels = load_pixels(self.paths[i], self._fit, box)
        return self.preprocess.normalise(pixels), int(self.labels[i]), int(i)


def _layout_error(problem: str, root: Path) -> DatasetError:
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:20] if root.is_dir() else []
    return DatasetError(f"{problem}\nExpected layout:\n{LAYOUT}\nFound in {root}: {found or 'nothing'}")


def _scan_split(split_dir: Path, root: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image files of one split; every class folder must hold images."""
    classes = {}
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        files = sorted(f for f in class_dir.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise _layout_error(
                f"class folder {class_dir} has no images (extensions {sorted(IMAGE_EXTENSIONS)}); "
                "add images or remove the folder",
                root,
            )
        classes[class_dir.name] = files
    if not classes:
        raise _layout_error(f"{split_dir} has no class folders", root)
    return classes


def _eval_splits(root: Path) -> dict[str, dict[str, list[Path]]]:
    """The evaluation splits present: ``query`` + ``gallery``, or ``val``."""
    has_query, has_gallery = (root / "query").is_dir(), (root / "gallery").is_dir()
    if has_query and has_gallery:
        return {name: _scan_split(root / name, root) for name in ("query", "gallery")}
    if has_query or has_gallery:
        present, missing = ("query", "gallery") if has_query else ("gallery", "query")
        raise _layout_error(f"{root} has {present}/ but no {missing}/", root)
    if (root / "val").is_dir():
        return {"val": _scan_split(root / "val", root)}
    raise _layout_error(f"{root} has no evaluation split (query/ + gallery/, or val/)", root)


@with_params(ImageFolderParams)
def make_image_folder(params: ImageFolderParams) -> RetrievalData:
    """Build train/query/gallery from ``params.root``.

    Train classes get ids 0..T-1 by sorted name. An evaluation class with the same name
    as a train class gets that id; other evaluation classes get T, T+1, ... by sorted
    name, shared between query and gallery.
    """
    root = params.root.expanduser()
    if not root.is_dir():
        raise _layout_error(f"dataset root {root} does not exist or is not a folder", root)
    if not (root / "train").is_dir():
        raise _layout_error(f"{root} has no train/ folder", root)
    train_classes = _scan_split(root / "train", root)
    splits = _eval_splits(root)
    class_id = {name: i for i, name in enumerate(train_classes)}
    unseen = sorted({name for split in splits.values() for name in split} - class_id.keys())
    class_id |= {name: len(train_classes) + i for i, name in enumerate(unseen)}

    preprocess = params.preprocess()

    def images(classes: dict[str, list[Path]]) -> FileImages:
        paths = [f for files in classes.values() for f in files]
        labels = np.array([class_id[name] for name, files in classes.items() for _ in files],
                          dtype=np.int64)
        return FileImages(paths, labels, preprocess)

    train = images(train_classes)
    if "val" in splits:
        query, gallery = images(splits["val"]), None
    else:
        query, gallery = images(splits["query"]), images(splits["gallery"])
    info = retrieval_info("image-folder", params.model_dump(mode="json"), train, query, gallery)
    info["protocol"] = "query-gallery" if gallery is not None else "leave-one-out"
    info["unseen_classes"] = len(unseen)
    return RetrievalData(train, query, gallery, len(train_classes), "image-folder", info,
                         preprocess)
