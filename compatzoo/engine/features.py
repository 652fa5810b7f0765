"""Embedding whole datasets in batches, without gradients."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from compatzoo import distributed
from compatzoo.engine.loading import BatchLoader
from compatzoo.interfaces import Encoder


@torch.no_grad()
def extract_features(encoder: Encoder, dataset, batch_size: int = 512,
                     device: torch.device | str = "cpu", progress: bool = True,
                     desc: str = "embed", num_workers: int = 0) -> torch.Tensor:
    """``(len(dataset), d)`` float32 CPU features in dataset order (eval mode).

    Under torchrun each rank embeds its contiguous share of the rows and every rank
    receives all of them (a collective: every rank must call it). ``num_workers``
    decodes images ahead in DataLoader workers.
    """
    was_training = encoder.training
    encoder.eval()
    start, stop = distributed.shard_rows(len(dataset))
    out = torch.empty(stop - start, encoder.embedding_dim)
    batches = [torch.arange(first, min(first + batch_size, stop))
               for first in range(start, stop, batch_size)]
    loaded = BatchLoader(dataset, num_workers)(batches)
    for index, (images, _) in tqdm(zip(batches, loaded), total=len(batches), desc=desc,
                                   disable=not progress or not distributed.is_main(),
                                   leave=False):
        out[index[0] - start:index[-1] + 1 - start] = encoder(images.to(device)).float().cpu()
    encoder.train(was_training)
    return distributed.gather_rows(out)
