"""The one optimisation loop: encoders, their heads, upgraders and side-information models
all train through :func:`fit_epochs` with a :class:`Recipe`.

A recipe is the optimiser and its schedule: epochs, batch size, optimiser, learning rate
with linear warm-up per step then cosine decay to zero (or constant), and optionally
BatchNorm statistics frozen for the last part of training (the FCT reference does so).

Under ``torchrun`` every fit is data-parallel without the caller doing anything: all ranks
draw the same permutation, each computes the loss of its slice of every (global) batch
through :class:`~torch.nn.parallel.DistributedDataParallel`, so a step over W ranks with
B / W items each is the single-process step over B items, up to BatchNorm statistics
(per rank unless synchronised) and random draws: each rank augments its share with a
generator of its own per step, where one process draws from the generator of the batch
order. Rank 0 alone logs and saves.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from compatzoo import distributed
from compatzoo.errors import CompatzooError, SpecError, TrainingDivergedError
from compatzoo.interfaces import LossOutput


class Recipe(BaseModel):
    """How a module is optimised. Component params subclass it and override the defaults
    with their paper's values; the defaults here are a classifier's (SGD 0.1, cosine)."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(10, ge=1, description="passes over the training items")
    batch_size: int = Field(128, ge=1, description="items per step (all items when fewer)")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("sgd", description="optimiser")
    lr: float = Field(0.1, gt=0, allow_inf_nan=False, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (Nesterov when > 0)")
    weight_decay: float = Field(5e-4, ge=0, allow_inf_nan=False, description="weight decay")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="after the warm-up: cosine decay to zero, or constant")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up length in epochs")
    freeze_bn_from: float | None = Field(
        None, ge=0, le=1, description="fraction of the epochs after which the model trains in "
        "eval mode, i.e. with BatchNorm statistics frozen (None: never)")


def build_optimizer(parameters, recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=recipe.lr, momentum=recipe.momentum,
                               weight_decay=recipe.weight_decay, nesterov=recipe.momentum > 0)
    kind = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW
    return kind(parameters, lr=recipe.lr, weight_decay=recipe.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up then cosine decay to zero (or constant)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_schedule(optimizer: torch.optim.Optimizer, recipe: Recipe,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate schedule of ``recipe`` over ``steps_per_epoch * epochs`` steps."""
    total = steps_per_epoch * recipe.epochs
    warmup = int(round(recipe.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, recipe.schedule))


@dataclass
class StepLog:
    """Append a JSON line of every loss part each ``every`` steps to ``path``."""

    path: Path
    every: int
    model: str


BatchLoss = Callable[..., "torch.Tensor | LossOutput"]
"""``batch_loss(indices, generator)``, or ``batch_loss(indices, generator, loaded)`` when
the fit has a ``loader``: one batch's loss, a scalar or a :class:`LossOutput`."""

Loader = Callable[[list[torch.Tensor]], Iterator]
"""``loader(index_batches)``: an iterator over what each batch needs, in order (e.g. images
decoded ahead in DataLoader workers)."""


def global_batch(batch_size: int, num_items: int, desc: str) -> int:
    """The items of one optimisation step over all ranks: ``batch_size`` (all items when
    fewer), which every rank shares equally. An explicit batch that the processes cannot
    share is an error; a batch clipped to the items is rounded down to a multiple of them."""
    world = distributed.world_size()
    if batch_size % world:
        raise SpecError(f"{desc}: batch_size {batch_size} cannot be shared equally by "
                        f"{world} processes; make it a multiple of {world} (--nproc_per_node)")
    batch = min(batch_size, num_items)
    batch -= batch % world
    if batch < world:
        raise SpecError(f"{desc}: {num_items} training items cannot give each of {world} "
                        "processes a share of a batch; use fewer processes (--nproc_per_node)")
    return batch


def autocast_dtype(name: str) -> torch.dtype:
    """The mixed-precision type: bfloat16 needs no loss scaling, so ``auto`` prefers it
    where the GPU computes in it (Ampere and later)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


class _Step(nn.Module):
    """The loss of one batch as a module call, which is what DDP synchronises around."""

    def __init__(self, model: nn.Module, batch_loss: BatchLoss):
        super().__init__()
        self.model = model
        self.batch_loss = batch_loss

    def forward(self, *args):
        return self.batch_loss(*args)


def _data_parallel(model: nn.Module, batch_loss: BatchLoss, sync_batchnorm: bool,
                   unused_parameters: bool) -> BatchLoss:
    """``batch_loss`` run through DDP when training on several ranks."""
    if distributed.world_size() == 1:
        return batch_loss
    if sync_batchnorm:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if device.type == "cpu":
            raise SpecError("sync_batchnorm needs the model on a GPU (torch's SyncBatchNorm "
                            "does not run on CPUs); set train.sync_batchnorm: false for CPU "
                            "training")
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Parameters a step leaves unused (a head no loss reads) need DDP to look for them
    # in every step's graph, which costs time: only where the caller says there are some.
    return nn.parallel.DistributedDataParallel(_Step(model, batch_loss),
                                               find_unused_parameters=unused_parameters)


def _next_batch(loaded: Iterator):
    """The next loaded batch; a data error met here is this rank's own (its share of the
    items), so it is marked for this rank to report (see ``distributed.reports``)."""
    try:
        return next(loaded)
    except CompatzooError as exc:
        exc.rank_specific = distributed.world_size() > 1
        raise


def _rank_generator(seed: int, epoch: int, batch_no: int) -> torch.Generator:
    """Augmentation draws of this rank's share of one batch, a function of where the step
    is: ranks differ, and a resumed fit draws the same as one never stopped."""
    key = ((seed * 1_000_003 + epoch) * 1_000_003 + batch_no) * 1031 + distributed.rank()
    return torch.Generator().manual_seed(key % (2**63))


@dataclass
class FitState:
    """Everything a fit needs to go on exactly where it stopped: the module's weights,
    the optimiser, schedule and scaler states, the RNG states and the position in the
    epoch. ``epoch`` is the epoch in progress (0-based) and ``next_batch`` its next batch;
    at an epoch end they are the next epoch and 0."""

    epoch: int
    next_batch: int
    step: int
    running: dict[str, float]
    epoch_lr: float
    summaries: list[dict[str, float]]
    model: dict[str, torch.Tensor]
    optimizer: dict
    schedule: dict
    scaler: dict
    generator_at_epoch_start: torch.Tensor
    generator: torch.Tensor
    torch_rng: torch.Tensor
    log_offset: int = 0
    cuda_rng: list[torch.Tensor] | None = None       # where the model trains on CUDA
    rank_rngs: list[torch.Tensor] | None = None      # every rank's torch RNG, under torchrun


def fit_epochs(model: nn.Module, num_items: int, batch_loss: BatchLoss, recipe: Recipe, *,
               seed: int = 0, progress: bool = True, desc: str = "fit", amp: bool = False,
               amp_dtype: str = "auto", step_log: StepLog | None = None,
               resume: FitState | None = None,
               save: Callable[[FitState], None] | None = None,
               save_every: int = 0, loader: Loader | None = None,
               sync_batchnorm: bool = False,
               unused_parameters: bool = False) -> Iterator[dict[str, float]]:
    """Train ``model``'s trainable parameters on shuffled batches of item indices, yielding
    each epoch's summary (mean loss and parts, learning rate, seconds) as it ends.

    ``batch_loss(indices, generator)`` returns one batch's loss (a scalar or a
    :class:`LossOutput` with named parts); the model must already be on the loss's device.
    The last incomplete batch of an epoch is dropped. ``amp`` runs the loss in mixed
    precision where CUDA is present (a no-op on the CPU): ``amp_dtype`` bfloat16, or
    float16 with a gradient scaler; ``auto`` takes bfloat16 where the GPU supports it. A
    non-finite loss, or a non-finite weight at a checkpoint or an epoch end, stops
    training with :class:`TrainingDivergedError`.

    ``save`` receives a :class:`FitState` every ``save_every`` steps (0: never mid-epoch)
    and at each epoch end once the caller took the summary (on rank 0 only); ``resume``
    continues from one, with the same results as a fit never stopped (given the same
    ``batch_loss``). ``loader`` prepares each batch's data ahead (see :data:`Loader`).
    ``sync_batchnorm`` shares BatchNorm statistics between ranks (GPUs only);
    ``unused_parameters`` says some trainable parameters get no gradient in a step.
    """
    if num_items < 2:
        raise SpecError(f"{desc}: needs at least 2 training items, got {num_items}")
    world, main = distributed.world_size(), distributed.is_main()
    batch = global_batch(recipe.batch_size, num_items, desc)
    share = batch // world
    steps = num_items // batch
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], recipe)
    schedule = build_schedule(optimizer, recipe, steps)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    use_amp = amp and device.type == "cuda"
    dtype = autocast_dtype(amp_dtype) if use_amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and dtype == torch.float16)
    step, first_epoch, first_batch, summaries = 0, 0, 0, []
    if resume is not None:
        model.load_state_dict(resume.model, strict=True)
        optimizer.load_state_dict(resume.optimizer)
        schedule.load_state_dict(resume.schedule)
        if resume.scaler:
            scaler.load_state_dict(resume.scaler)
        if len(resume.rank_rngs or [None]) != world:
            raise SpecError(f"{desc}: the saved training state was written by "
                            f"{len(resume.rank_rngs or [None])} process(es); resume it with "
                            f"as many, not {world}")
        torch.set_rng_state(resume.torch_rng if world == 1
                            else resume.rank_rngs[distributed.rank()])
        if resume.cuda_rng is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(resume.cuda_rng)
        step, first_epoch, first_batch = resume.step, resume.epoch, resume.next_batch
        summaries = list(resume.summaries)
        if step_log is not None and main and step_log.path.exists():
            with open(step_log.path, "r+b") as log:     # drop lines after the checkpoint
                log.truncate(resume.log_offset)
    log_file = open(step_log.path, "a") if step_log and main else None
    step_loss = _data_parallel(model, batch_loss, sync_batchnorm, unused_parameters)

    def save_state(epoch: int, next_batch: int, running: dict[str, float], epoch_lr: float,
                   at_epoch_start: torch.Tensor) -> None:
        """Rank 0 saves; under torchrun every rank takes part, giving its RNG state."""
        rngs = None
        if world > 1:
            rngs = distributed.gather_rows(torch.get_rng_state().unsqueeze(0))
            rngs = list(rngs.unbind(0))
        if main:
            save(FitState(epoch, next_batch, step, dict(running), epoch_lr, list(summaries),
                          model.state_dict(), optimizer.state_dict(), schedule.state_dict(),
                          scaler.state_dict(), at_epoch_start, generator.get_state(),
                          torch.get_rng_state(), log_file.tell() if log_file else 0,
                          torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                          rngs))

    try:
        for epoch in range(first_epoch, recipe.epochs):
            freeze = recipe.freeze_bn_from
            model.train(freeze is None or epoch < freeze * recipe.epochs)
            resuming = resume is not None and epoch == first_epoch
            if resuming:
                generator.set_state(resume.generator_at_epoch_start)
            at_epoch_start = generator.get_state()
            order = torch.randperm(num_items, generator=generator)
            lr, started = schedule.get_last_lr()[0], time.perf_counter()
            running: dict[str, float] = {}
            if resuming and first_batch:                      # mid-epoch
                generator.set_state(resume.generator)
                running, lr = dict(resume.running), resume.epoch_lr
            first = first_batch if resuming else 0
            shares = [order[b * batch + distributed.rank() * share:
                            b * batch + (distributed.rank() + 1) * share]
                      for b in range(first, steps)]
            loaded = loader(shares) if loader is not None else None
            bar = tqdm(range(first, steps), desc=f"{desc} {epoch + 1}/{recipe.epochs}",
                       disable=not progress or not main, leave=False)
            for batch_no, index in zip(bar, shares):
                draws = generator if world == 1 else _rank_generator(seed, epoch, batch_no)
                args = (index, draws) if loaded is None else (index, draws,
                                                              _next_batch(loaded))
                with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
                    out = step_loss(*args)
                if not isinstance(out, LossOutput):
                    out = LossOutput(out)
                values = distributed.mean_over_ranks(
                    {"loss": out.total.item(), **{k: v.item() for k, v in out.parts.items()}})
                check_finite(values, desc, epoch + 1, step + 1)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out.total).backward()
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                step += 1
                for key, value in values.items():
                    running[key] = running.get(key, 0.0) + value
                if progress:
                    bar.set_postfix(loss=f"{values['loss']:.3f}")
                if log_file and step % step_log.every == 0:
                    log_file.write(json.dumps({"model": step_log.model, "epoch": epoch + 1,
                                               "step": step, "lr": schedule.get_last_lr()[0],
                                               **values}) + "\n")
                    log_file.flush()
                if save and save_every and step % save_every == 0 and batch_no + 1 < steps:
                    check_finite_weights(model, desc, epoch + 1, step)
                    save_state(epoch, batch_no + 1, running, lr, at_epoch_start)
            distributed.broadcast_buffers(model)
            check_finite_weights(model, desc, epoch + 1, step)
            summary = {"epoch": epoch + 1, "steps": steps, "lr": lr,
                       "seconds": time.perf_counter() - started,
                       **{key: value / steps for key, value in running.items()}}
            summaries.append(summary)
            yield summary
            if save:      # after the caller has handled the epoch (e.g. saved its weights)
                save_state(epoch + 1, 0, {}, 0.0, generator.get_state())
    finally:
        if log_file:
            log_file.close()
        model.eval()


def fit_minibatches(model: nn.Module, num_items: int, batch_loss: BatchLoss, recipe: Recipe,
                    **options) -> list[dict[str, float]]:
    """:func:`fit_epochs` run to the end; the per-epoch summaries."""
    return list(fit_epochs(model, num_items, batch_loss, recipe, **options))


def check_finite_weights(model: nn.Module, desc: str, epoch: int, step: int) -> None:
    """Stop before a diverged model is saved or used: name the first non-finite weight or
    buffer (a BatchNorm running variance overflows while the loss still looks finite)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise TrainingDivergedError(
                f"{desc}: {name} holds {bad} non-finite value(s) after step {step} (epoch "
                f"{epoch}); training diverged. Lower the learning rate or the loss weights")


def check_finite(values: dict[str, float], desc: str, epoch: int, step: int) -> None:
    """Stop at the first non-finite loss, naming where and which parts. ``values`` is the
    step's loss and parts, averaged over ranks, so every rank stops at the same step."""
    if all(math.isfinite(v) for v in values.values()):
        return
    bad = [name for name, value in values.items() if name != "loss" and not math.isfinite(value)]
    raise TrainingDivergedError(
        f"{desc}: loss became {values['loss']} at epoch {epoch}, step {step} (non-finite "
        f"parts: {bad or ['total']}). Lower the learning rate or the loss weights, or check "
        "the inputs for NaN")
