"""Run a validated experiment spec end to end.

spec -> components -> train old -> train new model(s) -> evaluate (compatibility table,
backfill curves) -> results JSON + plots + checkpoints. Each step is a plain function.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import compatzoo
from compatzoo.chains import (ROOT, Generations, Hop, advance_macs, build_upgrader, carry,
                              check_upgrade_chains, lower_triangle, previous_of,
                              sequential_chains, stored_bytes, upgrade_path)
from compatzoo.data.augment import AugmentParams, BatchAugment
from compatzoo.errors import SpecError
from compatzoo.engine import TrainedModel, extract_features, resolve_device, save_state, train_model
from compatzoo.costs import count_macs
from compatzoo.interfaces import (GalleryState, StoredGallery, UpgradeContext, WeightedLoss,
                                  match_dim)
from compatzoo.registry import get_registry
from compatzoo.report import plot_compatibility_bars, plot_curves, plot_sequential
from compatzoo.retrieval import backfill_curve, empirical_compatibility, evaluate, update_gain
from compatzoo.specs import (ExperimentSpec, LossTermSpec, ModelSpec, UpgraderSpec,
                             build_loss_term)

log = logging.getLogger(__name__)


@dataclass
class Embeddings:
    query: torch.Tensor
    gallery: torch.Tensor   # the query set itself under leave-one-out


def build_model(spec: ModelSpec, num_classes: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    registry = get_registry()
    encoder = registry.get("encoder", spec.encoder.name).factory(spec.encoder.params_model())
    head = registry.get("head", spec.head.name).factory(
        spec.head.params_model(), embedding_dim=encoder.embedding_dim, num_classes=num_classes)
    return encoder, head


def build_loss(terms) -> WeightedLoss:
    return WeightedLoss([(t.name, t.weight, build_loss_term(t)) for t in terms])


def _embed(model: TrainedModel, data, batch_size: int, device, progress: bool) -> Embeddings:
    query = extract_features(model.encoder, data.query, batch_size, device, progress, "embed query")
    if data.gallery is None:
        return Embeddings(query, query)
    gallery = extract_features(model.encoder, data.gallery, batch_size, device, progress,
                               "embed gallery")
    return Embeddings(query, gallery)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def run_experiment(spec: ExperimentSpec, output_dir: str | Path, progress: bool = True,
                   save_checkpoints: bool = True) -> dict[str, Any]:
    """Train and evaluate everything the spec describes; write results under output_dir."""
    started = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    registry = get_registry()
    timing: dict[str, float] = {}

    tick = time.perf_counter()
    dataset = registry.get("dataset", spec.data.dataset.name)
    data = dataset.factory(spec.data.dataset.params_model())
    allocation_record = registry.get("allocation", spec.data.allocation.name)
    allocation = allocation_record.factory(np.asarray(data.train.labels),
                                           spec.data.allocation.params_model(), spec.seed)
    augment = BatchAugment(AugmentParams.model_validate(spec.data.augment))
    timing["data_s"] = time.perf_counter() - tick
    device = resolve_device(spec.old.train.device)
    batch = spec.evaluation.batch_size
    log_path = out / "train_log.jsonl"
    log_path.unlink(missing_ok=True)
    train_sets = training_sets(spec, data, allocation)
    check_new_training_sets(spec, train_sets)
    if any(m.upgrader is not None or m.direct_upgrades for m in spec.new):
        check_upgrade_chains(spec, embedding_dims(spec, data.num_classes))

    # ---- old model -----------------------------------------------------------------
    tick = time.perf_counter()
    _seed_everything(spec.seed)
    encoder, head = build_model(spec.old, data.num_classes)
    old = train_model(encoder, head, train_sets[ROOT],
                      build_loss([LossTermSpec(name="classification")]), spec.old.train,
                      augment=augment, seed=spec.seed, log_path=log_path, progress=progress,
                      checkpoint_dir=out / "checkpoints" / "old" if save_checkpoints else None,
                      checkpoint_config={"role": "old", "model": spec.old.model_dump(mode="json"),
                                         "num_classes": data.num_classes},
                      desc="old")
    timing["train_old_s"] = time.perf_counter() - tick
    models: dict[str, TrainedModel] = {ROOT: old}
    gens = Generations(previous_of(spec), {ROOT: _embed(old, data, batch, device, progress)})
    gallery_images = data.gallery if data.gallery is not None else data.query
    side_cache: dict[int, torch.Tensor | None] = {}

    def gallery_side(hop: Hop) -> torch.Tensor | None:
        if id(hop) not in side_cache:
            side_cache[id(hop)] = hop.upgrader.side_information(gallery_images, batch, progress)
        return side_cache[id(hop)]

    gens.gallery_side = gallery_side

    # ---- new models, each after the model it follows ------------------------------------
    for i, model_spec in enumerate(spec.new):
        name = model_spec.name
        tick = time.perf_counter()
        seed = spec.seed + 1 + i
        _seed_everything(seed)
        encoder, head = build_model(model_spec, data.num_classes)
        trained = train_model(
            encoder, head, train_sets[name], build_loss(model_spec.losses), model_spec.train,
            augment=augment, seed=seed, old=models[model_spec.previous],
            old_feature_cache=model_spec.old_feature_cache,
            log_path=log_path, progress=progress, desc=name,
            checkpoint_dir=out / "checkpoints" / name if save_checkpoints else None,
            checkpoint_config={"role": "new", "model": model_spec.model_dump(mode="json"),
                               "num_classes": data.num_classes})
        timing[f"train_{name}_s"] = time.perf_counter() - tick
        models[name] = trained
        gens.embeddings[name] = _embed(trained, data, batch, device, progress)
        fits = ([(model_spec.previous, model_spec.upgrader, None)] if model_spec.upgrader
                else []) + [(d.source, d.upgrader, d.label) for d in model_spec.direct_upgrades]
        for source, upgrader_spec, alias in fits:
            tick = time.perf_counter()
            hop = fit_hop(upgrader_spec, source, name, alias, models, train_sets, gens,
                          augment, device, seed, batch, progress)
            if save_checkpoints:
                folder = "upgrader" if alias is None else f"upgrader-{alias}"
                save_state(out / "checkpoints" / name / folder, {"upgrader": hop.upgrader},
                           {"role": "upgrader", "source": source, "target": name,
                            "upgrader": upgrader_spec.model_dump(mode="json"),
                            "input_dim": hop.upgrader.input_dim,
                            "output_dim": hop.upgrader.output_dim,
                            "side_dim": hop.upgrader.side_dim})
            if alias is not None:
                gens.direct[(name, alias)] = hop
            else:
                gens.hops[name] = hop
            timing[f"upgrade_{hop.label}_s"] = time.perf_counter() - tick

    # ---- evaluation ----------------------------------------------------------------
    tick = time.perf_counter()
    for hop in [*gens.hops.values(), *gens.direct.values()]:
        hop.cost = upgrade_cost(hop, gens, models, gallery_images, device)
    evaluation = evaluate_upgrade(spec, data, gens, models)
    timing["evaluate_s"] = time.perf_counter() - tick
    timing["total_s"] = time.perf_counter() - started

    results = {
        "compatzoo_version": compatzoo.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "experiment": spec.name,
        "seed": spec.seed,
        "dataset": data.info,
        "allocation": {"name": spec.data.allocation.name,
                       "stages": allocation.describe(np.asarray(data.train.labels)),
                       "models": {n: stage_of(spec, n, len(allocation.stages))
                                  for n in [ROOT, *gens.previous]}},
        "spec": spec.model_dump(mode="json"),
        "training": {**{n: m.history for n, m in models.items()},
                     **{f"{h.label}/upgrader": h.history
                        for h in [*gens.hops.values(), *gens.direct.values()]}},
        "evaluation": evaluation,
        "timing": timing,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_compatibility_bars(evaluation, spec.evaluation.primary, out / "compatibility.png",
                            title=spec.name)
    if evaluation.get("backfill"):
        plot_curves(evaluation, spec.evaluation.primary, out)
    if evaluation.get("sequential"):
        plot_sequential(evaluation, out)
    return results


def stage_of(spec: ExperimentSpec, name: str, stages: int) -> int:
    """Index of the allocation's training set a model sees (old: 0, new: last by default)."""
    if name == ROOT:
        return 0
    model = next(m for m in spec.new if m.name == name)
    return stages - 1 if model.stage is None else model.stage


def training_sets(spec: ExperimentSpec, data, allocation) -> dict[str, Any]:
    """Each model's training images; a stage the allocation lacks fails here."""
    stages = len(allocation.stages)
    sets = {ROOT: data.train.subset(allocation.stages[0])}
    for model in spec.new:
        stage = stage_of(spec, model.name, stages)
        if stage >= stages:
            raise SpecError(
                f"new model '{model.name}': stage {stage}, but allocation "
                f"'{spec.data.allocation.name}' gives {stages} training sets (stages 0-"
                f"{stages - 1}, 0 is the old model's); use the sequential allocation with one "
                "fraction per model version, or a smaller stage")
        sets[model.name] = data.train.subset(allocation.stages[stage])
    return sets


def embedding_dims(spec: ExperimentSpec, num_classes: int) -> dict[str, int]:
    """Every model's embedding width, from throw-away builds that leave the RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        dims = {ROOT: build_model(spec.old, num_classes)[0].embedding_dim}
        for model in spec.new:
            dims[model.name] = build_model(model, num_classes)[0].embedding_dim
    return dims


def check_new_training_sets(spec: ExperimentSpec, train_sets: dict[str, Any]) -> None:
    """Fail before any training when a new model's losses cannot get what they need from
    its data (e.g. contrastive negatives when the allocation leaves a single class)."""
    for model in spec.new:
        new_train = train_sets[model.name]
        classes = len(np.unique(np.asarray(new_train.labels)))
        loss = build_loss(model.losses)
        if loss.min_classes_per_batch > classes:
            raise SpecError(
                f"new model '{model.name}': its losses need samples of "
                f"{loss.min_classes_per_batch} classes per batch, but its training set "
                f"({spec.data.allocation.name}) has {classes} class(es); choose another "
                "allocation or loss")
        if len(new_train) < model.train.batch_size:
            raise SpecError(f"new model '{model.name}': its training set has "
                            f"{len(new_train)} items, fewer than batch_size "
                            f"{model.train.batch_size}; lower new.train.batch_size")


def fit_hop(spec: UpgraderSpec, source: str, target: str, alias: str | None,
            models: dict[str, TrainedModel], train_sets: dict[str, Any], gens: Generations,
            augment, device, seed: int, batch: int, progress: bool) -> Hop:
    """Fit an upgrader from ``source``'s gallery into ``target``'s space on ``target``'s
    training set; in a chain it also sees the hop before it and the training items as
    the chain stores them."""
    src, tgt = models[source], models[target]
    new_train = train_sets[target]
    upgrader = build_upgrader(spec, src.encoder.embedding_dim, tgt.encoder.embedding_dim)
    hop = Hop(source, target, upgrader, alias)
    features: dict[str, torch.Tensor] = {}

    def phi(name: str) -> torch.Tensor:
        if name not in features:
            features[name] = extract_features(models[name].encoder, new_train, batch, device,
                                              progress, f"{name} features (upgrader)")
        return features[name]

    def replay() -> StoredGallery:
        path = gens.path(source)
        states = carry([gens.hops.get(n) for n in path[1:]], phi(ROOT),
                       lambda first: first.upgrader.side_information(new_train, batch, progress))
        return states[-1]

    context = UpgradeContext(
        old_train=train_sets[source], new_train=new_train, old_encoder=src.encoder,
        new_encoder=tgt.encoder, old_features=phi(source), new_features=phi(target),
        labels=torch.as_tensor(new_train.labels), new_head=tgt.head, augment=augment,
        device=device, seed=seed, progress=progress,
        previous_upgrader=gens.hops[source].upgrader if source in gens.hops else None,
        replay_chain=replay if source != ROOT else None)
    hop.history = upgrader.fit(context)
    hop.upgrader = upgrader.cpu().eval()
    return hop


def upgrade_cost(hop: Hop, gens: Generations, models: dict[str, TrainedModel],
                 gallery_images, device) -> dict[str, float]:
    """Per gallery item: MACs of the hop vs re-embedding the image, and bytes stored."""
    # The state entering the hop, as the chain from the old gallery delivers it.
    stored = (gens.direct_gallery(hop) if hop.direct
              else gens.carried_gallery(ROOT, hop.target))[-2]
    images, _ = gallery_images.get_batch([0, 1])
    encoder = models[hop.target].encoder
    return {"upgrade_macs_per_item": advance_macs(hop.upgrader, stored),
            "reembed_macs_per_item": count_macs(encoder, images.to(device)),
            **stored_bytes(hop.upgrader, stored),
            "new_bytes_per_item": 4 * encoder.embedding_dim}


def evaluate_upgrade(spec: ExperimentSpec, data, gens: Generations,
                     models: dict[str, TrainedModel]) -> dict[str, Any]:
    """The compatibility table (o2o, n2o, n2u, n2n), BCT's criterion, backfill curves and,
    for chains of three or more generations, their compatibility matrices.

    n2u is new queries against the old gallery carried into the model's space by its
    chain's upgraders (BiCT's M_FCT, FCT's new/h(old, s)); with an upgrader, the
    not-yet-backfilled part of the gallery is that carried gallery.
    """
    metrics = tuple(spec.evaluation.metrics)
    primary = spec.evaluation.primary
    loo = data.gallery is None
    q_labels = np.asarray(data.query.labels)
    g_labels = q_labels if loo else np.asarray(data.gallery.labels)
    emb = gens.embeddings

    scores: dict[tuple[int, int], dict[str, float]] = {}

    def score(query: torch.Tensor, gallery: torch.Tensor) -> dict[str, float]:
        """Each (query, gallery) pair once: the table and the chain matrices share many."""
        key = (id(query), id(gallery))  # the tensors live in gens for the whole evaluation
        if key not in scores:
            # Queries against a gallery of another width: BCT's first-d rule.
            scores[key] = evaluate(match_dim(query, gallery.shape[1]), q_labels, gallery,
                                   g_labels, metrics=metrics, leave_one_out=loo)
        return scores[key]

    carried = {name: gens.carried_gallery(ROOT, name) for name in gens.previous
               if gens.has_upgrader(name)}
    table: dict[str, dict[str, float]] = {"o2o": score(emb[ROOT].query, emb[ROOT].gallery)}
    for name in gens.previous:
        query = emb[name].query
        table[f"n2o/{name}"] = score(query, emb[ROOT].gallery)
        if name in carried:
            table[f"n2u/{name}"] = score(query, carried[name][-1].features)
        previous = gens.previous[name]
        if previous != ROOT and name in gens.hops:
            table[f"n2u/{name}/from-{previous}"] = score(
                query, gens.carried_gallery(previous, name)[-1].features)
        for (target, _), hop in gens.direct.items():
            if target == name:
                table[f"n2u/{hop.label}"] = score(query, gens.direct_gallery(hop)[-1].features)
        table[f"n2n/{name}"] = score(query, emb[name].gallery)

    paragon = spec.evaluation.paragon or _default_paragon(spec)
    criterion = {}
    for name in gens.previous:
        n2o = table[f"n2o/{name}"][primary]
        entry = {"compatible": empirical_compatibility(n2o, table["o2o"][primary])}
        if paragon is not None:
            entry["update_gain"] = update_gain(n2o, table["o2o"][primary],
                                               table[f"n2n/{paragon}"][primary])
        criterion[name] = entry

    result: dict[str, Any] = {"metrics": list(metrics), "primary": primary,
                              "leave_one_out": loo, "paragon": paragon,
                              "table": table, "criterion": criterion}
    backfill = spec.evaluation.backfill
    if backfill is not None:
        result["backfill"] = backfill_curves(spec, gens, models, carried, q_labels, g_labels,
                                             loo)
    hops = [*gens.hops.values(), *gens.direct.values()]
    if hops:
        result["upgrade_cost"] = {hop.label: hop.cost for hop in hops}
    sequential = {chain[-1]: chain_report(gens, chain[-1], primary, score)
                  for chain in sequential_chains(gens.previous)}
    if sequential:
        result["sequential"] = sequential
    return result


def backfill_curves(spec: ExperimentSpec, gens: Generations, models: dict[str, TrainedModel],
                    carried: dict[str, list[StoredGallery]], q_labels: np.ndarray,
                    g_labels: np.ndarray, loo: bool) -> dict[str, dict[str, Any]]:
    """One curve per (model, scheduler): from the stored gallery as the model's chain leaves
    it (the old one, or the carried one) to the fully backfilled one; NFR vs o2o."""
    backfill = spec.evaluation.backfill
    metrics = tuple(spec.evaluation.metrics)
    registry = get_registry()
    old = gens.embeddings[ROOT]
    curves: dict[str, dict[str, Any]] = {}
    for name in backfill.models or list(gens.previous):
        emb = gens.embeddings[name]
        states = carried.get(name)
        before = old.gallery if states is None else states[-1].features
        if emb.query.shape[1] != before.shape[1]:
            log.warning("skipping the backfill curve of %s: its dim %d differs from the "
                        "stored gallery's %d (give it an upgrader)", name,
                        emb.query.shape[1], before.shape[1])
            continue
        hop = gens.hops.get(name)
        stored_in = None if states is None else states[-2]
        uncertainty = None
        if hop is not None and hasattr(hop.upgrader, "uncertainty"):
            uncertainty = hop.upgrader.uncertainty(stored_in.features, stored_in.side)
        state = GalleryState(
            old_features=old.gallery.numpy(), new_features=emb.gallery.numpy(),
            new_head=models[name].head, upgraded=None if states is None else before.numpy(),
            side=None if stored_in is None or stored_in.side is None
            else stored_in.side.numpy(), uncertainty=uncertainty)
        curves[name] = {}
        for sched_spec in backfill.schedulers:
            scheduler = registry.get("scheduler", sched_spec.name).factory(
                sched_spec.params_model())
            label = backfill.label(sched_spec)
            order = scheduler.order(state, seed=spec.seed)
            curve = backfill_curve(emb.query, before, emb.gallery, q_labels, g_labels, order,
                                   points=backfill.points, metrics=metrics,
                                   query_old=old.query, nfr_k=tuple(backfill.nfr_k),
                                   leave_one_out=loo,
                                   reference_gallery=old.gallery)
            curves[name][label] = {**curve.to_dict(), "oracle": type(scheduler).is_oracle}
    return curves


def chain_report(gens: Generations, leaf: str, metric: str, score) -> dict[str, Any]:
    """The compatibility matrices of one chain ``old -> ... -> leaf``.

    ``backfilled[i][j]``: model i's queries against model j's own gallery (BCT, RACT;
    average compatibility and multi-model accuracy as in METHODS.md). With upgraders also
    ``upgraded[i][k]`` (k <= i): model i's queries against the old gallery carried to
    generation k, never re-embedded (BiCT eq. 2 reads along it), and ``carried[i][j]``
    (j <= i): against the gallery embedded by model j and carried to i (FCT table 5).
    """
    names = gens.path(leaf)
    emb = gens.embeddings

    def value(query: str, gallery: torch.Tensor) -> float:
        return score(emb[query].query, gallery)[metric]

    backfilled = lower_triangle(
        names, lambda i, j: value(names[i], emb[names[j]].gallery), metric, full=True)
    report: dict[str, Any] = {"models": names, "backfilled": backfilled.to_dict()}
    if gens.has_upgrader(leaf):
        from_root = gens.carried_gallery(ROOT, leaf)
        upgraded = lower_triangle(
            names, lambda i, k: value(names[i], from_root[k].features), metric)
        carried = lower_triangle(names, lambda i, j: value(
            names[i], gens.carried_gallery(names[j], names[i])[-1].features), metric)
        report.update(upgraded=upgraded.to_dict(), carried=carried.to_dict(),
                      upgrade_path=upgrade_path(upgraded))
    return report


def _default_paragon(spec: ExperimentSpec) -> str | None:
    """The first new model trained with plain classification only (independent training)."""
    for model in spec.new:
        if [t.name for t in model.losses] == ["classification"]:
            return model.name
    return None
