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


ARCHITECTURES: dict[str, tuple[Callable[..., nn.Module], Callable]] = {
    **{f"resnet{d}": (getattr(torchvision.models, f"resnet{d}"), _resnet_trunk)
       for d in (18, 34, 50, 101, 152)},
    "mobilenet_v2": (torchvision.models.mobilenet_v2, _mobilenet_trunk),
    "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, _mobilenet_trunk),
    "mobilenet_v3_large": (torchvision.models.mobilenet_v3_large, _mobilenet_trunk),
}


def torchvision_factory(arch: str) -> Callable[[TorchvisionParams], PooledEncoder]:
    build, trunk_of = ARCHITECTURES[arch]

    def factory(params: TorchvisionParams) -> PooledEncoder:
        # weights=None: torchvision must never download; local weights go through
        # params.weights (safetensors, loaded strictly into the trunk).
        trunk, dim = trunk_of(build(weights=None))
        return PooledEncoder(trunk, dim, params)

    factory.__name__ = f"{arch}_encoder"
    return factory
