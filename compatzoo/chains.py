"""Generations of models and the upgraders between them (v1 -> v2 -> v3).

Every new model follows a ``previous`` one ('old' or an earlier new model). A model's
upgrader is the hop from its previous model's stored gallery into its own space; a chain
carries a gallery from generation to generation through these hops with
``GalleryUpgrader.advance`` (identity where a model has no upgrader: BCT keeps the
gallery as it is). The same walk runs on zero-row tensors before any training, so a
chain that cannot carry a gallery (a width mismatch, side information the next hop needs
but the previous one drops) fails before any work starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compatzoo.costs import count_macs
from compatzoo.errors import CompatzooError, SpecError
from compatzoo.interfaces import GalleryUpgrader, StoredGallery
from compatzoo.registry import get_registry
from compatzoo.retrieval.compatibility import CompatibilityMatrix
from compatzoo.specs import ExperimentSpec, UpgraderSpec

ROOT = "old"


@dataclass
class Hop:
    """A fitted upgrader from ``source``'s stored gallery into ``target``'s space."""

    source: str
    target: str
    upgrader: GalleryUpgrader
    alias: str | None = None      # set on an extra hop outside the chain (direct_upgrades)
    history: list[dict[str, float]] = field(default_factory=list)
    cost: dict[str, float] = field(default_factory=dict)

    @property
    def direct(self) -> bool:
        return self.alias is not None

    @property
    def label(self) -> str:
        return f"{self.target}/{self.alias}" if self.alias else self.target


def build_upgrader(spec: UpgraderSpec, input_dim: int, output_dim: int) -> GalleryUpgrader:
    return get_registry().get("upgrader", spec.name).factory(
        spec.params_model(), input_dim=input_dim, output_dim=output_dim, side_dim=0)


def previous_of(spec: ExperimentSpec) -> dict[str, str]:
    return {model.name: model.previous for model in spec.new}


def path_to(previous: dict[str, str], name: str) -> list[str]:
    """``['old', ..., name]`` along the previous links."""
    path = [name]
    while path[-1] != ROOT:
        path.append(previous[path[-1]])
    return path[::-1]


def sequential_chains(previous: dict[str, str]) -> list[list[str]]:
    """Every chain of three or more generations (old first) that ends at a model no other
    model follows."""
    followed = set(previous.values())
    paths = [path_to(previous, name) for name in previous if name not in followed]
    return [path for path in paths if len(path) >= 3]


def advance(hop: Hop | None, stored: StoredGallery) -> StoredGallery:
    """One generation on; without an upgrader the gallery stays as it is (BCT)."""
    if hop is None:
        return StoredGallery(stored.features, None, stored.features)
    return hop.upgrader.advance(stored)


def carry(steps: list[Hop | None], features: torch.Tensor,
          side_of: Callable[[Hop], torch.Tensor | None]) -> list[StoredGallery]:
    """The stored states of items embedded as ``features``, then carried through ``steps``:
    ``states[0]`` as stored (with the side information the first hop reads), ``states[k]``
    after k hops."""
    first = steps[0] if steps else None
    side = side_of(first) if first is not None else None
    states = [StoredGallery(features, side)]
    for hop in steps:
        states.append(advance(hop, states[-1]))
    return states


@dataclass
class Generations:
    """Everything a run trained, and the walks over its chains."""

    previous: dict[str, str]
    embeddings: dict[str, Any]                     # name -> Embeddings (query, gallery)
    hops: dict[str, Hop] = field(default_factory=dict)            # by target
    direct: dict[tuple[str, str], Hop] = field(default_factory=dict)  # (target, alias)
    gallery_side: Callable[[Hop], torch.Tensor | None] = lambda hop: None
    _carried: dict[tuple[str, str], list[StoredGallery]] = field(default_factory=dict,
                                                                  repr=False)

    def path(self, name: str) -> list[str]:
        return path_to(self.previous, name)

    def steps(self, start: str, target: str) -> list[Hop | None]:
        path = self.path(target)
        return [self.hops.get(name) for name in path[path.index(start) + 1:]]

    def has_upgrader(self, name: str) -> bool:
        return any(hop is not None for hop in self.steps(ROOT, name))

    def carried_gallery(self, start: str, target: str) -> list[StoredGallery]:
        """The gallery embedded by ``start`` and carried to ``target`` without images
        (every state on the way; computed once)."""
        if (start, target) not in self._carried:
            self._carried[(start, target)] = carry(
                self.steps(start, target), self.embeddings[start].gallery, self.gallery_side)
        return self._carried[(start, target)]

    def direct_gallery(self, hop: Hop) -> list[StoredGallery]:
        """The source's gallery before and after an extra hop (computed once)."""
        key = (hop.source, hop.label)  # labels hold a '/', so no chain key looks like it
        if key not in self._carried:
            self._carried[key] = carry([hop], self.embeddings[hop.source].gallery,
                                       self.gallery_side)
        return self._carried[key]


# --------------------------------------------------------------------------- before training
def check_upgrade_chains(spec: ExperimentSpec, dims: dict[str, int]) -> None:
    """Build every upgrader (untrained) and carry a zero-row gallery through every chain and
    direct hop, so what cannot work fails before any training. ``dims`` are the models'
    embedding widths."""
    previous = previous_of(spec)
    hops: dict[str, Hop] = {}
    direct: list[Hop] = []
    for model in spec.new:
        try:
            if model.upgrader is not None:
                hops[model.name] = Hop(model.previous, model.name, build_upgrader(
                    model.upgrader, dims[model.previous], dims[model.name]))
            for entry in model.direct_upgrades:
                direct.append(Hop(entry.source, model.name, build_upgrader(
                    entry.upgrader, dims[entry.source], dims[model.name]), entry.label))
        except CompatzooError as exc:
            raise SpecError(f"new model '{model.name}': cannot build its upgrader: {exc}") from None

    def empty_side(hop: Hop) -> torch.Tensor | None:
        return torch.empty(0, hop.upgrader.side_dim) if hop.upgrader.side_dim else None

    def walk(start: str, steps: list[Hop | None], names: list[str]) -> None:
        try:
            carry(steps, torch.empty(0, dims[start]), empty_side)
        except CompatzooError as exc:
            raise SpecError(
                f"the chain {' -> '.join(names)} cannot carry a stored gallery: {exc}. Each "
                "upgrader reads what the hop before it leaves (its width, its side "
                "information); fix the upgraders of that chain") from None

    for model in spec.new:
        path = path_to(previous, model.name)
        hop, before = hops.get(model.name), hops.get(model.previous)
        if hop is not None and before is not None:
            try:
                hop.upgrader.follows(before.upgrader)
            except CompatzooError as exc:
                raise SpecError(f"new model '{model.name}': its upgrader cannot follow the one "
                                f"of '{model.previous}': {exc}") from None
        walk(ROOT, [hops.get(name) for name in path[1:]], path)
    for hop in direct:
        walk(hop.source, [hop], [hop.source, hop.target])


# --------------------------------------------------------------------------- reporting
def advance_macs(upgrader: GalleryUpgrader, stored: StoredGallery) -> int:
    """Multiply-accumulates of carrying one stored item one generation on (h, and g when
    the upgrader carries side information on)."""

    class _Advance(nn.Module):
        def __init__(self):
            super().__init__()
            self.upgrader = upgrader

        def forward(self, features, side, previous):
            return self.upgrader.advance(StoredGallery(features, side, previous))

    def head(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[:2]

    return count_macs(_Advance(), head(stored.features), head(stored.side),
                      head(stored.previous))


def stored_bytes(upgrader: GalleryUpgrader, stored: StoredGallery) -> dict[str, int]:
    """Bytes per item that must stay stored for this hop (float32)."""
    side = 0 if stored.side is None else stored.side.shape[1]
    extra = (stored.previous.shape[1]
             if stored.previous is not None and upgrader.reads_previous
             else 0)
    return {"stored_bytes_per_item": 4 * (stored.features.shape[1] + side + extra),
            "side_bytes_per_item": 4 * side, "previous_copy_bytes_per_item": 4 * extra}


def lower_triangle(names: list[str], value: Callable[[int, int], float],
                   metric: str, full: bool = False) -> CompatibilityMatrix:
    """``M[i][j] = value(i, j)`` for j <= i (all j when ``full``); NaN elsewhere."""
    n = len(names)
    values = [[value(i, j) if full or j <= i else math.nan for j in range(n)]
              for i in range(n)]
    return CompatibilityMatrix(list(names), values, metric)


def upgrade_path(matrix: CompatibilityMatrix) -> dict[str, Any]:
    """BiCT eq. 2 along a chain whose gallery is never re-embedded:
    ``M[0][0] < M[1][0] < M[1][1] < M[2][1] < M[2][2] ...`` (query upgrade, then gallery
    upgrade, generation by generation)."""
    names, m = matrix.names, matrix.values
    steps = [(0, 0)]
    for i in range(1, len(names)):
        steps += [(i, i - 1), (i, i)]
    values = [m[i][k] for i, k in steps]
    return {"steps": [{"query": names[i], "gallery": names[k], "value": v}
                      for (i, k), v in zip(steps, values)],
            "increasing": bool(all(b > a for a, b in zip(values, values[1:])))}
