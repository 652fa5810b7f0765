"""Batches of a dataset decoded ahead of the model, in DataLoader worker processes.

The training loop decides which items form each batch (its seeded permutation, shared by
every rank, so a resumed or data-parallel fit sees the same batches); a
:class:`BatchLoader` only turns those index batches into tensors, in order. Decoding has
no randomness (augmentation runs on the batch in the main process), so the worker count
never changes a result.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset


class _Batches(Dataset):
    """A dataset whose items are whole batches: ``batches[indices] = get_batch(indices)``."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset.get_batch(indices)


class _Schedule:
    """The index batches the loader serves next; replaced before each pass, so persistent
    workers keep serving across epochs."""

    def __init__(self) -> None:
        self.batches: Sequence[torch.Tensor] = ()

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BatchLoader:
    """``loader(index_batches)`` yields ``(images, labels)`` per batch, in order.

    ``num_workers`` 0 decodes in the calling process (nothing started); more start that
    many worker processes, each preparing ``prefetch_factor`` batches ahead.
    ``persistent_workers`` keeps them between passes (epochs); ``pin_memory`` puts batches
    in page-locked memory for non-blocking copies to a GPU.
    """

    def __init__(self, dataset, num_workers: int = 0, prefetch_factor: int = 2,
                 persistent_workers: bool = False, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self._schedule = _Schedule()
        self._loader = None if num_workers == 0 else DataLoader(
            _Batches(dataset), sampler=self._schedule, batch_size=None,
            num_workers=num_workers, prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers, pin_memory=pin_memory)

    def __call__(self, batches: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor,
                                                                        torch.Tensor]]:
        if self._loader is None:
            return (self.dataset.get_batch(index) for index in batches)
        self._schedule.batches = list(batches)
        return iter(self._loader)
