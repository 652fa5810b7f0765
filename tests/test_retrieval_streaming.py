"""Metrics are reduced one query block at a time (so leave-one-out memory grows with the
items, not with items x positives); the block size changes no result."""

import numpy as np
import pytest
from fixtures_retrieval import clustered

from compatzoo.retrieval import backfill_curve, evaluate, search

METRICS = ["map", "map@100", "map@r", "r_precision", "cmc@1", "precision@5"]


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_query_blocks_change_no_metric(monkeypatch, leave_one_out):
    query, query_labels, gallery, labels = clustered(np.random.default_rng(3), 90, 400, 6, 16)
    if leave_one_out:
        query, query_labels = gallery, labels
    whole = evaluate(query, query_labels, gallery, labels, METRICS,
                     leave_one_out=leave_one_out, chunk_size=128)
    monkeypatch.setattr(search, "MAX_QUERY_BLOCK", 7)
    assert len(search.query_blocks(len(query))) >= 13
    blocked = evaluate(query, query_labels, gallery, labels, METRICS,
                       leave_one_out=leave_one_out, chunk_size=128)
    # the same per-query values, averaged over the same queries; rows of another padded
    # width may only change float64 summation order, hence the tolerance
    assert blocked == pytest.approx(whole, rel=1e-12, abs=1e-15)


def test_curve_and_flips_do_not_depend_on_query_blocks(monkeypatch):
    rng = np.random.default_rng(4)
    query, query_labels, gallery, labels = clustered(rng, 60, 300, 6, 16)
    new = gallery + 0.3 * rng.standard_normal(gallery.shape).astype(np.float32)
    order = rng.permutation(300)

    def curve():
        return backfill_curve(query, gallery, new, query_labels, labels, order, points=5,
                              metrics=["map@100", "map"], query_old=query, nfr_k=(1, 3),
                              chunk_size=64).to_dict()

    whole = curve()
    monkeypatch.setattr(search, "MAX_QUERY_BLOCK", 11)
    assert len(search.query_blocks(len(query))) == 6
    blocked = curve()
    assert blocked["nfr"] == whole["nfr"]                     # counts of queries: exact
    for name, values in whole["metrics"].items():
        assert blocked["metrics"][name] == pytest.approx(values, rel=1e-12, abs=1e-15)


def test_queries_without_a_positive_skipped_or_counted_as_misses():
    """``miss`` (FastFill's evaluation) averages over every query with 0 for those with no
    positive; ``skip`` over the others only: miss = skip x (scored / all)."""
    query, query_labels, gallery, labels = clustered(np.random.default_rng(6), 50, 300, 6, 16)
    query_labels = query_labels.copy()
    query_labels[:12] = 99                                   # 12 queries of no gallery class
    skip = evaluate(query, query_labels, gallery, labels, METRICS)
    miss = evaluate(query, query_labels, gallery, labels, METRICS,
                    queries_without_positive="miss")
    assert miss == pytest.approx({m: v * 38 / 50 for m, v in skip.items()}, rel=1e-12)
    curve = backfill_curve(query, gallery, gallery, query_labels, labels, np.arange(300),
                           points=3, metrics=["map@100"], queries_without_positive="miss")
    assert curve.metrics["map@100"] == pytest.approx([miss["map@100"]] * 3, rel=1e-12)
    with pytest.raises(Exception, match="'skip'.*'miss'"):
        evaluate(query, query_labels, gallery, labels, queries_without_positive="count")
