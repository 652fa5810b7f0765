"""Encoders registered by the core: tiny CNN, torchvision backbones, open_clip towers."""

from compatzoo.encoders.base import PooledEncoder, PooledEncoderParams
from compatzoo.encoders.clip import OpenClipEncoder, OpenClipParams
from compatzoo.encoders.tiny import TinyCNNParams, tiny_cnn
from compatzoo.encoders.torchvision_backbones import (ARCHITECTURES, TorchvisionParams,
                                                      torchvision_factory)

ENCODERS = {
    "tiny-cnn": (tiny_cnn, TinyCNNParams),
    **{arch: (torchvision_factory(arch), TorchvisionParams) for arch in ARCHITECTURES},
    "open-clip": (OpenClipEncoder, OpenClipParams),
}

__all__ = ["ENCODERS", "PooledEncoder", "PooledEncoderParams", "OpenClipEncoder"]
