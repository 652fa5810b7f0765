"""Ranks of each query's positives in every gallery state of a plan.

Shallow metrics (depth <= MAX_TOPK_DEPTH) read the positives off a chunked top-k search.
Deeper ones (full-ranking mAP, mAP@R with many positives) count, for each positive, the
gallery items that beat it, in two chunked passes: the first collects the positives'
scores, the second counts per chunk how many scores lie above each (a row sort plus a
vectorised binary search). Neither builds a query x gallery matrix; both follow the
ranking of :mod:`compatzoo.retrieval.search` (score descending, then gallery index).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from compatzoo.retrieval.metrics import UNRANKED
from compatzoo.retrieval.search import (
    NEW, OLD, Plan, TorchBackend, auto_chunk_rows, chunk_scores, decode_index, normalised,
    query_blocks, resolve_backend, topk_states,
)
from compatzoo.retrieval.validation import Features

#: Deepest ranking read through top-k search; deeper metrics count ranks instead.
MAX_TOPK_DEPTH = 1024
#: Tied positives resolved together in one (tied x chunk) comparison.
_TIE_GROUP = 256

ProbeMask = Callable[[torch.Tensor], torch.Tensor]  # gallery index (C,) -> (Q, C) bool


@dataclass(frozen=True)
class RankTable:
    """Per query: ascending 0-based ranks of its positives (UNRANKED-padded) and their count."""

    ranks: torch.Tensor
    n_pos: torch.Tensor


def count_positives(query_labels: np.ndarray, gallery_labels: np.ndarray,
                    leave_one_out: bool) -> torch.Tensor:
    classes, sizes = np.unique(gallery_labels, return_counts=True)
    at = np.clip(np.searchsorted(classes, query_labels), 0, len(classes) - 1)
    n_pos = np.where(classes[at] == query_labels, sizes[at], 0) - int(leave_one_out)
    return torch.from_numpy(n_pos.astype(np.int64))


# --- full ranking by counting ------------------------------------------------------------

def _sort_rows(scores: torch.Tensor) -> torch.Tensor:
    if scores.device.type == "cpu":  # numpy's SIMD sort is ~10x faster than torch's on CPU
        return torch.from_numpy(np.sort(scores.numpy(), axis=1))
    return torch.sort(scores, dim=1).values


def _count_at_most(sorted_rows: torch.Tensor, rows: torch.Tensor, values: torch.Tensor,
                   strict: bool) -> torch.Tensor:
    """Per (row, value): entries of that sorted row < value (strict) or <= value."""
    width = sorted_rows.shape[1]
    flat, base = sorted_rows.reshape(-1), rows * width
    lo, hi = torch.zeros_like(rows), torch.full_like(rows, width)
    for _ in range(width.bit_length()):
        mid = (lo + hi) // 2
        probe = flat[base + mid.clamp(max=width - 1)]
        right = (probe < values if strict else probe <= values) & (lo < hi)
        lo = torch.where(right, mid + 1, lo)
        hi = torch.where(right | (lo >= hi), hi, mid)
    return lo


def _beaten_by(scores: torch.Tensor, sorted_rows: torch.Tensor, index: torch.Tensor,
               rows: torch.Tensor, values: torch.Tensor, gidx: torch.Tensor,
               own: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Items of this chunk ranked above each positive (row, value, gallery index)."""
    width = scores.shape[1]
    above = width - _count_at_most(sorted_rows, rows, values, strict=False)
    at_least = width - _count_at_most(sorted_rows, rows, values, strict=True)
    own = torch.nonzero(own).flatten()  # the positive itself is never above itself
    own_score = scores[rows[own], cols[own]]
    above[own] -= (own_score > values[own]).long()
    at_least[own] -= (own_score >= values[own]).long()
    tied = torch.nonzero(at_least > above).flatten()  # other items with the very same score
    for group in tied.split(_TIE_GROUP):
        same = scores[rows[group]] == values[group, None]
        above[group] += (same & (index[None, :] < gidx[group, None])).sum(1)
    return above


def count_ranks(plan: Plan, query: torch.Tensor, is_probe: ProbeMask, chunk_rows: int,
                self_index: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ranks of every probe pair (query row, gallery index) in every state of ``plan``.

    Returns the pairs' query rows, gallery indices and ranks (states x pairs).
    """
    device = query.device
    found = []
    for chunk in plan.chunks(chunk_rows, device):  # pass 1: the probes' own scores
        rows, cols = torch.nonzero(is_probe(chunk.index), as_tuple=True)
        values = torch.full((2, len(rows)), torch.nan, device=device)
        for version in chunk.rows:
            values[version] = chunk_scores(query, chunk, version, self_index)[rows, cols]
        found.append((rows, cols, chunk.index[cols], chunk.start + cols,
                      torch.full_like(rows, chunk.number), values))
    rows, cols, gidx, position, number, values = (torch.cat(x, dim=-1) for x in zip(*found))
    cuts = torch.tensor(plan.cuts, device=device)
    sees_new = position[None, :] < cuts[:, None]  # per state: which score each probe has

    ranks = torch.zeros((len(plan.cuts), len(rows)), dtype=torch.int64, device=device)
    for chunk in plan.chunks(chunk_rows, device):  # pass 2: who beats them
        in_chunk = number == chunk.number
        for version in chunk.rows:
            scores = chunk_scores(query, chunk, version, self_index)
            sorted_rows = _sort_rows(scores)
            counts = torch.zeros((2, len(rows)), dtype=torch.int64, device=device)
            for probe_version in (OLD, NEW):
                at = torch.nonzero(~torch.isnan(values[probe_version])).flatten()
                own = in_chunk[at] & (probe_version == version)
                counts[probe_version, at] = _beaten_by(
                    scores, sorted_rows, chunk.index, rows[at], values[probe_version, at],
                    gidx[at], own, cols[at])
            states = plan.states_seeing(chunk.start, chunk.start + chunk.width, version)
            ranks[states] += torch.where(sees_new[states], counts[NEW], counts[OLD])
    return rows, gidx, ranks


# --- assembling rank tables ----------------------------------------------------------------

def _pairs_to_table(rows: torch.Tensor, ranks: torch.Tensor, n_queries: int) -> torch.Tensor:
    by_rank = torch.argsort(ranks)
    by_row = by_rank[torch.argsort(rows[by_rank], stable=True)]
    rows, ranks = rows[by_row], ranks[by_row]
    per_row = torch.bincount(rows, minlength=n_queries)
    first = torch.cumsum(per_row, 0) - per_row
    table = torch.full((n_queries, int(per_row.max())), UNRANKED, dtype=torch.int64)
    table[rows, torch.arange(len(rows)) - first[rows]] = ranks
    return table


def _hits_to_table(hits: torch.Tensor) -> torch.Tensor:
    """(..., Q, k) hit flags of ranked lists -> (..., Q, m) ascending ranks of the hits."""
    ranks = torch.where(hits, torch.arange(hits.shape[-1]), UNRANKED)
    width = int(hits.sum(-1).max()) if hits.numel() else 0
    return torch.sort(ranks, dim=-1).values[..., :width]


def _stack(tables: list[torch.Tensor]) -> torch.Tensor:
    width = max(t.shape[1] for t in tables)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=UNRANKED)
                      for t in tables])


def _same_label(labels: torch.Tensor, query_labels: torch.Tensor,
                self_index: torch.Tensor | None) -> ProbeMask:
    """Probe mask of the positives: same label, and not the query itself."""
    def is_probe(index: torch.Tensor) -> torch.Tensor:
        same = labels[index][None, :] == query_labels[:, None]
        return same if self_index is None else same & (index != self_index[:, None])
    return is_probe


def positive_ranks(query: Features, query_labels: np.ndarray, plan: Plan,
                   gallery_labels: np.ndarray, n_pos: torch.Tensor, depth: int,
                   backend: str = "auto", chunk_size: int | None = None,
                   leave_one_out: bool = False) -> list[RankTable]:
    """Rank tables of the positives (same label, self excluded) for every state of ``plan``.

    Ranks are exact up to ``depth``; deeper positives are UNRANKED unless the depth
    needed counting (then all are ranked, always with torch). ``n_pos`` is
    :func:`count_positives` of the labels.
    """
    full = depth > MAX_TOPK_DEPTH
    engine = TorchBackend() if full else resolve_backend(backend, depth)
    device = engine.device
    labels = torch.from_numpy(gallery_labels).to(device)
    tables: list[list[torch.Tensor]] = [[] for _ in plan.cuts]
    for block in query_blocks(query.n):
        q = normalised(query, block, device)
        q_labels = torch.from_numpy(query_labels[block]).to(device)
        self_index = torch.arange(block.start, block.stop, device=device) if leave_one_out else None
        rows = chunk_size or auto_chunk_rows(len(q), query.dim)
        if full:
            is_probe = _same_label(labels, q_labels, self_index)
            pair_rows, _, ranks = count_ranks(plan, q, is_probe, rows, self_index)
            block_tables = [_pairs_to_table(pair_rows.cpu(), r, len(q)) for r in ranks.cpu()]
        else:
            keys = torch.stack(topk_states(plan, q, depth, engine, rows, self_index))
            hits = (labels[decode_index(keys)] == q_labels[:, None]).cpu()
            block_tables = list(_hits_to_table(hits))
        for state, table in zip(tables, block_tables):
            state.append(table)
    return [RankTable(_stack(state), n_pos) for state in tables]
