"""Compatibility matrix, its summaries, BCT's criterion and update gain."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compatzoo.retrieval import (
    CompatibilityMatrix, compatibility_matrix, empirical_compatibility, evaluate, update_gain,
)
from compatzoo.retrieval.validation import InvalidArgumentError
from fixtures_retrieval import clustered


def test_summaries_hand_example():
    matrix = CompatibilityMatrix(["v1", "v2", "v3"], [[0.5, 0.1, 0.0],
                                                      [0.6, 0.7, 0.2],
                                                      [0.4, 0.75, 0.8]], "map@100")
    # Pairs i > j: M[v2][v1]=0.6 > M[v1][v1]=0.5 yes; M[v3][v1]=0.4 > 0.5 no;
    # M[v3][v2]=0.75 > M[v2][v2]=0.7 yes -> 2 of 3.
    assert matrix.average_compatibility == pytest.approx(2 / 3)
    # Lower triangle with diagonal: (0.5 + 0.6 + 0.7 + 0.4 + 0.75 + 0.8) / 6
    assert matrix.average_multi_model_accuracy == pytest.approx(0.625)
    data = json.loads(json.dumps(matrix.to_dict(), allow_nan=False))
    assert data["values"][2][1] == 0.75 and data["names"] == ["v1", "v2", "v3"]
    table = matrix.to_markdown().splitlines()
    assert len(table) == 5 and table[3] == "| v2 | 0.6000 | 0.7000 | 0.2000 |"


def test_single_model_has_no_compatibility_pairs():
    matrix = CompatibilityMatrix(["v1"], [[0.5]], "cmc@1")
    assert np.isnan(matrix.average_compatibility)
    assert matrix.to_dict()["average_compatibility"] is None
    assert matrix.average_multi_model_accuracy == 0.5


def test_bct_criterion_and_update_gain():
    assert empirical_compatibility(0.6, 0.5) and not empirical_compatibility(0.5, 0.5)
    # (0.6 - 0.5) / (0.7 - 0.5)
    assert update_gain(0.6, 0.5, 0.7) == pytest.approx(0.5)
    with pytest.raises(InvalidArgumentError, match="paragon"):
        update_gain(0.6, 0.5, 0.5)


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_matrix_entries_are_cross_evaluations(leave_one_out):
    rng = np.random.default_rng(0)
    q, ql, g, gl = clustered(rng, 30, 120, 8, 16, spread=2.0)
    if leave_one_out:
        q, ql = g, gl
    models = {"old": (q, g), "new": (q * 2 + 0.5, g * 2 + 0.5), "newer": (q + 1, g - 1)}
    matrix = compatibility_matrix(models, ql, gl, metric="cmc@1", leave_one_out=leave_one_out)
    assert matrix.names == ["old", "new", "newer"] and matrix.metric == "cmc@1"
    for i, (qf, _) in enumerate(models.values()):
        for j, (_, gf) in enumerate(models.values()):
            expected = evaluate(qf, ql, gf, gl, ["cmc@1"], leave_one_out=leave_one_out)
            assert matrix.values[i][j] == expected["cmc@1"]
