"""WebDataset ``.tar`` shards as labelled images with random access by item index.

The training engine asks for items by index (``get_batch``; old-feature caches and exact
resume are keyed by it), which webdataset's streaming readers do not offer. So the tar
headers are scanned once at open, grouping members into samples the way webdataset does (a
sample is the run of consecutive members sharing a key: the name up to its basename's first
dot; ``__*__`` metadata and non-file members are skipped; extensions are lower-cased), and
each image is then read by seek. Shards must be uncompressed tar files to be seekable.
"""

from __future__ import annotations

import io
import logging
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from pydantic import model_validator

from compatzoo.data.datasets import (
    Indices,
    LabeledImages,
    RetrievalData,
    _as_index_array,
    retrieval_info,
)
from compatzoo.data.image_folder import ImageParams, load_pixels
from compatzoo.data.preprocess import FitSquare, Preprocess
from compatzoo.data.revisited_data import RevisitedEval, revisited_data
from compatzoo.errors import DatasetError, PluginError
from compatzoo.registry import with_params

logger = logging.getLogger(__name__)

#: image members a sample may hold, in the order one is chosen when it holds several
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: webdataset's ``skip_meta``: members such as ``__key__`` are not sample fields
SKIP_META = re.compile(r"__[^/]*__($|/)")
#: problems listed in an error; the rest are counted
SHOWN = 5
SAMPLE = "every sample needs an image member (jpg, jpeg, png or webp) and a cls member (an integer)"

ShardList = str | list[str]


class WebDatasetParams(ImageParams):
    """Shard lists (paths or brace patterns such as ``shards/train-{000000..000009}.tar``)
    and how images are prepared. Evaluate on ``query`` + ``gallery``, on ``val`` (leave one
    out) or on Revisited Oxford/Paris (``revisited``)."""

    train: ShardList
    query: ShardList | None = None
    gallery: ShardList | None = None
    val: ShardList | None = None
    revisited: RevisitedEval | None = None

    @model_validator(mode="after")
    def _one_evaluation_set(self) -> WebDatasetParams:
        if (self.query is None) != (self.gallery is None):
            raise ValueError("query and gallery go together; give both, or use val or revisited")
        chosen = [name for name, value in (("query + gallery", self.query), ("val", self.val),
                                           ("revisited", self.revisited)) if value is not None]
        if len(chosen) != 1:
            raise ValueError(f"give exactly one evaluation set (query + gallery, val or "
                             f"revisited); found {', '.join(chosen) or 'none'}")
        return self


def _webdataset():
    """webdataset's key convention and brace expansion, imported only when shards are read."""
    try:
        from braceexpand import braceexpand
        from webdataset.tariterators import base_plus_ext
    except ImportError as exc:
        raise PluginError("the webdataset dataset needs the webdataset library: "
                          "pip install 'compatzoo[webdataset]'") from exc
    return base_plus_ext, braceexpand


@dataclass
class SampleIndex:
    """Where each sample's image bytes lie, and its ``cls`` as written."""

    shards: list[Path]
    shard: np.ndarray  # (N,) int32: position in shards
    offset: np.ndarray  # (N,) int64: first byte of the image member's data
    size: np.ndarray  # (N,) int64
    key: np.ndarray  # (N,) bytes, for error messages
    cls: np.ndarray  # (N,) int64


def expand_shards(patterns: ShardList, split: str) -> list[Path]:
    """Shard paths of a list of paths or brace patterns; every one must exist."""
    _, braceexpand = _webdataset()
    patterns = [patterns] if isinstance(patterns, str) else patterns
    paths = [Path(p).expanduser() for pattern in patterns for p in braceexpand(pattern)]
    if not paths:
        raise DatasetError(f"{split}: the shard list is empty; name at least one .tar shard, "
                           "e.g. shards/train-{000000..000009}.tar")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(f"{split}: {len(missing)} of {len(paths)} shards do not exist "
                           f"(first {min(SHOWN, len(missing))}: {', '.join(missing[:SHOWN])}); "
                           "check the paths and brace pattern")
    return paths


@dataclass
class _Problems:
    """Incomplete samples: all counted, the first few kept for the error."""

    count: int = 0
    shown: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.shown) < SHOWN:
            self.shown.append(text)


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:")
    except tarfile.ReadError as exc:
        raise DatasetError(f"{path} is not an uncompressed tar file ({exc}); shards are read by "
                           "seek, so write them uncompressed (webdataset.TarWriter on a .tar)") from exc


def _group_members(tar: tarfile.TarFile, base_plus_ext) -> Iterator[tuple[str, dict[str, list[tarfile.TarInfo]]]]:
    """Members grouped as webdataset groups them: runs of consecutive members sharing a key,
    by lower-cased extension."""
    key, members = None, {}
    for member in tar:
        if not member.isreg() or SKIP_META.match(member.name):
            continue
        prefix, ext = base_plus_ext(member.name)
        if prefix is None:
            continue
        if prefix != key:
            if key is not None:
                yield key, members
            key, members = prefix, {}
        members.setdefault(ext.lower(), []).append(member)
    if key is not None:
        yield key, members


def _problem(members: dict[str, list[tarfile.TarInfo]]) -> str | None:
    """What keeps a sample from being used, or None."""
    twice = [ext for ext, found in members.items() if len(found) > 1]
    if twice:
        return f"has two {twice[0]} members"
    has_image = any(ext in members for ext in IMAGE_EXTENSIONS)
    missing = [what for what, present in (("image", has_image), ("cls", "cls" in members)) if not present]
    if missing:
        return f"has no {' and no '.join(missing)} member (found: {', '.join(sorted(members))})"
    return None


def _scan_shard(path: Path, base_plus_ext, problems: _Problems) -> list[tuple[str, int, int, int]]:
    """``(key, offset, size, cls)`` of each complete sample; incomplete ones go to ``problems``."""
    samples = []
    with _open_tar(path) as tar:
        for key, members in _group_members(tar, base_plus_ext):
            problem = _problem(members)
            if problem is None:
                text = tar.extractfile(members["cls"][0]).read().strip()
                if not re.fullmatch(rb"[+-]?\d+", text):
                    problem = f"has cls {text[:20]!r}, not an integer"
            if problem is not None:
                problems.add(f"{path}: sample {key!r} {problem}")
                continue
            image = next(members[ext][0] for ext in IMAGE_EXTENSIONS if ext in members)
            samples.append((key, image.offset_data, image.size, int(text)))
    return samples


def index_shards(shards: list[Path], split: str) -> SampleIndex:
    """Scan every shard's headers once; fail listing the incomplete samples."""
    base_plus_ext, _ = _webdataset()
    problems = _Problems()
    scanned = [_scan_shard(path, base_plus_ext, problems) for path in shards]
    if problems.count:
        raise DatasetError(f"{split}: {problems.count} samples are incomplete or ambiguous, first "
                           f"{len(problems.shown)}:\n  " + "\n  ".join(problems.shown)
                           + f"\n{SAMPLE}; rewrite these samples or leave the shards out")
    if not any(scanned):
        raise DatasetError(f"{split}: the shards {', '.join(map(str, shards[:SHOWN]))} hold no "
                           f"samples; {SAMPLE}")
    rows = [row for samples in scanned for row in samples]
    keys, offsets, sizes, classes = zip(*rows)
    logger.info("webdataset %s: %d samples in %d shards", split, len(rows), len(shards))
    return SampleIndex(
        shards=shards,
        shard=np.repeat(np.arange(len(shards), dtype=np.int32), [len(s) for s in scanned]),
        offset=np.array(offsets, dtype=np.int64), size=np.array(sizes, dtype=np.int64),
        key=np.array([k.encode() for k in keys], dtype="S"), cls=np.array(classes, dtype=np.int64))


class ShardImages(LabeledImages):
    """Samples of WebDataset shards, each image read by seek and decoded on access."""

    def __init__(self, index: SampleIndex, labels: np.ndarray, preprocess: Preprocess) -> None:
        self.index = index
        self.labels = np.asarray(labels, dtype=np.int64)
        self.preprocess = preprocess
        self._fit = FitSquare(preprocess.image_size)

    def _decode(self, shard: BinaryIO, i: int) -> torch.Tensor:
        shard.seek(int(self.index.offset[i]))
        data = shard.read(int(self.index.size[i]))
        name = f"{self.index.shards[self.index.shard[i]]} sample {self.index.key[i].decode()!r}"
        return self.preprocess.normalise(load_pixels(io.BytesIO(data), self._fit, name=name))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        with self.index.shards[self.index.shard[i]].open("rb") as shard:
            return self._decode(shard, i), int(self.labels[i]), int(i)

    def get_batch(self, indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Each shard the batch touches is opened once."""
        idx = _as_index_array(indices, len(self))
        images: list[torch.Tensor | None] = [None] * len(idx)
        shard_of = self.index.shard[idx]
        for s in np.unique(shard_of):
            with self.index.shards[s].open("rb") as shard:
                for position in np.flatnonzero(shard_of == s):
                    images[position] = self._decode(shard, int(idx[position]))
        return torch.stack(images), torch.from_numpy(self.labels[idx])


@with_params(WebDatasetParams)
def make_webdataset(params: WebDatasetParams) -> RetrievalData:
    """Build train and evaluation sets from shards.

    Train ``cls`` values get class ids 0..T-1 by sorted value; an evaluation ``cls`` that is
    also a train class gets that id, the others T, T+1, ... by sorted value (as image-folder
    does with class names).
    """
    shard_lists = {"train": params.train, "query": params.query, "gallery": params.gallery,
                   "val": params.val}
    indexes = {name: index_shards(expand_shards(patterns, name), name)
               for name, patterns in shard_lists.items() if patterns is not None}
    train_classes = np.unique(indexes["train"].cls)
    eval_cls = [ix.cls for name, ix in indexes.items() if name != "train"]
    unseen = np.setdiff1d(np.concatenate(eval_cls), train_classes) if eval_cls else train_classes[:0]
    classes = np.concatenate([train_classes, unseen])  # class id -> cls value
    order = np.argsort(classes)
    preprocess = params.preprocess()
    images = {name: ShardImages(ix, order[np.searchsorted(classes, ix.cls, sorter=order)], preprocess)
              for name, ix in indexes.items()}
    num_classes = len(train_classes)
    if params.revisited is not None:
        return revisited_data("webdataset", params, images["train"], num_classes,
                              params.revisited, preprocess)
    query, gallery = (images["val"], None) if "val" in images else (images["query"], images["gallery"])
    info = retrieval_info("webdataset", params.model_dump(mode="json"), images["train"], query, gallery)
    info["protocol"] = "query-gallery" if gallery is not None else "leave-one-out"
    info["unseen_classes"] = len(unseen)
    return RetrievalData(images["train"], query, gallery, num_classes, "webdataset", info, preprocess)
