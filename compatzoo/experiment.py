"""Run a validated experiment spec end to end, as phases with plain inputs and outputs:

    plan(spec) -> Lineage                                   compatzoo.lineage
    load_data(lineage) -> RunData
    train(lineage, run, options) -> {generation: TrainedModel}
    embed(models, run, options) -> {generation: Embeddings}
    fit_upgraders(lineage, run, models, embeddings, options) -> Upgrades
    evaluate_run(lineage, run, models, embeddings, upgrades) -> evaluation   compatzoo.evaluation
    write(report, output_dir)                               compatzoo.report

Data flows one way: each phase receives what the earlier ones returned, and plugins
receive data (``HopData``), never a way back into the run. Each phase seeds the global
RNG itself (a generation's encoder, head and hops are built under its seed), so the
result of a phase does not depend on what ran before it.

Under ``torchrun`` every rank runs the phases up to the evaluation (training
data-parallel, embeddings split and gathered); rank 0 alone evaluates and writes
(:mod:`compatzoo.distributed`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compatzoo import distributed
from compatzoo.data.allocations import Allocation
from compatzoo.data.augment import AugmentParams, BatchAugment
from compatzoo.data.datasets import LabeledImages, RetrievalData
from compatzoo.engine import (TrainedModel, extract_features, load_state, resolve_device,
                              save_state, train_model)
from compatzoo.engine.checkpoints import FIT_STATE, load_fit_state
from compatzoo.engine.training import check_batches
from compatzoo.errors import CompatzooError, SpecError, StorageError
from compatzoo.interfaces import GalleryUpgrader, HopData, StoredGallery
from compatzoo.lineage import ROOT, Hop, Lineage, advance, carry, plan
from compatzoo.retrieval.revisited import REVISITED_METRICS
from compatzoo.run_folder import Mode, RunFolder, data_fingerprint
from compatzoo.specs import ExperimentSpec


@dataclass
class RunData:
    """The run's images: the dataset, the allocation and each generation's training set."""

    data: RetrievalData
    allocation: Allocation
    stages: dict[str, int]                   # generation -> index of its training set
    train_sets: dict[str, LabeledImages]     # generation -> its training images
    augment: BatchAugment

    @property
    def leave_one_out(self) -> bool:
        """No separate gallery: the query set is the gallery, each query left out (FCT)."""
        return self.data.gallery is None

    @property
    def gallery_images(self) -> LabeledImages:
        return self.data.query if self.data.gallery is None else self.data.gallery


@dataclass(frozen=True)
class RunOptions:
    """How a run executes, as opposed to what it computes (the spec)."""

    progress: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 512                    # feature extraction
    checkpoints: Path | None = None          # folder of checkpoints/<generation>/...
    log_path: Path | None = None             # per-step training log (JSON lines)
    folder: RunFolder | None = None          # finished stages to reload, not redo
    save_every: int = 0                      # steps between training states (0: epochs)
    num_workers: int = 0                     # DataLoader workers decoding for extraction


@dataclass
class Embeddings:
    query: torch.Tensor
    gallery: torch.Tensor   # the query set itself under leave-one-out


@dataclass
class FittedHop:
    """A hop's fitted upgrader and the stored galleries it starts from.

    ``source_gallery`` is the gallery the source generation embedded, stored with the
    side information this hop reads; ``entering`` is the gallery that enters the hop on
    the way from the old one (for a hop outside the chain, the source's own gallery).
    """

    hop: Hop
    upgrader: GalleryUpgrader
    history: list[dict[str, float]]
    source_gallery: StoredGallery
    entering: StoredGallery
    seconds: float = 0.0


@dataclass
class Upgrades:
    """Every fitted hop and the stored galleries they produced.

    ``carried[(j, i)]`` is the gallery embedded by generation j and carried to generation
    i through the chain hops between them (unchanged across a generation without one);
    ``direct[label]`` is the source's gallery after a hop outside the chain;
    ``queries[label]`` the target's queries mapped into the old space by a query hop.
    """

    hops: dict[str, FittedHop] = field(default_factory=dict)
    carried: dict[tuple[str, str], StoredGallery] = field(default_factory=dict)
    direct: dict[str, StoredGallery] = field(default_factory=dict)
    queries: dict[str, torch.Tensor] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


# --------------------------------------------------------------------------- phases
def load_data(lineage: Lineage) -> RunData:
    """The dataset, its allocation and every generation's training set, with the checks
    that need the data (stages, the batch rule) run for every generation before any
    training."""
    spec = lineage.spec
    data = spec.data.dataset.build()
    check_metrics(spec.evaluation.metrics, data)
    labels = np.asarray(data.train.labels)
    allocation = spec.data.allocation.build(labels=labels, seed=spec.seed)
    stages = {name: lineage.resolve_stage(name, len(allocation.stages))
              for name in lineage.generations}
    train_sets = {name: data.train.subset(allocation.stages[stage])
                  for name, stage in stages.items()}
    for name, generation in lineage.generations.items():
        check_batches(train_sets[name].labels, generation.model.train.batch_size,
                      generation.min_batch_classes, generation.who)
        check_head(generation, data.num_classes)
    augment = BatchAugment(AugmentParams.model_validate(spec.data.augment))
    return RunData(data, allocation, stages, train_sets, augment)


def check_head(generation, num_classes: int) -> None:
    """Build the generation's head once, the RNG left as it was: a head that cannot serve
    the data's classes (a fixed classifier too narrow for them) fails here, before any
    model trains, not when its generation's turn comes."""
    try:
        with torch.random.fork_rng(devices=[]):
            generation.model.head.build(embedding_dim=generation.embedding_dim,
                                        num_classes=num_classes)
    except CompatzooError as exc:
        raise SpecError(f"{generation.who}: its head cannot serve this data's "
                        f"{num_classes} classes: {exc}") from None


def check_metrics(metrics: list[str], data: RetrievalData) -> None:
    """Metrics the data can score: revisitop mAP (``rmap-*``) where the dataset gives
    per-query ground truth (Revisited Oxford/Paris), label metrics everywhere else."""
    revisited = [m for m in metrics if m in REVISITED_METRICS]
    if data.relevance is not None and len(revisited) != len(metrics):
        raise SpecError(
            f"dataset {data.name!r} is scored by its per-query ground truth (revisitop), not "
            f"by labels, so evaluation.metrics must come from {list(REVISITED_METRICS)}; "
            f"found {metrics}. Use e.g. metrics: [rmap-medium, rmap-hard], primary: rmap-medium")
    if data.relevance is None and revisited:
        raise SpecError(
            f"{revisited} need a dataset with per-query ground truth (revisited, or gldv2 with "
            f"a revisited block); dataset {data.name!r} is scored by labels: use e.g. "
            "map@100, cmc@1")


def train(lineage: Lineage, run: RunData, options: RunOptions) -> dict[str, TrainedModel]:
    """Every generation, oldest first, each against the model it follows. A generation
    the run folder records as trained is loaded, one with a saved training state goes on
    from it."""
    models: dict[str, TrainedModel] = {}
    num_classes = run.data.num_classes
    folder = options.folder
    for name, generation in lineage.generations.items():
        started = time.perf_counter()
        seed_everything(generation.seed)
        encoder, head = generation.build(num_classes)
        stage = f"train/{name}"
        state_path = None if options.checkpoints is None else (
            options.checkpoints / name / FIT_STATE)
        if folder is not None and folder.done(stage):
            models[name] = _load_trained(encoder, head, run.train_sets[name], generation,
                                         options.checkpoints / name, folder.done(stage))
            if distributed.is_main():
                state_path.unlink(missing_ok=True)  # left by a stop right after the record
            continue
        resume = None
        if folder is not None and state_path is not None and state_path.exists():
            resume = load_fit_state(state_path)
        elif folder is not None and options.log_path and options.log_path.exists():
            with open(options.log_path, "r+b") as log:   # lines of an unfinished attempt
                log.truncate(folder.log_offset())
        models[name] = train_model(
            encoder, head, run.train_sets[name], generation.build_loss(),
            generation.model.train, augment=run.augment, seed=generation.seed,
            old=models.get(generation.previous), old_feature_cache=generation.old_feature_cache,
            log_path=options.log_path, progress=options.progress, desc=name,
            checkpoint_dir=None if options.checkpoints is None else options.checkpoints / name,
            checkpoint_config=generation.record(num_classes), resume=resume,
            fit_state_path=state_path, save_every=options.save_every)
        models[name].seconds = time.perf_counter() - started
        if folder is not None and options.checkpoints is not None:
            folder.mark_done(stage, {
                "seconds": models[name].seconds, "history": models[name].history,
                "log_offset": options.log_path.stat().st_size
                if options.log_path and options.log_path.exists() else 0,
                "resumed_from": None if resume is None else {
                    "epoch": resume.epoch + 1, "step": resume.step}})
        if state_path is not None and distributed.is_main():
            state_path.unlink(missing_ok=True)
    return models


def _load_trained(encoder, head, items: LabeledImages, generation, directory: Path,
                  record: dict[str, Any]) -> TrainedModel:
    """A generation trained in an earlier session of the run, from its checkpoint."""
    load_state(directory, {"encoder": encoder, "head": head})
    device = resolve_device(generation.model.train.device)
    return TrainedModel(encoder.to(device).eval(), head.to(device).eval(),
                        torch.unique(torch.as_tensor(items.labels)), list(record["history"]),
                        record["seconds"])


def embed(models: dict[str, TrainedModel], run: RunData,
          options: RunOptions) -> dict[str, Embeddings]:
    """Every generation's query and gallery embeddings."""

    def features(model: TrainedModel, images: LabeledImages, what: str) -> torch.Tensor:
        return extract_features(model.encoder, images, options.batch_size, options.device,
                                options.progress, f"embed {what}", options.num_workers)

    out = {}
    for name, model in models.items():
        query = features(model, run.data.query, "query")
        out[name] = Embeddings(query, query if run.leave_one_out
                               else features(model, run.data.gallery, "gallery"))
    return out


def fit_upgraders(lineage: Lineage, run: RunData, models: dict[str, TrainedModel],
                  embeddings: dict[str, Embeddings], options: RunOptions) -> Upgrades:
    """Fit every hop on its target's training set, oldest target first, and carry the
    stored galleries through each fitted hop at once."""
    upgrades = Upgrades()
    folder = options.folder
    for name in lineage.new:
        generation = lineage.generations[name]
        items = run.train_sets[name]
        features = _ItemFeatures(models, items, options)
        seed_everything(generation.seed)
        finished = None if folder is None else folder.done(f"upgrade/{name}")
        for hop in lineage.hops_into(name):
            started = time.perf_counter()
            upgrader = hop.build()
            if finished is not None:       # fitted in an earlier session of the run
                load_state(options.checkpoints / name / hop.folder, {"upgrader": upgrader})
                history = finished["hops"][hop.label]["history"]
            else:
                before = lineage.chain_hop(hop.source)
                stored = (_stored_items(lineage, upgrades, hop.source, features[ROOT], items,
                                        options)
                          if upgrader.fits_on_stored and hop.source != ROOT else None)
                history = upgrader.fit(HopData(
                    old_features=features[hop.source], new_features=features[name],
                    labels=torch.as_tensor(items.labels), stored=stored,
                    new_head=models[name].head, old_train=run.train_sets[hop.source],
                    new_train=items, augment=run.augment, device=options.device,
                    source_encoder=models[hop.source].encoder,
                    target_encoder=models[name].encoder,
                    previous_upgrader=(None if before is None
                                       else upgrades.hops[before.label].upgrader),
                    seed=generation.seed, progress=options.progress))
            upgrader = upgrader.cpu().eval()
            if options.checkpoints is not None and finished is None and distributed.is_main():
                save_state(options.checkpoints / name / hop.folder, {"upgrader": upgrader},
                           hop.record(upgrader))
            seconds = (finished["hops"][hop.label]["seconds"] if finished is not None
                       else time.perf_counter() - started)
            if hop.maps_queries:           # the stored gallery stays; the queries move
                queries = StoredGallery(embeddings[name].query)
                upgrades.queries[hop.label] = torch.from_numpy(upgrader.upgrade(
                    queries.features))
                upgrades.hops[hop.label] = FittedHop(
                    hop, upgrader, history, StoredGallery(embeddings[ROOT].gallery), queries,
                    seconds)
                continue
            # The source's gallery as stored, with the side information this hop reads.
            side = upgrader.side_information(run.gallery_images, options.batch_size,
                                             options.progress)
            source_gallery = StoredGallery(embeddings[hop.source].gallery, side)
            entering = (upgrades.carried[(ROOT, hop.source)]
                        if hop.in_chain and hop.source != ROOT else source_gallery)
            upgrades.hops[hop.label] = FittedHop(hop, upgrader, history, source_gallery,
                                                 entering, seconds)
            if not hop.in_chain:
                upgrades.direct[hop.label] = upgrader.advance(source_gallery)
        _carry_chain(lineage, upgrades, embeddings, name)
        if folder is not None and finished is None and options.checkpoints is not None:
            folder.mark_done(f"upgrade/{name}", {"hops": {
                hop.label: {"history": upgrades.hops[hop.label].history,
                            "seconds": upgrades.hops[hop.label].seconds}
                for hop in lineage.hops_into(name)}})
    return upgrades


class _ItemFeatures(dict):
    """Any generation's features of one generation's training items, extracted once."""

    def __init__(self, models: dict[str, TrainedModel], items: LabeledImages,
                 options: RunOptions):
        super().__init__()
        self.models, self.items, self.options = models, items, options

    def __missing__(self, name: str) -> torch.Tensor:
        self[name] = extract_features(self.models[name].encoder, self.items,
                                      self.options.batch_size, self.options.device,
                                      self.options.progress, f"{name} features (upgrader)",
                                      self.options.num_workers)
        return self[name]


def _carry_chain(lineage: Lineage, upgrades: Upgrades, embeddings: dict[str, Embeddings],
                 name: str) -> None:
    """``carried[(j, name)]`` for every j before ``name`` on its chain: one more step
    from ``carried[(j, previous)]``, or from the previous generation's own gallery."""
    previous = lineage.generations[name].previous
    hop = lineage.chain_hop(name)
    fitted = None if hop is None else upgrades.hops[hop.label]
    for start in lineage.path(name)[:-1]:
        if start != previous:
            entering = upgrades.carried[(start, previous)]
        elif fitted is None:
            entering = StoredGallery(embeddings[previous].gallery)
        else:
            entering = fitted.source_gallery
        upgrades.carried[(start, name)] = advance(None if fitted is None else fitted.upgrader,
                                                  entering)


def _stored_items(lineage: Lineage, upgrades: Upgrades, source: str, root_features: torch.Tensor,
                  items: LabeledImages, options: RunOptions) -> StoredGallery:
    """The items as the chain stores them at ``source``: embedded by the old model (with
    the side information the first hop reads) and carried through the fitted hops."""
    steps = [None if hop is None else upgrades.hops[hop.label].upgrader
             for hop in lineage.steps(ROOT, source)]
    return carry(steps, root_features,
                 lambda first: first.side_information(items, options.batch_size,
                                                      options.progress))[-1]


def run_experiment(spec: ExperimentSpec, output_dir: str | Path, progress: bool = True,
                   save_checkpoints: bool = True, save_bundles: bool = True,
                   mode: Mode = "new", save_every: int = 0,
                   check_data: bool = False) -> dict[str, Any]:
    """Train and evaluate everything the spec describes; write results (and a bundle per
    new model, ``bundles/<name>/``) under output_dir and return the results (the content
    of ``results.json``).

    ``mode``: ``new`` needs a missing or empty folder, ``resume`` continues the run in it
    (the same spec and data; finished stages are reloaded, a training goes on from its
    last saved state), ``overwrite`` replaces the run in it. ``save_every`` saves the
    training state every that many steps besides each epoch end. ``check_data`` decodes
    every image once before any training. All of it is checked before any training."""
    try:
        return _run_experiment(spec, Path(output_dir), progress, save_checkpoints,
                               save_bundles, mode, save_every, check_data)
    except OSError as exc:             # the machine's refusals, as messages
        raise StorageError.from_os_error(exc) from exc


def _run_experiment(spec: ExperimentSpec, out: Path, progress: bool, save_checkpoints: bool,
                    save_bundles: bool, mode: Mode, save_every: int,
                    check_data: bool) -> dict[str, Any]:
    from compatzoo.data.checks import check_retrieval_labels, scan_images

    started = time.perf_counter()
    lineage = plan(spec)
    folder = RunFolder.claim(out, spec.model_dump(mode="json"), mode,
                             {"checkpoints": save_checkpoints, "bundles": save_bundles,
                              "processes": distributed.world_size()})
    folder.writer = distributed.is_main()
    distributed.barrier()              # every rank has read the folder before rank 0 writes
    if folder.finished:
        return json.loads((out / "results.json").read_text())
    tick = time.perf_counter()
    run = load_data(lineage)
    check_retrieval_labels(run.data)
    if check_data:
        distributed.on_main(lambda: scan_images(
            {"train": run.data.train, "query": run.data.query,
             **({} if run.data.gallery is None else {"gallery": run.data.gallery})},
            progress=progress))
    timing = {"data_s": time.perf_counter() - tick}
    fingerprint = data_fingerprint(run.data)
    distributed.on_main(lambda: folder.begin(fingerprint))
    if not folder.writer:
        folder.begin(fingerprint)      # the same record, in memory
    options = RunOptions(progress=progress and distributed.is_main(),
                         device=resolve_device(spec.old.train.device),
                         batch_size=spec.evaluation.batch_size,
                         checkpoints=out / "checkpoints" if save_checkpoints else None,
                         log_path=out / "train_log.jsonl" if distributed.is_main() else None,
                         folder=folder, save_every=save_every,
                         num_workers=spec.old.train.num_workers)
    models = train(lineage, run, options)
    embeddings = embed(models, run, options)
    upgrades = fit_upgraders(lineage, run, models, embeddings, options)
    # Rank 0 evaluates and writes; the others wait, so a failure there stops them too.
    return distributed.on_main(lambda: _evaluate_and_write(
        lineage, run, models, embeddings, upgrades, folder, save_bundles, timing,
        started)) or {}


def _evaluate_and_write(lineage: Lineage, run: RunData, models: dict[str, TrainedModel],
                        embeddings: dict[str, Embeddings], upgrades: Upgrades,
                        folder: RunFolder, save_bundles: bool, timing: dict[str, float],
                        started: float) -> dict[str, Any]:
    from compatzoo.evaluation import evaluate_run
    from compatzoo.report import Report, write

    spec = lineage.spec
    tick = time.perf_counter()
    evaluation = evaluate_run(lineage, run, models, embeddings, upgrades)
    timing.update({f"train_{name}_s": model.seconds for name, model in models.items()})
    hops = [upgrades.hops[label] for label in lineage.hops]
    timing.update({f"upgrade_{f.hop.label}_s": f.seconds for f in hops})
    timing["evaluate_s"] = time.perf_counter() - tick
    timing["total_s"] = time.perf_counter() - started
    preprocess = run.data.preprocess
    report = Report(
        spec=spec, dataset={**run.data.info, "preprocess": None if preprocess is None
                            else preprocess.model_dump(mode="json")},
        allocation={"name": spec.data.allocation.name,
                    "stages": run.allocation.describe(np.asarray(run.data.train.labels)),
                    "models": dict(run.stages)},
        training={**{name: model.history for name, model in models.items()},
                  **{f"{f.hop.label}/upgrader": f.history for f in hops}},
        evaluation=evaluation, timing=timing)
    staging = folder.staging()           # results, plots and bundles appear together
    write(report, staging)
    if save_bundles:
        write_bundles(lineage, run, models, upgrades, evaluation, staging / "bundles")
    folder.publish(staging)
    folder.finish()
    return report.to_dict()


def write_bundles(lineage: Lineage, run: RunData, models: dict[str, TrainedModel],
                  upgrades: Upgrades, evaluation: dict[str, Any], folder: Path) -> list[Path]:
    """One bundle per new model: the model it follows, itself and its chain hop."""
    from compatzoo.bundles import write_bundle
    from compatzoo.bundles.from_run import run_bundle

    encoders = {name: model.encoder for name, model in models.items()}
    heads = {name: model.head for name, model in models.items()}
    paths = []
    for name in lineage.new:
        hop = lineage.chain_hop(name)
        contents = run_bundle(lineage, name, encoders, heads,
                              None if hop is None else upgrades.hops[hop.label].upgrader,
                              run.data.num_classes, run.data.preprocess, evaluation)
        write_bundle(folder / name, contents)
        paths.append(folder / name)
    return paths
