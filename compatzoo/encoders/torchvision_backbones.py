"""torchvision ResNet / MobileNet backbones, randomly initialised or from local weights."""

from __future__ import annotations

from typing import Callable

import torchvision
from torch import nn

from compatzoo.encoders.base import PooledEncoder, PooledEncoderParams


class TorchvisionParams(PooledEncoderParams):
    pass


def _resnet_trunk(model: nn.Module) -> tuple[nn.Module, int]:
    trunk = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                          model.layer1, model.layer2, model.layer3, model.layer4)
    return trunk, model.fc.in_features


def _mobilenet_trunk(model: nn.Module) -> tuple[nn.Module, int]:
    return model.features, model.features[-1].out_channels


ARCHITECTURES: dict[str, tuple[Callable[..., nn.Module], Callable, int]] = {
    **{f"resnet{d}": (getattr(torchvision.models, f"resnet{d}"), _resnet_trunk, width)
       for d, width in ((18, 512), (34, 512), (50, 2048), (101, 2048), (152, 2048))},
    "mobilenet_v2": (torchvision.models.mobilenet_v2, _mobilenet_trunk, 1280),
    "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, _mobilenet_trunk, 576),
    "mobilenet_v3_large": (torchvision.models.mobilenet_v3_large, _mobilenet_trunk, 960),
}


class TorchvisionEncoder(PooledEncoder):
    """A torchvision trunk (``arch``), randomly initialised or from local weights."""

    Params = TorchvisionParams
    arch: str

    def __init__(self, params: TorchvisionParams):
        build, trunk_of, _ = ARCHITECTURES[self.arch]
        # weights=None: torchvision must never download; local weights go through
        # params.weights (safetensors, loaded strictly into the trunk).
        trunk, dim = trunk_of(build(weights=None))
        super().__init__(trunk, dim, params)

    @classmethod
    def backbone_dim_of(cls, params: TorchvisionParams) -> int:
        return ARCHITECTURES[cls.arch][2]


def torchvision_encoder(arch: str) -> type[TorchvisionEncoder]:
    """The encoder class registered as ``arch``."""
    return type(f"TorchvisionEncoder_{arch}", (TorchvisionEncoder,), {"arch": arch})
