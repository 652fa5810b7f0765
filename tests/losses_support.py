"""Stand-in classifier heads and small helpers for the compat-loss tests.

The heads follow the ClassifierHead contract (margin on the target logit when labels are
given, ``temperature`` = scale) without depending on compatzoo.heads. Their parameters keep
``requires_grad=True`` so the tests prove that the losses detach the old head themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosMarginHead(nn.Module):
    """``s * (cos(f, w_j) - m * 1[j = y])`` with a normalised weight (CosFace form)."""

    def __init__(self, dim: int, classes: int, scale: float = 4.0, margin: float = 0.2,
                 seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(classes, dim, generator=g))
        self.embedding_dim, self.num_classes = dim, classes
        self.scale = self.temperature = scale
        self.margin = margin

    def forward(self, features, labels=None):
        cosine = F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).T
        if labels is not None:
            cosine = cosine - self.margin * F.one_hot(labels, cosine.shape[1])
        return self.scale * cosine


class LinearSoftmaxHead(nn.Module):
    """Plain linear softmax head; its parameters live in a sub-module (``fc.weight``)."""

    def __init__(self, dim: int, classes: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(dim, classes)
        self.embedding_dim, self.num_classes, self.temperature = dim, classes, 1.0

    def forward(self, features, labels=None):
        return self.fc(features)


def randn(*shape: int, seed: int = 0, grad: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(grad)


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def assert_untouched(module: nn.Module, before: list[torch.Tensor]) -> None:
    for p, old in zip(module.parameters(), before):
        assert p.grad is None
        assert torch.equal(p.detach(), old)
