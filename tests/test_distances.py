"""evaluation.distance: euclidean (ml-fct's L2 on raw features) through the cosine search,
against direct computations of the L2 ranking and of the metrics' formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compatzoo.errors import SpecError
from compatzoo.retrieval import backfill_curve, evaluate, top_k
from compatzoo.retrieval.distances import euclidean_as_cosine, for_distance


def raw_features(n: int, d: int, seed: int) -> torch.Tensor:
    """Unnormalised rows whose norms spread over two orders of magnitude, so cosine and L2
    rankings differ."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, d, generator=g)
    return rows * torch.exp(torch.empty(n, 1).uniform_(-2.3, 2.3, generator=g))


def l2_order(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Per query, gallery indices by ascending Euclidean distance, ties by lower index."""
    distance = ((query[:, None, :].astype(np.float64) - gallery[None].astype(np.float64)) ** 2
                ).sum(-1)
    return np.argsort(distance, axis=1, kind="stable")


def direct_metrics(query, query_labels, gallery, gallery_labels, k: int) -> dict[str, float]:
    """cmc@1 and Kaggle's mAP@k, AP@k = sum_{i<=k} P(i) rel(i) / min(k, n_pos)."""
    order = l2_order(query.numpy(), gallery.numpy())
    relevant = gallery_labels[order] == query_labels[:, None]
    n_pos = relevant.sum(axis=1)
    hits = relevant[:, :k]
    precision = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
    ap = (precision * hits).sum(axis=1) / np.minimum(k, n_pos)
    return {"cmc@1": relevant[:, 0].mean(), f"map@{k}": ap.mean()}


def test_lifted_cosine_scores_are_the_l2_formula_per_query():
    query, gallery = raw_features(7, 5, 0), raw_features(40, 5, 1)
    (q,), (g,) = euclidean_as_cosine([query], [gallery])
    radius = g.double().norm(dim=1)
    assert torch.allclose(radius, radius[0].expand_as(radius), rtol=1e-6)  # one norm: M
    cosine = (q.double() / q.double().norm(dim=1, keepdim=True)) @ (g.double() / radius[:, None]).T
    direct = 0.5 * (query.double().norm(dim=1, keepdim=True) ** 2
                    - torch.cdist(query.double(), gallery.double()) ** 2)
    scale = radius[0] * q.double().norm(dim=1, keepdim=True)
    # float32 lifting, float64 check: |g|^4 / 4 reaches ~1e4 here, hence the tolerance
    assert torch.allclose(cosine * scale, direct, rtol=1e-5, atol=1e-3)


def test_lifted_top_k_is_the_l2_ranking_and_not_the_cosine_one():
    query, gallery = raw_features(30, 8, 2), raw_features(200, 8, 3)
    (q,), (g,) = euclidean_as_cosine([query], [gallery])
    _, index = top_k(q, g, k=10)
    expected = l2_order(query.numpy(), gallery.numpy())[:, :10]
    assert np.array_equal(index.numpy() if torch.is_tensor(index) else index, expected)
    _, cosine_index = top_k(query, gallery, k=10)
    cosine_index = cosine_index.numpy() if torch.is_tensor(cosine_index) else cosine_index
    assert not np.array_equal(cosine_index, expected)             # the switch matters here


def test_evaluate_on_lifted_features_is_the_l2_metric_formula():
    query, gallery = raw_features(60, 6, 4), raw_features(150, 6, 5)
    rng = np.random.default_rng(0)
    query_labels, gallery_labels = rng.integers(0, 10, 60), rng.integers(0, 10, 150)
    (q,), (g,) = for_distance("euclidean", [query], [gallery])
    got = evaluate(q, query_labels, g, gallery_labels, metrics=("cmc@1", "map@20"))
    expected = direct_metrics(query, query_labels, gallery, gallery_labels, 20)
    assert got["cmc@1"] == pytest.approx(expected["cmc@1"], abs=1e-9)
    assert got["map@20"] == pytest.approx(expected["map@20"], rel=1e-6)


def test_a_backfill_curve_lifted_together_is_l2_on_each_mixed_gallery():
    query, query_old = raw_features(40, 6, 6), raw_features(40, 6, 7)
    old, new = raw_features(90, 6, 8), raw_features(90, 6, 9)
    rng = np.random.default_rng(1)
    query_labels, gallery_labels = rng.integers(0, 8, 40), rng.integers(0, 8, 90)
    order = rng.permutation(90)
    (q, q_old), (stored, fresh, reference) = for_distance(
        "euclidean", [query, query_old], [old, new, old])
    curve = backfill_curve(q, stored, fresh, query_labels, gallery_labels, order, points=4,
                           metrics=("cmc@1",), query_old=q_old, reference_gallery=reference)
    for fraction, value in zip(curve.fractions, curve.metrics["cmc@1"]):
        mixed = old.clone()
        done = order[:int(round(fraction * 90))]
        mixed[done] = new[done]
        expected = direct_metrics(query, query_labels, mixed, gallery_labels, 1)["cmc@1"]
        assert value == pytest.approx(expected, abs=1e-9)


def test_cosine_leaves_the_features_as_they_are():
    query, gallery = raw_features(3, 4, 0), raw_features(5, 4, 1)
    (q,), (g,) = for_distance("cosine", [query], [gallery])
    assert q is query and g is gallery
    with pytest.raises(ValueError, match="cosine"):
        for_distance("manhattan", [query], [gallery])


def test_the_spec_takes_cosine_or_euclidean_only():
    from compatzoo.specs import load_spec
    from test_sequential import sequential_spec

    spec = sequential_spec([{"name": "v2", "stage": 1}])
    assert load_spec(spec).evaluation.distance == "cosine"             # the papers' default
    spec["evaluation"]["distance"] = "euclidean"
    assert load_spec(spec).evaluation.distance == "euclidean"
    spec["evaluation"]["distance"] = "l1"
    with pytest.raises(SpecError, match="distance"):
        load_spec(spec)


def test_a_run_table_in_euclidean_mode_is_l2_on_the_run_embeddings(tiny_lineage):
    from compatzoo.evaluation import _Scores
    from compatzoo.lineage import ROOT, plan
    from compatzoo.specs import load_spec

    lineage, data, embeddings, upgrades, evaluation, _ = tiny_lineage
    spec = lineage.spec.model_dump(mode="json")
    spec["evaluation"]["distance"] = "euclidean"
    score = _Scores(plan(load_spec(spec)), data, embeddings, upgrades)
    query_labels = np.asarray(data.data.query.labels)
    gallery_labels = np.asarray(data.gallery_images.labels)
    for query in ("v2", "f2"):
        got = score(query, score.own(ROOT))
        expected = direct_metrics(embeddings[query].query, query_labels,
                                  embeddings[ROOT].gallery, gallery_labels, 100)
        assert got["cmc@1"] == pytest.approx(expected["cmc@1"], abs=1e-9)
        assert got["map@100"] == pytest.approx(expected["map@100"], rel=1e-6)
    assert evaluation["distance"] == "cosine"
