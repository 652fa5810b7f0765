"""Ranks of each query's positives in every gallery state of a plan.

Shallow metrics (depth <= MAX_TOPK_DEPTH) read the positives off a chunked top-k search.
Deeper ones (full-ranking mAP, mAP@R with many positives) count, for each positive, the
gallery items that beat it, in two chunked passes: the first collects the positives'
scores, the second counts per chunk how many scores lie above each (a row sort plus a
vectorised binary search). Neither builds a query x gallery matrix; both follow the
ranking of :mod:`compatzoo.retrieval.search` (score descending, then gallery index).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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


def _row_slots(rows: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, int]:
    """Each entry's place among the entries of its row (in input order), and the most
    entries any row has: the layout of a row-padded table of ragged entries."""
    order = torch.argsort(rows, stable=True)
    per_row = torch.bincount(rows, minlength=n_rows)
    first = torch.cumsum(per_row, 0) - per_row
    slots = torch.empty_like(rows)
    slots[order] = torch.arange(len(rows), device=rows.device) - first[rows[order]]
    return slots, int(per_row.max()) if len(rows) else 0


@dataclass(frozen=True)
class _Probes:
    """The (query row, gallery item) pairs whose ranks are counted, and their scores."""

    rows: torch.Tensor      # query row in the block
    cols: torch.Tensor      # column in its chunk
    gidx: torch.Tensor      # gallery index
    position: torch.Tensor  # position in the plan's order
    number: torch.Tensor    # chunk number
    values: torch.Tensor    # (2, n): score per version, NaN where no state needs it
    slot: torch.Tensor      # place in its query's row of a padded table
    n_slots: int


def _collect(plan: Plan, query: torch.Tensor, is_probe: ProbeMask, chunk_rows: int,
             self_position: torch.Tensor | None) -> _Probes:
    """Pass 1: find the probe pairs chunk by chunk and keep their own scores."""
    found = []
    for chunk in plan.chunks(chunk_rows, query.device):
        rows, cols = torch.nonzero(is_probe(chunk.index), as_tuple=True)
        values = torch.full((2, len(rows)), torch.nan, device=query.device)
        for version in chunk.rows:
            values[version] = chunk_scores(query, chunk, version, self_position)[rows, cols]
        found.append((rows, cols, chunk.index[cols], chunk.start + cols,
                      torch.full_like(rows, chunk.number), values))
    rows, cols, gidx, position, number, values = (torch.cat(x, dim=-1) for x in zip(*found))
    return _Probes(rows, cols, gidx, position, number, values, *_row_slots(rows, len(query)))


def _beaten_by(scores: torch.Tensor, sorted_rows: torch.Tensor, index: torch.Tensor,
               probes: _Probes, values: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Items of this chunk ranked above each probe scoring ``values``."""
    width, rows, slot = scores.shape[1], probes.rows, probes.slot
    table = torch.full((len(scores), probes.n_slots), torch.inf, device=scores.device)
    table[rows, slot] = values  # one row of values per query, searched in its sorted row
    above = width - torch.searchsorted(sorted_rows, table, right=True)[rows, slot]
    at_least = width - torch.searchsorted(sorted_rows, table)[rows, slot]
    own = torch.nonzero(own).flatten()  # the probe itself is never above itself
    own_score = scores[rows[own], probes.cols[own]]
    above[own] -= (own_score > values[own]).long()
    at_least[own] -= (own_score >= values[own]).long()
    tied = torch.nonzero(at_least > above).flatten()  # other items with the very same score
    for group in tied.split(_TIE_GROUP):
        same = scores[rows[group]] == values[group, None]
        above[group] += (same & (index[None, :] < probes.gidx[group, None])).sum(1)
    return above


def count_ranks(plan: Plan, query: torch.Tensor, is_probe: ProbeMask, chunk_rows: int,
                self_position: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ranks of every probe pair (query row, gallery index) in every state of ``plan``.

    Returns the pairs' query rows, gallery indices and ranks (states x pairs).
    ``self_position``: leave-one-out, see :func:`compatzoo.retrieval.search.chunk_scores`.
    """
    probes = _collect(plan, query, is_probe, chunk_rows, self_position)
    cuts = torch.tensor(plan.cuts, device=query.device)
    sees_new = probes.position[None, :] < cuts[:, None]  # per state: the probe's version
    scored = [v for v in (OLD, NEW) if not probes.values[v].isnan().all()]
    ranks = torch.zeros((len(plan.cuts), len(probes.rows)), dtype=torch.int64,
                        device=query.device)
    for chunk in plan.chunks(chunk_rows, query.device):  # pass 2: who beats them
        in_chunk = probes.number == chunk.number
        for version in chunk.rows:
            scores = chunk_scores(query, chunk, version, self_position)
            sorted_rows = _sort_rows(scores)
            counts = torch.zeros((2, len(probes.rows)), dtype=torch.int64, device=query.device)
            for probe_version in scored:  # counts of NaN scores are never read by a state
                own = in_chunk & (probe_version == version)
                counts[probe_version] = _beaten_by(scores, sorted_rows, chunk.index, probes,
                                                   probes.values[probe_version], own)
            states = plan.states_seeing(chunk.start, chunk.start + chunk.width, version)
            ranks[states] += torch.where(sees_new[states], counts[NEW], counts[OLD])
    return probes.rows, probes.gidx, ranks


# --- assembling rank tables ----------------------------------------------------------------

def _pairs_to_table(rows: torch.Tensor, ranks: torch.Tensor, n_queries: int) -> torch.Tensor:
    by_rank = torch.argsort(ranks)
    rows, ranks = rows[by_rank], ranks[by_rank]
    slot, width = _row_slots(rows, n_queries)
    table = torch.full((n_queries, width), UNRANKED, dtype=torch.int64)
    table[rows, slot] = ranks
    return table


def _hits_to_table(hits: torch.Tensor) -> torch.Tensor:
    """(..., Q, k) hit flags of ranked lists -> (..., Q, m) ascending ranks of the hits."""
    ranks = torch.where(hits, torch.arange(hits.shape[-1]), UNRANKED)
    width = int(hits.sum(-1).max()) if hits.numel() else 0
    return torch.sort(ranks, dim=-1).values[..., :width]


def _same_label(labels: torch.Tensor, query_labels: torch.Tensor,
                itself: torch.Tensor | None) -> ProbeMask:
    """Probe mask of the positives: same label, and not the query itself (by index)."""
    def is_probe(index: torch.Tensor) -> torch.Tensor:
        same = labels[index][None, :] == query_labels[:, None]
        return same if itself is None else same & (index != itself[:, None])
    return is_probe


def positive_ranks(query: Features, query_labels: np.ndarray, plan: Plan,
                   gallery_labels: np.ndarray, n_pos: torch.Tensor, depth: int,
                   backend: str = "auto", chunk_size: int | None = None,
                   leave_one_out: bool = False) -> Iterator[tuple[slice, list[RankTable]]]:
    """Rank tables of the positives (same label, self excluded) for every state of
    ``plan``, one query block at a time: ``(block, [table per state])``. A caller that
    reduces each block (to per-query values) keeps memory linear in the number of
    queries, however many positives each has.

    Ranks are exact up to ``depth``; deeper positives are UNRANKED unless the depth
    needed counting (then all are ranked, always with torch). ``n_pos`` is
    :func:`count_positives` of the labels.
    """
    full = depth > MAX_TOPK_DEPTH
    blocks = query_blocks(query.n)
    engine = TorchBackend() if full else resolve_backend(
        backend, depth, blocks[0].stop - blocks[0].start, plan.size, query.dim, chunk_size)
    device = engine.device
    labels = torch.from_numpy(gallery_labels).to(device)
    for block in blocks:
        q = normalised(query, block, device)
        q_labels = torch.from_numpy(query_labels[block]).to(device)
        itself = torch.arange(block.start, block.stop, device=device) if leave_one_out else None
        position = None if itself is None else plan.positions(itself)
        rows = chunk_size or auto_chunk_rows(len(q), query.dim)
        if full:
            is_probe = _same_label(labels, q_labels, itself)
            pair_rows, _, ranks = count_ranks(plan, q, is_probe, rows, position)
            tables = [_pairs_to_table(pair_rows.cpu(), r, len(q)) for r in ranks.cpu()]
        else:
            keys = torch.stack(topk_states(plan, q, depth, engine, rows, position))
            hits = (labels[decode_index(keys)] == q_labels[:, None]).cpu()
            tables = list(_hits_to_table(hits))
        yield block, [RankTable(table, n_pos[block]) for table in tables]
