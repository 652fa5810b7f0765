"""Helpers shared by the losses that read the frozen old classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from compatzoo.plugin import CompatLoss, DimensionMismatchError, SpecError, TrainingContext


def expect_dim(features: torch.Tensor, dim: int, what: str) -> None:
    """Raise a clear error when ``features`` is not ``(B, dim)``."""
    if features.dim() != 2 or features.shape[1] != dim:
        raise DimensionMismatchError(
            f"{what} must have shape (batch, {dim}) but has shape {tuple(features.shape)}; "
            "use the old encoder and old head of the same old model")


def frozen_logits(head: nn.Module, features: torch.Tensor, labels: torch.Tensor | None = None,
                  overrides: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits of ``head`` in its own form (margin applied when ``labels`` are given).

    The head's parameters enter detached, so gradients reach ``features`` only, whatever
    ``requires_grad`` says; ``overrides`` replaces parameters by name (synthesized rows).
    """
    params = {name: p.detach() for name, p in head.named_parameters()}
    params.update(overrides or {})
    return functional_call(head, params, (features, labels))


def soft_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Per-sample ``KL(softmax(teacher / T) || softmax(student / T))``."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits.detach() / temperature, dim=1),
                    reduction="none", log_target=True).sum(dim=1)


class OldHeadLoss(CompatLoss):
    """Base of losses that use the old head on the classes the old model was trained on."""

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.register_buffer("known", torch.zeros(0, dtype=torch.bool), persistent=False)

    def prepare(self, context: TrainingContext) -> None:
        head = context.old_head
        if head is None:
            raise SpecError(f"loss {type(self).__name__} needs the old model's classifier head; "
                            "give the experiment an old model with a head")
        known = torch.zeros(max(context.num_classes, head.num_classes), dtype=torch.bool)
        classes = context.old_classes
        known[classes if classes is not None else torch.arange(head.num_classes)] = True
        self.known = known

    def known_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """Which samples belong to a class the old head was trained on."""
        if self.known.numel() == 0:
            raise RuntimeError(f"{type(self).__name__}.prepare(context) must run before training")
        self.to(labels.device)  # buffers made in prepare() start on the CPU
        return self.known[labels]
