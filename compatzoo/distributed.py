"""Training under ``torchrun``: the process group, the split of work between ranks, and
cross-process helpers for losses that use negatives from every rank.

Every rank runs the whole experiment up to the evaluation (training through DDP, feature
extraction split by rows and gathered back in dataset order); rank 0 alone writes files,
logs and evaluates. :func:`start_from_env` joins the group ``torchrun`` describes.

``all_gather_with_grad`` concatenates a tensor from all ranks along dim 0 and keeps
gradients: in backward the gradient of the gathered tensor is summed over ranks (every
rank's loss may use this rank's rows as negatives) and the local slice is returned. With
DDP averaging gradients over ranks and each rank averaging its loss over its local
anchors, the update equals the single-process update on the concatenated batch.
All helpers are no-ops in a single process (torch.distributed not initialised).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from compatzoo.errors import CompatzooError, SpecError

T = TypeVar("T")
BACKENDS = ("auto", "gloo", "nccl")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """The process that writes files, logs, evaluates and reports (rank 0, or the only one)."""
    return rank() == 0


def launched_rank() -> int:
    """``RANK`` as torchrun sets it (0 outside torchrun), known before the group exists."""
    return int(os.environ.get("RANK", "0"))


def reports(error: BaseException) -> bool:
    """Whether this process prints ``error``: rank 0 always; another rank only an error
    of its own (its share of the data), since every rank meets the others' checks alike."""
    return launched_rank() == 0 or bool(getattr(error, "rank_specific", False))


def launched_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start_from_env(backend: str = "auto") -> torch.device | None:
    """Join the process group torchrun describes; returns this rank's device (None when
    the run is a single process, which changes nothing).

    ``auto`` is NCCL when CUDA is present, else gloo; NCCL without CUDA is refused before
    any process waits for another. Each rank takes GPU ``LOCAL_RANK``.
    """
    if backend not in BACKENDS:
        raise SpecError(f"distributed backend '{backend}' is not one of {', '.join(BACKENDS)}")
    if launched_world_size() <= 1 or is_distributed():
        return None
    cuda = torch.cuda.is_available()
    if backend == "nccl" and not cuda:
        raise SpecError("the nccl backend needs CUDA GPUs, and torch sees none on this "
                        "machine; use --dist-backend gloo (or auto) to train on CPUs")
    chosen = "nccl" if backend == "auto" and cuda else "gloo" if backend == "auto" else backend
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if cuda and chosen == "nccl":
        if per_machine > torch.cuda.device_count():
            raise SpecError(f"{per_machine} processes per machine (--nproc_per_node) but "
                            f"this machine has {torch.cuda.device_count()} GPU(s); start at "
                            "most one process per GPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(chosen)
    return device


def stop() -> None:
    """Leave the process group (a no-op in a single process)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class RankFailedError(CompatzooError):
    """Another rank raised; it reports the error, this rank only stops."""


def on_main(work: Callable[[], T]) -> T | None:
    """Run ``work`` on rank 0 only (checks, file writes); the other ranks wait for it and
    raise :class:`RankFailedError` if it failed, so one error is reported once and no
    rank is left waiting in a collective. Returns ``work``'s result on rank 0."""
    if not is_distributed():
        return work()
    outcome: list[Any] = [None]
    result = None
    if is_main():
        try:
            result = work()
        except BaseException as exc:
            outcome[0] = f"{type(exc).__name__}: {exc}"
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise RankFailedError(f"rank 0 failed ({outcome[0]})")
    return result


def all_agree(ok: bool) -> bool:
    """Whether every rank says ``ok``; lets all ranks stop together when one cannot go on."""
    if not is_distributed():
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def shard_rows(n: int) -> tuple[int, int]:
    """This rank's contiguous ``[start, stop)`` of ``n`` rows (earlier ranks take the
    remainder), so gathering the shards in rank order restores dataset order."""
    size, extra = divmod(n, world_size())
    start = rank() * size + min(rank(), extra)
    return start, start + size + (1 if rank() < extra else 0)


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of a :func:`shard_rows` split, concatenated in rank order, on
    every rank (without gradients)."""
    if world_size() == 1:
        return rows
    with torch.no_grad():
        return _gather(rows.to(_collective_device()))[0].to(rows.device)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics, which each rank updated
    with its own share of the last batch), so all ranks hold the model rank 0 saves."""
    if world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean of each logged value over the ranks (one small all-reduce), so logs and
    histories describe the whole batch, not rank 0's share of it."""
    if world_size() == 1 or not values:
        return values
    stacked = torch.tensor(list(values.values()), dtype=torch.float64,
                           device=_collective_device())
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / world_size()).tolist()))


def _collective_device() -> torch.device:
    """Where collectives take their tensors: the rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    size = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def _gather(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """All ranks' rows in rank order (ranks may hold different numbers of rows)."""
    sizes = _gather_sizes(tensor.shape[0], tensor.device)
    padded = F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, max(sizes) - tensor.shape[0]))
    chunks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded.contiguous())
    return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes)]), sizes


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 that sends each rank its rows' summed gradient back."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        gathered, ctx.sizes = _gather(tensor)
        ctx.rank = rank()
        return gathered

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
