"""Classifier heads used to train encoders (never at retrieval time).

Margin heads follow their papers: NormFace (scaled cosine), CosFace (cos - m),
ArcFace (cos(theta + m)). Defaults are the values the zoo's papers use: CosFace s=32,
m=0.4 (BCT); ArcFace s=30, m=0.3 (BiCT).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from compatzoo.interfaces import ClassifierHead


class LinearHeadParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bias: bool = True


class NormFaceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = Field(32.0, gt=0, description="logit scale s (softmax temperature)")


class CosFaceParams(NormFaceParams):
    margin: float = Field(0.4, ge=0, description="additive cosine margin m (BCT: 0.4)")


class ArcFaceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = Field(30.0, gt=0, description="logit scale s (BiCT: 30)")
    margin: float = Field(0.3, ge=0, lt=math.pi / 2, description="angular margin m (BiCT: 0.3)")


class LinearHead(ClassifierHead):
    """Plain softmax classifier (BCT's 'softmax' old models)."""

    Params = LinearHeadParams

    def __init__(self, params: LinearHeadParams, embedding_dim: int, num_classes: int):
        super().__init__()
        self.embedding_dim, self.num_classes, self.temperature = embedding_dim, num_classes, 1.0
        self.fc = nn.Linear(embedding_dim, num_classes, bias=params.bias)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(features)


class CosineHead(ClassifierHead):
    """Scaled cosine logits with an optional margin on the target class."""

    def __init__(self, params: NormFaceParams | ArcFaceParams, embedding_dim: int,
                 num_classes: int):
        super().__init__()
        self.embedding_dim, self.num_classes = embedding_dim, num_classes
        self.scale = float(params.scale)
        self.temperature = self.scale
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))

    def target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cosine = self.cosine(features)
        if labels is not None:
            target = cosine.gather(1, labels[:, None])
            cosine = cosine.scatter(1, labels[:, None], self.target_logit(target))
        return self.scale * cosine


class NormFaceHead(CosineHead):
    """Normalised softmax (NormFace): scaled cosine, no margin."""

    Params = NormFaceParams


class CosFaceHead(CosineHead):
    """Additive cosine margin on the target logit: ``s (cos - m)``."""

    Params = CosFaceParams

    def __init__(self, params: CosFaceParams, embedding_dim: int, num_classes: int):
        super().__init__(params, embedding_dim, num_classes)
        self.margin = float(params.margin)

    def target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine - self.margin


class ArcFaceHead(CosineHead):
    """Additive angular margin on the target logit: ``s cos(theta + m)``."""

    Params = ArcFaceParams

    def __init__(self, params: ArcFaceParams, embedding_dim: int, num_classes: int):
        super().__init__(params, embedding_dim, num_classes)
        self.margin = float(params.margin)
        # Beyond theta = pi - m, cos(theta + m) stops decreasing; use the linear fallback
        # of the reference ArcFace implementation there so the logit stays monotonic.
        self._threshold = math.cos(math.pi - self.margin)
        self._fallback = math.sin(math.pi - self.margin) * self.margin

    def target_logit(self, cosine: torch.Tensor) -> torch.Tensor:
        sine = torch.sqrt((1.0 - cosine * cosine).clamp(min=1e-7))
        with_margin = cosine * math.cos(self.margin) - sine * math.sin(self.margin)
        return torch.where(cosine > self._threshold, with_margin, cosine - self._fallback)


HEADS = {"linear": LinearHead, "normface": NormFaceHead, "cosface": CosFaceHead,
         "arcface": ArcFaceHead}
