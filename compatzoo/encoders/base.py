"""Encoder = backbone feature map + global pooling + optional linear projection."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from compatzoo.encoders.pooling import make_pooling
from compatzoo.errors import CheckpointError
from compatzoo.interfaces import Encoder


class PooledEncoderParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    embedding_dim: int | None = Field(
        128, ge=1, description="output dim of the linear projection; null keeps the backbone's width")
    pooling: Literal["avg", "gem"] = "avg"
    gem_p: float = Field(3.0, gt=0, description="initial GeM exponent (learnable)")
    weights: str | None = Field(
        None, description="local .safetensors file with backbone weights; never downloaded")


class PooledEncoder(Encoder):
    """Any backbone that yields a (B, C, H, W) map, pooled and projected to a vector.
    Subclasses build the backbone from their params and say its width in
    :meth:`backbone_dim_of`."""

    Params = PooledEncoderParams

    @classmethod
    def backbone_dim_of(cls, params: PooledEncoderParams) -> int:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def embedding_dim_of(cls, params: PooledEncoderParams) -> int:
        return params.embedding_dim or cls.backbone_dim_of(params)

    def __init__(self, backbone: nn.Module, backbone_dim: int, params: PooledEncoderParams):
        super().__init__()
        self.backbone = backbone
        if params.weights is not None:
            load_backbone_weights(backbone, params.weights)
        self.pool = make_pooling(params.pooling, params.gem_p)
        dim = params.embedding_dim or backbone_dim
        self.projection = nn.Linear(backbone_dim, dim) if params.embedding_dim else nn.Identity()
        self.embedding_dim = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.pool(self.backbone(images)))


def load_backbone_weights(module: nn.Module, path: str | Path) -> None:
    """Load a local safetensors state dict strictly, with an actionable error."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"backbone weights file {path} does not exist; give a local "
                              ".safetensors file (compatzoo never downloads weights)")
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); convert the "
                              "weights with safetensors.torch.save_file") from exc
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {path} do not match the backbone: {exc}") from exc
