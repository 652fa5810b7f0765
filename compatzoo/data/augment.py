"""Batch-level augmentation on normalised image tensors.

The engine draws a batch once (``LabeledImages.get_batch``) and calls
:class:`BatchAugment` on it as many times as it needs independent views (RACT feeds
differently augmented views to the old and new branch). Everything is one vectorised
pass per batch with an explicit ``torch.Generator``, so runs are reproducible and no
per-image Python loop slows CPU training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator


class AugmentParams(BaseModel):
    """Random resized crop (with reflect-padded shifts), flip and colour jitter.

    Defaults are the CIFAR-style pad-and-crop shift plus mild colour jitter: on the
    synthetic benchmark flips and smaller crops cost the old model 5-13 mAP points at
    demo-length schedules. For natural images lower ``crop_scale``, widen ``crop_ratio``
    (e.g. 3/4 to 4/3) and enable ``hflip``.

    Colour jitter acts on *normalised* tensors, so its amounts are in units of the
    dataset's channel std: brightness adds an offset, contrast scales around each
    image's mean, saturation scales the distance to each pixel's channel mean.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    crop_scale: tuple[float, float] = Field((1.0, 1.0), description="area fraction of the crop")
    crop_ratio: tuple[float, float] = Field((1.0, 1.0), description="aspect ratio range of the crop")
    translate: float = Field(0.125, ge=0, le=0.5, description="shift past the border, fraction of size")
    hflip: bool = False
    brightness: float = Field(0.1, ge=0)
    contrast: float = Field(0.1, ge=0, lt=1)
    saturation: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _check_ranges(self) -> AugmentParams:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        low, high = self.crop_ratio
        if not 0 < low <= high:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        return self


class BatchAugment:
    """Callable ``(images B x C x H x W, generator) -> augmented images``."""

    def __init__(self, params: AugmentParams | None = None) -> None:
        self.params = params or AugmentParams()

    @property
    def is_identity(self) -> bool:
        """True when disabled or every amount is zero: the engine may then reuse cached
        old-model features instead of recomputing them on augmented views."""
        p = self.params
        return not p.enabled or (
            p.crop_scale == (1.0, 1.0)
            and p.crop_ratio == (1.0, 1.0)
            and p.translate == 0
            and not p.hflip
            and p.brightness == p.contrast == p.saturation == 0
        )

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.is_identity:
            return images
        return self._jitter_colour(self._crop_and_flip(images, generator), generator)

    @staticmethod
    def _uniform(
        n: int, low: float, high: float, images: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """``n`` uniform draws from ``generator`` (on its device), moved to ``images``."""
        device = generator.device if generator is not None else torch.device("cpu")
        draw = torch.rand(n, generator=generator, device=device)
        return (low + (high - low) * draw).to(device=images.device, dtype=images.dtype)

    def _crop_and_flip(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        p, n = self.params, images.shape[0]

        def u(low: float, high: float) -> torch.Tensor:
            return self._uniform(n, low, high, images, generator)

        area = u(*p.crop_scale)
        ratio = torch.exp(u(math.log(p.crop_ratio[0]), math.log(p.crop_ratio[1])))
        width = torch.sqrt(area * ratio).clamp(max=1.0)
        height = torch.sqrt(area / ratio).clamp(max=1.0)
        # Crop centres in normalised [-1, 1] coordinates; `translate` lets the crop leave
        # the image (filled by reflection), the pad-and-crop shift of CIFAR recipes.
        cx = u(-1.0, 1.0) * (1.0 - width + 2 * p.translate)
        cy = u(-1.0, 1.0) * (1.0 - height + 2 * p.translate)
        flip = torch.where(u(0.0, 1.0) < 0.5, -1.0, 1.0) if p.hflip else torch.ones_like(width)
        zero = torch.zeros_like(width)
        theta = torch.stack([torch.stack([width * flip, zero, cx], 1), torch.stack([zero, height, cy], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _jitter_colour(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        p, n = self.params, images.shape[0]

        def u(low: float, high: float) -> torch.Tensor:
            return self._uniform(n, low, high, images, generator).view(n, 1, 1, 1)

        grey = images.mean(dim=1, keepdim=True)
        images = grey + u(1 - p.saturation, 1 + p.saturation) * (images - grey)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = mean + u(1 - p.contrast, 1 + p.contrast) * (images - mean)
        return images + u(-p.brightness, p.brightness)
