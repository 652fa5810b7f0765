"""The lineage of one upgrade: its generations (model versions) and the hops between
their stored galleries, built once from a validated spec by :func:`plan`.

Every new generation follows a ``previous`` one (``old`` or an earlier new model): its
compat losses read that model, and its chain hop maps that model's stored gallery into
its own space. ``direct_upgrades`` add hops outside the chain (from an older generation,
or alternatives from the previous one). Widths come from the components' params, so
every consistency check -- stages, batch rules, chains, side information, the signals
schedulers read -- runs here, once, before anything is built or trained. A chain check
carries a zero-row stored gallery through the same ``GalleryUpgrader.advance`` walk that
later carries the real gallery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from compatzoo.engine.training import check_batches
from compatzoo.errors import CompatzooError, SpecError
from compatzoo.interfaces import (OLD_MODEL_INPUTS, GalleryUpgrader, StoredGallery,
                                  WeightedLoss)
from compatzoo.specs import ExperimentSpec, LossTermSpec, ModelSpec, UpgraderSpec

ROOT = "old"


@dataclass(frozen=True)
class Generation:
    """One model version: what it is built from, what it trains on and whom it follows."""

    name: str
    previous: str | None            # None for the root (the old model)
    stage: int | None               # allocation training set; None: the last one
    seed: int
    model: ModelSpec                # encoder, head, train
    losses: tuple[LossTermSpec, ...]
    embedding_dim: int
    loss_inputs: frozenset[str]
    min_batch_classes: int
    old_feature_cache: str = "auto"

    @property
    def reads_previous_model(self) -> bool:
        """Whether its losses read the model it follows (compatibility training)."""
        return bool(self.loss_inputs & OLD_MODEL_INPUTS)

    @property
    def who(self) -> str:
        return "the old model" if self.previous is None else f"new model '{self.name}'"

    def build(self, num_classes: int) -> tuple[torch.nn.Module, torch.nn.Module]:
        """A fresh encoder and head (consumes the global RNG: seed before)."""
        encoder = self.model.encoder.build()
        head = self.model.head.build(embedding_dim=self.embedding_dim, num_classes=num_classes)
        return encoder, head

    def build_loss(self) -> WeightedLoss:
        return WeightedLoss([(t.name, t.weight, t.build()) for t in self.losses])

    def record(self, num_classes: int) -> dict[str, Any]:
        """What a checkpoint of this generation says about it."""
        return {"role": "old" if self.previous is None else "new", "name": self.name,
                "previous": self.previous,
                "model": self.model.model_dump(mode="json", include={"encoder", "head", "train"}),
                "losses": [t.model_dump(mode="json") for t in self.losses],
                "embedding_dim": self.embedding_dim, "num_classes": num_classes}


@dataclass(frozen=True)
class Hop:
    """An upgrader from ``source``'s stored gallery into ``target``'s space. ``name`` is
    set on hops outside the chain (``direct_upgrades``). A ``query`` hop maps the
    target's queries into the old space instead (reported as ``a2o``): it carries no
    gallery, so it is never a chain hop, and its widths are (d_target, d_old)."""

    source: str
    target: str
    upgrader: UpgraderSpec
    name: str | None
    input_dim: int
    output_dim: int
    direction: str = "gallery"

    @property
    def in_chain(self) -> bool:
        return self.name is None and self.direction == "gallery"

    @property
    def maps_queries(self) -> bool:
        return self.direction == "query"

    @property
    def label(self) -> str:
        return self.target if self.name is None else f"{self.target}/{self.name}"

    @property
    def folder(self) -> str:
        """Its checkpoint folder inside the target's."""
        return "upgrader" if self.name is None else f"upgrader-{self.name}"

    def build(self) -> GalleryUpgrader:
        """A fresh upgrader (consumes the global RNG: seed before)."""
        return self.upgrader.build(input_dim=self.input_dim, output_dim=self.output_dim)

    def record(self, upgrader: GalleryUpgrader) -> dict[str, Any]:
        """What a checkpoint of this hop's fitted upgrader says about it."""
        return {"role": "upgrader", "source": self.source, "target": self.target,
                "label": self.label, "upgrader": self.upgrader.model_dump(mode="json"),
                "input_dim": self.input_dim, "output_dim": self.output_dim,
                "side_dim": upgrader.side_dim}


@dataclass(frozen=True)
class Lineage:
    """Every generation (oldest first) and every hop of one upgrade experiment."""

    spec: ExperimentSpec
    generations: dict[str, Generation]
    hops: dict[str, Hop]            # by label; a chain hop's label is its target's name
    paragon: str | None             # new*, the reference of BCT's update gain

    @property
    def new(self) -> list[str]:
        return [name for name in self.generations if name != ROOT]

    def chain_hop(self, name: str) -> Hop | None:
        hop = self.hops.get(name)
        return hop if hop is not None and hop.in_chain else None

    def hops_into(self, name: str) -> list[Hop]:
        """The chain hop first, then the others in spec order."""
        return [hop for hop in self.hops.values() if hop.target == name]

    def path(self, name: str) -> list[str]:
        """``['old', ..., name]`` along the previous links."""
        path = [name]
        while self.generations[path[-1]].previous is not None:
            path.append(self.generations[path[-1]].previous)
        return path[::-1]

    def steps(self, start: str, target: str) -> list[Hop | None]:
        """The chain hops (None where a generation has none) from ``start`` to ``target``."""
        path = self.path(target)
        return [self.chain_hop(name) for name in path[path.index(start) + 1:]]

    def has_upgrader(self, name: str) -> bool:
        """Whether the old gallery reaches ``name`` through at least one upgrader."""
        return any(hop is not None for hop in self.steps(ROOT, name))

    def chains(self) -> list[list[str]]:
        """Every chain of three or more generations that ends at one no other follows."""
        followed = {g.previous for g in self.generations.values()}
        paths = [self.path(name) for name in self.new if name not in followed]
        return [path for path in paths if len(path) >= 3]

    def resolve_stage(self, name: str, stage_count: int) -> int:
        """The index of ``name``'s training set among ``stage_count`` (old: 0, new: the
        last unless the spec says); a stage the allocation lacks fails here."""
        generation = self.generations[name]
        if generation.previous is None:
            return 0
        stage = stage_count - 1 if generation.stage is None else generation.stage
        if stage >= stage_count:
            raise SpecError(
                f"{generation.who}: stage {stage}, but allocation "
                f"'{self.spec.data.allocation.name}' gives {stage_count} training sets (stages "
                f"0-{stage_count - 1}, 0 is the old model's); use the sequential allocation "
                "with one fraction per model version, or a smaller stage")
        return stage


# --------------------------------------------------------------------------- carrying
def advance(upgrader: GalleryUpgrader | None, stored: StoredGallery) -> StoredGallery:
    """One generation on; without an upgrader the gallery stays as it is (BCT)."""
    if upgrader is None:
        return StoredGallery(stored.features, None, stored.features)
    return upgrader.advance(stored)


def carry(steps: list[GalleryUpgrader | None], features: torch.Tensor,
          side_of: Callable[[GalleryUpgrader], torch.Tensor | None]) -> list[StoredGallery]:
    """The stored states of items embedded as ``features``, then carried through ``steps``:
    ``states[0]`` as stored (with the side information ``side_of`` the first step gives),
    ``states[k]`` after k steps."""
    first = steps[0] if steps else None
    states = [StoredGallery(features, None if first is None else side_of(first))]
    for upgrader in steps:
        states.append(advance(upgrader, states[-1]))
    return states


# --------------------------------------------------------------------------- planning
def plan(spec: ExperimentSpec) -> Lineage:
    """The lineage of ``spec`` with every check that needs no data; fails with a
    :class:`SpecError` naming the generation, hop or chain at fault."""
    generations = {ROOT: _generation(ROOT, None, 0, spec.seed, spec.old,
                                     (LossTermSpec(name="classification"),))}
    for i, model in enumerate(spec.new):
        generations[model.name] = _generation(model.name, model.previous, model.stage,
                                              spec.seed + 1 + i, model, tuple(model.losses),
                                              model.old_feature_cache)
    entries = [(m.previous, m.name, m.upgrader, None) for m in spec.new if m.upgrader] + [
        (d.source, m.name, d.upgrader, d.label) for m in spec.new for d in m.direct_upgrades]
    hops: dict[str, Hop] = {}
    for source, target, upgrader, name in entries:   # chain hops first, then the others
        hop = _hop(source, target, upgrader, name, generations)
        if hop.label in hops:
            raise SpecError(f"new model '{target}': two upgraders are labelled "
                            f"'{hop.label}'; name the direct upgrade another way")
        hops[hop.label] = hop
    paragon = spec.evaluation.paragon or next(
        (name for name, g in generations.items()
         if g.previous is not None and not g.reads_previous_model), None)
    lineage = Lineage(spec, generations, hops, paragon)

    stage_count = getattr(spec.data.allocation.component, "stage_count", None)
    stages = None if stage_count is None else stage_count(spec.data.allocation.validated)
    for generation in generations.values():
        if stages is not None:
            lineage.resolve_stage(generation.name, stages)
        check_batches(None, generation.model.train.batch_size, generation.min_batch_classes,
                      generation.who)
    built, chain_states = _check_hops(lineage) if hops else ({}, {})
    _check_schedulers(lineage, built, chain_states)
    return lineage


def _hop(source: str, target: str, upgrader: UpgraderSpec, name: str | None,
         generations: dict[str, Generation]) -> Hop:
    """A hop with its widths: (d_source, d_target), or (d_target, d_old) for a query
    upgrader, which only the old gallery can serve (its row compares with o2o)."""
    direction = upgrader.component.direction_of(upgrader.validated)
    if direction not in ("gallery", "query"):
        raise SpecError(f"new model '{target}': upgrader {upgrader.name!r} says it maps "
                        f"'{direction}'; an upgrader maps 'gallery' or 'query'")
    source_dim, target_dim = (generations[source].embedding_dim,
                              generations[target].embedding_dim)
    if direction == "gallery":
        return Hop(source, target, upgrader, name, source_dim, target_dim)
    if source != ROOT:
        raise SpecError(
            f"new model '{target}': the query upgrader {upgrader.name!r} would map its "
            f"queries into '{source}''s space; query upgraders serve the old gallery: give it "
            "as the upgrader of a model that follows 'old', or as a direct upgrade with "
            "source: old")
    return Hop(source, target, upgrader, name, target_dim, source_dim, "query")


def _generation(name: str, previous: str | None, stage: int | None, seed: int,
                model: ModelSpec, losses: tuple[LossTermSpec, ...],
                old_feature_cache: str = "auto") -> Generation:
    encoder = model.encoder
    try:
        dim = encoder.component.embedding_dim_of(encoder.validated)
    except CompatzooError as exc:
        raise SpecError(f"model '{name}': {exc}") from None
    classes = [t.component for t in losses]
    inputs = frozenset().union(*(c.inputs(t.validated) for c, t in zip(classes, losses)))
    return Generation(name, previous, stage, seed, model, losses, dim, inputs,
                      max(c.min_batch_classes for c in classes), old_feature_cache)


def _check_hops(lineage: Lineage) -> tuple[dict[str, GalleryUpgrader],
                                            dict[str, list[StoredGallery]]]:
    """Build every upgrader untrained (the RNG left as it was) and carry a zero-row gallery
    through every chain and hop, so what cannot work fails before any training: a hop
    that cannot follow the one before it, widths or side information a hop needs but the
    chain does not deliver, and signals or state a backfill scheduler reads but the
    model's upgrade does not give."""
    built: dict[str, GalleryUpgrader] = {}
    with torch.random.fork_rng(devices=[]):
        for label, hop in lineage.hops.items():
            try:
                built[label] = hop.build()
            except CompatzooError as exc:
                raise SpecError(f"new model '{hop.target}': cannot build its upgrader "
                                f"{hop.upgrader.name!r}: {exc}") from None

    def empty_side(upgrader: GalleryUpgrader) -> torch.Tensor | None:
        return torch.empty(0, upgrader.side_dim) if upgrader.side_dim else None

    def walk(start: str, steps: list[GalleryUpgrader | None],
             names: list[str]) -> list[StoredGallery]:
        try:
            dim = lineage.generations[start].embedding_dim
            return carry(steps, torch.empty(0, dim), empty_side)
        except CompatzooError as exc:
            raise SpecError(
                f"the chain {' -> '.join(names)} cannot carry a stored gallery: {exc}. Each "
                "upgrader reads what the hop before it leaves (its width, its side "
                "information); fix the upgraders of that chain") from None

    chain_states: dict[str, list[StoredGallery]] = {}
    for name in lineage.new:
        generation = lineage.generations[name]
        hop, before = lineage.chain_hop(name), lineage.chain_hop(generation.previous)
        if hop is not None and before is not None:
            try:
                built[hop.label].follows(built[before.label])
            except CompatzooError as exc:
                raise SpecError(f"new model '{name}': its upgrader cannot follow the one of "
                                f"'{generation.previous}': {exc}") from None
        path = lineage.path(name)
        steps = [None if h is None else built[h.label] for h in lineage.steps(ROOT, name)]
        chain_states[name] = walk(ROOT, steps, path)
    for label, hop in lineage.hops.items():
        if not hop.in_chain and not hop.maps_queries:
            walk(hop.source, [built[label]], [hop.source, hop.target])
    return built, chain_states


def _check_schedulers(lineage: Lineage, built: dict[str, GalleryUpgrader],
                      chain_states: dict[str, list[StoredGallery]]) -> None:
    """Every backfill scheduler gets the state fields and signals it reads."""
    backfill = lineage.spec.evaluation.backfill
    if backfill is None:
        return
    for name in backfill.models or lineage.new:
        hop = lineage.chain_hop(name)
        upgraded = lineage.has_upgrader(name)
        entering = chain_states[name][-2] if upgraded else None
        given = {"new_head", "new_features"} | ({"upgraded"} if upgraded else set()) | (
            {"side"} if entering is not None and entering.side is not None else set())
        published = built[hop.label].publishes if hop is not None else frozenset()
        for scheduler in backfill.schedulers:
            component = scheduler.component
            missing = sorted(component.requires - given)
            if missing:
                raise SpecError(f"evaluation.backfill: scheduler '{scheduler.name}' reads "
                                f"{missing} of the backfill state, which model '{name}' "
                                "does not give (no upgrader, or one without side "
                                "information); choose another scheduler or give the model "
                                "an upgrader")
            absent = sorted(component.needs_signals - published)
            if absent:
                raise SpecError(
                    f"evaluation.backfill: scheduler '{scheduler.name}' orders by the "
                    f"per-item signal(s) {absent}, but the upgrader of model '{name}' "
                    f"publishes {sorted(published) or 'none'}; give that model an upgrader "
                    "that publishes them, or list the model in evaluation.backfill.models "
                    "only with other schedulers")
