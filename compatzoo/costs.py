"""Per-item cost of an upgrade: multiply-accumulates and stored bytes (FCT fig. 3)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def count_macs(module: nn.Module, *example: torch.Tensor | None) -> int:
    """Multiply-accumulates of one forward pass for ONE item (batch of the example / B).

    Counts convolutions and linear layers, which dominate both encoders and upgraders.
    """
    total = 0

    def conv_hook(layer: nn.Conv2d, _inputs, output):
        nonlocal total
        per_position = (layer.in_channels // layer.groups) * layer.kernel_size[0] * layer.kernel_size[1]
        total += output.numel() * per_position

    def linear_hook(layer: nn.Linear, _inputs, output):
        nonlocal total
        total += output.numel() * layer.in_features

    hooks = [m.register_forward_hook(conv_hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in module.modules() if isinstance(m, nn.Linear)]
    was_training = module.training
    module.eval()
    try:
        module(*example)
    finally:
        for hook in hooks:
            hook.remove()
        module.train(was_training)
    batch = next(t for t in example if t is not None).shape[0]
    return total // batch
