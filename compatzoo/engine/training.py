"""Training an encoder and its head with a (compatibility) loss.

The loop computes only what the active losses declare: the old encoder runs only when a
loss needs old features of the augmented views, and the old-feature cache (phi_old over
the training set, computed once) stands in where it is exact or allowed. Optimisation
itself is the shared loop of :mod:`compatzoo.engine.fitting`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from compatzoo import distributed
from compatzoo.engine.checkpoints import save_fit_state, save_state
from compatzoo.engine.features import extract_features
from compatzoo.engine.fitting import FitState, StepLog, fit_epochs, global_batch
from compatzoo.engine.loading import BatchLoader
from compatzoo.errors import SpecError, TrainingDivergedError
from compatzoo.interfaces import (OLD_MODEL_INPUTS, ClassifierHead, Encoder, FeatureCache,
                                  LossInputs, TrainingContext, WeightedLoss)

if TYPE_CHECKING:
    from compatzoo.specs import TrainSpec

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """An encoder with the head it was trained with and the classes it has seen."""

    encoder: Encoder
    head: ClassifierHead
    classes: torch.Tensor
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: under torchrun with NCCL, this rank's GPU; else CUDA when present."""
    if name == "auto":
        if torch.cuda.is_available():
            if distributed.is_distributed() and torch.distributed.get_backend() == "nccl":
                return torch.device("cuda", torch.cuda.current_device())
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(name)


def on_cuda(setting, device: torch.device) -> bool:
    """A speed switch that is ``auto`` (on where the device is a GPU), true or false."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def speed_up(encoder: Encoder, cfg: TrainSpec, device: torch.device) -> bool:
    """The GPU speed paths a train block asks for, applied to ``encoder``; returns whether
    inputs should be channels-last too. On a CPU with the defaults nothing changes."""
    channels_last = on_cuda(cfg.channels_last, device)
    if channels_last:
        encoder.to(memory_format=torch.channels_last)
    if cfg.compile:
        encoder.compile()        # in place: the state dict keeps its keys
    return channels_last


def check_batches(labels, batch_size: int, min_classes: int, who: str) -> None:
    """The batch rule: a loss that contrasts classes needs ``min_classes`` classes in every
    batch, so in the batch and in the training set; and a training set holds at least one
    batch. ``labels`` None checks the batch size alone (before any data is loaded)."""
    if min_classes > 1 and batch_size < min_classes:
        raise SpecError(f"{who}: its losses need samples of {min_classes} classes in every "
                        f"batch (negatives), but batch_size is {batch_size}; raise "
                        "train.batch_size")
    if labels is None:
        return
    classes = len(np.unique(np.asarray(labels)))
    if min_classes > 1 and classes < min_classes:
        raise SpecError(f"{who}: its losses need samples of {min_classes} classes in every "
                        f"batch, but its training set has {classes} class(es); choose another "
                        "allocation or loss")
    if len(labels) < batch_size:
        raise SpecError(f"{who}: its training set has {len(labels)} items, fewer than "
                        f"batch_size {batch_size}; lower train.batch_size")
    global_batch(batch_size, len(labels), who)      # shared equally by the processes


class _OldBranch:
    """Provides old features per step from the live old encoder or the cache."""

    def __init__(self, old: TrainedModel, dataset, needs: frozenset[str], policy: str,
                 augment_is_identity: bool, device: torch.device, batch_size: int,
                 progress: bool, num_workers: int = 0):
        self.encoder = old.encoder.to(device).eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.needs = needs
        # Cached features are of un-augmented images: exact when augmentation is off,
        # an approximation the user may allow for the same-view term with "always".
        allowed = policy != "never"
        self.cached_view1 = ("old_features" in needs and allowed
                             and (policy == "always" or augment_is_identity))
        self.cached_view2 = "old_features_view2" in needs and allowed and augment_is_identity
        self.cache: FeatureCache | None = None
        if "old_feature_cache" in needs or self.cached_view1 or self.cached_view2:
            features = extract_features(self.encoder, dataset, batch_size, device, progress,
                                        desc="old-feature cache", num_workers=num_workers)
            # On a GPU the cache stays there: a step then gathers its rows without a copy.
            self.cache = FeatureCache(features.to(device) if device.type == "cuda" else features,
                                      torch.as_tensor(dataset.labels))
        self.device = device

    @torch.no_grad()
    def features(self, indices: torch.Tensor, view1: torch.Tensor,
                 view2: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if "old_features" in self.needs:
            out["old_features"] = (self.cache.features[indices].to(self.device)
                                   if self.cached_view1 else self.encoder(view1))
        if "old_features_view2" in self.needs:
            out["old_features_view2"] = (self.cache.features[indices].to(self.device)
                                         if self.cached_view2 else self.encoder(view2))
        return out


def train_model(
    encoder: Encoder,
    head: ClassifierHead,
    dataset,
    loss: WeightedLoss,
    cfg: TrainSpec,
    *,
    augment: Callable[..., torch.Tensor],
    seed: int,
    old: TrainedModel | None = None,
    old_feature_cache: str = "auto",
    log_path: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_config: dict[str, Any] | None = None,
    progress: bool = True,
    desc: str = "train",
    resume: FitState | None = None,
    fit_state_path: str | Path | None = None,
    save_every: int = 0,
) -> TrainedModel:
    """Train ``encoder`` + ``head`` on ``dataset`` with ``loss``; returns the trained model.

    ``old`` is required when a loss declares old inputs. ``checkpoint_dir`` receives the
    weights after every epoch, so a diverging run can name its last good state.
    ``fit_state_path`` receives the whole training state (:class:`FitState`) at every
    epoch end and every ``save_every`` steps; ``resume`` continues from such a state with
    the results of a training never stopped.
    """
    device = resolve_device(cfg.device)
    needs = loss.required_inputs
    old_needs = needs & OLD_MODEL_INPUTS
    if old_needs and old is None:
        raise SpecError(f"{desc}: its losses need {sorted(old_needs)} from an old model, but "
                        "none was given")
    check_batches(dataset.labels, cfg.batch_size, loss.min_classes_per_batch, desc)
    classes = torch.unique(torch.as_tensor(dataset.labels))

    encoder.to(device)
    head.to(device)
    loss.to(device)
    channels_last = speed_up(encoder, cfg, device)
    pin = on_cuda(cfg.pin_memory, device)
    augment_is_identity = bool(getattr(augment, "is_identity", False))
    branch = (_OldBranch(old, dataset, old_needs, old_feature_cache, augment_is_identity,
                         device, 512, progress, cfg.num_workers) if old_needs else None)
    if old is not None:
        old.head.to(device).eval()
        for p in old.head.parameters():
            p.requires_grad_(False)
    loss.prepare(TrainingContext(
        num_classes=head.num_classes, new_embedding_dim=encoder.embedding_dim,
        old_embedding_dim=old.encoder.embedding_dim if old else None,
        old_head=old.head if old else None, old_classes=old.classes if old else None,
        old_feature_cache=branch.cache if branch else None))
    needs_view2 = "old_features_view2" in needs
    loader = BatchLoader(dataset, cfg.num_workers, cfg.prefetch_factor,
                         cfg.persistent_workers, pin)

    def batch_loss(index: torch.Tensor, generator: torch.Generator, loaded):
        images, labels = loaded
        images = images.to(device, non_blocking=pin)
        labels = labels.to(device, non_blocking=pin)
        view1 = augment(images, generator=generator)
        view2 = augment(images, generator=generator) if needs_view2 else None
        if channels_last:
            view1 = view1.contiguous(memory_format=torch.channels_last)
            view2 = None if view2 is None else view2.contiguous(
                memory_format=torch.channels_last)
        return loss(LossInputs(
            new_features=encoder(view1).float(), labels=labels, indices=index.to(device),
            new_head=head if "new_head" in needs else None,
            old_head=old.head if "old_head" in needs else None,
            **(branch.features(index, view1, view2) if branch else {})))

    model = nn.ModuleDict({"encoder": encoder, "head": head, "loss": loss})
    step_log = StepLog(Path(log_path), cfg.log_every, desc) if log_path else None
    history: list[dict[str, Any]] = list(resume.summaries) if resume else []
    last_good: str | None = str(checkpoint_dir) if history and checkpoint_dir else None
    save = None if fit_state_path is None else (
        lambda state: save_fit_state(fit_state_path, state))
    try:
        for summary in fit_epochs(model, len(dataset), batch_loss, cfg, seed=seed,
                                  progress=progress, desc=desc, amp=cfg.amp,
                                  amp_dtype=cfg.amp_dtype, step_log=step_log, resume=resume,
                                  save=save, save_every=save_every, loader=loader,
                                  sync_batchnorm=cfg.sync_batchnorm,
                                  unused_parameters="new_head" not in needs):
            history.append(summary)
            log.info("%s epoch %d: %s", desc, summary["epoch"],
                     ", ".join(f"{k}={v:.4f}" for k, v in summary.items()
                               if k not in ("epoch", "steps")))
            if checkpoint_dir is not None and distributed.is_main():
                last_good = str(save_state(checkpoint_dir, {"encoder": encoder, "head": head},
                                           {**(checkpoint_config or {}),
                                            "epoch": summary["epoch"]}))
    except TrainingDivergedError as exc:
        raise TrainingDivergedError(f"{exc}; last good checkpoint: "
                                    f"{last_good or 'none saved yet'}") from None
    return TrainedModel(encoder=encoder, head=head, classes=classes.cpu(), history=history)
