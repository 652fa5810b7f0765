"""Cross-model compatibility: the matrix M[i][j] and BCT's summaries of it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from compatzoo.retrieval.curves import json_safe
from compatzoo.retrieval.evaluation import check_without_positive, query_values, summarise
from compatzoo.retrieval.metrics import parse_metric
from compatzoo.retrieval.search import Plan
from compatzoo.retrieval.validation import (
    ArrayLike, InvalidArgumentError, check_same_dim, validate_retrieval,
)


def empirical_compatibility(m_new_old: float, m_old_old: float) -> bool:
    """BCT's criterion (eq. 2): new queries on the old gallery beat the old model."""
    return m_new_old > m_old_old


def update_gain(m_new_old: float, m_old_old: float, m_paragon: float) -> float:
    """BCT eq. 9: share of the paragon's improvement reached without backfilling."""
    if m_paragon == m_old_old:
        raise InvalidArgumentError(
            f"update gain is undefined when the paragon equals the old model ({m_paragon}); "
            "there is no improvement to measure a share of"
        )
    return (m_new_old - m_old_old) / (m_paragon - m_old_old)


@dataclass
class CompatibilityMatrix:
    """M[i][j] = metric(queries of model i, gallery of model j); models oldest first."""

    names: list[str]
    values: list[list[float]]
    metric: str

    @property
    def average_compatibility(self) -> float:
        """Share of pairs i > j (newer queries, older gallery) with M[i][j] > M[j][j]."""
        pairs = [(i, j) for i in range(len(self.names)) for j in range(i)]
        if not pairs:
            return math.nan
        m = self.values
        return sum(empirical_compatibility(m[i][j], m[j][j]) for i, j in pairs) / len(pairs)

    @property
    def average_multi_model_accuracy(self) -> float:
        """Mean of the lower triangle including the diagonal (the deployable pairs)."""
        m = self.values
        return float(np.mean([m[i][j] for i in range(len(m)) for j in range(i + 1)]))

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "names": list(self.names),
            "values": [[json_safe(v) for v in row] for row in self.values],
            "average_compatibility": json_safe(self.average_compatibility),
            "average_multi_model_accuracy": json_safe(self.average_multi_model_accuracy),
        }

    def to_markdown(self) -> str:
        header = f"| query \\ gallery ({self.metric}) | " + " | ".join(self.names) + " |"
        lines = [header, "|" + "---|" * (len(self.names) + 1)]
        lines += [f"| {name} | " + " | ".join("-" if math.isnan(v) else f"{v:.4f}" for v in row) + " |"
                  for name, row in zip(self.names, self.values)]
        return "\n".join(lines)


def compatibility_matrix(models: Mapping[str, tuple[ArrayLike, ArrayLike]],
                         query_labels: ArrayLike, gallery_labels: ArrayLike,
                         metric: str = "map@100", leave_one_out: bool = False,
                         backend: str = "auto", chunk_size: int | None = None,
                         queries_without_positive: str = "skip") -> CompatibilityMatrix:
    """Evaluate every model's queries against every model's gallery.

    ``models`` maps name -> (query features, gallery features), ordered oldest first (the
    order the summaries read as "older"). All models must share the embedding dimension.
    ``queries_without_positive``: ``skip`` or ``miss``, see :func:`evaluate`.
    """
    parsed = parse_metric(metric)
    check_without_positive(queries_without_positive)
    if not models:
        raise InvalidArgumentError("models is empty; pass {name: (query_feats, gallery_feats)}")
    checked = {}
    for name, pair in models.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InvalidArgumentError(
                f"models['{name}'] must be a (query_features, gallery_features) pair"
            )
        checked[name] = validate_retrieval(
            pair[0], query_labels, pair[1], gallery_labels, leave_one_out,
            names=(f"query features of '{name}'", f"gallery features of '{name}'"))
    names = list(checked)
    for name in names[1:]:  # any model's queries meet any model's gallery
        check_same_dim(checked[name][0], checked[names[0]][2])
    ql, gl = checked[names[0]][1], checked[names[0]][3]

    def score(query_model: str, gallery_model: str) -> float:
        values = query_values(checked[query_model][0], ql, Plan(checked[gallery_model][2]),
                              gl, [parsed], leave_one_out, backend, chunk_size)[0]
        return summarise([parsed], values, queries_without_positive)[parsed.name]

    values = [[score(qn, gn) for gn in names] for qn in names]
    return CompatibilityMatrix(names, values, parsed.name)
