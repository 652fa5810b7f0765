"""``compatzoo run SPEC --dry-run``: every component of a lineage built at full size and
stepped once on a fake batch, so a paper-scale recipe is known to run before a GPU spends
hours on data loading and training.

Validation and planning check names, params and widths; what they cannot see fails only
when something is built or stepped: a head of 81,313 classes that does not fit, a loss
whose widths disagree once the old model's features arrive, an upgrader whose side
information is not the width it stores, an out-of-memory at the real image size. A dry
run builds each generation's encoder and head with the dataset's real class count, runs
one optimisation step of its real losses through the training loop (the previous
generation runs on the same fake batch, as in training), and steps every upgrader on
random features of its real widths (side information from its side encoder when it has
one), then reports parameter counts, losses and seconds.

Nothing is read from the dataset (the class count and image size come from the dataset's
declaration, see :mod:`compatzoo.data`, or ``--classes``) and nothing is written. Backbone
weights named in the spec are loaded when the file is there (so a wrong file fails here)
and replaced by a random initialisation, with a note, when it is not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from compatzoo.data.augment import AugmentParams, BatchAugment
from compatzoo.data.datasets import TensorImages
from compatzoo.engine import resolve_device, train_model
from compatzoo.engine.training import TrainedModel
from compatzoo.errors import CompatzooError, SpecError
from compatzoo.experiment import seed_everything
from compatzoo.interfaces import StoredGallery
from compatzoo.lineage import Generation, Hop, Lineage, plan
from compatzoo.specs import DatasetSpec, EncoderSpec, ExperimentSpec

#: the summary entries of a training epoch that are not losses
_NOT_LOSSES = ("epoch", "steps", "lr", "seconds")


class DryRunError(CompatzooError):
    """A component could not be built or stepped at full size."""


@dataclass
class StepReport:
    """One component's dry-run step: trainable parameters by part, its losses, seconds."""

    name: str
    parameters: dict[str, int]
    losses: dict[str, float]
    seconds: float
    notes: list[str] = field(default_factory=list)


@dataclass
class DryRun:
    """What a dry run used and what each generation and hop did."""

    spec: str
    num_classes: int
    classes_from: str
    image_size: int
    batch: int
    generations: list[StepReport]
    hops: list[StepReport]


def dataset_shape(dataset: DatasetSpec, classes: int | None = None) -> tuple[int, str, int]:
    """The training class count (and where it came from) and the image side a dataset
    declares from its params (``num_classes_of``, ``image_size_of`` or ``params.image_size``);
    ``classes`` overrides the count."""
    component, params = dataset.component, dataset.validated
    declared = getattr(component, "num_classes_of", None)
    known = declared(params) if declared is not None else None
    if classes is None and known is None:
        raise SpecError(
            f"dataset '{dataset.name}' cannot tell its class count without reading its files; "
            "give it with --classes N (e.g. 1000 for ImageNet-1k), the number of classes its "
            "training set has")
    size_of = getattr(component, "image_size_of", None)
    size = size_of(params) if size_of is not None else getattr(params, "image_size", None)
    if not isinstance(size, int):
        raise SpecError(f"dataset '{dataset.name}' declares no image size (an image_size "
                        "param or image_size_of(params)); a dry run needs it to make images")
    if classes is not None:
        return classes, "given with --classes", size
    return known, f"declared by dataset '{dataset.name}'", size


def fake_batch(spec: ExperimentSpec, num_classes: int, image_size: int, size: int,
               min_classes: int = 1) -> TensorImages:
    """Random images of the dataset's size. Their labels come in pairs where the losses
    allow (per-class statistics, e.g. AdvBCT's class boundaries or MixBCT's credible
    features, need two items of a class) and span the class ids from the last one down,
    so a head too narrow for the data's classes fails."""
    generator = torch.Generator().manual_seed(spec.seed)
    images = torch.randint(0, 256, (size, 3, image_size, image_size), dtype=torch.uint8,
                           generator=generator)
    classes = min(max(min_classes, (size + 1) // 2), num_classes)
    ids = torch.linspace(num_classes - 1, 0, classes).round().long()
    labels = ids[torch.arange(size) * classes // size]
    params = spec.data.dataset.validated
    mean = getattr(params, "mean", (0.5, 0.5, 0.5))
    std = getattr(params, "std", (0.25, 0.25, 0.25))
    return TensorImages(images, labels.numpy(), mean, std)


def _parameters(module: torch.nn.Module, besides: torch.nn.Module | None = None) -> int:
    """Trainable parameters of ``module``, those of ``besides`` (a part counted apart) left
    out."""
    apart = set() if besides is None else {id(p) for p in besides.parameters()}
    return sum(p.numel() for p in module.parameters() if p.requires_grad and id(p) not in apart)


def _build_encoder(spec: EncoderSpec) -> tuple[torch.nn.Module, list[str]]:
    """The encoder; backbone weights the spec names but this machine lacks become a random
    initialisation, noted (the run itself still needs them)."""
    params = spec.validated
    weights = getattr(params, "weights", None)
    if weights is not None and not Path(weights).is_file():
        return (spec.component(params.model_copy(update={"weights": None})),
                [f"weights {weights} not found here: random initialisation"])
    return spec.build(), []


def step_generation(generation: Generation, num_classes: int, images: TensorImages,
                    augment: BatchAugment, models: dict[str, TrainedModel]) -> StepReport:
    """Build ``generation`` at full size and train it for one step on ``images`` through
    the training loop, against the model it follows."""
    started = time.perf_counter()
    seed_everything(generation.seed)
    encoder, notes = _build_encoder(generation.model.encoder)
    if encoder.embedding_dim != generation.embedding_dim:
        raise DryRunError(f"its encoder outputs {encoder.embedding_dim}-d embeddings, but "
                          f"its params declare {generation.embedding_dim}")
    head = generation.model.head.build(embedding_dim=generation.embedding_dim,
                                       num_classes=num_classes)
    loss = generation.build_loss()
    one_step = generation.model.train.model_copy(update={
        "epochs": 1, "batch_size": len(images), "warmup_epochs": 0.0, "num_workers": 0})
    models[generation.name] = train_model(
        encoder, head, images, loss, one_step, augment=augment, seed=generation.seed,
        old=models.get(generation.previous), old_feature_cache=generation.old_feature_cache,
        progress=False, desc=generation.name)
    summary = models[generation.name].history[-1]
    parameters = {"encoder": _parameters(encoder), "head": _parameters(head)}
    if _parameters(loss):
        parameters["loss"] = _parameters(loss)
    return StepReport(generation.name, parameters,
                      {k: v for k, v in summary.items() if k not in _NOT_LOSSES},
                      time.perf_counter() - started, notes)


def step_hop(lineage: Lineage, hop: Hop, images: TensorImages,
             augment: BatchAugment) -> StepReport:
    """Build ``hop``'s upgrader at full size and step it once: its side encoder (if any)
    forward and backward on the fake images, then the upgrader forward and backward on
    random stored embeddings of its input width (with that side information) against
    random targets of its output width; its published signals are computed too."""
    started = time.perf_counter()
    target = lineage.generations[hop.target]
    device = resolve_device(target.model.train.device)
    seed_everything(target.seed)
    upgrader = hop.build().to(device).train()
    batch = len(images)
    side_encoder = upgrader.side_encoder()
    parameters, losses = {"upgrader": _parameters(upgrader, besides=side_encoder)}, {}
    side = (torch.randn(batch, upgrader.side_dim, device=device) if upgrader.side_dim
            else None)
    if side_encoder is not None:
        pixels = augment(images.get_batch(range(batch))[0]).to(device)
        side = side_encoder.train()(pixels)
        if tuple(side.shape) != (batch, upgrader.side_dim):
            raise DryRunError(f"its side encoder gives {tuple(side.shape[1:])} per image, "
                              f"but it stores {upgrader.side_dim} values per item")
        losses["side"] = side.float().square().mean()
        losses["side"].backward()
        side = side.detach()
        parameters["side encoder"] = _parameters(side_encoder)
    old = torch.randn(batch, hop.input_dim, device=device)
    output = upgrader(old, side)
    if tuple(output.shape) != (batch, hop.output_dim):
        raise DryRunError(f"it maps ({batch}, {hop.input_dim}) to {tuple(output.shape)}, "
                          f"not ({batch}, {hop.output_dim})")
    losses["mse"] = F.mse_loss(output.float(), torch.randn(batch, hop.output_dim,
                                                          device=device))
    if output.requires_grad:
        losses["mse"].backward()
    signals = upgrader.eval().signals(StoredGallery(old.cpu(), None if side is None
                                                    else side.cpu()))
    for name in upgrader.publishes:
        if name not in signals or len(signals[name]) != batch:
            raise DryRunError(f"it publishes the signal '{name}' but gives no value per "
                              "stored item for it")
    notes = [] if output.requires_grad else ["no trainable parameters before its fit"]
    return StepReport(f"{hop.label} ({hop.source} -> {hop.target})", parameters,
                      {k: float(v.detach()) for k, v in losses.items()},
                      time.perf_counter() - started, notes)


def _guarded(what: str, step, *args) -> StepReport:
    """A step whose failure, whatever raised it (a torch shape error, an out-of-memory),
    becomes a :class:`DryRunError` naming the component: reporting what does not run is
    the dry run's purpose. ``--debug`` shows the traceback."""
    try:
        return step(*args)
    except CompatzooError as exc:
        raise DryRunError(f"dry run: {what}: {exc}") from exc
    except Exception as exc:
        raise DryRunError(f"dry run: {what} failed its step at full size: "
                          f"{type(exc).__name__}: {exc} (--debug shows where)") from exc


def dry_run(spec: ExperimentSpec, classes: int | None = None,
            batch: int | None = None) -> DryRun:
    """Plan ``spec``, then build and step every generation (oldest first) and every hop.
    ``batch`` defaults to the smallest batch every loss accepts (at least 2)."""
    lineage = plan(spec)
    num_classes, classes_from, image_size = dataset_shape(spec.data.dataset, classes)
    smallest_classes = max(g.min_batch_classes for g in lineage.generations.values())
    smallest = max(2, smallest_classes)
    batch = batch or smallest
    if batch < smallest:
        raise SpecError(f"a fake batch of {batch} is too small: a training step takes at "
                        f"least 2 images, and these losses need samples of {smallest_classes} "
                        f"classes; give --fake-batch {smallest} or more")
    images = fake_batch(spec, num_classes, image_size, batch, smallest_classes)
    augment = BatchAugment(AugmentParams.model_validate(spec.data.augment))
    models: dict[str, TrainedModel] = {}
    generations = [_guarded(g.who, step_generation, g, num_classes, images, augment, models)
                   for g in lineage.generations.values()]
    hops = [_guarded(f"upgrader '{hop.label}' of new model '{hop.target}'", step_hop,
                     lineage, hop, images, augment) for hop in lineage.hops.values()]
    return DryRun(spec.name, num_classes, classes_from, image_size, batch, generations, hops)


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def format_dry_run(result: DryRun) -> str:
    """One line per generation and hop: parameters, losses, seconds, notes."""
    lines = [(f"dry run of {result.spec}: {result.num_classes} classes "
              f"({result.classes_from}), {result.image_size} px images, a fake batch of "
              f"{result.batch}")]
    for title, reports in (("generation", result.generations), ("upgrader", result.hops)):
        for r in reports:
            parameters = " + ".join(f"{part} {_millions(n)}" for part, n in r.parameters.items())
            parts = {k: v for k, v in r.losses.items() if k != "loss"}
            losses = (f"loss {r.losses['loss']:.4g} " if "loss" in r.losses else "loss ") + (
                f"({', '.join(f'{k} {v:.4g}' for k, v in parts.items())})" if parts else "")
            lines.append(f"  {title} {r.name}: {parameters} parameters; {losses.rstrip()}; "
                         f"{r.seconds:.1f} s" + "".join(f"; {n}" for n in r.notes))
    lines.append("every component built at full size and stepped once; no data read, "
                 "nothing written")
    return "\n".join(lines)
