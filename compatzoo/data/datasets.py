"""Labelled image collections and the train/query/gallery bundle every experiment uses.

Labels are *global* class ids: a subset keeps the ids of its parent, so an old model
trained on an allocation's subset and a new model trained on the full set agree on
what class ``k`` means (the old head's rows line up with the new model's classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from compatzoo.data.preprocess import Preprocess

Indices = Sequence[int] | np.ndarray | torch.Tensor


def _as_index_array(indices: Indices, length: int) -> np.ndarray:
    """Validate ``indices`` against ``length`` and return them as an int64 array."""
    if isinstance(indices, torch.Tensor):
        indices = indices.cpu().numpy()
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= length):
        raise IndexError(f"indices out of range for a dataset of {length} items")
    return idx


class LabeledImages(Dataset):
    """A labelled image dataset: items are ``(image CxHxW float, label, index)``.

    ``index`` is the item's position in *this* dataset, so per-item caches (old
    features, side information) can be keyed by it. Subclasses implement
    ``__getitem__`` and set ``labels``; ``get_batch`` is the engine's fast path and
    in-memory datasets override it with a single tensor gather.
    """

    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        raise NotImplementedError

    def get_batch(self, indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(B, C, H, W)`` and labels ``(B,)`` of the given items."""
        idx = _as_index_array(indices, len(self))
        images = torch.stack([self[int(i)][0] for i in idx])
        return images, torch.from_numpy(self.labels[idx])

    def subset(self, indices: Indices) -> LabeledImages:
        """A view on some items, keeping their global labels."""
        return SubsetImages(self, _as_index_array(indices, len(self)))

    @property
    def classes(self) -> np.ndarray:
        """Sorted global class ids present in this dataset."""
        return np.unique(self.labels)


class SubsetImages(LabeledImages):
    """Items ``indices`` of ``parent``; indices are re-numbered from 0."""

    def __init__(self, parent: LabeledImages, indices: np.ndarray) -> None:
        self.parent = parent
        self.indices = indices
        self.labels = parent.labels[indices]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, label, _ = self.parent[int(self.indices[i])]
        return image, label, i

    def get_batch(self, indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
        return self.parent.get_batch(self.indices[_as_index_array(indices, len(self))])

    def subset(self, indices: Indices) -> LabeledImages:
        return self.parent.subset(self.indices[_as_index_array(indices, len(self))])


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], ...]:
    """Per-channel mean and std of uint8 images ``(N, C, H, W)`` scaled to [0, 1]."""
    n_pixels = images.shape[0] * images.shape[2] * images.shape[3]
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    mean = total / n_pixels
    std = (total_sq / n_pixels - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


class TensorImages(LabeledImages):
    """In-memory uint8 images, returned as ``(x / 255 - mean) / std``.

    Keeping uint8 in memory costs a quarter of float32; normalising per batch is cheap.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: Indices,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        labels_np = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels_np) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(labels_np)} labels")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError("mean and std need one value per channel")
        self.images = images
        self.labels = labels_np
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._labels_t = torch.from_numpy(labels_np)
        self._mean_t = torch.tensor(self.mean).view(1, -1, 1, 1)
        self._std_t = torch.tensor(self.std).view(1, -1, 1, 1)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float().div_(255.0) - self._mean_t) / self._std_t

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self._normalise(self.images[i : i + 1])[0], int(self.labels[i]), int(i)

    def get_batch(self, indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(_as_index_array(indices, len(self)))
        return self._normalise(self.images[idx]), self._labels_t[idx]

    def subset(self, indices: Indices) -> TensorImages:
        idx = torch.from_numpy(_as_index_array(indices, len(self)))
        return TensorImages(self.images[idx], self.labels[idx.numpy()], self.mean, self.std)


@dataclass(frozen=True)
class RevisitedTruth:
    """Per-query relevant gallery items, for datasets whose truth is not a shared label.

    Revisited Oxford/Paris (revisitop) list, for each query, the indices of its ``easy``,
    ``hard`` and ``junk`` gallery images; ``gnd`` keeps them in the form
    :func:`compatzoo.retrieval.evaluate_revisited` takes.
    """

    gnd: tuple[dict[str, np.ndarray], ...]
    dataset: str

    @classmethod
    def from_gnd(cls, gnd: Sequence[dict[str, Any]], dataset: str) -> RevisitedTruth:
        """Keep the easy/hard/junk lists of a checked revisitop ``gnd`` as int64 arrays."""
        return cls(tuple({key: np.asarray(entry[key], dtype=np.int64).reshape(-1)
                          for key in ("easy", "hard", "junk")} for entry in gnd), dataset)


@dataclass
class RetrievalData:
    """Everything an upgrade experiment needs from a dataset.

    ``gallery is None`` means the FCT protocol: the query set is also the gallery and
    each query is left out of its own ranking. ``relevance``, when set, is the retrieval
    truth (revisitop protocol) and the labels of query and gallery are only bookkeeping.
    """

    train: LabeledImages
    query: LabeledImages
    gallery: LabeledImages | None
    num_classes: int
    name: str
    info: dict[str, Any] = field(default_factory=dict)
    #: how a raw image becomes a model input (recorded in bundles); None if unknown
    preprocess: Preprocess | None = None
    #: per-query easy/hard/junk gallery indices (Revisited Oxford/Paris); None: labels decide
    relevance: RevisitedTruth | None = None

    def __post_init__(self) -> None:
        if self.relevance is not None and (
                self.gallery is None or len(self.relevance.gnd) != len(self.query)):
            raise ValueError("relevance needs a gallery and one ground-truth entry per query")


def retrieval_info(
    name: str,
    params: dict[str, Any],
    train: LabeledImages,
    query: LabeledImages,
    gallery: LabeledImages | None,
) -> dict[str, Any]:
    """The provenance block recorded in results JSON: params and split sizes."""
    sizes = {
        "train_images": len(train),
        "train_classes": int(len(train.classes)),
        "query_images": len(query),
        "query_classes": int(len(query.classes)),
    }
    if gallery is not None:
        sizes |= {"gallery_images": len(gallery), "gallery_classes": int(len(gallery.classes))}
    return {"dataset": name, "params": params, "sizes": sizes}
