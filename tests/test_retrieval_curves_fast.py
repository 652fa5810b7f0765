"""backfill_curve's top-k path (running top-k lists filtered by their floor) against brute force.

The brute force builds each point's mixed gallery explicitly and calls ``evaluate`` on it.
Features are integer-valued (entries -1, 0, 1 with 1, 4 or 16 non-zeros), so every
normalised entry is a power of two, every score is exact in any summation order, and
exact ties abound: within a chunk, across chunks, and between old and new rows. Their
order (by gallery index) and so every metric must then match exactly, whatever chunking,
backend or block size computed them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compatzoo.retrieval import backfill_curve, curves, evaluate, ranking
from compatzoo.retrieval.search import NEW, OLD, PAD, Plan, encode, normalised
from compatzoo.retrieval.validation import as_features
from fixtures_retrieval import reference_correct

METRICS = ["map@10", "map@100", "map", "map@r", "r_precision", "cmc@1", "cmc@5", "precision@3"]


def exact_features(rng: np.random.Generator, n: int, dim: int = 16) -> np.ndarray:
    """Rows of -1/0/1 with 1, 4 or 16 non-zeros: unit rows of +-1, +-1/2 or +-1/4."""
    rows = np.zeros((n, dim), dtype=np.float32)
    for row, width in zip(rows, rng.choice([1, 4, 16], n, p=[0.3, 0.5, 0.2])):
        row[rng.choice(dim, width, replace=False)] = rng.choice([-1.0, 1.0], width)
    return rows


def mixed_gallery(g_old, g_new, order, fraction):
    backfilled = order[:round(fraction * len(order))]
    mixed = g_old.copy()
    mixed[backfilled] = g_new[backfilled]
    return mixed


def tie_data(seed: int, n_query: int, n_gallery: int, n_classes: int = 5):
    """Old and new gallery sharing some rows (ties across versions), duplicated rows (ties
    within a version), labels with a few queries that have no positive."""
    rng = np.random.default_rng(seed)
    g_old = exact_features(rng, n_gallery)
    g_new = exact_features(rng, n_gallery)
    shared = rng.random(n_gallery) < 0.2
    g_new[shared] = g_old[shared]
    dup = rng.integers(0, n_gallery, n_gallery // 4)
    g_old[rng.integers(0, n_gallery, len(dup))] = g_old[dup]
    q_new, q_old = exact_features(rng, n_query), exact_features(rng, n_query)
    gl = rng.integers(0, n_classes, n_gallery)
    ql = rng.integers(0, n_classes + 1, n_query)  # label n_classes: no positive
    ql[0] = gl[0]
    return q_old, q_new, ql, g_old, g_new, gl, rng.permutation(n_gallery)


def brute_force(q_new, ql, g_old, g_new, gl, order, fractions, metrics, **kwargs):
    return [evaluate(q_new, ql, mixed_gallery(g_old, g_new, order, f), gl, metrics, **kwargs)
            for f in fractions]


@pytest.mark.parametrize("n_query, n_gallery, points, chunk_size", [
    (30, 1, 2, None), (30, 2, 5, 1), (25, 7, 21, None), (40, 60, 2, None), (40, 60, 7, 5),
    (50, 157, 21, None), (50, 157, 11, 13), (70, 400, 21, 64), (70, 400, 4, None),
])
@pytest.mark.parametrize("without", ["skip", "miss"])
def test_curve_equals_brute_force_with_ties(n_query, n_gallery, points, chunk_size, without):
    q_old, q_new, ql, g_old, g_new, gl, order = tie_data(n_gallery + points, n_query, n_gallery)
    curve = backfill_curve(q_new, g_old, g_new, ql, gl, order, points=points, metrics=METRICS,
                           chunk_size=chunk_size, query_old=q_old, nfr_k=(1, 3),
                           queries_without_positive=without)
    assert curve.fractions[0] == 0.0 and curve.fractions[-1] == 1.0
    expected = brute_force(q_new, ql, g_old, g_new, gl, order, curve.fractions, METRICS,
                           queries_without_positive=without)
    for point, values in enumerate(expected):
        assert {m: curve.metrics[m][point] for m in METRICS} == values, point
    scored = np.isin(ql, gl)
    for k in (1, 3):
        before = reference_correct(q_old, ql, g_old, gl, k) & scored
        for point, fraction in enumerate(curve.fractions):
            now = reference_correct(q_new, ql, mixed_gallery(g_old, g_new, order, fraction), gl, k)
            flips = (before & ~now).sum() / before.sum() if before.any() else np.nan
            assert curve.nfr[k][point] == pytest.approx(flips, nan_ok=True)  # float32 ratio


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("n_items, points, chunk_size",
                         [(3, 2, None), (40, 9, 3), (210, 21, None)])
def test_leave_one_out_curve_equals_brute_force_with_ties(backend, n_items, points, chunk_size):
    _, _, _, g_old, g_new, gl, order = tie_data(7 * n_items, 1, n_items, n_classes=2)
    curve = backfill_curve(g_new, g_old, g_new, gl, gl, order, points=points, metrics=METRICS,
                           leave_one_out=True, backend=backend, chunk_size=chunk_size,
                           query_old=g_old)
    expected = brute_force(g_new, gl, g_old, g_new, gl, order, curve.fractions, METRICS,
                           leave_one_out=True)
    for point, values in enumerate(expected):
        assert {m: curve.metrics[m][point] for m in METRICS} == values, point
    before = reference_correct(g_old, gl, g_old, gl, 1, leave_one_out=True)
    for point, fraction in enumerate(curve.fractions):
        now = reference_correct(g_new, gl, mixed_gallery(g_old, g_new, order, fraction), gl, 1,
                                leave_one_out=True)
        flips = (before & ~now).sum() / before.sum() if before.any() else np.nan
        assert curve.nfr[1][point] == pytest.approx(flips, nan_ok=True)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("leave_one_out", [False, True])
def test_curve_in_threads_equals_brute_force(monkeypatch, threads, leave_one_out):
    """Parts of the queries let each chunk in on their own threads."""
    monkeypatch.setattr(curves, "_MIN_PART_ROWS", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    q_old, q_new, ql, g_old, g_new, gl, order = tie_data(threads, 50, 157)
    if leave_one_out:
        q_new, q_old, ql = g_new, g_old, gl
    curve = backfill_curve(q_new, g_old, g_new, ql, gl, order, points=21, metrics=METRICS,
                           chunk_size=13, leave_one_out=leave_one_out, query_old=q_old)
    expected = brute_force(q_new, ql, g_old, g_new, gl, order, curve.fractions, METRICS,
                           leave_one_out=leave_one_out)
    for point, values in enumerate(expected):
        assert {m: curve.metrics[m][point] for m in METRICS} == values
    before = reference_correct(q_old, ql, g_old, gl, 1, leave_one_out) & np.isin(ql, gl)
    for point, fraction in enumerate(curve.fractions):
        now = reference_correct(q_new, ql, mixed_gallery(g_old, g_new, order, fraction), gl, 1,
                                leave_one_out)
        assert curve.nfr[1][point] == pytest.approx((before & ~now).sum() / before.sum())


def test_curve_with_many_query_blocks_equals_brute_force(monkeypatch):
    from compatzoo.retrieval import search

    monkeypatch.setattr(search, "MAX_QUERY_BLOCK", 16)  # 5 blocks of 15 queries
    _, q_new, ql, g_old, g_new, gl, order = tie_data(11, 75, 90)
    curve = backfill_curve(q_new, g_old, g_new, ql, gl, order, points=6, metrics=METRICS)
    expected = brute_force(q_new, ql, g_old, g_new, gl, order, curve.fractions, METRICS)
    for point, values in enumerate(expected):
        assert {m: curve.metrics[m][point] for m in METRICS} == values


def test_deep_curve_equals_brute_force():
    # map@r and a deep map@k with many positives per query: lists of hundreds of keys.
    rng = np.random.default_rng(5)
    g_old, g_new = exact_features(rng, 600), exact_features(rng, 600)
    q_new = exact_features(rng, 20)
    gl, ql, order = rng.integers(0, 2, 600), rng.integers(0, 2, 20), rng.permutation(600)
    metrics = ["map@500", "map@r", "r_precision", "precision@250"]
    curve = backfill_curve(q_new, g_old, g_new, ql, gl, order, points=5, metrics=metrics,
                           chunk_size=70)
    expected = brute_force(q_new, ql, g_old, g_new, gl, order, curve.fractions, metrics)
    for point, values in enumerate(expected):
        assert {m: curve.metrics[m][point] for m in metrics} == values


def test_fast_path_gives_the_rank_tables_of_the_general_scan():
    """On float data with near-ties the two paths still agree exactly: both score the
    same chunks with the same kernels, and only select differently."""
    rng = np.random.default_rng(8)
    n_query, n_gallery, dim = 90, 500, 8
    q = rng.standard_normal((n_query, dim)).astype(np.float32)
    g_old = rng.standard_normal((n_gallery, dim)).astype(np.float32)
    g_new = np.round(rng.standard_normal((n_gallery, dim)), 1).astype(np.float32)
    ql, gl = rng.integers(0, 6, n_query), rng.integers(0, 6, n_gallery)
    old, new, query = as_features(g_old, "o"), as_features(g_new, "n"), as_features(q, "q")
    n_pos = ranking.count_positives(ql, gl, False)
    for points, chunk_size, depth in [(21, None, 100), (8, 11, 37), (3, 200, 499)]:
        cuts = tuple(round(f * n_gallery) for f in np.linspace(0, 1, points))
        plan = Plan(old, new, torch.from_numpy(rng.permutation(n_gallery)), cuts)
        fast = list(curves._curve_ranks(query, ql, plan, gl, n_pos, depth, chunk_size, False))
        general = list(ranking.positive_ranks(query, ql, plan, gl, n_pos, depth, "torch",
                                              chunk_size))
        assert len(fast) == len(general)
        for (block_a, tables_a), (block_b, tables_b) in zip(fast, general):
            assert block_a == block_b
            for a, b in zip(tables_a, tables_b, strict=True):
                assert torch.equal(a.ranks, b.ranks) and torch.equal(a.n_pos, b.n_pos)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_running_lists_hold_the_exact_top_k_of_every_prefix_and_suffix(threads):
    rng = np.random.default_rng(2)
    g_old, g_new, q = exact_features(rng, 120), exact_features(rng, 120), exact_features(rng, 9)
    order = rng.permutation(120)
    cuts = (0, 7, 30, 31, 90, 120)
    plan = Plan(as_features(g_old, "o"), as_features(g_new, "n"), torch.from_numpy(order), cuts)
    query = normalised(as_features(q, "q"), slice(None), torch.device("cpu"))
    labels = np.zeros(120, dtype=np.int64)
    pool = curves._Pool(threads) if threads > 1 else None
    for version, rows in ((NEW, g_new), (OLD, g_old)):
        unit = torch.from_numpy(rows / np.linalg.norm(rows, axis=1, keepdims=True))
        keys = encode((query @ unit.T).contiguous(), torch.arange(120).expand(9, -1))
        for k, chunk_size in ((5, 4), (16, 1000)):
            parts = curves._scan(plan, query, np.zeros(9, dtype=np.int64), labels, k, version,
                                 chunk_size, None, pool)
            assert len(parts) == threads and parts[0].start == 0
            entered = np.concatenate([np.stack(part.positives[:2], 1) + [part.start, 0]
                                      for part in parts])
            assert len(entered) == len(np.unique(entered, axis=0))  # each enters once
            for cut in cuts:
                positions = order[:cut] if version == NEW else order[cut:]
                if not len(positions):
                    assert all(cut not in part.lists for part in parts)
                    continue
                lists = np.concatenate([part.lists[cut] for part in parts])
                want = torch.sort(keys[:, positions], dim=1, descending=True).values[:, :k]
                got = torch.from_numpy(np.sort(lists, axis=1)[:, ::-1].copy())
                assert torch.equal(got[:, :want.shape[1]], want)
                assert (got[:, want.shape[1]:] == PAD).all()  # fewer than k items so far
                assert (lists[:, 0] == got[:, -1]).all()  # the k-th key first
    if pool is not None:
        pool.shutdown()


def test_numpy_keys_equal_search_keys():
    values = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 1e-45, -1e-45, 3.4e38, 0.5,
                       -0.25], dtype=np.float32)
    values = np.concatenate([values, np.random.default_rng(0).standard_normal(1000)
                             .astype(np.float32)])
    index = np.random.default_rng(1).integers(0, 2**32 - 1, len(values))
    want = encode(torch.from_numpy(values), torch.from_numpy(index)).numpy()
    assert np.array_equal(curves._encode(values, curves._LOW32 - index), want)
    assert np.array_equal(curves._decode_scores(want).view(np.int32),
                          (values + np.float32(0.0)).view(np.int32))


def test_faiss_and_counting_keep_the_general_paths(monkeypatch):
    """Full ranking (depth beyond MAX_TOPK_DEPTH) counts ranks; faiss keeps its own scan."""
    monkeypatch.setattr(ranking, "MAX_TOPK_DEPTH", 20)
    calls = []
    monkeypatch.setattr(curves, "_curve_ranks",
                        lambda *a, **k: calls.append(1) or ranking.positive_ranks(
                            *a[:6], "torch", *a[6:]))
    _, q_new, ql, g_old, g_new, gl, order = tie_data(3, 20, 50)
    backfill_curve(q_new, g_old, g_new, ql, gl, order, points=3, metrics=["map"],
                   backend="torch")
    backfill_curve(q_new, g_old, g_new, ql, gl, order, points=3, metrics=["cmc@1"],
                   backend="faiss")
    assert calls == []
    backfill_curve(q_new, g_old, g_new, ql, gl, order, points=3, metrics=["cmc@1"],
                   backend="torch")
    assert calls == [1]
