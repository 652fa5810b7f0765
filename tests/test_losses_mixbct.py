"""compatzoo-mixbct: denoising, the mix operation and the single classification loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from compatzoo.errors import DimensionMismatchError, SpecError
from compatzoo.interfaces import FeatureCache, LossInputs, TrainingContext
from compatzoo.registry import get_registry
from compatzoo_mixbct import MixBCTLoss, MixBCTParams, credible_mask
from losses_support import CosMarginHead, randn


class RecordingHead(CosMarginHead):
    """Remembers the embeddings it classified last."""

    def forward(self, features, labels=None):
        self.seen = features.detach().clone()
        return super().forward(features, labels)


def credible_reference(features, labels, fraction):
    """Rows L2-normalised, each dimension L2-normalised over the set, then per class the
    ceil(fraction * n) features nearest the class mean."""
    rows = [r / r.norm() for r in features.double()]
    columns = torch.stack(rows)
    x = columns / columns.norm(dim=0)
    keep = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        members = [i for i in range(len(labels)) if labels[i] == c]
        mean = sum(x[i] for i in members) / len(members)
        nearest = sorted(members, key=lambda i: float((x[i] - mean).norm()))
        for i in nearest[:math.ceil(round(fraction * len(members), 9))]:
            keep[i] = True
    return keep


def cache(n_per_class=(10, 7, 3, 12), dim=4, seed=0) -> FeatureCache:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    spread = torch.linspace(0.2, 3.0, dim)   # dimensions of very different scales
    return FeatureCache(randn(len(labels), dim, seed=seed) * spread + 1.0, labels)


def prepared(params: MixBCTParams | None = None, data=None, dim=4) -> MixBCTLoss:
    loss = MixBCTLoss(params)
    loss.prepare(TrainingContext(num_classes=4, new_embedding_dim=dim, old_embedding_dim=4,
                                 old_feature_cache=data or cache()))
    return loss


def step(loss, data, indices, seed=1):
    indices = torch.as_tensor(indices)
    new = randn(len(indices), 4, seed=seed, grad=True)
    head = RecordingHead(4, 4)
    out = loss(LossInputs(new_features=new, labels=data.labels[indices], indices=indices,
                          new_head=head))
    replaced = (head.seen != new.detach()).any(dim=1)
    return out, new, head, replaced


# ----------------------------------------------------------------- denoising
def test_credible_mask_matches_the_paper_normalisation():
    # with this seed, normalising only the rows, only the dimensions, or standardising
    # within each class would each keep a different set
    data = cache(seed=2)
    mask = credible_mask(data.features, data.labels, 0.9)
    assert torch.equal(mask, credible_reference(data.features, data.labels, 0.9))
    # per class ceil(0.9 n): 9 of 10, 7 of 7, 3 of 3, 11 of 12
    counts = [int(mask[data.labels == c].sum()) for c in range(4)]
    assert counts == [9, 7, 3, 11]


def test_credible_mask_drops_the_outlier_of_a_class():
    features = torch.ones(10, 3) + 0.01 * randn(10, 3)
    features[4] = torch.tensor([1.0, -2.0, 0.5])
    mask = credible_mask(features, torch.zeros(10, dtype=torch.long), 0.9)
    assert not mask[4] and mask.sum() == 9


# ----------------------------------------------------------------- mixing
@pytest.mark.parametrize("batch_size, expected", [(10, 3), (16, 5), (5, 2), (2, 1)])
def test_replaces_round_alpha_b_credible_rows_by_their_old_features(batch_size, expected):
    data = cache()
    loss = prepared(data=data)
    g = torch.Generator().manual_seed(batch_size)
    for trial in range(4):
        indices = torch.randperm(len(data.labels), generator=g)[:batch_size]
        out, new, head, replaced = step(loss, data, indices, seed=trial)
        assert int(replaced.sum()) == expected
        assert bool(loss.credible[indices[replaced]].all())
        assert torch.equal(head.seen[replaced], data.features[indices[replaced]])
        assert torch.equal(head.seen[~replaced], new.detach()[~replaced])
        assert out.parts["mixed_share"].item() == pytest.approx(expected / batch_size)


def test_replaces_every_credible_row_when_too_few_are_credible():
    data = cache()
    loss = prepared(data=data)
    indices = torch.arange(10)                       # class 0
    loss.credible = torch.zeros_like(loss.credible)
    loss.credible[[2, 7]] = True
    _, _, _, replaced = step(loss, data, indices)
    assert replaced.nonzero().flatten().tolist() == [2, 7]


def test_loss_is_the_new_head_classification_of_the_mixed_batch():
    data = cache()
    loss = prepared(data=data)
    indices = torch.arange(0, 32, 2)
    out, new, head, replaced = step(loss, data, indices)
    labels = data.labels[indices]
    expected = F.cross_entropy(CosMarginHead(4, 4)(head.seen, labels), labels)
    assert torch.allclose(out.total, expected)
    out.total.backward()
    assert new.grad[replaced].abs().sum() == 0
    assert new.grad[~replaced].abs().sum(dim=1).min() > 0
    assert head.weight.grad is not None    # the new head is trained by this loss


def test_the_seed_decides_which_rows_are_mixed():
    data = cache()
    indices = torch.arange(0, 30)

    def picks(seed):
        loss = prepared(MixBCTParams(seed=seed), data=data)
        return [step(loss, data, indices)[3].nonzero().flatten().tolist() for _ in range(3)]

    assert picks(3) == picks(3)
    assert picks(3) != picks(4)


# ----------------------------------------------------------------- bad input
def test_dimension_mismatch_and_missing_cache_are_reported_in_prepare():
    with pytest.raises(DimensionMismatchError, match="embedding_dim 4"):
        prepared(dim=6)
    with pytest.raises(SpecError, match="old-feature cache"):
        MixBCTLoss().prepare(TrainingContext(num_classes=4, new_embedding_dim=4))


def test_registration_and_params_validation():
    record = get_registry().get("loss", "mixbct")
    assert record.distribution == "compatzoo-mixbct"
    loss = record.component(record.params_model(alpha=0.5, seed=3))
    assert isinstance(loss, MixBCTLoss)
    assert loss.required_inputs == {"old_feature_cache", "new_head"}
    with pytest.raises(ValidationError, match="credible_fractoin"):
        record.params_model(credible_fractoin=0.8)
    with pytest.raises(ValidationError):
        record.params_model(alpha=1.5)
