"""compatzoo-fastfill: the sigma output, FastFill's loss on hand values, its fit through
the frozen new head, per-item uncertainty and registration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import compatzoo
from compatzoo.errors import DimensionMismatchError, SpecError
from compatzoo.plugin import HopData, StoredGallery
from compatzoo.registry import get_registry
from compatzoo_fastfill import FastFillParams, FastFillUpgrader, fastfill_loss
from compatzoo_fct import FCTTransformation

D_OLD, D_NEW, CLASSES = 8, 12, 4


def fastfill(**params) -> FastFillUpgrader:
    params = {"side_info": "none", "side_info_dim": 6, "inner_dim": 32, **params}
    return compatzoo.create_upgrader("fastfill", D_OLD, D_NEW, **params)


def problem(n: int = 256, seed: int = 0):
    """Old features, new features = a fixed linear map of them, labels of a linear head."""
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(n, D_OLD, generator=g)
    new = old @ torch.randn(D_OLD, D_NEW, generator=g)
    head = compatzoo.create_head("linear", embedding_dim=D_NEW, num_classes=CLASSES)
    with torch.no_grad():
        labels = head(new).argmax(dim=1)
    return old, new, labels, head


def context(old, new, labels, head) -> HopData:
    return HopData(old_features=old, new_features=new, labels=labels, new_head=head,
                   progress=False)


def test_the_transformation_has_one_extra_sigma_output():
    ff = fastfill()
    assert isinstance(ff, FCTTransformation)                       # FCT's h, reused
    assert ff.net.mixer[-1].out_features == D_NEW + 1
    old = torch.randn(5, D_OLD)
    features, sigma = ff.eval().predict(old)
    assert features.shape == (5, D_NEW) and sigma.shape == (5,)
    assert torch.equal(ff(old), features)
    assert ff.upgrade(np.zeros((5, D_OLD), np.float32)).shape == (5, D_NEW)


def test_loss_matches_hand_values():
    features, target = torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2)
    logits, labels = torch.zeros(1, 2), torch.tensor([0])    # uniform: CE = ln 2, any smoothing
    l_i = 0.5 + 1.0 * math.log(2)                            # MSE_i = (1 + 0) / 2
    got = fastfill_loss(features, torch.zeros(1), target, logits, labels)
    assert float(got) == pytest.approx(0.5 * l_i)
    sigma = torch.tensor([math.log(2)])
    expected = 0.5 * 0.5 * l_i + 0.5 * math.log(2)           # 0.5 exp(-sigma) l_i + mu sigma
    assert float(fastfill_loss(features, sigma, target, logits, labels)) == pytest.approx(expected)
    confident = torch.tensor([[10.0, 0.0]])                  # smoothing 0.1 puts 0.05 on class 1
    log_p = torch.log_softmax(confident, 1)[0]
    ce = -(0.95 * log_p[0] + 0.05 * log_p[1])
    got = fastfill_loss(target, torch.zeros(1), target, confident, labels, mu_disc=2.0)
    assert float(got) == pytest.approx(float(0.5 * 2.0 * ce))


def test_paper_defaults():
    p = FastFillParams()
    assert (p.mu, p.mu_disc, p.label_smoothing) == (0.5, 1.0, 0.1)


def test_fit_reduces_the_loss_and_leaves_the_head_untouched():
    old, new, labels, head = problem()
    ff = fastfill(epochs=10, batch_size=32, lr=1e-2, warmup_epochs=1)
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    loss_fn = ff.mapping_loss(context(old, new, labels, head))

    def full_loss() -> float:
        with torch.no_grad():
            return float(loss_fn(ff.eval().net(old, torch.zeros(len(old), 6)), new, labels))

    before = full_loss()
    logs = ff.fit(context(old, new, labels, head))
    assert logs[-1]["loss"] < logs[0]["loss"] and full_loss() < before - 1.0
    assert all(torch.equal(v, head_before[k]) for k, v in head.state_dict().items())


def test_sigma_is_larger_where_the_target_is_unpredictable():
    old, new, labels, head = problem(n=1024)
    noisy = torch.arange(len(old)) % 2 == 1
    old[noisy, 0] = 3.0                                        # a visible marker for the noisy half
    new = torch.where(noisy[:, None], 3 * torch.randn_like(new), new)
    ff = fastfill(epochs=15, batch_size=64, lr=1e-2, warmup_epochs=1)
    ff.fit(context(old, new, labels, head))
    assert ff.publishes == {"sigma"}
    sigma = ff.signals(StoredGallery(old))["sigma"]
    assert sigma.shape == (len(old),) and sigma.dtype == np.float32
    assert sigma[noisy.numpy()].mean() > sigma[~noisy.numpy()].mean() + 1.0
    first = np.argsort(-sigma, kind="stable")[: len(old) // 2]
    assert noisy.numpy()[first].mean() > 0.9                   # sigma order backfills noise first


def test_sigma_equals_predict_in_any_chunking_and_keeps_the_mode():
    ff = fastfill().eval()
    old = torch.randn(10, D_OLD)
    with torch.no_grad():
        full = ff.predict(old)[1].numpy()
    assert np.array_equal(ff.sigma(old.numpy()), full)            # one chunk: the same call
    # Chunks of 3 rows are other matrix shapes: BLAS may sum in another order, so the
    # values agree to float32 rounding, not bit for bit.
    np.testing.assert_allclose(ff.sigma(old.numpy(), chunk_size=3), full, rtol=1e-5, atol=1e-6)
    assert not ff.training
    ff.train()
    ff.sigma(old.numpy())
    assert ff.training


def test_missing_or_mismatched_head_fails_before_any_work():
    old, new, labels, head = problem(n=16)
    ff = fastfill(side_info="alt-old", side_model={"encoder_params": {"widths": [4]}})
    with pytest.raises(SpecError, match="classifier head"):
        ff.fit(context(old, new, labels, None))
    assert not bool(ff.side_model.fitted)
    wrong = compatzoo.create_head("linear", embedding_dim=D_NEW + 1, num_classes=CLASSES)
    with pytest.raises(DimensionMismatchError, match="13-d"):
        ff.fit(context(old, new, labels, wrong))


def test_registered_through_the_entry_point_with_validated_params():
    assert get_registry().get("upgrader", "fastfill").distribution == "compatzoo-fastfill"
    assert isinstance(fastfill(mu=0.25), FastFillUpgrader) and fastfill(mu=0.25).params.mu == 0.25
    with pytest.raises(SpecError, match="label_smoothing"):
        fastfill(label_smoothing=1.5)
    with pytest.raises(SpecError, match="sigma_weight: unknown parameter"):
        fastfill(sigma_weight=1.0)


def test_sigma_from_a_separate_linear_layer_like_the_reference_code():
    """``sigma_head: linear`` (ml-fct's FastFill): h keeps d_new outputs and sigma is a
    Linear(d_new, 1) of them; it is trained with h by the same loss."""
    ff = fastfill(sigma_head="linear", epochs=5, batch_size=32, lr=1e-2)
    assert ff.net.transformation.mixer[-1].out_features == D_NEW
    old = torch.randn(5, D_OLD)
    features, sigma = ff.eval().predict(old)
    torch.testing.assert_close(sigma, ff.net.sigma(features)[:, 0])
    assert torch.equal(ff(old), features)
    layer = ff.net.sigma.weight.detach().clone()
    ff.fit(context(*problem()))
    assert not torch.equal(ff.net.sigma.weight, layer)
    stored = ff.signals(StoredGallery(old))["sigma"]
    with torch.no_grad():
        np.testing.assert_allclose(stored, ff.eval().predict(old)[1].numpy(), rtol=1e-5,
                                   atol=1e-6)
    with pytest.raises(SpecError, match="sigma_head"):
        fastfill(sigma_head="layer")


def test_an_augmented_step_is_fastfills_loss_on_the_augmented_features():
    """features: augmented, FastFill's loss: the frozen models on one view of the images."""
    import copy

    from compatzoo.data.datasets import TensorImages

    g = torch.Generator().manual_seed(0)
    images = TensorImages(torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8, generator=g),
                          np.arange(16) % CLASSES, (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(2)
    source = compatzoo.create_encoder("tiny-cnn", widths=[4, 8], embedding_dim=D_OLD).eval()
    target = compatzoo.create_encoder("tiny-cnn", widths=[4, 8], embedding_dim=D_NEW).eval()
    head = compatzoo.create_head("linear", embedding_dim=D_NEW, num_classes=CLASSES)
    x, labels = images.get_batch(np.arange(16))
    with torch.no_grad():
        old, new = source(x), target(x)

    def flip(batch, generator=None):
        return batch.flip(-1)

    data = HopData(old_features=old, new_features=new, labels=labels, new_head=head,
                   new_train=images, augment=flip, source_encoder=source,
                   target_encoder=target, progress=False)
    ff = fastfill(side_info="old-embedding", features="augmented", epochs=1, batch_size=16)
    before = copy.deepcopy(ff).train()
    logs = ff.fit(data)
    with torch.no_grad():
        view_old, view_new = source(flip(x)), target(flip(x))
        out = before.net(view_old, view_old)
        expected = fastfill_loss(out[:, :-1], out[:, -1], view_new, head(out[:, :-1]), labels)
    assert logs[-1]["loss"] == pytest.approx(float(expected), rel=1e-5)
