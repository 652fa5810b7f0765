"""Training throughput: compatzoo's loop against a plain PyTorch loop, and image loading.

1. Images/s of ``train_model`` against a hand-written loop (``for batch: forward, loss,
   backward, step``) over the same encoder, head, loss modules, data and batches:
   classification alone, and BCT with the old model run live on every batch and read
   from the old-feature cache. The two loops alternate, best of ``--repeats`` each, so
   the machine's drift hits both alike; the figure is compatzoo's time / the plain
   loop's (target: under 1.05).
2. Images/s of decoding an image folder (JPEG files) in 0, 1 and 2 DataLoader workers.

    python benchmarks/bench_training.py [--steps 30] [--repeats 5] [--out bench_training.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import compatzoo
from compatzoo.data import FileImages
from compatzoo.data.datasets import TensorImages
from compatzoo.data.preprocess import Preprocess
from compatzoo.engine import TrainedModel, extract_features, train_model
from compatzoo.engine.fitting import build_optimizer
from compatzoo.engine.loading import BatchLoader
from compatzoo.interfaces import FeatureCache, LossInputs, TrainingContext, WeightedLoss
from compatzoo.specs import TrainSpec


def identity(images, generator=None):
    return images


identity.is_identity = True


def make_data(n: int, classes: int, size: int) -> TensorImages:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return TensorImages(images, (torch.arange(n) % classes).numpy(), (0.5,) * 3, (0.25,) * 3)


def build(widths, dim, classes, seed=1):
    torch.manual_seed(seed)
    encoder = compatzoo.create_encoder("tiny-cnn", widths=widths, embedding_dim=dim)
    return encoder, compatzoo.create_head("cosface", dim, classes)


def loss_of(kind: str) -> WeightedLoss:
    terms = [("classification", 1.0, compatzoo.get_loss("classification"))]
    if kind != "classification":
        terms.append(("bct", 1.0, compatzoo.get_loss("bct")))
    return WeightedLoss(terms)


def engine_seconds(kind: str, data, cfg: TrainSpec, old: TrainedModel) -> float:
    """One epoch of ``train_model``: its own measure of the epoch (no setup)."""
    encoder, head = build(args.new_widths, args.dim, args.classes)
    model = train_model(encoder, head, data, loss_of(kind), cfg, augment=identity, seed=1,
                        old=None if kind == "classification" else old,
                        old_feature_cache="never" if kind == "bct-live" else "auto",
                        progress=False)
    return model.history[-1]["seconds"]


def plain_seconds(kind: str, data, cfg: TrainSpec, old: TrainedModel,
                  cache: torch.Tensor) -> float:
    """The same epoch written by hand: shuffle, slice, forward, loss, backward, step."""
    encoder, head = build(args.new_widths, args.dim, args.classes)
    loss = loss_of(kind)
    loss.prepare(TrainingContext(num_classes=args.classes, new_embedding_dim=args.dim,
                                 old_embedding_dim=args.dim, old_head=old.head,
                                 old_classes=old.classes,
                                 old_feature_cache=FeatureCache(cache, torch.as_tensor(
                                     data.labels))))
    model = torch.nn.ModuleDict({"encoder": encoder, "head": head, "loss": loss}).train()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))
    started = time.perf_counter()
    for step in range(len(data) // cfg.batch_size):
        index = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        images, labels = data.get_batch(index)
        extra = {}
        if kind == "bct-live":
            with torch.no_grad():
                extra["old_features"] = old.encoder(images)
        elif kind == "bct-cached":
            extra["old_features"] = cache[index]
        out = loss(LossInputs(new_features=encoder(images), labels=labels, indices=index,
                              new_head=head, old_head=old.head if extra else None, **extra))
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        optimizer.step()
    return time.perf_counter() - started


def loop_overhead(data, cfg, old, cache) -> dict[str, dict[str, float]]:
    results = {}
    for kind in ("classification", "bct-live", "bct-cached"):
        engine, plain = [], []
        for _ in range(args.repeats):        # interleaved: the machine's drift hits both
            plain.append(plain_seconds(kind, data, cfg, old, cache))
            engine.append(engine_seconds(kind, data, cfg, old))
        results[kind] = {"compatzoo_images_s": len(data) / min(engine),
                         "plain_images_s": len(data) / min(plain),
                         "ratio": min(engine) / min(plain)}
        print(f"{kind:<16}{results[kind]['compatzoo_images_s']:>12.0f}"
              f"{results[kind]['plain_images_s']:>12.0f}{results[kind]['ratio']:>10.3f}",
              flush=True)
    return results


def write_folder(root: Path, n: int, size: int) -> FileImages:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = root / f"{i:05d}.jpg"
        pixels = rng.integers(0, 256, (size * 3 // 4, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return FileImages(paths, np.arange(n) % 10,
                      Preprocess(image_size=args.image_size, mean=(0.5,) * 3, std=(0.25,) * 3))


def loading(images: FileImages) -> dict[str, float]:
    """Decoding alone (no model), with persistent workers started and warmed up first:
    what the workers can feed, not their start-up."""
    batches = list(torch.arange(len(images)).split(args.batch_size))
    loaders = {workers: BatchLoader(images, workers, persistent_workers=workers > 0)
               for workers in (0, 1, 2)}
    best = {workers: float("inf") for workers in loaders}
    for repeat in range(args.repeats + 1):
        for workers, loader in loaders.items():
            started = time.perf_counter()
            for _batch in loader(batches):
                pass
            if repeat:                        # the first pass starts the workers
                best[workers] = min(best[workers], time.perf_counter() - started)
    return {str(w): len(images) / s for w, s in best.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--old-widths", type=int, nargs="+", default=[16, 32, 64, 64])
    parser.add_argument("--new-widths", type=int, nargs="+", default=[32, 64, 128, 128])
    parser.add_argument("--folder-images", type=int, default=1024)
    parser.add_argument("--folder-size", type=int, default=320,
                        help="width of the stored JPEGs (4:3; decoded, then fitted to "
                        "--image-size)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))

    data = make_data(args.steps * args.batch_size, args.classes, args.image_size)
    cfg = TrainSpec(epochs=1, batch_size=args.batch_size, optimizer="sgd", lr=0.01)
    old_encoder, old_head = build(args.old_widths, args.dim, args.classes, seed=0)
    old = TrainedModel(old_encoder.eval(), old_head.eval(), torch.arange(args.classes))
    for p in [*old.encoder.parameters(), *old.head.parameters()]:
        p.requires_grad_(False)
    cache = extract_features(old.encoder, data, 512, progress=False)
    engine_seconds("classification", data, cfg, old)          # warm-up
    print(f"{args.steps} steps of {args.batch_size} images ({args.image_size} px), "
          f"{torch.get_num_threads()} threads, best of {args.repeats}, interleaved")
    print(f"{'loop':<16}{'compatzoo':>12}{'plain':>12}{'ratio':>10}   (images/s)")
    results = {"steps": args.steps, "batch_size": args.batch_size,
               "threads": torch.get_num_threads(), "loop": loop_overhead(data, cfg, old, cache)}
    with tempfile.TemporaryDirectory() as tmp:
        images = write_folder(Path(tmp), args.folder_images, args.folder_size)
        results["folder_images_s"] = loading(images)
    print("image folder decoding, images/s by DataLoader workers: " + ", ".join(
        f"{w}: {v:.0f}" for w, v in results["folder_images_s"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
