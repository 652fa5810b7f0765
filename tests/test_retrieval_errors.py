"""Bad input fails early, with a CompatzooError that says what is wrong and what to do."""

from __future__ import annotations

import numpy as np
import pytest

from compatzoo.errors import (
    CompatzooError, DatasetError, DimensionMismatchError, InvalidFeaturesError,
)
from compatzoo.retrieval import backfill_curve, compatibility_matrix, evaluate, parse_metric
from compatzoo.retrieval import evaluation
from compatzoo.retrieval.validation import InvalidArgumentError

RNG = np.random.default_rng(0)
Q = RNG.standard_normal((5, 4)).astype(np.float32)
G = RNG.standard_normal((12, 4)).astype(np.float32)
QL = np.array([0, 1, 2, 0, 1])
GL = np.arange(12) % 3


@pytest.fixture(autouse=True)
def no_search(monkeypatch):
    """Any search started by these tests is a failure: checks must come first."""
    def fail(*args, **kwargs):
        raise AssertionError("a search ran before the input was rejected")
    monkeypatch.setattr(evaluation, "positive_ranks", fail)


def with_rows(array, rows, value):
    array = array.copy()
    array[rows] = value
    return array


@pytest.mark.parametrize("call, error, words", [
    (lambda: evaluate(Q[:, :3], QL, G, GL), DimensionMismatchError, "dimension 3"),
    (lambda: evaluate(Q, QL[:4], G, GL), DimensionMismatchError, "4 labels"),
    (lambda: evaluate(Q, QL, G, GL[:5]), DimensionMismatchError, "one label per row"),
    (lambda: evaluate(Q, QL, with_rows(G, [3, 7], np.nan), GL), InvalidFeaturesError,
     "rows 3, 7"),
    (lambda: evaluate(with_rows(Q, [4], np.inf), QL, G, GL), InvalidFeaturesError, "rows 4"),
    (lambda: evaluate(Q, QL, G[:0], GL[:0]), InvalidFeaturesError, "empty"),
    (lambda: evaluate(Q[:0], QL[:0], G, GL), InvalidFeaturesError, "empty"),
    (lambda: evaluate(Q[0], QL[:1], G, GL), InvalidFeaturesError, "x[None, :]"),
    (lambda: evaluate(Q.astype(int), QL, G, GL), InvalidFeaturesError, "astype"),
    (lambda: evaluate(Q, QL, with_rows(G, [2], 0.0), GL), InvalidFeaturesError, "all-zero"),
    (lambda: evaluate(Q, QL.astype(float), G, GL), InvalidArgumentError, "integer"),
    (lambda: evaluate(Q, QL, G, GL, metrics=["mAP@x"]), InvalidArgumentError, "map@<k>"),
    (lambda: evaluate(Q, QL, G, GL, metrics=["map@0"]), InvalidArgumentError, "known metrics"),
    (lambda: evaluate(Q, QL, G, GL, metrics=[]), InvalidArgumentError, "empty"),
    (lambda: evaluate(Q, QL, G, GL, backend="gpu"), InvalidArgumentError, "backend"),
    (lambda: evaluate(Q, QL, G, GL, chunk_size=0), InvalidArgumentError, "chunk_size"),
    (lambda: evaluate(Q, QL + 10, G, GL), DatasetError, "same label ids"),
    (lambda: evaluate(Q, QL, G, GL, leave_one_out=True), InvalidArgumentError,
     "leave_one_out"),
    (lambda: evaluate(G[:1], GL[:1], G[:1], GL[:1], leave_one_out=True), InvalidFeaturesError,
     "at least 2"),
    (lambda: backfill_curve(Q, G, G, QL, GL, np.arange(11)), InvalidArgumentError,
     "permutation"),
    (lambda: backfill_curve(Q, G, G, QL, GL, np.r_[0, np.arange(11)]), InvalidArgumentError,
     "never appear"),
    (lambda: backfill_curve(Q, G, G, QL, GL, np.arange(12) + 1), InvalidArgumentError,
     "outside"),
    (lambda: backfill_curve(Q, G, G[:11], QL, GL, np.arange(12)), DimensionMismatchError,
     "gallery_new"),
    (lambda: backfill_curve(Q, G, G, QL, GL, np.arange(12), query_old=Q[:4]),
     DimensionMismatchError, "query_old"),
    (lambda: backfill_curve(Q, G, G, QL, GL, np.arange(12), points=1), InvalidArgumentError,
     "points"),
    (lambda: backfill_curve(Q, G, G, QL, GL, np.arange(12), nfr_k=(0,)), InvalidArgumentError,
     "nfr_k"),
    (lambda: compatibility_matrix({"a": (Q, G), "b": (Q[:, :3], G[:, :3])}, QL, GL),
     DimensionMismatchError, "dimension"),
    (lambda: compatibility_matrix({"a": Q}, QL, GL), InvalidArgumentError, "pair"),
    (lambda: compatibility_matrix({}, QL, GL), InvalidArgumentError, "empty"),
    (lambda: parse_metric("ndcg@10"), InvalidArgumentError, "cmc@<k>"),
])
def test_bad_input_is_rejected_before_searching(call, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")) as info:
        call()
    assert isinstance(info.value, CompatzooError)
