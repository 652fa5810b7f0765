"""Run by tests/test_distributed_training.py, in one process or under ``torchrun
--nproc_per_node 2`` (gloo, CPU): the shared fit loop on a small MLP, saved to OUT.

``step``: one SGD step (lr 1, no momentum or decay) of a global batch of 8, so the weight
change is minus the gradient of the whole batch. ``fit``: 2 epochs of Adam over 24 items,
batches of 8 drawn from the seeded permutation, every step logged and the state saved.
Neither draws anything at random (dropout 0, no augmentation): in one process the
augmentation draws come from the generator of the batch order, under torchrun from a
generator per rank and step, so with draws the two follow different, equally valid,
sequences. Without them the result must be the single process's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from compatzoo.distributed import is_main, launched_world_size
from compatzoo.engine.fitting import Recipe, StepLog, fit_epochs
from compatzoo.interfaces import LossOutput


def problem(items: int):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(items, 6, generator=g), torch.randint(0, 3, (items,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3))
    return x, y, model


def run(kind: str, out: Path) -> None:
    items, recipe = (8, Recipe(epochs=1, batch_size=8, optimizer="sgd", lr=1.0, momentum=0.0,
                               weight_decay=0.0)) if kind == "step" else (
        24, Recipe(epochs=2, batch_size=8, optimizer="adam", lr=0.01, weight_decay=1e-4))
    x, y, model = problem(items)
    model[2].p = 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def batch_loss(index, generator):
        logits = model(x[index])
        return LossOutput(F.cross_entropy(logits, y[index]),
                          {"mean_logit": logits.mean()})

    saved = []
    log = StepLog(out / "steps.jsonl", 1, kind)
    history = list(fit_epochs(model, items, batch_loss, recipe, seed=3, progress=False,
                              step_log=log, save=saved.append, save_every=1))
    if is_main():
        tensors = {f"after.{k}": v.contiguous() for k, v in model.state_dict().items()}
        tensors |= {f"before.{k}": v.contiguous() for k, v in before.items()}
        save_file(tensors, out / "weights.safetensors")
        (out / "history.txt").write_text(repr([{k: v for k, v in h.items() if k != "seconds"}
                                               for h in history]))
        (out / "saved.txt").write_text(repr([(s.epoch, s.next_batch, s.step,
                                              None if s.rank_rngs is None
                                              else len(s.rank_rngs)) for s in saved]))


if __name__ == "__main__":
    if launched_world_size() > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for kind in sys.argv[1].split(","):
        (Path(sys.argv[2]) / kind).mkdir(parents=True, exist_ok=True)
        run(kind, Path(sys.argv[2]) / kind)
    if launched_world_size() > 1:
        dist.destroy_process_group()
