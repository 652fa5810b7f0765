"""open_clip visual towers (extra ``clip``): random init or local weights, never a download."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from compatzoo.encoders.base import load_backbone_weights
from compatzoo.errors import PluginError
from compatzoo.interfaces import Encoder


class OpenClipParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_name: str = Field("ViT-B-32", description="an open_clip architecture name")
    embedding_dim: int | None = Field(None, ge=1, description="optional projection after the tower")
    weights: str | None = Field(None, description="local .safetensors of the visual tower")


def _open_clip(model_name: str):
    try:
        import open_clip
    except ImportError as exc:
        raise PluginError("the open-clip encoder needs open_clip_torch: "
                          "pip install 'compatzoo[clip]'") from exc
    if model_name not in open_clip.list_models():
        raise PluginError(f"unknown open_clip architecture '{model_name}'; "
                          f"known: {', '.join(open_clip.list_models()[:20])}, ...")
    return open_clip


class OpenClipEncoder(Encoder):
    """An open_clip visual tower, optionally followed by a linear projection."""

    Params = OpenClipParams

    @classmethod
    def embedding_dim_of(cls, params: OpenClipParams) -> int:
        """The tower's output width from the architecture's config, without building it."""
        if params.embedding_dim:
            return params.embedding_dim
        return int(_open_clip(params.model_name).get_model_config(params.model_name)["embed_dim"])

    def __init__(self, params: OpenClipParams):
        super().__init__()
        open_clip = _open_clip(params.model_name)
        model = open_clip.create_model(params.model_name, pretrained=None)
        self.visual = model.visual
        if params.weights is not None:
            load_backbone_weights(self.visual, params.weights)
        tower_dim = int(getattr(self.visual, "output_dim"))
        self.projection = (nn.Linear(tower_dim, params.embedding_dim)
                           if params.embedding_dim else nn.Identity())
        self.embedding_dim = params.embedding_dim or tower_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.visual(images))
