"""One training loop for old models, new models and their compat losses.

The loop computes only what the active losses declare: the old encoder runs only when a
loss needs old features of the augmented views, and the old-feature cache (phi_old over
the training set, computed once) stands in where it is exact or allowed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from compatzoo.engine.checkpoints import save_state
from compatzoo.engine.features import extract_features
from compatzoo.errors import SpecError, TrainingDivergedError
from compatzoo.interfaces import (ClassifierHead, Encoder, FeatureCache, LossInputs,
                                  TrainingContext, WeightedLoss)
from compatzoo.specs import TrainSpec

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """An encoder with the head it was trained with and the classes it has seen."""

    encoder: Encoder
    head: ClassifierHead
    classes: torch.Tensor
    history: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_optimizer(params, cfg: TrainSpec) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up then cosine decay to zero (or constant)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _OldBranch:
    """Provides old features per step from the live old encoder or the cache."""

    def __init__(self, old: TrainedModel, dataset, needs: frozenset[str], policy: str,
                 augment_is_identity: bool, device: torch.device, batch_size: int,
                 progress: bool):
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
                                        desc="old-feature cache")
            self.cache = FeatureCache(features, torch.as_tensor(dataset.labels))
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
) -> TrainedModel:
    """Train ``encoder`` + ``head`` on ``dataset`` with ``loss``; returns the trained model.

    ``old`` is required when a loss declares old inputs. ``checkpoint_dir`` receives the
    weights after every epoch, so a diverging run can name its last good state.
    """
    device = resolve_device(cfg.device)
    needs = loss.required_inputs
    old_needs = needs & {"old_features", "old_features_view2", "old_head", "old_feature_cache"}
    if old_needs and old is None:
        raise SpecError(f"the losses need {sorted(old_needs)} from an old model, but none was given")
    labels = torch.as_tensor(dataset.labels)
    classes = torch.unique(labels)
    min_classes = loss.min_classes_per_batch
    if min_classes > 1 and len(classes) < min_classes:
        raise SpecError(f"the losses need samples of {min_classes} classes per batch, but the "
                        f"training set has {len(classes)} class(es)")
    if len(dataset) < cfg.batch_size:
        raise SpecError(f"the training set has {len(dataset)} items, fewer than batch_size "
                        f"{cfg.batch_size}; lower train.batch_size")

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    encoder.to(device).train()
    head.to(device).train()
    loss.to(device)
    augment_is_identity = bool(getattr(augment, "is_identity", False))
    branch = (_OldBranch(old, dataset, old_needs, old_feature_cache, augment_is_identity,
                         device, 512, progress) if old_needs else None)
    if old is not None:
        old.head.to(device).eval()
        for p in old.head.parameters():
            p.requires_grad_(False)
    loss.prepare(TrainingContext(
        num_classes=head.num_classes, new_embedding_dim=encoder.embedding_dim,
        old_embedding_dim=old.encoder.embedding_dim if old else None,
        old_head=old.head if old else None, old_classes=old.classes if old else None,
        old_feature_cache=branch.cache if branch else None))

    params = [p for p in [*encoder.parameters(), *head.parameters(), *loss.parameters()]
              if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    steps_per_epoch = len(dataset) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, cfg.schedule))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    log_file = open(log_path, "a") if log_path else None
    history: list[dict[str, Any]] = []
    last_good: str | None = None
    needs_view2 = "old_features_view2" in needs
    step = 0
    try:
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(dataset), generator=generator)
            bar = tqdm(range(steps_per_epoch), desc=f"{desc} {epoch + 1}/{cfg.epochs}",
                       disable=not progress, leave=False)
            running: dict[str, float] = {}
            epoch_started = time.perf_counter()
            for batch_no in bar:
                index = order[batch_no * cfg.batch_size:(batch_no + 1) * cfg.batch_size]
                images, batch_labels = dataset.get_batch(index)
                images, batch_labels = images.to(device), batch_labels.to(device)
                view1 = augment(images, generator=generator)
                view2 = augment(images, generator=generator) if needs_view2 else None
                with torch.autocast(device.type, enabled=use_amp):
                    inputs = LossInputs(
                        new_features=encoder(view1).float(), labels=batch_labels,
                        indices=index.to(device),
                        new_head=head if "new_head" in needs else None,
                        old_head=old.head if "old_head" in needs else None,
                        **(branch.features(index, view1, view2) if branch else {}))
                    out = loss(inputs)
                if not torch.isfinite(out.total):
                    bad = [k for k, v in out.parts.items() if not torch.isfinite(v)]
                    raise TrainingDivergedError(
                        f"{desc}: loss became {out.total.item()} at epoch {epoch + 1}, step "
                        f"{step} (non-finite parts: {bad or ['total']}); last good checkpoint: "
                        f"{last_good or 'none saved yet'}. Lower the learning rate or the loss "
                        "weights, or check the inputs for NaN.")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out.total).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                values = {"loss": out.total.item(), **{k: v.item() for k, v in out.parts.items()}}
                for key, value in values.items():
                    running[key] = running.get(key, 0.0) + value
                bar.set_postfix(loss=f"{values['loss']:.3f}")
                if log_file and step % cfg.log_every == 0:
                    record = {"model": desc, "epoch": epoch + 1, "step": step,
                              "lr": scheduler.get_last_lr()[0], **values}
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
            summary = {"epoch": epoch + 1, "steps": steps_per_epoch,
                       "seconds": time.perf_counter() - epoch_started,
                       **{k: v / max(1, steps_per_epoch) for k, v in running.items()}}
            history.append(summary)
            log.info("%s epoch %d: %s", desc, epoch + 1,
                     ", ".join(f"{k}={v:.4f}" for k, v in summary.items()
                               if k not in ("epoch", "steps")))
            if checkpoint_dir is not None:
                last_good = str(save_state(checkpoint_dir, {"encoder": encoder, "head": head},
                                           {**(checkpoint_config or {}), "epoch": epoch + 1}))
    finally:
        if log_file:
            log_file.close()
    encoder.eval()
    head.eval()
    return TrainedModel(encoder=encoder, head=head, classes=classes.cpu(), history=history)

