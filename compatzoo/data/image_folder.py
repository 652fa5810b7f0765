"""Retrieval datasets from a local folder tree of images, one folder per class.

Images are read lazily with PIL, so a folder larger than memory works; each is resized
and centre-cropped to a square ``image_size`` and normalised (ImageNet statistics by
default, matching pretrained torchvision/open_clip backbones).
"""

from __future__ import annotations

from pathlib import Path

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


class ImageFolderParams(BaseModel):
    """Where the folder tree is and how images are prepared."""

    model_config = ConfigDict(extra="forbid")

    root: Path
    image_size: int = Field(224, ge=8)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class FileImages(LabeledImages):
    """Images on disk, decoded on access."""

    def __init__(self, paths: list[Path], labels: np.ndarray, preprocess: Preprocess) -> None:
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.preprocess = preprocess
        self._fit = FitSquare(preprocess.image_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        path = self.paths[i]
        try:
            with Image.open(path) as img:
                square = self._fit(img)
        except (OSError, UnidentifiedImageError) as exc:
            raise DatasetError(f"cannot read image {path} ({exc}); replace or delete the file") from exc
        return self.preprocess.normalise(pil_to_uint8(square)), int(self.labels[i]), int(i)


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

    preprocess = Preprocess(image_size=params.image_size, mean=params.mean, std=params.std)

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
