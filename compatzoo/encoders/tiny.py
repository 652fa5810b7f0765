"""A small CNN that trains in minutes on a laptop CPU (demo, tests, quick suite)."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from compatzoo.encoders.base import PooledEncoder, PooledEncoderParams


class TinyCNNParams(PooledEncoderParams):
    widths: list[int] = Field(default_factory=lambda: [32, 64, 128, 128], min_length=1,
                              description="channels per stage; every stage after the first halves the resolution")
    in_channels: int = Field(3, ge=1)


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyCNN(PooledEncoder):
    """Conv-BN-ReLU stages, each after the first halving the resolution."""

    Params = TinyCNNParams

    def __init__(self, params: TinyCNNParams):
        channels = [params.in_channels, *params.widths]
        stages = [_stage(cin, cout, 1 if i == 0 else 2)
                  for i, (cin, cout) in enumerate(zip(channels[:-1], channels[1:]))]
        super().__init__(nn.Sequential(*stages), params.widths[-1], params)

    @classmethod
    def backbone_dim_of(cls, params: TinyCNNParams) -> int:
        return params.widths[-1]
