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
from compatzoo.data.augment import AugmentParams, BatchAugment
from compatzoo.errors import SpecError
from compatzoo.engine import TrainedModel, extract_features, resolve_device, save_state, train_model
from compatzoo.costs import count_macs
from compatzoo.interfaces import GalleryState, UpgradeContext, WeightedLoss, match_dim
from compatzoo.registry import get_registry
from compatzoo.report import plot_compatibility_bars, plot_curves
from compatzoo.retrieval import backfill_curve, empirical_compatibility, evaluate, update_gain
from compatzoo.specs import (ExperimentSpec, LossTermSpec, ModelSpec, UpgraderSpec,
                             build_loss_term)

log = logging.getLogger(__name__)


@dataclass
class Embeddings:
    query: torch.Tensor
    gallery: torch.Tensor   # the query set itself under leave-one-out


@dataclass
class UpgradedGallery:
    """The stored old gallery after a GalleryUpgrader: psi(old[, side])."""

    features: torch.Tensor
    side: torch.Tensor | None
    uncertainty: np.ndarray | None
    cost: dict[str, float]
    history: list[dict[str, float]]


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
    old_train = data.train.subset(allocation.old)
    new_train = data.train.subset(allocation.new)
    check_new_training_sets(spec, new_train)

    # ---- old model -----------------------------------------------------------------
    tick = time.perf_counter()
    _seed_everything(spec.seed)
    encoder, head = build_model(spec.old, data.num_classes)
    old = train_model(encoder, head, old_train,
                      build_loss([LossTermSpec(name="classification")]), spec.old.train,
                      augment=augment, seed=spec.seed, log_path=log_path, progress=progress,
                      checkpoint_dir=out / "checkpoints" / "old" if save_checkpoints else None,
                      checkpoint_config={"role": "old", "model": spec.old.model_dump(mode="json"),
                                         "num_classes": data.num_classes},
                      desc="old")
    timing["train_old_s"] = time.perf_counter() - tick
    old_emb = _embed(old, data, batch, device, progress)

    # ---- new models ----------------------------------------------------------------
    new_models: dict[str, TrainedModel] = {}
    new_emb: dict[str, Embeddings] = {}
    upgrades: dict[str, UpgradedGallery] = {}
    for i, model_spec in enumerate(spec.new):
        tick = time.perf_counter()
        seed = spec.seed + 1 + i
        _seed_everything(seed)
        encoder, head = build_model(model_spec, data.num_classes)
        trained = train_model(
            encoder, head, new_train, build_loss(model_spec.losses), model_spec.train,
            augment=augment, seed=seed, old=old, old_feature_cache=model_spec.old_feature_cache,
            log_path=log_path, progress=progress, desc=model_spec.name,
            checkpoint_dir=out / "checkpoints" / model_spec.name if save_checkpoints else None,
            checkpoint_config={"role": "new", "model": model_spec.model_dump(mode="json"),
                               "num_classes": data.num_classes})
        timing[f"train_{model_spec.name}_s"] = time.perf_counter() - tick
        new_models[model_spec.name] = trained
        new_emb[model_spec.name] = _embed(trained, data, batch, device, progress)
        if model_spec.upgrader is not None:
            tick = time.perf_counter()
            upgrades[model_spec.name] = upgrade_gallery(
                model_spec.upgrader, old, trained, data, old_train, new_train, old_emb,
                augment, device, seed, batch, progress,
                out / "checkpoints" / model_spec.name / "upgrader" if save_checkpoints else None)
            timing[f"upgrade_{model_spec.name}_s"] = time.perf_counter() - tick

    # ---- evaluation ----------------------------------------------------------------
    tick = time.perf_counter()
    evaluation = evaluate_upgrade(spec, data, old_emb, new_emb, new_models, upgrades)
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
                       "stages": allocation.describe(np.asarray(data.train.labels))},
        "spec": spec.model_dump(mode="json"),
        "training": {"old": old.history, **{n: m.history for n, m in new_models.items()},
                     **{f"{n}/upgrader": u.history for n, u in upgrades.items()}},
        "evaluation": evaluation,
        "timing": timing,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_compatibility_bars(evaluation, spec.evaluation.primary, out / "compatibility.png",
                            title=spec.name)
    if evaluation.get("backfill"):
        plot_curves(evaluation, spec.evaluation.primary, out)
    return results


def check_new_training_sets(spec: ExperimentSpec, new_train) -> None:
    """Fail before any training when a new model's losses cannot get what they need from
    the data (e.g. contrastive negatives when the allocation leaves a single class)."""
    classes = len(np.unique(np.asarray(new_train.labels)))
    for model in spec.new:
        loss = build_loss(model.losses)
        if loss.min_classes_per_batch > classes:
            raise SpecError(
                f"new model '{model.name}': its losses need samples of "
                f"{loss.min_classes_per_batch} classes per batch, but the new training set "
                f"({spec.data.allocation.name}) has {classes} class(es); choose another "
                "allocation or loss")
        if len(new_train) < model.train.batch_size:
            raise SpecError(f"new model '{model.name}': the new training set has "
                            f"{len(new_train)} items, fewer than batch_size "
                            f"{model.train.batch_size}; lower new.train.batch_size")


def upgrade_gallery(spec: UpgraderSpec, old: TrainedModel, new: TrainedModel, data, old_train,
                    new_train, old_emb: Embeddings, augment, device, seed: int, batch: int,
                    progress: bool, checkpoint_dir: Path | None) -> UpgradedGallery:
    """Fit the upgrader on training features, then map the stored old gallery."""
    upgrader = get_registry().get("upgrader", spec.name).factory(
        spec.params_model(), input_dim=old.encoder.embedding_dim,
        output_dim=new.encoder.embedding_dim, side_dim=0)
    context = UpgradeContext(
        old_train=old_train, new_train=new_train, old_encoder=old.encoder,
        new_encoder=new.encoder,
        old_features=extract_features(old.encoder, new_train, batch, device, progress,
                                      "old features (upgrader)"),
        new_features=extract_features(new.encoder, new_train, batch, device, progress,
                                      "new features (upgrader)"),
        labels=torch.as_tensor(new_train.labels), new_head=new.head, augment=augment,
        device=device, seed=seed, progress=progress)
    history = upgrader.fit(context)
    upgrader = upgrader.cpu().eval()
    gallery_images = data.gallery if data.gallery is not None else data.query
    side = upgrader.side_information(gallery_images, batch_size=batch, progress=progress)
    features = torch.from_numpy(upgrader.upgrade(old_emb.gallery, side))
    uncertainty = (upgrader.uncertainty(old_emb.gallery, side)
                   if hasattr(upgrader, "uncertainty") else None)
    if checkpoint_dir is not None:
        save_state(checkpoint_dir, {"upgrader": upgrader},
                   {"role": "upgrader", "upgrader": spec.model_dump(mode="json"),
                    "input_dim": upgrader.input_dim, "output_dim": upgrader.output_dim,
                    "side_dim": upgrader.side_dim})
    images, _ = gallery_images.get_batch([0, 1])
    side_example = None if side is None else side[:2]
    side_dim = 0 if side is None else side.shape[1]
    cost = {
        "upgrade_macs_per_item": count_macs(upgrader, old_emb.gallery[:2], side_example),
        "reembed_macs_per_item": count_macs(new.encoder, images.to(device)),
        "stored_bytes_per_item": 4 * (old_emb.gallery.shape[1] + side_dim),
        "side_bytes_per_item": 4 * side_dim,
        "new_bytes_per_item": 4 * new.encoder.embedding_dim,
    }
    return UpgradedGallery(features, side, uncertainty, cost, history)


def evaluate_upgrade(spec: ExperimentSpec, data, old_emb: Embeddings,
                     new_emb: dict[str, Embeddings], new_models: dict[str, TrainedModel],
                     upgrades: dict[str, UpgradedGallery] | None = None) -> dict[str, Any]:
    """The compatibility table (o2o, n2o, n2u, n2n), BCT's criterion, backfill curves.

    n2u is new queries against the upgraded old gallery (BiCT's M_FCT, FCT's new/h(old, s));
    with an upgrader, the not-yet-backfilled part of the gallery is the upgraded one.
    """
    upgrades = upgrades or {}
    metrics = tuple(spec.evaluation.metrics)
    primary = spec.evaluation.primary
    loo = data.gallery is None
    q_labels = np.asarray(data.query.labels)
    g_labels = q_labels if loo else np.asarray(data.gallery.labels)

    def score(query: torch.Tensor, gallery: torch.Tensor) -> dict[str, float]:
        return evaluate(query, q_labels, gallery, g_labels, metrics=metrics, leave_one_out=loo)

    d_old = old_emb.gallery.shape[1]
    table: dict[str, dict[str, float]] = {"o2o": score(old_emb.query, old_emb.gallery)}
    for name, emb in new_emb.items():
        # New queries against an old gallery of another width: BCT's first-d_old rule.
        table[f"n2o/{name}"] = score(match_dim(emb.query, d_old), old_emb.gallery)
        if name in upgrades:
            table[f"n2u/{name}"] = score(emb.query, upgrades[name].features)
        table[f"n2n/{name}"] = score(emb.query, emb.gallery)

    paragon = spec.evaluation.paragon or _default_paragon(spec)
    criterion = {}
    for name in new_emb:
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
        curves: dict[str, dict[str, Any]] = {}
        registry = get_registry()
        for name in backfill.models or list(new_emb):
            emb = new_emb[name]
            upgrade = upgrades.get(name)
            before = old_emb.gallery if upgrade is None else upgrade.features
            if emb.query.shape[1] != before.shape[1]:
                log.warning("skipping the backfill curve of %s: its dim %d differs from the "
                            "stored gallery's %d (give it an upgrader)", name,
                            emb.query.shape[1], before.shape[1])
                continue
            state = GalleryState(
                old_features=old_emb.gallery.numpy(), new_features=emb.gallery.numpy(),
                new_head=new_models[name].head,
                upgraded=None if upgrade is None else upgrade.features.numpy(),
                side=None if upgrade is None or upgrade.side is None else upgrade.side.numpy(),
                uncertainty=None if upgrade is None else upgrade.uncertainty)
            curves[name] = {}
            for sched_spec in backfill.schedulers:
                scheduler = registry.get("scheduler", sched_spec.name).factory(
                    sched_spec.params_model())
                order = scheduler.order(state, seed=spec.seed)
                curve = backfill_curve(emb.query, before, emb.gallery, q_labels,
                                       g_labels, order, points=backfill.points, metrics=metrics,
                                       query_old=old_emb.query, nfr_k=tuple(backfill.nfr_k),
                                       leave_one_out=loo, reference_gallery=old_emb.gallery)
                curves[name][sched_spec.name] = {**curve.to_dict(),
                                                 "oracle": type(scheduler).is_oracle}
        result["backfill"] = curves
    if upgrades:
        result["upgrade_cost"] = {name: u.cost for name, u in upgrades.items()}
    return result


def _default_paragon(spec: ExperimentSpec) -> str | None:
    """The first new model trained with plain classification only (independent training)."""
    for model in spec.new:
        if [t.name for t in model.losses] == ["classification"]:
            return model.name
    return None


def format_table(evaluation: dict[str, Any]) -> str:
    """A plain-text compatibility table: one row per (setting, model), one column per metric."""
    metrics = evaluation["metrics"]
    rows = [("setting", *metrics)]
    for key, values in evaluation["table"].items():
        rows.append((key, *(f"{100 * values[m]:.2f}" for m in metrics)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    primary = evaluation["primary"]
    for name, entry in evaluation["criterion"].items():
        gain = entry.get("update_gain")
        lines.append(f"{name}: n2o > o2o on {primary} (BCT criterion): "
                     f"{'yes' if entry['compatible'] else 'no'}"
                     + (f"; update gain {gain:.3f}" if gain is not None else ""))
    for name, cost in evaluation.get("upgrade_cost", {}).items():
        lines.append(
            f"{name} upgrade per gallery item: {cost['upgrade_macs_per_item'] / 1e6:.3f} MMACs vs "
            f"{cost['reembed_macs_per_item'] / 1e6:.3f} MMACs to re-embed the image; stores "
            f"{cost['stored_bytes_per_item']} B (side info {cost['side_bytes_per_item']} B)")
    for name, by_scheduler in evaluation.get("backfill", {}).items():
        for scheduler, curve in by_scheduler.items():
            auc = curve["auc"][primary]
            nfr = curve.get("nfr", {})
            nfr_text = ", ".join(f"NFR@{k} max {100 * max(v):.2f}" for k, v in nfr.items())
            lines.append(f"backfill {name} ({scheduler}): AUC {primary} {100 * auc:.2f}"
                         + (f"; {nfr_text}" if nfr_text else ""))
    return "\n".join(lines)
