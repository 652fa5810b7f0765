"""evaluate(): every metric by hand and against a full-matrix reference; ties; backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compatzoo.retrieval import KNOWN_METRICS, evaluate, parse_metric
from compatzoo.retrieval import ranking, search
from compatzoo.retrieval.validation import as_features
from fixtures_retrieval import (
    assert_no_near_ties, assert_same_ranking, clustered, reference_evaluate,
)

ALL = ["map@1", "map@2", "map@3", "map@5", "map@100", "map", "map@r", "r_precision",
       "cmc@1", "cmc@2", "cmc@5", "precision@1", "precision@3", "precision@4"]


def at_cosines(cosines) -> np.ndarray:
    """2-D unit vectors whose cosine with the query [1, 0] is each given value."""
    c = np.asarray(cosines, dtype=np.float64)
    return np.stack([c, np.sqrt(1 - c**2)], axis=1).astype(np.float32)


# Gallery ranked 0..5 for the query [1, 0] (cosines 0.9 down to 0.4).
HAND_GALLERY = at_cosines([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
HAND_GALLERY_LABELS = np.array([1, 2, 1, 2, 1, 3])
# Query 0 (label 1): positives at ranks 1, 3, 5 (1-based), n_pos = 3.
# Query 1 (label 2): positives at ranks 2, 4, n_pos = 2.
# Query 2 (label 9): no positive in the gallery -> left out of every mean.
HAND_QUERY = np.array([[1, 0], [1, 0], [1, 0]], dtype=np.float32)
HAND_QUERY_LABELS = np.array([1, 2, 9])
HAND_EXPECTED = {
    # q0: P(1)=1 -> 1/min(1,3) = 1;          q1: nothing in top 1 -> 0
    "map@1": (1 + 0) / 2,
    # q0: P(1)=1 -> 1/min(2,3) = 1/2;        q1: P(2)=1/2 -> (1/2)/min(2,2) = 1/4
    "map@2": (1 / 2 + 1 / 4) / 2,
    # q0: (1 + 2/3)/3 = 5/9;                  q1: (1/2)/min(3,2) = 1/4
    "map@3": (5 / 9 + 1 / 4) / 2,
    # q0: (1 + 2/3 + 3/5)/3 = 34/45;          q1: (1/2 + 2/4)/2 = 1/2
    "map@5": (34 / 45 + 1 / 2) / 2,
    "map@100": (34 / 45 + 1 / 2) / 2,
    "map": (34 / 45 + 1 / 2) / 2,
    # R = n_pos. q0: R=3, hits at 1, 3 -> (1 + 2/3)/3 = 5/9; q1: R=2, hit at 2 -> (1/2)/2
    "map@r": (5 / 9 + 1 / 4) / 2,
    # q0: 2 of top 3;  q1: 1 of top 2
    "r_precision": (2 / 3 + 1 / 2) / 2,
    "cmc@1": (1 + 0) / 2,
    "cmc@2": (1 + 1) / 2,
    "cmc@5": 1.0,
    "precision@1": (1 + 0) / 2,
    # q0: 2 of top 3; q1: 1 of top 3
    "precision@3": (2 / 3 + 1 / 3) / 2,
    # q0: 2 of top 4; q1: 2 of top 4
    "precision@4": (2 / 4 + 2 / 4) / 2,
}


@pytest.fixture(params=["topk", "counting"])
def rank_path(request, monkeypatch):
    """Run a test through the top-k path and through the two-pass counting path."""
    if request.param == "counting":
        monkeypatch.setattr(ranking, "MAX_TOPK_DEPTH", 0)
    return request.param


def test_hand_worked_example(rank_path):
    result = evaluate(HAND_QUERY, HAND_QUERY_LABELS, HAND_GALLERY, HAND_GALLERY_LABELS,
                      metrics=ALL)
    assert result == pytest.approx(HAND_EXPECTED, abs=1e-12)


def test_map_at_k_divides_by_min_k_npos():
    # One positive, found at rank 2: AP@5 = (1/2) / min(5, 1) = 1/2 (not divided by 5).
    result = evaluate(HAND_QUERY[:1], [3], HAND_GALLERY, [0, 3, 0, 0, 0, 0], metrics=["map@5"])
    assert result["map@5"] == pytest.approx(0.5)


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_matches_reference_on_random_data(rank_path, leave_one_out):
    rng = np.random.default_rng(0)
    q, ql, g, gl = clustered(rng, 60, 400, 40, 16, spread=1.5)
    gl[:5] = 1000 + np.arange(5)  # singleton classes: no positive under leave-one-out
    ql[:3] = -1  # queries without any positive
    if leave_one_out:
        q, ql = g, gl
    # Full rankings of 400 items hold positives and negatives within float32 rounding of
    # each other (under leave-one-out, all 200 seeds tried do), which chunked scoring may
    # swap; the reference ranks those both ways and the result must lie in between (the
    # bounds coincide where there are none, and differ by < 4e-6 here).
    low, high = (reference_evaluate(q, ql, g, gl, ALL, leave_one_out, near_ties=side)
                 for side in ("last", "first"))
    result = evaluate(q, ql, g, gl, metrics=ALL, leave_one_out=leave_one_out, chunk_size=37)
    for m in ALL:
        assert low[m] - 1e-12 <= result[m] <= high[m] + 1e-12, m


def test_matches_reference_with_ties(rank_path):
    # Few distinct vectors -> many exactly equal scores; ties rank by gallery index.
    rng = np.random.default_rng(1)
    basis = np.eye(4, dtype=np.float32)
    g = basis[rng.integers(0, 4, 200)]
    gl = rng.integers(0, 5, 200)
    q = basis[rng.integers(0, 4, 30)]
    ql = rng.integers(0, 5, 30)
    expected = reference_evaluate(q, ql, g, gl, ALL)
    for chunk_size in (None, 7) if rank_path == "counting" else (None, 1, 2, 7, 64):
        result = evaluate(q, ql, g, gl, metrics=ALL, chunk_size=chunk_size)
        assert result == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_ties_break_by_gallery_index(backend, rank_path):
    # Items 0 and 1 have the same vector; the lower index ranks first on every backend.
    g = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    q = np.array([[1, 0]], dtype=np.float32)
    first_wrong = evaluate(q, [1], g, [2, 1, 1], ["cmc@1", "map"], backend=backend)
    assert first_wrong == pytest.approx({"cmc@1": 0.0, "map": (1 / 2 + 2 / 3) / 2})
    first_right = evaluate(q, [1], g, [1, 2, 1], ["cmc@1", "map"], backend=backend)
    assert first_right == pytest.approx({"cmc@1": 1.0, "map": (1 + 2 / 3) / 2})


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_tie_group_across_chunks_and_topk_boundary(backend):
    # 50 identical items: the top 10 must be indices 0..9 whatever the chunking.
    g = np.tile(np.array([[0, 1, 0]], dtype=np.float32), (50, 1))
    q = np.array([[0, 2, 0], [0, 1, 0]], dtype=np.float32)
    for chunk_size in (3, 8, 50):
        scores, index = search.search(as_features(q, "q"), as_features(g, "g"), 10, backend,
                                      chunk_size)
        assert index.tolist() == [list(range(10))] * 2
        assert torch.all(scores == 1.0)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_many_chunks_asking_few_candidates_stay_exact(backend):
    # Late chunks are asked for only a few candidates; queries with more entrants are
    # asked again. Both must reproduce the reference ranking.
    rng = np.random.default_rng(7)
    q, ql, g, gl = clustered(rng, 50, 3000, 30, 16, spread=1.5)
    metrics = ["map@20", "precision@20", "cmc@1"]
    assert_no_near_ties(q, g, np.equal.outer(ql, gl), depth=20)  # ranks as the reference
    result = evaluate(q, ql, g, gl, metrics, backend=backend, chunk_size=100)
    assert result == pytest.approx(reference_evaluate(q, ql, g, gl, metrics), rel=1e-12)


def test_backends_give_identical_rankings():
    rng = np.random.default_rng(2)
    q, _, g, _ = clustered(rng, 50, 500, 20, 32)
    for backend in ("torch", "faiss", "auto"):
        _, index = search.search(as_features(q, "q"), as_features(g, "g"), 20, backend, 64)
        assert_same_ranking(index.numpy(), q, g)


def test_backends_give_identical_metrics_leave_one_out():
    rng = np.random.default_rng(3)
    _, _, g, gl = clustered(rng, 0, 300, 15, 32)
    # faiss sums in its own BLAS: same metrics only because no near-tie can swap ranks.
    assert_no_near_ties(g, g, np.equal.outer(gl, gl), depth=10, leave_one_out=True)
    results = [evaluate(g, gl, g, gl, ["map@10", "cmc@1", "cmc@5"], leave_one_out=True,
                        backend=b, chunk_size=41) for b in ("torch", "faiss")]
    assert results[0] == results[1]


def test_counting_and_topk_paths_agree_exactly(monkeypatch):
    """Exact by construction: one backend and one chunking score both paths identically."""
    rng = np.random.default_rng(4)
    q, ql, g, gl = clustered(rng, 40, 300, 10, 8, spread=2.0)
    topk = evaluate(q, ql, g, gl, ALL, backend="torch", chunk_size=29)
    monkeypatch.setattr(ranking, "MAX_TOPK_DEPTH", 0)
    assert evaluate(q, ql, g, gl, ALL, backend="torch", chunk_size=29) == topk


def test_query_blocks_and_chunk_sizes_do_not_change_results(monkeypatch, rank_path):
    rng = np.random.default_rng(5)
    q, ql, g, gl = clustered(rng, 70, 200, 10, 8, spread=2.0)
    ql[:14] = 0  # the first query block has more positives per query than the others
    gl[:30] = 0
    assert_no_near_ties(q, g, np.equal.outer(ql, gl))  # other blockings rank alike
    expected = reference_evaluate(q, ql, g, gl, ALL)
    monkeypatch.setattr(search, "MAX_QUERY_BLOCK", 16)
    for chunk_size in (1, 5, None) if rank_path == "topk" else (37, None):
        assert evaluate(q, ql, g, gl, ALL, chunk_size=chunk_size) == pytest.approx(expected)


def test_leave_one_out_excludes_self_by_index_not_by_score():
    # Items 0 and 1 are identical: under leave-one-out each finds the other at rank 1.
    g = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    labels = np.array([0, 0, 1, 2])
    result = evaluate(g, labels, g, labels, ["cmc@1", "map"], leave_one_out=True)
    # Queries 0 and 1 are right at rank 1; 2 and 3 have no positive (singletons).
    assert result == {"cmc@1": 1.0, "map": 1.0}


def test_accepts_torch_float64_and_readonly_inputs_without_changing_them():
    rng = np.random.default_rng(6)
    q, ql, g, gl = clustered(rng, 20, 100, 5, 8)
    q_copy, g_copy = q.copy(), g.copy()
    g.setflags(write=False)
    expected = evaluate(q, ql, g, gl, ["map@10"])
    np.testing.assert_array_equal(q, q_copy)
    np.testing.assert_array_equal(g, g_copy)
    tensors = evaluate(torch.from_numpy(q), torch.from_numpy(ql), torch.from_numpy(g.copy()),
                       torch.from_numpy(gl), ["map@10"])
    assert tensors == expected
    assert evaluate(q.astype(np.float64), ql, g.astype(np.float64), gl, ["map@10"]) == expected
    # Negative strides; the rows sit elsewhere in the matmul, so no near-tie may swap.
    assert_no_near_ties(q, g, np.equal.outer(ql, gl), depth=10)
    reversed_view = evaluate(q, ql, g[::-1], gl[::-1], ["map@10"])
    assert reversed_view == pytest.approx(expected)


def test_parse_metric():
    assert (parse_metric("mAP@100").kind, parse_metric("mAP@100").k) == ("map@k", 100)
    assert (parse_metric(" CMC@05 ").kind, parse_metric(" CMC@05 ").k) == ("cmc", 5)
    assert (parse_metric("map@r").kind, parse_metric("R_Precision").kind) == ("map@r",
                                                                             "r_precision")
    assert "map@<k>" in KNOWN_METRICS and "r_precision" in KNOWN_METRICS


def test_results_are_keyed_by_the_names_as_given():
    result = evaluate(HAND_QUERY, HAND_QUERY_LABELS, HAND_GALLERY, HAND_GALLERY_LABELS,
                      metrics=["mAP@3", "CMC@1"])
    assert result == pytest.approx({"mAP@3": HAND_EXPECTED["map@3"],
                                    "CMC@1": HAND_EXPECTED["cmc@1"]})
