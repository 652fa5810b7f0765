"""Retrieval evaluation for model upgrades: exact chunked search, metrics, backfill curves,
compatibility matrices, revisited Oxford/Paris and face verification/identification.

Similarity is cosine (features are L2-normalised chunk by chunk, inputs are never
modified); rankings sort by score descending and break ties by gallery index ascending,
identically on every backend.
"""

from compatzoo.retrieval.compatibility import (
    CompatibilityMatrix, compatibility_matrix, empirical_compatibility, update_gain,
)
from compatzoo.retrieval.curves import BackfillCurve, backfill_curve
from compatzoo.retrieval.evaluation import evaluate, top_k
from compatzoo.retrieval.metrics import KNOWN_METRICS, Metric, parse_metric
from compatzoo.retrieval.revisited import evaluate_revisited, load_revisited_gnd
from compatzoo.retrieval.validation import InvalidArgumentError
from compatzoo.retrieval.verification import tar_at_far, tpir_at_fpir

__all__ = [
    "KNOWN_METRICS", "BackfillCurve", "CompatibilityMatrix", "InvalidArgumentError", "Metric",
    "backfill_curve", "compatibility_matrix", "empirical_compatibility", "evaluate",
    "evaluate_revisited", "load_revisited_gnd", "parse_metric", "tar_at_far", "top_k",
    "tpir_at_fpir", "update_gain",
]
