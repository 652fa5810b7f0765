"""Encoders registered by the core: tiny CNN, torchvision backbones, open_clip towers."""

from compatzoo.encoders.base import PooledEncoder, PooledEncoderParams
from compatzoo.encoders.clip import OpenClipEncoder, OpenClipParams
from compatzoo.encoders.tiny import TinyCNN, TinyCNNParams
from compatzoo.encoders.torchvision_backbones import (ARCHITECTURES, TorchvisionEncoder,
                                                      TorchvisionParams, torchvision_encoder)

ENCODERS = {
    "tiny-cnn": TinyCNN,
    **{arch: torchvision_encoder(arch) for arch in ARCHITECTURES},
    "open-clip": OpenClipEncoder,
}

__all__ = ["ENCODERS", "OpenClipEncoder", "OpenClipParams", "PooledEncoder",
           "PooledEncoderParams", "TinyCNN", "TinyCNNParams", "TorchvisionEncoder",
           "TorchvisionParams"]
