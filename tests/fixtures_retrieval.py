"""Straightforward reference computations for the retrieval tests.

The reference builds the full similarity matrix and ranks each row with a stable sort on
(-score, gallery index). Scores use the same float32 formula as the library (x / ||x||,
then one matmul) so a comparison tests ranking and metric logic, not float rounding.
Another chunking, query block or backend still sums each dot product in another order, so
scores closer than :func:`score_tolerance` may come out in either order: a test compares
rankings with :func:`assert_same_ranking`, or asserts :func:`assert_no_near_ties` before
comparing metrics exactly.
"""

from __future__ import annotations

import numpy as np
import torch


def unit(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    return t / torch.linalg.vector_norm(t, dim=1)[:, None]


def reference_scores(query, gallery, leave_one_out: bool = False) -> np.ndarray:
    scores = (unit(query) @ unit(gallery).T).numpy().astype(np.float64)
    if leave_one_out:
        np.fill_diagonal(scores, -np.inf)
    return scores


def score_tolerance(dim: int) -> float:
    """Gap between two reference scores below which another float32 computation may swap them.

    Summed in any order (BLAS kernel, chunk shape, backend), a float32 dot product of unit
    vectors lies within gamma_d = d u / (1 - d u) of the exact value (u = 2**-24; Higham,
    Accuracy and Stability of Numerical Algorithms, sec. 3.1). Given the same unit rows, a
    computation and the reference thus differ by at most 2 gamma_d per score, and can order
    two scores differently only if those are within 4 gamma_d (about 4e-6 for d = 16).
    """
    u = 2.0**-24
    return 4 * dim * u / (1 - dim * u)


def near_tie_runs(descending: np.ndarray, tol: float) -> np.ndarray:
    """Run number per score of a descending list: a new run starts after each gap > tol."""
    return np.concatenate([[0], np.cumsum(descending[:-1] - descending[1:] > tol)])


def reference_rankings(query, gallery, leave_one_out: bool = False) -> list[np.ndarray]:
    """Per query, gallery indices best first (self removed under leave-one-out)."""
    scores = reference_scores(query, gallery, leave_one_out)
    rankings = []
    for i, row in enumerate(scores):
        order = np.lexsort((np.arange(len(row)), -row))
        rankings.append(order[order != i] if leave_one_out else order)
    return rankings


def reference_metric(name: str, rel: np.ndarray) -> float:
    """One metric of one query from its relevance vector over the whole ranking."""
    n_pos = int(rel.sum())
    precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    if name == "map":
        return float((precision * rel).sum() / n_pos)
    if name == "map@r":
        return float((precision * rel)[:n_pos].sum() / n_pos)
    if name == "r_precision":
        return float(rel[:n_pos].sum() / n_pos)
    kind, k = name.split("@")
    k = int(k)
    if kind == "map":
        return float((precision * rel)[:k].sum() / min(k, n_pos))
    if kind == "cmc":
        return float(rel[:k].any())
    return float(rel[:k].sum() / k)  # precision@k


def reference_evaluate(query, query_labels, gallery, gallery_labels, metrics,
                       leave_one_out: bool = False, near_ties: str | None = None,
                       ) -> dict[str, float]:
    """Mean of each metric over the queries that have at least one positive.

    ``near_ties="first"`` / ``"last"``: within each run of scores less than
    :func:`score_tolerance` apart, positives rank before / after negatives: the best and the
    worst ranking float32 rounding in another summation order can give (every metric here
    only grows when a positive moves ahead of a negative).
    """
    gallery_labels = np.asarray(gallery_labels)
    scores = reference_scores(query, gallery, leave_one_out)
    tol = score_tolerance(np.shape(query)[1])
    values: dict[str, list[float]] = {m: [] for m in metrics}
    rankings = reference_rankings(query, gallery, leave_one_out)
    for i, (label, order) in enumerate(zip(query_labels, rankings)):
        rel = (gallery_labels[order] == label).astype(np.float64)
        if rel.sum() == 0:
            continue
        if near_ties is not None:
            first = {"first": -rel, "last": rel}[near_ties]
            rel = rel[np.lexsort((first, near_tie_runs(scores[i, order], tol)))]
        for m in metrics:
            values[m].append(reference_metric(m, rel))
    return {m: float(np.mean(v)) for m, v in values.items()}


def reference_correct(query, query_labels, gallery, gallery_labels, k: int,
                      leave_one_out: bool = False) -> np.ndarray:
    """Per query: a same-label item within the top k."""
    gallery_labels = np.asarray(gallery_labels)
    rankings = reference_rankings(query, gallery, leave_one_out)
    return np.array([(gallery_labels[order[:k]] == label).any()
                     for label, order in zip(query_labels, rankings)])


def assert_same_ranking(index, query, gallery) -> None:
    """``index`` (Q, k), gallery indices best first, is the reference top-k up to near-ties.

    Scores within :func:`score_tolerance` may swap in another summation order, so the
    reference scores along ``index`` must match the reference's best k within it, and the
    indices must be identical wherever a reference score is farther than it from both
    neighbours.
    """
    scores = reference_scores(query, gallery)
    tol = score_tolerance(np.shape(query)[1])
    for i, (found, order) in enumerate(zip(np.asarray(index), reference_rankings(query, gallery))):
        k, best = len(found), scores[i, order]
        assert len(np.unique(found)) == k, f"query {i}: an item is listed twice: {found}"
        np.testing.assert_allclose(scores[i, found], best[:k], rtol=0, atol=tol,
                                   err_msg=f"query {i}: not the reference top {k}")
        apart = best[:-1] - best[1:] > tol
        alone = np.r_[True, apart][:k] & np.r_[apart, True][:k]
        np.testing.assert_array_equal(found[alone], order[:k][alone],
                                      err_msg=f"query {i}: well-separated items out of order")


def assert_no_near_ties(query, gallery, relevance, depth: int | None = None,
                        leave_one_out: bool = False) -> None:
    """Precondition for comparing rank-derived results of two computations exactly.

    Metrics read only the relevance at each rank, and another summation order can only
    reorder runs of reference scores less than :func:`score_tolerance` apart; so when no
    such run that starts within the top ``depth`` (None: all) mixes relevance values, every
    computation gives the same metrics. ``relevance``: (Q, G) what a metric sees of each
    gallery item, e.g. ``np.equal.outer(query_labels, gallery_labels)``.
    """
    scores = reference_scores(query, gallery, leave_one_out)
    tol = score_tolerance(np.shape(query)[1])
    relevance = np.asarray(relevance)
    for i, order in enumerate(reference_rankings(query, gallery, leave_one_out)):
        s, rel = scores[i, order], relevance[i, order]
        runs = near_tie_runs(s, tol)
        shallow = runs[:-1] <= runs[min(depth or len(order), len(order)) - 1]
        clash = np.flatnonzero(shallow & (runs[:-1] == runs[1:]) & (rel[:-1] != rel[1:]))
        assert not len(clash), (
            f"query {i}: ranks {clash[0]} and {clash[0] + 1} score {s[clash[0]]:.9f} and "
            f"{s[clash[0] + 1]:.9f}, within {tol:.1e}, but differ in relevance, so float32 "
            "rounding may swap them and change the metrics: choose other data")


def clustered(rng: np.random.Generator, n_query: int, n_gallery: int, n_classes: int,
              dim: int, spread: float = 1.0) -> tuple[np.ndarray, ...]:
    """Query and gallery features around shared class centres (metrics far from 0 and 1):
    query, query_labels, gallery, gallery_labels."""
    centres = rng.standard_normal((n_classes, dim))
    labels = rng.integers(0, n_classes, n_query + n_gallery)
    noise = spread * rng.standard_normal((len(labels), dim))
    features = (centres[labels] + noise).astype(np.float32)
    return features[:n_query], labels[:n_query], features[n_query:], labels[n_query:]
