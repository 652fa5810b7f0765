"""How an image becomes an encoder's input: a square ``image_size`` crop (PIL's
``ImageOps.fit``: the centred crop of that aspect, bicubic resize), scaled to [0, 1], then
normalised per channel. Datasets use it, and bundles record it, so an image embedded from
a bundle gets exactly the input the model was trained and evaluated on."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field


class Preprocess(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    image_size: int = Field(ge=1, description="side of the square input, in pixels")
    mean: tuple[float, ...] = Field(description="per-channel mean of [0, 1] pixels")
    std: tuple[float, ...] = Field(description="per-channel std of [0, 1] pixels")
    resize: str = Field("fit", description="'fit': centred crop to a square, bicubic resize")

    def transform(self):
        """A torchvision transform: PIL image -> normalised float tensor ``(C, S, S)``."""
        from torchvision import transforms

        return transforms.Compose([FitSquare(self.image_size), transforms.PILToTensor(),
                                   ScaleAndNormalize(self.mean, self.std)])

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``(..., C, H, W)`` -> ``(x / 255 - mean) / std``."""
        return ScaleAndNormalize(self.mean, self.std)(pixels)


class FitSquare:
    """PIL ``ImageOps.fit`` to ``size x size`` (bicubic), RGB."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.fit(image.convert("RGB"), (self.size, self.size), Image.BICUBIC)

    def __repr__(self) -> str:
        return f"FitSquare({self.size})"


class ScaleAndNormalize:
    """uint8 pixels -> ``(x / 255 - mean) / std`` as float32."""

    def __init__(self, mean, std):
        self.mean, self.std = tuple(mean), tuple(std)
        self._mean = torch.tensor(self.mean).view(-1, 1, 1)
        self._std = torch.tensor(self.std).view(-1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() / 255.0 - self._mean) / self._std

    def __repr__(self) -> str:
        return f"ScaleAndNormalize(mean={self.mean}, std={self.std})"


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """``(C, H, W)`` uint8 tensor of an RGB PIL image."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
