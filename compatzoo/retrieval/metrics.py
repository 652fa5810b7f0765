"""Metric names and their per-query formulas, written on the ranks of each query's positives.

Every metric here is a function of where the positives of a query land in its ranking, so
the search only has to produce those ranks (0-based, ascending), known up to the depth
the requested metrics need. A query without any positive in the gallery has no right
answer: it gets NaN and is left out of every mean, top-k accuracy included (revisitop
does the same for mAP); counting it would score the gallery's coverage, not the model.
How many were left out is logged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from compatzoo.retrieval.validation import InvalidArgumentError

#: Metric name patterns accepted by :func:`parse_metric` (``<k>`` is a positive integer).
KNOWN_METRICS: tuple[str, ...] = (
    "map@<k>", "map", "map@r", "r_precision", "cmc@<k>", "precision@<k>",
)

#: Rank used for positives that lie beyond the searched depth.
UNRANKED = torch.iinfo(torch.int64).max

_AT_K = re.compile(r"^(map|cmc|precision)@([0-9]+)$")


@dataclass(frozen=True)
class Metric:
    """A parsed metric: ``name`` as the caller wrote it (results are keyed by it),
    ``kind`` one of map@k, map, map@r, r_precision, cmc, precision, and ``k``."""

    name: str
    kind: str
    k: int | None = None

    def depth(self, max_positives: int, candidates: int) -> int:
        """How many top ranks this metric reads, for a gallery of ``candidates`` items."""
        if self.kind == "map":
            return candidates
        if self.kind in ("map@r", "r_precision"):
            return min(max_positives, candidates)
        return min(self.k, candidates)

    def per_query(self, ranks: torch.Tensor, n_pos: torch.Tensor) -> torch.Tensor:
        """Value per query (float64, NaN where the query has no positive).

        ``ranks``: (Q, m) ascending 0-based ranks of each query's positives, UNRANKED for
        positives beyond the searched depth; ``n_pos``: (Q,) positives per query.
        precision@k divides by k even where fewer than k items can be retrieved.
        """
        known = ranks != UNRANKED
        ranks = ranks.to(torch.float64)
        n = n_pos.to(torch.float64)
        hits_so_far = torch.arange(1, ranks.shape[1] + 1, dtype=torch.float64)
        precision_at_hit = hits_so_far / (ranks + 1)  # P(i) at the rank of each positive
        if self.kind == "map@k":
            value = (precision_at_hit * (ranks < self.k)).sum(1) / n.clamp(max=self.k)
        elif self.kind == "map":
            value = (precision_at_hit * known).sum(1) / n
        elif self.kind == "map@r":
            value = (precision_at_hit * (ranks < n[:, None])).sum(1) / n
        elif self.kind == "r_precision":
            value = (ranks < n[:, None]).sum(1, dtype=torch.float64) / n
        elif self.kind == "cmc":
            value = (ranks < self.k).any(1).to(torch.float64)
        else:  # precision@k
            value = (ranks < self.k).sum(1, dtype=torch.float64) / self.k
        return torch.where(n_pos > 0, value, torch.nan)


def parse_metric(name: str) -> Metric:
    """Parse a metric name (case-insensitive, e.g. "mAP@100") so callers can validate
    names early."""
    canonical = str(name).strip().lower()
    if canonical in ("map", "map@r", "r_precision"):
        return Metric(str(name), canonical)
    match = _AT_K.match(canonical)
    if match and int(match.group(2)) > 0:
        prefix, k = match.group(1), int(match.group(2))
        return Metric(str(name), "map@k" if prefix == "map" else prefix, k)
    raise InvalidArgumentError(
        f"unknown metric {name!r}; known metrics: {', '.join(KNOWN_METRICS)} "
        "(<k> a positive integer, e.g. 'map@100', 'cmc@1')"
    )


def parse_metrics(names: str | tuple[str, ...] | list[str]) -> list[Metric]:
    """Parse a list of names (a single string is one name), rejecting an empty list."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise InvalidArgumentError(
            f"metrics is empty; name at least one of {', '.join(KNOWN_METRICS)}"
        )
    return list({m.name: m for m in map(parse_metric, names)}.values())
