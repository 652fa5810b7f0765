"""``evaluate``: retrieval metrics of one query set against one gallery."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from compatzoo.errors import DatasetError, InvalidArgumentError
from compatzoo.retrieval.metrics import Metric, parse_metrics
from compatzoo.retrieval.ranking import count_positives, positive_ranks
from compatzoo.retrieval.search import Plan, check_backend
from compatzoo.retrieval.validation import (
    ArrayLike, Features, check_chunk_size, validate_retrieval,
)

logger = logging.getLogger(__name__)


def search_depth(metrics: Iterable[Metric], n_pos: torch.Tensor, candidates: int,
                 extra_k: Iterable[int] = ()) -> int:
    """How deep the ranking must be known for ``metrics`` (and top-``extra_k`` checks)."""
    max_positives = int(n_pos.max())
    depths = [m.depth(max_positives, candidates) for m in metrics]
    return max(depths + [min(k, candidates) for k in extra_k])


def require_positives(n_pos: torch.Tensor) -> None:
    """Fail early when no query can be scored; log how many queries are left out."""
    missing = int((n_pos <= 0).sum())
    if missing == len(n_pos):
        raise DatasetError(
            "no query has a same-label item in the gallery, so no retrieval metric is defined; "
            "check that query and gallery labels use the same label ids"
        )
    if missing:
        logger.info("%d of %d queries have no positive in the gallery and are left out of "
                    "every metric", missing, len(n_pos))


QueryValues = dict[str, torch.Tensor]
"""Per query of one gallery state: each metric's value (float64, NaN for a query without
a positive), keyed by the metric's name, and ``correct@k`` (bool) for each extra k."""


WITHOUT_POSITIVE = ("skip", "miss")


def check_without_positive(value: str) -> None:
    if value not in WITHOUT_POSITIVE:
        raise InvalidArgumentError(f"queries_without_positive is {value!r}; choose 'skip' "
                                   "(left out of every mean) or 'miss' (counted as 0)")


def summarise(metrics: Sequence[Metric], values: QueryValues,
              queries_without_positive: str = "skip") -> dict[str, float]:
    """Mean of each metric over the queries that have at least one positive (``skip``),
    or over all queries with 0 for those without (``miss``, FastFill's evaluation)."""
    if queries_without_positive == "miss":
        return {m.name: float(torch.nan_to_num(values[m.name], nan=0.0).mean())
                for m in metrics}
    return {m.name: float(torch.nanmean(values[m.name])) for m in metrics}


def query_values(query: Features, query_labels: np.ndarray, plan: Plan,
                 gallery_labels: np.ndarray, metrics: Sequence[Metric], leave_one_out: bool,
                 backend: str, chunk_size: int | None, extra_k: Iterable[int] = (),
                 ranker: Callable[..., Iterator] = positive_ranks) -> list[QueryValues]:
    """Check the search arguments, rank the positives deep enough for ``metrics`` and
    reduce each query block's ranks to per-query values at once, so memory grows with
    the number of queries, not with queries x positives. One :data:`QueryValues` per
    state of ``plan``; ``extra_k`` adds ``correct@k`` (a positive in the top k).
    ``ranker`` gives the rank tables, with :func:`positive_ranks`' arguments and results
    (backfill curves pass a faster one for their many states)."""
    check_chunk_size(chunk_size)
    check_backend(backend)
    extra_k = list(extra_k)
    n_pos = count_positives(query_labels, gallery_labels, leave_one_out)
    require_positives(n_pos)
    depth = search_depth(metrics, n_pos, plan.size - int(leave_one_out), extra_k)
    parts: list[dict[str, list[torch.Tensor]]] = [
        {name: [] for name in [*(m.name for m in metrics), *(f"correct@{k}" for k in extra_k)]}
        for _ in plan.cuts]
    for _, tables in ranker(query, query_labels, plan, gallery_labels, n_pos, depth, backend,
                            chunk_size, leave_one_out):
        for state, table in zip(parts, tables):
            for metric in metrics:
                state[metric.name].append(metric.per_query(table.ranks, table.n_pos))
            for k in extra_k:
                hit = Metric(f"cmc@{k}", "cmc", k).per_query(table.ranks, table.n_pos) == 1
                state[f"correct@{k}"].append(hit)
    return [{name: torch.cat(values) for name, values in state.items()} for state in parts]


def evaluate(query: ArrayLike, query_labels: ArrayLike, gallery: ArrayLike,
             gallery_labels: ArrayLike, metrics: Sequence[str] = ("map@100", "cmc@1"),
             leave_one_out: bool = False, backend: str = "auto",
             chunk_size: int | None = None,
             queries_without_positive: str = "skip") -> dict[str, float]:
    """Retrieval metrics (cosine similarity) of ``query`` against ``gallery``.

    ``leave_one_out=True`` is FCT's protocol: pass the same set as query and gallery; item
    i is left out of query i's ranking (by index, not by score). Ties rank by gallery
    index. Queries without a positive are left out of every mean (``"skip"``), or count
    as misses, 0, as FastFill's evaluation does (``"miss"``). ``chunk_size`` gallery
    rows are scored at a time (None: from a memory budget). Metric names are
    case-insensitive (:data:`KNOWN_METRICS`); the result maps each name as given to its
    value in [0, 1].
    """
    parsed = parse_metrics(metrics)
    check_without_positive(queries_without_positive)
    q, ql, g, gl = validate_retrieval(query, query_labels, gallery, gallery_labels,
                                      leave_one_out)
    values = query_values(q, ql, Plan(g), gl, parsed, leave_one_out, backend, chunk_size)[0]
    return summarise(parsed, values, queries_without_positive)


def top_k(query: ArrayLike, gallery: ArrayLike, k: int = 10,
          backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` gallery items most cosine-similar to each query: ``(scores, indices)``,
    both ``(Q, k)``, best first, ties broken by gallery index. Exact, in bounded memory."""
    from compatzoo.errors import DimensionMismatchError, InvalidArgumentError
    from compatzoo.retrieval.search import search
    from compatzoo.retrieval.validation import as_features

    queries, items = as_features(query, "query"), as_features(gallery, "gallery")
    if queries.dim != items.dim:
        raise DimensionMismatchError(f"queries are {queries.dim}-d but the gallery is "
                                     f"{items.dim}-d; embed or upgrade both into one space")
    if k < 1:
        raise InvalidArgumentError(f"k must be at least 1, got {k}")
    check_backend(backend)
    scores, index = search(queries, items, k, backend)
    return scores.numpy(), index.numpy()
