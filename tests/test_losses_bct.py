"""compatzoo-bct losses against direct computations of the papers' formulas."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

import compatzoo
from compatzoo.errors import DimensionMismatchError, SpecError
from compatzoo.interfaces import FeatureCache, LossInputs, TrainingContext
from compatzoo.registry import get_registry
from compatzoo_bct import (BCTLoss, BCTParams, CosineLoss, FocalDistillationLoss,
                           FocalDistillationParams, L2Loss, L2Params, LwFLoss, LwFParams,
                           SupConLoss)
from losses_support import (CosMarginHead, LinearSoftmaxHead, assert_untouched, randn,
                            snapshot)


# ----------------------------------------------------------------- reference formulas
def cos_logits(f: torch.Tensor, weight: torch.Tensor, scale: float, margin: float = 0.0,
               label: int | None = None) -> torch.Tensor:
    """One sample's CosFace logits, written out class by class."""
    out = []
    for j in range(weight.shape[0]):
        c = torch.dot(f, weight[j]) / (f.norm() * weight[j].norm())
        out.append(scale * (c - (margin if j == label else 0.0)))
    return torch.stack(out)


def ce(logits: torch.Tensor, label: int) -> torch.Tensor:
    return -(logits[label] - torch.log(torch.exp(logits).sum()))


def kl(teacher: torch.Tensor, student: torch.Tensor, t: float) -> torch.Tensor:
    p = torch.softmax(teacher / t, 0)
    return (p * (torch.log(p) - torch.log_softmax(student / t, 0))).sum()


def context(head, num_classes, old_classes=None, cache=None) -> TrainingContext:
    return TrainingContext(num_classes=num_classes, new_embedding_dim=head.embedding_dim,
                           old_embedding_dim=head.embedding_dim, old_head=head,
                           old_classes=old_classes, old_feature_cache=cache)


def batch(new, labels, **extra) -> LossInputs:
    labels = torch.as_tensor(labels)
    return LossInputs(new_features=new, labels=labels, indices=torch.arange(len(labels)), **extra)


# ----------------------------------------------------------------- bct
def test_bct_influence_loss_on_old_classes_only():
    head = CosMarginHead(4, 3, scale=4.0, margin=0.2)
    before = snapshot(head)
    labels = [0, 3, 1, 4, 2, 0]
    new = randn(6, 4, grad=True)
    loss = BCTLoss()
    loss.prepare(context(head, num_classes=5))
    out = loss(batch(new, labels, old_head=head))

    expected = torch.stack([ce(cos_logits(new[i], head.weight, 4.0, 0.2, y), y)
                            for i, y in enumerate(labels) if y < 3]).mean()
    assert torch.allclose(out.total, expected, atol=1e-5)
    assert out.parts["old_known_share"].item() == pytest.approx(4 / 6)
    out.total.backward()
    assert new.grad[[1, 3]].abs().sum() == 0          # classes 3, 4: not in the old head
    assert new.grad[[0, 2, 4, 5]].abs().sum(dim=1).min() > 0
    assert_untouched(head, before)


def test_bct_old_classes_from_context_limit_the_term():
    head = CosMarginHead(4, 3)
    loss = BCTLoss()
    loss.prepare(context(head, num_classes=3, old_classes=torch.tensor([0, 2])))
    out = loss(batch(randn(3, 4), [0, 1, 2], old_head=head))
    assert out.parts["old_known_share"].item() == pytest.approx(2 / 3)


def test_bct_dim_rule_truncates_wider_and_pads_narrower_features():
    head = CosMarginHead(4, 3)
    labels = [0, 1, 2, 1]
    loss = BCTLoss()
    loss.prepare(context(head, num_classes=3))
    wide = randn(4, 6, grad=True)
    out = loss(batch(wide, labels, old_head=head))
    assert torch.allclose(out.total, loss(batch(wide[:, :4], labels, old_head=head)).total)
    out.total.backward()
    assert wide.grad[:, 4:].abs().sum() == 0 and wide.grad[:, :4].abs().sum() > 0

    narrow = randn(4, 3, seed=1)
    padded = torch.cat([narrow, torch.zeros(4, 1)], dim=1)
    assert torch.allclose(loss(batch(narrow, labels, old_head=head)).total,
                          loss(batch(padded, labels, old_head=head)).total)


def _cache(dim: int, classes: int, per_class: int = 4) -> FeatureCache:
    labels = torch.arange(classes).repeat_interleave(per_class)
    return FeatureCache(randn(len(labels), dim, seed=7), labels)


def test_bct_synthesized_rows_are_class_means_only_for_missing_classes():
    # The old head has 4 rows but was trained on classes 0-2 only; the new set has 5.
    head = CosMarginHead(4, 4, scale=4.0, margin=0.2)
    before = snapshot(head)
    cache = _cache(dim=4, classes=5)
    loss = BCTLoss(BCTParams(new_classes="synthesized"))
    assert "old_feature_cache" in loss.required_inputs
    loss.prepare(context(head, 5, old_classes=torch.tensor([0, 1, 2]), cache=cache))

    means = torch.stack([cache.features[cache.labels == c].mean(0) for c in range(5)])
    assert torch.equal(loss.synth_weight[:3], head.weight.detach()[:3])
    assert torch.allclose(loss.synth_weight[3:], means[3:], atol=1e-6)

    labels = [0, 3, 4, 2, 4]
    new = randn(5, 4, seed=3, grad=True)
    out = loss(batch(new, labels, old_head=head))
    rows = loss.synth_weight   # the normalised head normalises the appended rows itself
    expected = torch.stack([ce(cos_logits(new[i], rows, 4.0, 0.2, y), y)
                            for i, y in enumerate(labels)]).mean()
    assert torch.allclose(out.total, expected, atol=1e-5)
    out.total.backward()
    assert new.grad.abs().sum(dim=1).min() > 0   # new classes get a term too
    assert_untouched(head, before)



def synthesized_ce(loss: BCTLoss, new: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """The influence loss written out with the synthesized classifier: mean CE(W x + b, y)."""
    w, b = loss.synth_weight, loss.synth_bias
    return torch.stack([ce(w @ new[i] + b, y) for i, y in enumerate(labels)]).mean()

def test_bct_synthesized_with_linear_head_appends_zero_bias():
    head = LinearSoftmaxHead(4, 3)
    cache = _cache(dim=4, classes=5)
    loss = BCTLoss(BCTParams(new_classes="synthesized"))
    loss.prepare(context(head, 5, cache=cache))
    assert torch.equal(loss.synth_bias[:3], head.fc.bias.detach())
    assert torch.equal(loss.synth_bias[3:], torch.zeros(2))

    labels = [4, 1, 3]
    new = randn(3, 4, seed=5)
    assert torch.allclose(loss(batch(new, labels, old_head=head)).total,
                          synthesized_ce(loss, new, labels), atol=1e-5)


def test_bct_synthesize_all_replaces_every_row_with_its_class_mean_as_openbct():
    # openBCT: the old classifier is the old-feature class centres of every class (with a
    # linear head, no bias); a class absent from the training set keeps its own row.
    head = LinearSoftmaxHead(4, 4)
    cache = _cache(dim=4, classes=3)                   # class 3 has no training items
    loss = BCTLoss(BCTParams(new_classes="synthesized", synthesize="all"))
    loss.prepare(context(head, 4, cache=cache))
    means = torch.stack([cache.features[cache.labels == c].mean(0) for c in range(3)])
    assert torch.allclose(loss.synth_weight[:3], means, atol=1e-6)
    assert torch.equal(loss.synth_weight[3], head.fc.weight.detach()[3])
    assert torch.equal(loss.synth_bias, torch.cat([torch.zeros(3), head.fc.bias.detach()[3:]]))
    labels = [2, 0, 1]
    new = randn(3, 4, seed=9)
    assert torch.allclose(loss(batch(new, labels, old_head=head)).total,
                          synthesized_ce(loss, new, labels), atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "cosface", "arcface"])
def test_bct_synthesized_works_with_the_core_heads(kind):
    head = compatzoo.create_head(kind, 4, 3)
    loss = BCTLoss(BCTParams(new_classes="synthesized"))
    loss.prepare(context(head, 5, cache=_cache(dim=4, classes=5)))
    labels = torch.tensor([0, 4, 3])
    new = randn(3, 4, seed=2)
    out = loss(batch(new, labels, old_head=head))
    extended = copy.deepcopy(head)   # the same head, built with the extended rows
    for p in extended.parameters():
        p.data = (loss.synth_weight if p.dim() == 2 else loss.synth_bias).clone()
    expected = F.cross_entropy(extended(new, labels), labels)
    assert torch.allclose(out.total, expected, atol=1e-5)


def test_bct_synthesized_needs_cache_and_a_class_weight_matrix():
    loss = BCTLoss(BCTParams(new_classes="synthesized"))
    with pytest.raises(SpecError, match="old-feature cache"):
        loss.prepare(context(CosMarginHead(4, 3), 5))

    class TransposedHead(nn.Module):
        embedding_dim, num_classes, temperature = 4, 3, 1.0

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4, 3))

    with pytest.raises(SpecError, match="class weights"):
        loss.prepare(context(TransposedHead(), 5, cache=_cache(4, 5)))


def test_bct_distill_kl_at_head_temperature_for_new_classes():
    head = CosMarginHead(4, 3, scale=4.0, margin=0.2)
    loss = BCTLoss(BCTParams(new_classes="distill"))
    assert loss.required_inputs == {"old_head", "old_features"}
    loss.prepare(context(head, 5))
    labels = [0, 3, 1, 4]
    new, old = randn(4, 4, seed=1, grad=True), randn(4, 4, seed=2, grad=True)
    out = loss(batch(new, labels, old_head=head, old_features=old))

    w = head.weight
    terms = [ce(cos_logits(new[i], w, 4.0, 0.2, y), y) if y < 3 else
             kl(cos_logits(old[i], w, 4.0), cos_logits(new[i], w, 4.0), 4.0)
             for i, y in enumerate(labels)]
    assert torch.allclose(out.total, torch.stack(terms).mean(), atol=1e-6)
    out.total.backward()
    assert old.grad is None and new.grad[[1, 3]].abs().sum() > 0


def test_bct_old_head_as_a_plain_linear_layer_like_the_reference_code():
    """OpenCompatible / AdvBCT: CE(W_old x, y) without the head's normalisation, margin
    or scale, on the samples of old classes."""
    head = CosMarginHead(4, 3, scale=4.0, margin=0.35)
    loss = BCTLoss(BCTParams(old_head="linear"))
    loss.prepare(context(head, 5))
    labels = [0, 4, 2, 1]
    new = randn(4, 6, seed=3, grad=True)
    out = loss(batch(new, labels, old_head=head))
    logits = [head.weight.detach() @ new[i, :4] for i in (0, 2, 3)]
    expected = torch.stack([F.cross_entropy(logit[None], torch.tensor([labels[i]]))
                            for logit, i in zip(logits, (0, 2, 3))]).mean()
    torch.testing.assert_close(out.total, expected)
    own = BCTLoss()
    own.prepare(context(head, 5))
    assert not torch.allclose(own(batch(new, labels, old_head=head)).total, expected)


def test_bct_required_inputs_default_and_registry_params():
    assert BCTLoss().required_inputs == {"old_head"}
    record = get_registry().get("loss", "bct")
    with pytest.raises(ValidationError):
        record.params_model(new_classes="synthesised")


# ----------------------------------------------------------------- regression baselines
def test_l2_and_cosine_regression_with_the_dim_rule():
    old = randn(5, 4, seed=1, grad=True)
    for new in (randn(5, 6, seed=2, grad=True), randn(5, 3, seed=3, grad=True)):
        inputs = batch(new, [0, 1, 2, 3, 4], old_features=old)
        matched = [torch.cat([new[i, :4], torch.zeros(max(0, 4 - new.shape[1]))])
                   for i in range(5)]
        l2 = torch.stack([((matched[i] - old[i]) ** 2).sum() for i in range(5)]).mean()
        cos = torch.stack([1 - torch.dot(matched[i], old[i])
                           / (matched[i].norm() * old[i].norm()) for i in range(5)]).mean()
        assert torch.allclose(L2Loss()(inputs).total, l2, atol=1e-5)
        total = CosineLoss()(inputs).total
        assert torch.allclose(total, cos, atol=1e-6)
        total.backward()
        assert old.grad is None and new.grad[:, :min(4, new.shape[1])].abs().sum() > 0


def test_l2_reference_code_conventions():
    """'mean' is nn.MSELoss (openBCT); with 'normalize' it is OpenCompatible's 'l2'."""
    old, new = randn(5, 4, seed=4), randn(5, 4, seed=5)
    inputs = batch(new, [0, 1, 2, 3, 4], old_features=old)
    mean = L2Loss(L2Params(reduction="mean"))(inputs).total
    torch.testing.assert_close(mean, torch.nn.MSELoss()(new, old))
    both = L2Loss(L2Params(reduction="mean", normalize=True))(inputs).total
    torch.testing.assert_close(both, torch.nn.MSELoss()(F.normalize(new, dim=1),
                                                        F.normalize(old, dim=1)))
    summed = L2Loss(L2Params(normalize=True))(inputs).total
    torch.testing.assert_close(summed, 4 * both)


# ----------------------------------------------------------------- distillation baselines
def test_lwf_soft_labels_on_old_classes():
    head = CosMarginHead(4, 3, scale=4.0)
    before = snapshot(head)
    loss = LwFLoss(LwFParams(temperature=2.0))
    loss.prepare(context(head, 5))
    labels = [0, 4, 2]
    new, old = randn(3, 4, seed=1, grad=True), randn(3, 4, seed=2)
    out = loss(batch(new, labels, old_head=head, old_features=old))
    expected = torch.stack([kl(cos_logits(old[i], head.weight, 4.0),
                               cos_logits(new[i], head.weight, 4.0), 2.0) for i in (0, 2)])
    assert torch.allclose(out.total, expected.mean(), atol=1e-6)
    out.total.backward()
    assert new.grad[1].abs().sum() == 0 and new.grad[0].abs().sum() > 0
    assert_untouched(head, before)


def test_lwf_on_all_samples_as_the_reference_code_does():
    head = CosMarginHead(4, 3, scale=4.0)
    loss = LwFLoss(LwFParams(temperature=1.0, samples="all"))
    loss.prepare(context(head, 5))
    labels = [0, 4, 2]
    new, old = randn(3, 4, seed=1, grad=True), randn(3, 4, seed=2)
    out = loss(batch(new, labels, old_head=head, old_features=old))
    expected = torch.stack([kl(cos_logits(old[i], head.weight, 4.0),
                               cos_logits(new[i], head.weight, 4.0), 1.0) for i in range(3)])
    assert torch.allclose(out.total, expected.mean(), atol=1e-6)
    out.total.backward()
    assert new.grad[1].abs().sum() > 0          # the sample of an unknown class too


def test_old_features_of_the_wrong_dim_are_rejected():
    head = CosMarginHead(4, 3)
    loss = LwFLoss()
    loss.prepare(context(head, 3))
    with pytest.raises(DimensionMismatchError, match=r"\(batch, 4\)"):
        loss(batch(randn(2, 4), [0, 1], old_head=head, old_features=randn(2, 5)))


@pytest.mark.parametrize("divergence", ["kl", "l2"])
def test_focal_distillation_weights_samples_the_old_model_gets_right(divergence):
    old_head = CosMarginHead(4, 3, scale=4.0, seed=0)
    new_head = CosMarginHead(5, 5, scale=6.0, seed=1)
    before = snapshot(old_head)
    params = FocalDistillationParams(divergence=divergence)
    loss = FocalDistillationLoss(params)
    loss.prepare(context(old_head, 5))
    labels = [0, 1, 2, 4, 2]
    old = old_head.weight.detach()[[0, 2, 2, 1, 1]].clone()   # right, wrong, right, -, wrong
    new = randn(5, 5, seed=3, grad=True)
    out = loss(batch(new, labels, old_head=old_head, new_head=new_head, old_features=old))

    terms, correct = [], []
    for i, y in enumerate(labels):
        if y >= 3:
            continue
        z_old = cos_logits(old[i], old_head.weight, 4.0)
        z_new = cos_logits(new[i], new_head.weight, 6.0)[:3]
        right = int(z_old.argmax()) == y
        d = (kl(z_old, z_new, 100.0) * 100.0 ** 2 if divergence == "kl"
             else 0.5 * ((z_new - z_old) ** 2).sum())
        terms.append((1.0 + 5.0 * right) * d)
        correct.append(right)
    assert correct == [True, False, True, False]
    assert torch.allclose(out.total, torch.stack(terms).mean(), rtol=1e-4)
    assert out.parts["old_correct_share"].item() == pytest.approx(0.5)
    out.total.backward()
    assert new_head.weight.grad is not None and new.grad[3].abs().sum() == 0
    assert_untouched(old_head, before)


def test_focal_distillation_needs_a_new_head_covering_the_old_classes():
    loss = FocalDistillationLoss()
    old_head = CosMarginHead(4, 3)
    loss.prepare(context(old_head, 3))
    with pytest.raises(DimensionMismatchError, match="new head has 2 classes"):
        loss(batch(randn(2, 4), [0, 1], old_head=old_head, new_head=CosMarginHead(4, 2),
                   old_features=randn(2, 4)))


# ----------------------------------------------------------------- supervised contrastive
def test_supcon_matches_bict_eq10():
    labels = [0, 1, 0, 2, 1, 0]
    new, old = randn(6, 5, seed=1, grad=True), randn(6, 4, seed=2, grad=True)
    out = SupConLoss()(batch(new, labels, old_features=old))
    n = F.normalize(new.detach()[:, :4], dim=1)
    o = F.normalize(old.detach(), dim=1)
    per_anchor = []
    for i, y in enumerate(labels):
        denominator = sum(math.exp(float(n[i] @ o[j]) / 0.1) for j in range(6))
        positives = [j for j, yj in enumerate(labels) if yj == y]
        per_anchor.append(sum(-(float(n[i] @ o[p]) / 0.1 - math.log(denominator))
                              for p in positives) / len(positives))
    assert out.total.item() == pytest.approx(sum(per_anchor) / 6, rel=1e-5)
    out.total.backward()
    assert old.grad is None and new.grad[:, 4].abs().sum() == 0


# ----------------------------------------------------------------- registration
@pytest.mark.parametrize("name, params, cls", [
    ("bct", {"new_classes": "distill"}, BCTLoss),
    ("l2", {}, L2Loss),
    ("cosine", {}, CosineLoss),
    ("lwf", {"temperature": 4.0}, LwFLoss),
    ("focal-distillation", {"beta": 2.0}, FocalDistillationLoss),
    ("supcon", {"temperature": 0.2}, SupConLoss),
])
def test_losses_register_through_entry_points(name, params, cls):
    record = get_registry().get("loss", name)
    assert record.distribution == "compatzoo-bct"
    loss = record.component(record.params_model(**params))
    assert isinstance(loss, cls) and loss.required_inputs <= compatzoo.interfaces.LOSS_INPUTS
    with pytest.raises(ValidationError, match="extra"):
        record.params_model(**params, temprature=1.0)
