import pytest
import torch

import compatzoo
from compatzoo.data.datasets import TensorImages
from compatzoo.engine import load_state, save_state, train_model
from compatzoo.engine.checkpoints import read_manifest
from compatzoo.errors import CheckpointError, SpecError, TrainingDivergedError
from compatzoo.interfaces import CompatLoss, LossOutput, WeightedLoss
from compatzoo.specs import TrainSpec


def identity_augment(images, generator=None):
    return images


identity_augment.is_identity = True


def separable_dataset(n_per_class=24, classes=4, size=8, seed=0):
    """Each class is a constant colour + noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    base = torch.randint(0, 256, (classes, 3, 1, 1), generator=g).float()
    noise = torch.randn(len(labels), 3, size, size, generator=g) * 20
    images = (base[labels] + noise).clamp(0, 255).to(torch.uint8)
    return TensorImages(images, labels.numpy(), (0.5,) * 3, (0.25,) * 3)


def tiny_model(dim=8, classes=4, head="normface"):
    encoder = compatzoo.create_encoder("tiny-cnn", widths=[4, 8], embedding_dim=dim)
    return encoder, compatzoo.create_head(head, dim, classes, scale=8.0)


CFG = TrainSpec(epochs=3, batch_size=16, optimizer="adam", lr=1e-2, weight_decay=0.0, log_every=4)


def classification():
    return WeightedLoss([("classification", 1.0, compatzoo.get_loss("classification"))])


def test_training_reduces_the_loss_and_saves_a_loadable_checkpoint(tmp_path):
    data = separable_dataset()
    encoder, head = tiny_model()
    trained = train_model(encoder, head, data, classification(), CFG, augment=identity_augment,
                          seed=0, checkpoint_dir=tmp_path / "ckpt", log_path=tmp_path / "log.jsonl",
                          checkpoint_config={"role": "old"}, progress=False)
    losses = [h["loss"] for h in trained.history]
    assert losses[-1] < 0.7 * losses[0]
    assert trained.classes.tolist() == [0, 1, 2, 3]
    assert (tmp_path / "log.jsonl").read_text().count("\n") >= 1
    manifest = read_manifest(tmp_path / "ckpt")
    assert manifest["role"] == "old" and manifest["epoch"] == 3
    encoder2, head2 = tiny_model()
    load_state(tmp_path / "ckpt", {"encoder": encoder2, "head": head2})
    for key, value in trained.encoder.state_dict().items():
        torch.testing.assert_close(encoder2.state_dict()[key], value)


def test_corrupt_or_mismatched_checkpoints_raise(tmp_path):
    encoder, head = tiny_model()
    save_state(tmp_path, {"encoder": encoder, "head": head}, {})
    wider, head3 = tiny_model(dim=16)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_state(tmp_path, {"encoder": wider, "head": head3})
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_state(tmp_path, {"encoder": encoder, "head": head})
    with pytest.raises(CheckpointError, match="no config.json"):
        load_state(tmp_path / "nowhere", {"encoder": encoder})


class ExplodesAtStep(CompatLoss):
    def __init__(self, step):
        super().__init__()
        self.step, self.calls = step, 0

    def forward(self, inputs):
        self.calls += 1
        value = inputs.new_features.pow(2).mean()
        return LossOutput(value * (float("nan") if self.calls > self.step else 1.0))


def test_nan_loss_stops_with_step_part_and_last_checkpoint(tmp_path):
    data = separable_dataset()
    encoder, head = tiny_model()
    loss = WeightedLoss([("classification", 1.0, compatzoo.get_loss("classification")),
                         ("boom", 1.0, ExplodesAtStep(step=8))])
    with pytest.raises(TrainingDivergedError) as info:
        train_model(encoder, head, data, loss, CFG, augment=identity_augment, seed=0,
                    checkpoint_dir=tmp_path, progress=False)
    message = str(info.value)
    # the 9th step is the first whose loss is NaN (calls > 8); steps count from 1
    assert "step 9" in message and "'boom'" in message and str(tmp_path) in message


class RecordsInputs(CompatLoss):
    requires = frozenset({"old_features", "old_head"})

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, inputs):
        self.seen.append(inputs)
        return LossOutput(inputs.new_features.sum() * 0.0)


def test_old_branch_uses_cache_when_exact_and_runs_only_when_needed():
    data = separable_dataset()
    encoder, head = tiny_model()
    old = train_model(encoder, head, data, classification(), CFG, augment=identity_augment,
                      seed=0, progress=False)
    calls = {"n": 0}
    old.encoder.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))

    new_encoder, new_head = tiny_model()
    train_model(new_encoder, new_head, data, classification(), CFG, augment=identity_augment,
                seed=1, old=old, progress=False)
    assert calls["n"] == 0  # no loss needs the old model: it never runs

    recorder = RecordsInputs()
    loss = WeightedLoss([("classification", 1.0, compatzoo.get_loss("classification")),
                         ("rec", 1.0, recorder)])
    train_model(*tiny_model(), data, loss, CFG, augment=identity_augment, seed=1, old=old,
                progress=False)
    batches = len(data) // CFG.batch_size
    assert calls["n"] == -(-len(data) // 512)  # one cache pass, no per-step old forward
    expected = old.encoder(data.get_batch(recorder.seen[0].indices)[0])
    torch.testing.assert_close(recorder.seen[0].old_features, expected, atol=1e-5, rtol=1e-4)
    assert recorder.seen[0].old_head is old.head
    assert recorder.seen[0].old_features_view2 is None  # not declared: not computed
    assert len(recorder.seen) == batches * CFG.epochs
    assert not any(p.requires_grad for p in old.encoder.parameters())


def test_bct_training_leaves_the_old_model_untouched():
    data = separable_dataset()
    old = train_model(*tiny_model(), data, classification(), CFG, augment=identity_augment,
                      seed=0, progress=False)
    before = {k: v.clone() for k, v in {**old.encoder.state_dict(),
                                        **{f"h.{k}": v for k, v in old.head.state_dict().items()}}.items()}
    loss = WeightedLoss([("classification", 1.0, compatzoo.get_loss("classification")),
                         ("bct", 1.0, compatzoo.get_loss("bct"))])
    new = train_model(*tiny_model(), data, loss, CFG, augment=identity_augment, seed=1, old=old,
                      progress=False)
    after = {**old.encoder.state_dict(), **{f"h.{k}": v for k, v in old.head.state_dict().items()}}
    for key, value in before.items():
        torch.testing.assert_close(after[key], value)
    assert "bct" in new.history[-1]


def test_losses_needing_an_old_model_or_more_classes_fail_before_training():
    data = separable_dataset()
    loss = WeightedLoss([("bct", 1.0, compatzoo.get_loss("bct"))])
    with pytest.raises(SpecError, match="old_head"):
        train_model(*tiny_model(), data, loss, CFG, augment=identity_augment, seed=0,
                    progress=False)
    with pytest.raises(SpecError, match="batch_size"):
        train_model(*tiny_model(), data.subset(range(10)), classification(), CFG,
                    augment=identity_augment, seed=0, progress=False)
