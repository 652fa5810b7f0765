"""Which training images each model version may see (RACT table 1, MixBCT scenarios).

Every allocation is a pure function ``fn(params, labels=..., seed=...) -> Allocation`` of
the training labels: the same labels and seed always give the same indices. Its
``stage_count(params)`` says how many training sets it gives, so a plan can check the
stages models ask for before any data is loaded.

Rounding rule: a fraction ``f`` of ``n`` items is ``floor(f * n + 0.5)`` (round half
up), clipped so that every selected side is non-empty -- per class for ``by data``
splits (each class keeps at least one image on each side that needs it) and over the
class list for ``by class`` splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from compatzoo.errors import DatasetError
from compatzoo.registry import with_params


@dataclass(frozen=True)
class Allocation:
    """Sorted train-set indices per model version; ``stages[0]`` is the oldest."""

    stages: tuple[np.ndarray, ...]

    @property
    def old(self) -> np.ndarray:
        return self.stages[0]

    @property
    def new(self) -> np.ndarray:
        return self.stages[-1]

    def describe(self, labels: np.ndarray) -> list[dict[str, int]]:
        """Images and classes per stage, for the results JSON."""
        return [{"images": len(s), "classes": len(np.unique(labels[s]))} for s in self.stages]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExtendedParams(_Params):
    """Old model sees ``fraction`` of the data; the new one sees everything."""

    fraction: float = Field(0.3, gt=0, le=1, description="share the old model sees, in (0, 1]")


class OpenParams(_Params):
    """Old model sees ``fraction``; the new one sees only the rest (disjoint)."""

    fraction: float = Field(0.3, gt=0, lt=1, description="share the old model sees, in (0, 1)")


class SequentialParams(_Params):
    """Nested training sets for upgrades v1 -> v2 -> ... (RACT: 30% -> 60% -> 80% -> 100%)."""

    fractions: tuple[float, ...] = (0.3, 0.6, 0.8, 1.0)
    by: Literal["data", "class"] = "data"

    @field_validator("fractions")
    @classmethod
    def _increasing(cls, fractions: tuple[float, ...]) -> tuple[float, ...]:
        if len(fractions) < 2:
            raise ValueError("give at least two fractions (one per model version)")
        if not all(0 < f <= 1 for f in fractions):
            raise ValueError(f"every fraction must be in (0, 1], got {fractions}")
        if any(b <= a for a, b in zip(fractions, fractions[1:])):
            raise ValueError(f"fractions must be strictly increasing for nested stages, got {fractions}")
        return fractions


def _round(x: np.ndarray | float) -> np.ndarray:
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.int64)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"allocations need a non-empty 1-D integer label array, got shape {labels.shape}")
    return labels.astype(np.int64, copy=False)


def _random_rank(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image's position in a random order of its class (0-based)."""
    order = np.lexsort((rng.random(len(labels)), labels))
    sorted_labels = labels[order]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - first
    return rank


def _by_data(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Nested per-class subsets: stage ``i`` takes the first ``round(f_i * n_c)`` images
    (at least one) of a random order of each class."""
    classes, counts = np.unique(labels, return_counts=True)
    rank = _random_rank(labels, np.random.default_rng(seed))
    class_of = np.searchsorted(classes, labels)
    stages = []
    for f in fractions:
        quota = np.clip(_round(f * counts), 1, counts)
        stages.append(np.flatnonzero(rank < quota[class_of]))
    return stages


def _by_class(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Nested class subsets: stage ``i`` takes the first ``round(f_i * C)`` classes (at
    least one) of a random class order, with all their images."""
    classes = np.random.default_rng(seed).permutation(np.unique(labels))
    counts = np.clip(_round(np.asarray(fractions) * len(classes)), 1, len(classes))
    return [np.flatnonzero(np.isin(labels, classes[:n])) for n in counts]


@with_params(ExtendedParams)
def extended_data(params: ExtendedParams, *, labels: np.ndarray, seed: int) -> Allocation:
    """Old: ``fraction`` of each class's images; new: all images."""
    return Allocation(tuple(_by_data(_check_labels(labels), (params.fraction, 1.0), seed)))


@with_params(ExtendedParams)
def extended_class(params: ExtendedParams, *, labels: np.ndarray, seed: int) -> Allocation:
    """Old: ``fraction`` of the classes with all their images; new: all images."""
    return Allocation(tuple(_by_class(_check_labels(labels), (params.fraction, 1.0), seed)))


@with_params(OpenParams)
def open_data(params: OpenParams, *, labels: np.ndarray, seed: int) -> Allocation:
    """Old: ``fraction`` of each class's images; new: the other images of the same
    classes. Per class the old side is clipped to ``[1, n_c - 1]`` so both see it."""
    labels = _check_labels(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < 2:
        small = classes[counts < 2][:5].tolist()
        raise DatasetError(
            f"open-data gives each class to both models, so every class needs at least 2 "
            f"training images; classes {small} have 1. Use extended-data or open-class instead."
        )
    rank = _random_rank(labels, np.random.default_rng(seed))
    quota = np.clip(_round(params.fraction * counts), 1, counts - 1)[np.searchsorted(classes, labels)]
    return Allocation((np.flatnonzero(rank < quota), np.flatnonzero(rank >= quota)))


@with_params(OpenParams)
def open_class(params: OpenParams, *, labels: np.ndarray, seed: int) -> Allocation:
    """Old: ``fraction`` of the classes; new: the other classes (disjoint). The old side
    is clipped to ``[1, C - 1]`` classes."""
    labels = _check_labels(labels)
    classes = np.random.default_rng(seed).permutation(np.unique(labels))
    if len(classes) < 2:
        raise DatasetError(
            "open-class splits classes between two models, but the training set has one class; "
            "use extended-data or open-data instead"
        )
    n_old = int(np.clip(_round(params.fraction * len(classes)), 1, len(classes) - 1))
    old = np.isin(labels, classes[:n_old])
    return Allocation((np.flatnonzero(old), np.flatnonzero(~old)))


@with_params(SequentialParams)
def sequential(params: SequentialParams, *, labels: np.ndarray, seed: int) -> Allocation:
    """Nested training sets, one per model version, by images per class or by classes."""
    split = _by_data if params.by == "data" else _by_class
    return Allocation(tuple(split(_check_labels(labels), params.fractions, seed)))


def _two_stages(params) -> int:
    return 2


for _allocation in (extended_data, extended_class, open_data, open_class):
    _allocation.stage_count = _two_stages
sequential.stage_count = lambda params: len(params.fractions)

ALLOCATIONS = {"extended-data": extended_data, "extended-class": extended_class,
               "open-data": open_data, "open-class": open_class, "sequential": sequential}
