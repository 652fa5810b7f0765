"""Straightforward reference computations for the retrieval tests.

The reference builds the full similarity matrix and ranks each row with a stable sort on
(-score, gallery index). Scores use the same float32 formula as the library (x / ||x||,
then one matmul) so a comparison tests ranking and metric logic, not float rounding.
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
                       leave_one_out: bool = False) -> dict[str, float]:
    """Mean of each metric over the queries that have at least one positive."""
    gallery_labels = np.asarray(gallery_labels)
    values: dict[str, list[float]] = {m: [] for m in metrics}
    for label, order in zip(query_labels, reference_rankings(query, gallery, leave_one_out)):
        rel = (gallery_labels[order] == label).astype(np.float64)
        if rel.sum() == 0:
            continue
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


def clustered(rng: np.random.Generator, n_query: int, n_gallery: int, n_classes: int,
              dim: int, spread: float = 1.0) -> tuple[np.ndarray, ...]:
    """Query and gallery features around shared class centres (metrics far from 0 and 1):
    query, query_labels, gallery, gallery_labels."""
    centres = rng.standard_normal((n_classes, dim))
    labels = rng.integers(0, n_classes, n_query + n_gallery)
    noise = spread * rng.standard_normal((len(labels), dim))
    features = (centres[labels] + noise).astype(np.float32)
    return features[:n_query], labels[:n_query], features[n_query:], labels[n_query:]
