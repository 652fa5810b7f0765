"""backfill_curve(): equal to per-point evaluation, NFR by hand, AUC, export and plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compatzoo.retrieval import BackfillCurve, backfill_curve, evaluate
from compatzoo.errors import DimensionMismatchError
from compatzoo.retrieval import ranking
from fixtures_retrieval import assert_no_near_ties, clustered, reference_correct

METRICS = ["map@10", "map", "map@r", "r_precision", "cmc@1", "cmc@5", "precision@3"]


def upgrade_data(seed: int, n_query: int = 40, n_gallery: int = 300):
    """Old and new embeddings of the same items; the new model separates classes better."""
    rng = np.random.default_rng(seed)
    q_old, ql, g_old, gl = clustered(rng, n_query, n_gallery, 12, 8, spread=2.5)
    centres = rng.standard_normal((12, 8)) * 2
    q_new = (centres[ql] + rng.standard_normal(q_old.shape)).astype(np.float32)
    g_new = (centres[gl] + rng.standard_normal(g_old.shape)).astype(np.float32)
    return q_old, q_new, ql, g_old, g_new, gl, rng.permutation(n_gallery)


def assert_points_rank_alike(query, labels, galleries, gallery_labels, depth=None,
                             leave_one_out=False):
    """The curve scores each point in other chunks (cut at every point, rows in backfill
    order) than a plain evaluation or the reference: equal ranks need no near-ties."""
    for gallery in galleries:
        assert_no_near_ties(query, gallery, np.equal.outer(labels, gallery_labels), depth,
                            leave_one_out)


def mixed_gallery(g_old, g_new, order, fraction):
    backfilled = order[:round(fraction * len(order))]
    mixed = g_old.copy()
    mixed[backfilled] = g_new[backfilled]
    return mixed


@pytest.mark.parametrize("counting, chunk_size", [
    (False, None), (False, 7), (False, 64), (True, None), (True, 23),
])
def test_curve_equals_naive_per_point_evaluation(monkeypatch, counting, chunk_size):
    if counting:
        monkeypatch.setattr(ranking, "MAX_TOPK_DEPTH", 0)
    q_old, q_new, ql, g_old, g_new, gl, order = upgrade_data(97)  # seed 0 had near-ties
    assert_points_rank_alike(q_old, ql, [g_old], gl, depth=5)
    assert_points_rank_alike(q_new, ql, [mixed_gallery(g_old, g_new, order, f)
                                         for f in np.linspace(0, 1, 11)], gl)
    curve = backfill_curve(q_new, g_old, g_new, ql, gl, order, points=11, metrics=METRICS,
                           query_old=q_old, nfr_k=(1, 5), chunk_size=chunk_size)
    right_before = {k: reference_correct(q_old, ql, g_old, gl, k) for k in (1, 5)}
    assert curve.fractions == pytest.approx(np.linspace(0, 1, 11).tolist())
    for point, fraction in enumerate(curve.fractions):
        mixed = mixed_gallery(g_old, g_new, order, fraction)
        expected = evaluate(q_new, ql, mixed, gl, METRICS)
        assert {m: curve.metrics[m][point] for m in METRICS} == expected
        for k in (1, 5):
            now = reference_correct(q_new, ql, mixed, gl, k)
            flips = (right_before[k] & ~now).sum() / right_before[k].sum()
            assert curve.nfr[k][point] == pytest.approx(flips)
    assert curve.auc == pytest.approx({m: np.mean(v) for m, v in curve.metrics.items()})


@pytest.mark.parametrize("counting", [False, True])
def test_curve_equals_naive_evaluation_with_ties(monkeypatch, counting):
    # Axis vectors: scores are exactly 0 or 1, so ties span old and new rows and chunks.
    if counting:
        monkeypatch.setattr(ranking, "MAX_TOPK_DEPTH", 0)
    rng = np.random.default_rng(3)
    basis = np.eye(3, dtype=np.float32)
    g_old, g_new = basis[rng.integers(0, 3, 90)], basis[rng.integers(0, 3, 90)]
    gl, ql = rng.integers(0, 4, 90), rng.integers(0, 4, 20)
    q_new, order = basis[rng.integers(0, 3, 20)], rng.permutation(90)
    for chunk_size in (4, 64):
        curve = backfill_curve(q_new, g_old, g_new, ql, gl, order, points=7, metrics=METRICS,
                               chunk_size=chunk_size)
        for point, fraction in enumerate(curve.fractions):
            expected = evaluate(q_new, ql, mixed_gallery(g_old, g_new, order, fraction), gl,
                                METRICS)
            assert {m: curve.metrics[m][point] for m in METRICS} == expected


@pytest.mark.parametrize("counting, backend", [(False, "torch"), (False, "faiss"),
                                               (True, "torch")])
def test_leave_one_out_curve_equals_naive_evaluation(monkeypatch, counting, backend):
    # FCT protocol: the gallery items are the queries; each leaves itself out, which
    # under a permuted backfill order must still be found by identity.
    if counting:
        monkeypatch.setattr(ranking, "MAX_TOPK_DEPTH", 0)
    _, _, _, g_old, g_new, gl, order = upgrade_data(4, n_query=1, n_gallery=120)
    assert_points_rank_alike(g_old, gl, [g_old], gl, depth=1, leave_one_out=True)
    assert_points_rank_alike(g_new, gl, [mixed_gallery(g_old, g_new, order, f)
                                         for f in np.linspace(0, 1, 5)], gl, leave_one_out=True)
    curve = backfill_curve(g_new, g_old, g_new, gl, gl, order, points=5, metrics=METRICS,
                           query_old=g_old, leave_one_out=True, backend=backend,
                           chunk_size=17)
    right_before = reference_correct(g_old, gl, g_old, gl, 1, leave_one_out=True)
    for point, fraction in enumerate(curve.fractions):
        mixed = mixed_gallery(g_old, g_new, order, fraction)
        expected = evaluate(g_new, gl, mixed, gl, METRICS, leave_one_out=True)
        assert {m: curve.metrics[m][point] for m in METRICS} == expected
        now = reference_correct(g_new, gl, mixed, gl, 1, leave_one_out=True)
        assert curve.nfr[1][point] == pytest.approx((right_before & ~now).sum()
                                                    / right_before.sum())


def test_curve_with_more_points_than_items_and_identity_order():
    q_old, q_new, ql, g_old, g_new, gl, _ = upgrade_data(1, n_query=10, n_gallery=6)
    order = np.arange(6)
    assert_points_rank_alike(q_new, ql, [mixed_gallery(g_old, g_new, order, f)
                                         for f in np.linspace(0, 1, 21)], gl, depth=3)
    curve = backfill_curve(q_new, g_old, g_new, ql, gl, order, points=21, metrics=["map@3"])
    for point, fraction in enumerate(curve.fractions):
        mixed = mixed_gallery(g_old, g_new, order, fraction)
        assert curve.metrics["map@3"][point] == evaluate(q_new, ql, mixed, gl, ["map@3"])["map@3"]
    assert curve.nfr == {}


def test_nfr_hand_example():
    # Two gallery items, backfilled in order 0, 1: points at 0, 1/2, 1 backfill 0, 1, 2 items.
    g_old = np.array([[1, 0], [0, 1]], dtype=np.float32)
    g_new = np.array([[0, 1], [1, 0]], dtype=np.float32)
    gallery_labels = [0, 1]
    query_labels = [0, 1, 1]
    q_old = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    q_new = np.array([[0, 1], [0, 1], [1, 0]], dtype=np.float32)
    # o2o top-1: q0 -> item 0 (label 0) right; q1 -> item 0 wrong; q2 -> item 1 right.
    # Q+ = {q0, q2}.
    # f=0   gallery [1,0],[0,1]: q0 -> item 1 wrong, q1 -> item 1 right, q2 -> item 0 wrong.
    #       NFR = 2/2, top-1 = 1/3
    # f=1/2 gallery [0,1],[0,1]: every score ties, item 0 wins: q0 right, q1 wrong, q2 wrong.
    #       NFR = 1/2 (q2 flipped), top-1 = 1/3
    # f=1   gallery [0,1],[1,0]: q0 -> item 0 right, q1 -> item 0 wrong, q2 -> item 1 right.
    #       NFR = 0, top-1 = 2/3
    curve = backfill_curve(q_new, g_old, g_new, query_labels, gallery_labels, [0, 1], points=3,
                           metrics=["cmc@1"], query_old=q_old)
    assert curve.fractions == [0.0, 0.5, 1.0]
    assert curve.nfr[1] == pytest.approx([1.0, 0.5, 0.0])
    assert curve.metrics["cmc@1"] == pytest.approx([1 / 3, 1 / 3, 2 / 3])
    assert curve.auc["cmc@1"] == pytest.approx(4 / 9)


def test_nfr_is_nan_when_no_query_was_right_before():
    g = np.array([[1, 0], [0, 1]], dtype=np.float32)
    curve = backfill_curve(g, g, g, [1, 0], [0, 1], [1, 0], points=2, metrics=["cmc@1"],
                           query_old=g)
    assert np.isnan(curve.nfr[1]).all()
    assert curve.to_dict()["nfr"] == {"1": [None, None]}


def test_to_dict_is_json_and_plot_writes_png(tmp_path):
    q_old, q_new, ql, g_old, g_new, gl, order = upgrade_data(2, n_query=10, n_gallery=30)
    curve = backfill_curve(q_new, g_old, g_new, ql, gl, order, points=5, query_old=q_old)
    data = json.loads(json.dumps(curve.to_dict(), allow_nan=False))
    assert set(data) == {"fractions", "metrics", "nfr", "auc"}
    assert set(data["metrics"]) == {"map@100", "cmc@1"} and set(data["nfr"]) == {"1"}
    path = curve.plot(tmp_path / "curve.png", reference={"o2o": 0.3, "n2n": 0.6})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_nfr = BackfillCurve([0.0, 1.0], {"cmc@1": [0.1, 0.2]}, auc={"cmc@1": 0.15})
    assert "nfr" not in no_nfr.to_dict()
    assert no_nfr.plot(tmp_path / "plain.png").stat().st_size > 0


def test_reference_gallery_counts_flips_against_the_raw_old_gallery():
    """With an upgraded gallery psi(old) as the starting state, NFR stays relative to o2o."""
    q_old, q_new, ql, g_old, g_new, gl, order = upgrade_data(5, n_query=20, n_gallery=40)
    upgraded = g_new + 0.5 * np.random.default_rng(1).standard_normal(g_new.shape).astype(np.float32)
    assert_points_rank_alike(q_old, ql, [g_old], gl, depth=1)
    assert_points_rank_alike(q_new, ql, [mixed_gallery(upgraded, g_new, order, f)
                                         for f in np.linspace(0, 1, 4)], gl, depth=1)
    curve = backfill_curve(q_new, upgraded, g_new, ql, gl, order, points=4, metrics=["cmc@1"],
                           query_old=q_old, reference_gallery=g_old)
    right_before = reference_correct(q_old, ql, g_old, gl, 1)
    for point, fraction in enumerate(curve.fractions):
        mixed = mixed_gallery(upgraded, g_new, order, fraction)
        right_now = reference_correct(q_new, ql, mixed, gl, 1)
        assert curve.nfr[1][point] == pytest.approx((right_before & ~right_now).sum()
                                                    / right_before.sum())
    with pytest.raises(DimensionMismatchError, match="reference_gallery has 39 rows"):
        backfill_curve(q_new, upgraded, g_new, ql, gl, order, query_old=q_old,
                       reference_gallery=g_old[:39])
