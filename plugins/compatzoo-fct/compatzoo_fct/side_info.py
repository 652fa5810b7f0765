"""FCT's side information psi(x) (Ramanujan et al. 2022, secs. 3.4, 5.1, table 6).

An extra per-image feature stored beside phi_old(x), learned at old-model time from the
old training images only, so the future transformation h can recover what phi_old
discarded. ``SIDE_INFORMATION`` maps each ``side_info`` name to its class; everything
that differs between kinds lives in those classes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from compatzoo.plugin import (InvalidFeaturesError, Recipe, SpecError, create_encoder,
                              extract_features, fit_minibatches)

SideInfoName = Literal["simclr", "alt-old", "alt-old-mixup", "autoencoder", "none", "old-embedding"]
Augment = Callable[..., torch.Tensor] | None


class SideModelParams(Recipe):
    """The side encoder and its training; defaults are compatzoo's old-model recipe, since
    FCT trains the side model like an old model (its appendix settings are not public)."""

    encoder: str = Field("tiny-cnn", description="registered encoder name of psi; its "
                         "embedding_dim is the upgrader's side_info_dim")
    encoder_params: dict[str, Any] = Field(
        default_factory=dict, description="params of that encoder, without embedding_dim")
    epochs: int = Field(10, ge=1, description="training epochs on the old training set")
    batch_size: int = Field(128, ge=2, description="images per step")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("sgd", description="optimiser")
    lr: float = Field(0.1, gt=0, description="peak learning rate")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay")
    temperature: float = Field(0.1, gt=0, description="simclr: NT-Xent temperature (SimCLR's "
                               "ImageNet value; ml-fct ships pretrained SimCLR models only)")
    projection_dim: int = Field(128, ge=1, description="simclr: output of the 2-layer projection "
                                "head used in training only (SimCLR: 128)")
    mixup_alpha: float = Field(0.2, gt=0, description="alt-old-mixup: Beta(alpha, alpha) of the "
                               "mixing weight (mixup, Zhang et al. 2018: 0.1-0.4 on ImageNet)")
    decoder_width: int = Field(64, ge=1, description="autoencoder: channels of the "
                               "training-only decoder")

    @field_validator("encoder_params")
    @classmethod
    def _no_embedding_dim(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "embedding_dim" in value:
            raise ValueError("set the upgrader's side_info_dim instead of "
                             "encoder_params.embedding_dim")
        return value


class SideInformation(nn.Module):
    """What a gallery item stores (``stored_dim``, 0 for nothing) and what h's side branch
    receives (``input_dim`` wide). ``fitted`` is a buffer, so saved upgraders keep it."""

    stored_dim: int = 0

    def __init__(self, params: SideModelParams, side_dim: int, old_dim: int):
        super().__init__()
        self.params = params
        self.input_dim = side_dim
        self.register_buffer("fitted", torch.tensor(True))

    def fit(self, images: Any, augment: Augment, device: torch.device, seed: int,
            progress: bool) -> list[dict[str, float]]:
        """Train on ``images`` (the old training set); nothing to learn by default."""
        return []

    def extract(self, images: Any, batch_size: int = 512,
                progress: bool = True) -> torch.Tensor | None:
        """psi of ``images`` to store with the gallery; None when nothing is stored."""
        return None

    def branch_input(self, old: torch.Tensor, stored: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - interface


class ZeroSide(SideInformation):
    """``none``: FCT's no-side-information baseline passes the zero vector (sec. 5.1)."""

    def branch_input(self, old: torch.Tensor, stored: torch.Tensor | None) -> torch.Tensor:
        return old.new_zeros(old.shape[0], self.input_dim)


class OldEmbeddingSide(SideInformation):
    """``old-embedding``: what the ml-fct reference does without a side model
    (train_transformation.py uses the old model as side_info_model), so h sees phi_old on
    both branches. Nothing extra is stored."""

    def __init__(self, params: SideModelParams, side_dim: int, old_dim: int):
        super().__init__(params, side_dim, old_dim)
        self.input_dim = old_dim

    def branch_input(self, old: torch.Tensor, stored: torch.Tensor | None) -> torch.Tensor:
        return old


class LearnedSide(SideInformation):
    """A side encoder (any registered encoder, ``embedding_dim = side_dim``) trained with
    its kind's objective; the modules only training needs are built in ``fit`` and
    dropped afterwards, so a saved upgrader holds the encoder alone."""

    needs_augment: ClassVar[bool] = False

    def __init__(self, params: SideModelParams, side_dim: int, old_dim: int):
        super().__init__(params, side_dim, old_dim)
        self.stored_dim = side_dim
        self.encoder = create_encoder(params.encoder, **params.encoder_params,
                                                embedding_dim=side_dim)
        self.fitted.fill_(False)

    def training_heads(self, images: Any) -> nn.Module:
        raise NotImplementedError  # pragma: no cover - interface

    def objective(self, heads: nn.Module, x: torch.Tensor, y: torch.Tensor, augment: Augment,
                  generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - interface

    def fit(self, images: Any, augment: Augment, device: torch.device, seed: int,
            progress: bool) -> list[dict[str, float]]:
        if self.needs_augment and augment is None:
            raise SpecError(f"{type(self).__name__} contrasts two augmented views; give the "
                            "hop data (HopData.augment) an augment callable")
        heads = self.training_heads(images)
        model = nn.ModuleDict({"encoder": self.encoder, "heads": heads}).to(device)

        def batch_loss(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            x, y = images.get_batch(index)
            return self.objective(heads, x.to(device), y.to(device), augment, generator)

        logs = fit_minibatches(model, len(images), batch_loss, self.params, seed=seed,
                               progress=progress, desc=f"side model ({type(self).__name__})")
        self.fitted.fill_(True)
        return logs

    def extract(self, images: Any, batch_size: int = 512,
                progress: bool = True) -> torch.Tensor | None:
        device = next(self.encoder.parameters()).device
        return extract_features(self.encoder, images, batch_size, device, progress,
                                desc="side information")

    def branch_input(self, old: torch.Tensor, stored: torch.Tensor | None) -> torch.Tensor:
        if stored is None:
            raise InvalidFeaturesError(f"this transformation needs the stored side information "
                                       f"(dimension {self.stored_dim}) of every old embedding")
        return stored


def _view(augment: Augment, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x if augment is None else augment(x, generator=generator)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: each view's positive is the other view of its image, the other
    2B - 2 views of the batch are its negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T / temperature).masked_fill(
        torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    b = len(z1)
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(logits, targets)


class SimCLRSide(LearnedSide):
    """``simclr``: contrastive self-supervision on two augmented views (Chen et al. 2020),
    FCT's best side information (table 6). The projection head is dropped after training."""

    needs_augment = True

    def training_heads(self, images: Any) -> nn.Module:
        d = self.stored_dim
        return nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True),
                             nn.Linear(d, self.params.projection_dim))

    def objective(self, heads: nn.Module, x: torch.Tensor, y: torch.Tensor, augment: Augment,
                  generator: torch.Generator) -> torch.Tensor:
        z1 = heads(self.encoder(augment(x, generator=generator)))
        z2 = heads(self.encoder(augment(x, generator=generator)))
        return nt_xent(z1, z2, self.params.temperature)


class AltOldSide(LearnedSide):
    """``alt-old``: a second classification model on the old data, differing from phi_old
    only in its seed (FCT sec. 5.1, phi_old^alt); a linear softmax classifier trains it."""

    def training_heads(self, images: Any) -> nn.Module:
        return nn.Linear(self.stored_dim, int(np.max(images.labels)) + 1)

    def view(self, x: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
        return _view(augment, x, generator)

    def objective(self, heads: nn.Module, x: torch.Tensor, y: torch.Tensor, augment: Augment,
                  generator: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(heads(self.encoder(self.view(x, augment, generator))), y)


class AltOldMixupSide(AltOldSide):
    """``alt-old-mixup``: alt-old with mixup on the images only, labels staying one-hot
    (FCT sec. 5.1): each image is mixed with a shuffled partner at weight
    ``max(lam, 1 - lam)``, ``lam ~ Beta(alpha, alpha)``, and keeps its own label."""

    def view(self, x: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
        x = super().view(x, augment, generator)
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        alpha = self.params.mixup_alpha
        lam = float(np.random.default_rng(seed).beta(alpha, alpha))
        lam = max(lam, 1.0 - lam)
        partner = torch.randperm(len(x), generator=generator).to(x.device)
        return lam * x + (1.0 - lam) * x[partner]


class _Decoder(nn.Module):
    """side_dim -> image: a linear map to an 1/8-resolution grid, three upsampling conv
    stages, cropped to the image size."""

    def __init__(self, dim: int, shape: tuple[int, int, int], width: int):
        super().__init__()
        self.channels, self.height, self.width = shape
        self.grid = (width, math.ceil(self.height / 8), math.ceil(self.width / 8))
        self.fc = nn.Linear(dim, math.prod(self.grid))
        stages: list[nn.Module] = []
        for _ in range(3):
            stages += [nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, padding=1),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        self.up = nn.Sequential(*stages, nn.Conv2d(width, self.channels, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.up(self.fc(z).view(-1, *self.grid))
        return x[:, :, :self.height, :self.width]


class AutoencoderSide(LearnedSide):
    """``autoencoder``: psi is the bottleneck of an L2 image autoencoder (FCT sec. 5.1;
    FCT's encoder/decoder are MobileNetV2-based, here the side encoder plus a small
    convolutional decoder used in training only)."""

    def training_heads(self, images: Any) -> nn.Module:
        sample, _ = images.get_batch([0])
        return _Decoder(self.stored_dim, tuple(sample.shape[1:]), self.params.decoder_width)

    def objective(self, heads: nn.Module, x: torch.Tensor, y: torch.Tensor, augment: Augment,
                  generator: torch.Generator) -> torch.Tensor:
        view = _view(augment, x, generator)
        return F.mse_loss(heads(self.encoder(view)), view)


SIDE_INFORMATION: dict[str, type[SideInformation]] = {
    "simclr": SimCLRSide,
    "alt-old": AltOldSide,
    "alt-old-mixup": AltOldMixupSide,
    "autoencoder": AutoencoderSide,
    "none": ZeroSide,
    "old-embedding": OldEmbeddingSide,
}
