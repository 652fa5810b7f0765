"""Images decoded in DataLoader workers: the same batches, features and trained weights as
decoding in the training process, and a decoding error that still names the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compatzoo.data import FileImages
from compatzoo.data.preprocess import Preprocess
from compatzoo.engine import extract_features, train_model
from compatzoo.engine.loading import BatchLoader
from compatzoo.errors import DatasetError
from compatzoo.heads import HEADS
from compatzoo.encoders import ENCODERS
from compatzoo.interfaces import WeightedLoss
from compatzoo.losses import ClassificationLoss
from compatzoo.specs import TrainSpec


def noisy_images(folder: Path, n: int, classes: int = 3) -> FileImages:
    """``n`` 12x12 PNGs of random pixels (decoding differences would show)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return FileImages(paths, np.arange(n) % classes,
                      Preprocess(image_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))


def test_workers_serve_the_batches_in_the_order_asked(tmp_path):
    images = noisy_images(tmp_path, 20)
    batches = [torch.tensor([3, 1, 4]), torch.tensor([15, 9]), torch.tensor([2, 6, 5, 19])]
    loader = BatchLoader(images, num_workers=2, persistent_workers=True)
    for _ in range(2):                       # a second pass over the persistent workers
        served = list(loader(batches))
        assert len(served) == 3
        for index, (pixels, labels) in zip(batches, served):
            expected_pixels, expected_labels = images.get_batch(index)
            assert torch.equal(pixels, expected_pixels)        # the same decode, bytewise
            assert torch.equal(labels, expected_labels)


def test_features_and_training_with_workers_equal_those_without(tmp_path):
    images = noisy_images(tmp_path, 24)
    results = []
    for workers in (0, 2):
        torch.manual_seed(0)
        encoder = ENCODERS["tiny-cnn"](ENCODERS["tiny-cnn"].Params(widths=[4, 8],
                                                                   embedding_dim=8))
        head = HEADS["cosface"](HEADS["cosface"].Params(), 8, 3)
        cfg = TrainSpec(epochs=2, batch_size=8, optimizer="adam", lr=0.01,
                        num_workers=workers, device="cpu")
        loss = WeightedLoss([("classification", 1.0, ClassificationLoss())])
        trained = train_model(encoder, head, images, loss, cfg, augment=lambda x, **_: x,
                              seed=0, progress=False)
        features = extract_features(trained.encoder, images, 5, "cpu", False,
                                    num_workers=workers)
        results.append((trained.encoder.state_dict(), trained.history, features))
    (weights0, history0, features0), (weights2, history2, features2) = results
    assert all(torch.equal(weights0[k], weights2[k]) for k in weights0)
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in history0] == [
        {k: v for k, v in h.items() if k != "seconds"} for h in history2]
    assert torch.equal(features0, features2)


def test_an_unreadable_image_in_a_worker_is_reported_with_its_path(tmp_path):
    images = noisy_images(tmp_path, 6)
    images.paths[4].write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="004.png"):
        list(BatchLoader(images, num_workers=2)([torch.tensor([0, 1]), torch.tensor([4])]))
