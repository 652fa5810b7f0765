"""Cross-process helpers for contrastive losses that use negatives from every rank.

``all_gather_with_grad`` concatenates a tensor from all ranks along dim 0 and keeps
gradients: in backward the gradient of the gathered tensor is summed over ranks (every
rank's loss may use this rank's rows as negatives) and the local slice is returned. With
DDP averaging gradients over ranks and each rank averaging its loss over its local
anchors, the update equals the single-process update on the concatenated batch.
All helpers are no-ops in a single process (torch.distributed not initialised).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    size = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 (ranks may hold different numbers of rows)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        sizes = _gather_sizes(tensor.shape[0], tensor.device)
        ctx.sizes, ctx.rank = sizes, rank()
        padded = F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, max(sizes) - tensor.shape[0]))
        chunks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(chunks, padded.contiguous())
        return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sum of d(loss_r)/d(rows) over all ranks r
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Rows of ``tensor`` from every rank, in rank order; the local rows keep their graph.

    Every rank must call this (it is a collective, and so is its backward). Returns
    ``tensor`` itself when not distributed.
    """
    if world_size() == 1:
        return tensor
    return _AllGather.apply(tensor)
