"""Run by tests/test_losses_ract.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Each rank embeds its half of one batch with the same tiny encoder, computes RACT with
negatives gathered from both ranks and back-propagates; the loss is averaged over ranks
and the encoder gradients are averaged the way DDP does. Results go to OUT/rank{r}.pt.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

from compatzoo.distributed import all_gather_with_grad, rank, world_size
from compatzoo.interfaces import LossInputs
from compatzoo_ract import RACTLoss, RACTParams

CONFIGS = {
    "eq6": {},
    "split-topk": {"n2n_weight": 0.5, "topk_negatives": 3, "temperature_n2n": 0.1},
}


def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, nn.Linear]:
    """One batch of 8 (classes repeat across the two halves) and a seeded encoder."""
    g = torch.Generator().manual_seed(0)
    x, old = torch.randn(8, 5, generator=g), torch.randn(8, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 3, 1, 4, 2])
    torch.manual_seed(0)
    return x, old, labels, nn.Linear(5, 4)


def ract_step(encoder: nn.Linear, x, old, labels, params: dict
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and d(loss)/d(features) for one batch, plus encoder grads left in ``.grad``."""
    encoder.zero_grad()
    new = encoder(x)
    new.retain_grad()
    loss = RACTLoss(RACTParams(**params))(LossInputs(
        new_features=new, labels=labels, indices=torch.arange(len(labels)),
        old_features_view2=old)).total
    loss.backward()
    return loss.detach(), new.grad


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    r, ws = rank(), world_size()
    x, old, labels, encoder = problem()
    half = slice(r * len(labels) // ws, (r + 1) * len(labels) // ws)
    results: dict[str, object] = {}
    for name, params in CONFIGS.items():
        loss, feature_grad = ract_step(encoder, x[half], old[half], labels[half], params)
        dist.all_reduce(loss)
        grads = [p.grad.clone() for p in encoder.parameters()]
        for grad in grads:
            dist.all_reduce(grad)   # DDP: average gradients over ranks
        results[name] = {"loss": loss / ws, "feature_grad": feature_grad / ws,
                         "param_grads": [grad / ws for grad in grads]}

    # Uneven shards: rank 0 holds 3 rows, rank 1 holds 5.
    rows = torch.arange(8.0).reshape(8, 1).repeat(1, 2)
    mine = rows[:3] if r == 0 else rows[3:]
    mine = mine.clone().requires_grad_()
    gathered = all_gather_with_grad(mine)
    (gathered * rows).sum().backward()   # every rank's loss uses every row
    results["uneven"] = {"gathered": gathered.detach(), "grad": mine.grad}
    torch.save(results, f"{out_dir}/rank{r}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
