"""Embedding whole datasets in batches, without gradients."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from compatzoo.interfaces import Encoder


@torch.no_grad()
def extract_features(encoder: Encoder, dataset, batch_size: int = 512,
                     device: torch.device | str = "cpu", progress: bool = True,
                     desc: str = "embed") -> torch.Tensor:
    """``(len(dataset), d)`` float32 CPU features in dataset order (eval mode)."""
    was_training = encoder.training
    encoder.eval()
    out = torch.empty(len(dataset), encoder.embedding_dim)
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        index = torch.arange(start, min(start + batch_size, len(dataset)))
        images, _ = dataset.get_batch(index)
        out[start:start + len(index)] = encoder(images.to(device)).float().cpu()
    encoder.train(was_training)
    return out
