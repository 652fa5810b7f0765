"""Per-step cost of each compat loss relative to plain classification training.

Every configuration trains the same new encoder for the same steps in this process; the
figure of merit is (step time with the loss) / (step time of classification alone),
measured with the old-feature cache (augmentation off, so cached old features are exact)
and without it (old encoder run live on every batch). Cache construction is a one-off
cost and is reported separately.

    python benchmarks/bench_losses.py [--steps 40] [--batch-size 128] [--out bench_losses.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import compatzoo
from compatzoo.data.datasets import TensorImages
from compatzoo.engine import TrainedModel, extract_features, train_model
from compatzoo.interfaces import WeightedLoss
from compatzoo.specs import TrainSpec

LOSSES = {
    "bct": [("bct", {})],
    "l2": [("l2", {})],
    "cosine": [("cosine", {})],
    "lwf": [("lwf", {})],
    "focal-distillation": [("focal-distillation", {})],
    "supcon": [("supcon", {})],
    "ract": [("ract", {})],
    "ra-on-bct": [("bct", {}), ("ract", {})],
    "mixbct": [("mixbct", {})],
}


def identity(images, generator=None):
    return images


identity.is_identity = True


def flip(images, generator=None):
    """A cheap real augmentation, so cached features are not exact and run live."""
    return images.flip(-1)


def make_data(n: int, classes: int, size: int) -> TensorImages:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % classes
    return TensorImages(images, labels.numpy(), (0.5,) * 3, (0.25,) * 3)


def build(widths, dim, classes):
    encoder = compatzoo.create_encoder("tiny-cnn", widths=widths, embedding_dim=dim)
    return encoder, compatzoo.create_head("cosface", dim, classes)


def step_seconds(model: TrainedModel) -> float:
    """Fastest epoch's time per step: the least disturbed by other work on the machine."""
    return min(epoch["seconds"] / epoch["steps"] for epoch in model.history)


def ratio(losses, data, cfg, old, augment, cache) -> tuple[float, float]:
    """(loss step time / classification step time, classification step time), with the
    baseline measured right before, so slow drifts of a shared machine cancel out."""
    base = run([], data, cfg, old, identity, "auto")
    return run(losses, data, cfg, old, augment, cache) / base, base


def run(losses: list[tuple[str, dict]], data, cfg, old, augment, cache: str) -> float:
    terms = ([] if any(n == "mixbct" for n, _ in losses) else
             [("classification", 1.0, compatzoo.get_loss("classification"))])
    terms += [(name, 1.0, compatzoo.get_loss(name, **params)) for name, params in losses]
    encoder, head = build(args.new_widths, args.dim, args.classes)
    model = train_model(encoder, head, data, WeightedLoss(terms), cfg, augment=augment, seed=1,
                        old=old, old_feature_cache=cache, progress=False)
    return step_seconds(model)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3, help="epochs per configuration; "
                        "the fastest is reported")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--old-widths", type=int, nargs="+", default=[16, 32, 64, 64])
    parser.add_argument("--new-widths", type=int, nargs="+", default=[32, 64, 128, 128])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))

    data = make_data(args.steps * args.batch_size, args.classes, args.image_size)
    cfg = TrainSpec(epochs=args.repeats, batch_size=args.batch_size, optimizer="sgd", lr=0.01)
    old_encoder, old_head = build(args.old_widths, args.dim, args.classes)
    old = TrainedModel(old_encoder.eval(), old_head.eval(), torch.arange(args.classes))

    tick = time.perf_counter()
    extract_features(old.encoder, data, 512, progress=False)
    cache_seconds = time.perf_counter() - tick
    run([], data, cfg, old, identity, "auto")  # warm-up: allocator, kernels, thread pool
    base = run([], data, cfg, old, identity, "auto")
    bases = [base]
    results = {"steps": args.steps, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
               "classification_step_s": base, "cache_build_s": cache_seconds, "losses": {}}
    print(f"classification only: {1000 * base:.1f} ms/step; old-feature cache built once in "
          f"{cache_seconds:.2f} s ({args.steps * args.batch_size} images)")
    print(f"{'loss':<20}{'with cache':>14}{'without cache':>20}")
    for name in args.losses:
        cached, b1 = ratio(LOSSES[name], data, cfg, old, identity, "auto")
        live, b2 = (ratio(LOSSES[name], data, cfg, old, flip, "never") if name != "mixbct"
                    else (None, b1))
        bases += [b1, b2]
        results["losses"][name] = {"with_cache_ratio": cached, "without_cache_ratio": live}
        live_text = "n/a (needs cache)" if live is None else f"{live:.3f}x"
        print(f"{name:<20}{cached:>13.3f}x{live_text:>20}", flush=True)
    spread = (max(bases) - min(bases)) / min(bases)
    results["baseline_spread"] = spread
    print(f"classification step time ranged {1000 * min(bases):.1f}-{1000 * max(bases):.1f} ms "
          f"over the run ({100 * spread:.0f}% spread: the machine's noise)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
