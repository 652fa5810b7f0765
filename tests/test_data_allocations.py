"""Allocations: exact sizes, disjointness, nesting and determinism on constructed labels."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from compatzoo.data import (
    ALLOCATIONS,
    ExtendedParams,
    OpenParams,
    SequentialParams,
    extended_class,
    extended_data,
    open_class,
    open_data,
    sequential,
)
from compatzoo.errors import DatasetError

# Uneven classes: 10, 7, 3, 1, 20 and 2 images, shuffled so indices do not follow classes.
COUNTS = {0: 10, 1: 7, 2: 3, 3: 1, 4: 20, 5: 2}
LABELS = np.random.default_rng(123).permutation(np.repeat(list(COUNTS), list(COUNTS.values())))


def per_class(indices: np.ndarray, labels: np.ndarray = LABELS) -> dict[int, int]:
    classes, counts = np.unique(labels[indices], return_counts=True)
    return dict(zip(classes.tolist(), counts.tolist()))


def test_extended_data_takes_rounded_fraction_of_every_class() -> None:
    alloc = extended_data(ExtendedParams(fraction=0.3), labels=LABELS, seed=0)
    # floor(0.3 * n + 0.5), at least one: 10->3, 7->2, 3->1, 1->1, 20->6, 2->1
    assert per_class(alloc.old) == {0: 3, 1: 2, 2: 1, 3: 1, 4: 6, 5: 1}
    np.testing.assert_array_equal(alloc.new, np.arange(len(LABELS)))
    assert set(alloc.old) <= set(alloc.new)


def test_extended_class_keeps_whole_classes() -> None:
    alloc = extended_class(ExtendedParams(fraction=0.5), labels=LABELS, seed=0)
    old_counts = per_class(alloc.old)
    assert len(old_counts) == 3  # round(0.5 * 6)
    assert all(old_counts[c] == COUNTS[c] for c in old_counts)
    assert len(alloc.new) == len(LABELS)


def test_open_data_is_disjoint_and_covers_every_class_on_both_sides() -> None:
    labels = LABELS[LABELS != 3]  # open-data needs two images per class
    alloc = open_data(OpenParams(fraction=0.3), labels=labels, seed=0)
    assert not set(alloc.old) & set(alloc.new)
    assert len(alloc.old) + len(alloc.new) == len(labels)
    # 10->3, 7->2, 3->1, 20->6 and 2->1 (clipped to leave one for the new side)
    assert per_class(alloc.old, labels) == {0: 3, 1: 2, 2: 1, 4: 6, 5: 1}
    assert set(per_class(alloc.new, labels)) == {0, 1, 2, 4, 5}


def test_open_data_rejects_single_image_classes() -> None:
    with pytest.raises(DatasetError, match="at least 2"):
        open_data(OpenParams(), labels=LABELS, seed=0)


def test_open_class_splits_classes_disjointly() -> None:
    alloc = open_class(OpenParams(fraction=0.3), labels=LABELS, seed=0)
    old_classes, new_classes = set(per_class(alloc.old)), set(per_class(alloc.new))
    assert len(old_classes) == 2  # round(0.3 * 6) = 2
    assert old_classes.isdisjoint(new_classes)
    assert old_classes | new_classes == set(COUNTS)
    assert len(alloc.old) + len(alloc.new) == len(LABELS)


def test_open_class_clips_to_leave_one_class_for_each_side() -> None:
    alloc = open_class(OpenParams(fraction=0.9), labels=np.array([0, 0, 1, 1]), seed=0)
    assert len(per_class(alloc.old, np.array([0, 0, 1, 1]))) == 1
    assert len(alloc.new) == 2


@pytest.mark.parametrize("by", ["data", "class"])
def test_sequential_stages_are_nested_and_grow(by: str) -> None:
    labels = np.repeat(np.arange(20), 10)
    alloc = sequential(SequentialParams(by=by), labels=labels, seed=3)
    assert [len(s) for s in alloc.stages] == [60, 120, 160, 200]
    for smaller, larger in zip(alloc.stages, alloc.stages[1:]):
        assert set(smaller) < set(larger)
    assert alloc.old is alloc.stages[0] and alloc.new is alloc.stages[-1]
    classes_per_stage = [d["classes"] for d in alloc.describe(labels)]
    assert classes_per_stage == ([20] * 4 if by == "data" else [6, 12, 16, 20])


@pytest.mark.parametrize("name", sorted(ALLOCATIONS))
def test_allocations_are_deterministic_sorted_and_seed_dependent(name: str) -> None:
    fn = ALLOCATIONS[name]
    labels = np.repeat(np.arange(30), 8)
    first, again = fn(fn.Params(), labels=labels, seed=7), fn(fn.Params(), labels=labels, seed=7)
    other = fn(fn.Params(), labels=labels, seed=8)
    assert len(first.stages) == fn.stage_count(fn.Params())   # what a plan checks stages with
    for a, b in zip(first.stages, again.stages):
        np.testing.assert_array_equal(a, b)
        assert np.all(np.diff(a) > 0)
    assert not np.array_equal(first.old, other.old)


@pytest.mark.parametrize(
    ("model", "kwargs"),
    [
        (ExtendedParams, {"fraction": 0.0}),
        (ExtendedParams, {"fraction": 1.5}),
        (OpenParams, {"fraction": 1.0}),
        (OpenParams, {"fraction": -0.1}),
        (SequentialParams, {"fractions": (0.6, 0.3)}),
        (SequentialParams, {"fractions": (0.5,)}),
        (SequentialParams, {"fractions": (0.0, 1.0)}),
        (SequentialParams, {"by": "pixels"}),
        (OpenParams, {"fractoin": 0.3}),
    ],
)
def test_bad_params_are_rejected(model: type, kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        model(**kwargs)


def test_bad_labels_are_rejected() -> None:
    with pytest.raises(DatasetError, match="non-empty 1-D integer"):
        extended_data(ExtendedParams(), labels=np.array([], dtype=np.int64), seed=0)
