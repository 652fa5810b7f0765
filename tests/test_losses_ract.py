"""compatzoo-ract losses against direct computations of RACT's eqs. 5, 6, 13, 14, 15."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from compatzoo.distributed import all_gather_with_grad, rank, world_size
from compatzoo.interfaces import LossInputs
from compatzoo.registry import get_registry
from compatzoo_ract import (ContrastiveLoss, ContrastiveParams, RACTLoss, RACTParams,
                            RACTTripletLoss, TripletLoss, TripletParams)
from losses_support import randn

LABELS = [0, 1, 0, 2, 1, 3, 0]


def batch(new, old, labels=LABELS) -> LossInputs:
    labels = torch.as_tensor(labels)
    return LossInputs(new_features=new, labels=labels, indices=torch.arange(len(labels)),
                      old_features_view2=old)


def unit_rows(new, old):
    """Normalised rows as python lists, new cut/padded to d_old (BCT's rule)."""
    d = old.shape[1]
    new = torch.cat([new.detach()[:, :d], torch.zeros(len(new), max(0, d - new.shape[1]))], 1)
    return F.normalize(new, dim=1).tolist(), F.normalize(old.detach(), dim=1).tolist()


def dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def nce(positive: float, negatives: list[float]) -> float:
    return -positive + math.log(math.exp(positive) + sum(math.exp(v) for v in negatives))


def contrastive_reference(new, old, labels=LABELS, tau=0.05, tau_n2o=None, tau_n2n=None,
                          topk=None, eta=None, new_to_new=True) -> float:
    """Eqs. 5/6/13 anchor by anchor; negatives are other-class samples only."""
    n, o = unit_rows(new, old)
    total = 0.0
    for x, y in enumerate(labels):
        others = [k for k, yk in enumerate(labels) if yk != y]
        n2o = sorted((dot(n[x], o[k]) for k in others), reverse=True)[:topk]
        n2n = sorted((dot(n[x], n[k]) for k in others), reverse=True)[:topk]
        pos = dot(n[x], o[x]) / tau
        n2o = [v / (tau_n2o or tau) for v in n2o]
        n2n = [v / (tau_n2n or tau) for v in n2n]
        if not new_to_new:
            total += nce(pos, n2o)
        elif eta is None:
            total += nce(pos, n2o + n2n)
        else:
            total += nce(pos, n2o) + eta * nce(pos, n2n)
    return total / len(labels)


def triplet_reference(new, old, labels=LABELS, margin=0.8, hardest=True,
                      new_to_new=False) -> float:
    """Eqs. 14/15 with Euclidean distances of normalised features."""
    n, o = unit_rows(new, old)

    def dist(a, b):
        return math.sqrt(sum((p - q) ** 2 for p, q in zip(a, b)))

    total, anchors = 0.0, 0
    for x, y in enumerate(labels):
        others = [k for k, yk in enumerate(labels) if yk != y]
        if not others:
            continue
        anchors += 1
        pos = dist(n[x], o[x])
        kinds = [[dist(n[x], o[k]) for k in others]]
        if new_to_new:
            kinds.append([dist(n[x], n[k]) for k in others])
        for negatives in kinds:
            hinges = [max(pos - d + margin, 0.0) for d in negatives]
            total += max(hinges) if hardest else sum(hinges) / len(hinges)
    return total / anchors


# ----------------------------------------------------------------- contrastive forms
def test_ract_matches_eq6_and_contrastive_matches_eq5():
    new, old = randn(7, 4, seed=1, grad=True), randn(7, 4, seed=2, grad=True)
    ract = RACTLoss()(batch(new, old)).total
    assert ract.item() == pytest.approx(contrastive_reference(new, old), rel=1e-5)
    vanilla = ContrastiveLoss()(batch(new, old)).total
    assert vanilla.item() == pytest.approx(
        contrastive_reference(new, old, new_to_new=False), rel=1e-5)
    assert ract.item() > vanilla.item()   # the new-to-new negatives add to the denominator
    (ract + vanilla).backward()
    assert old.grad is None and new.grad.abs().sum(dim=1).min() > 0


def test_same_class_pairs_including_self_are_never_negatives():
    new, old = randn(4, 4, seed=1), randn(4, 4, seed=2)
    for loss in (RACTLoss(), ContrastiveLoss()):
        # one class only: no negatives at all, so -log(e^p / e^p) = 0 for every anchor
        assert loss(batch(new, old, [5, 5, 5, 5])).total.item() == pytest.approx(0.0, abs=1e-6)
    # a sample of the anchor's class that is a near-copy of the anchor costs nothing
    twin = torch.cat([new, new[:1] + 1e-3])
    old_twin = torch.cat([old, old[:1]])
    assert RACTLoss()(batch(twin, old_twin, [0, 1, 2, 3, 0])).total.item() == pytest.approx(
        contrastive_reference(twin, old_twin, [0, 1, 2, 3, 0]), rel=1e-5)


def test_topk_keeps_the_hardest_negatives_of_each_kind():
    new, old = randn(7, 4, seed=3), randn(7, 4, seed=4)
    top2 = RACTLoss(RACTParams(topk_negatives=2, temperature=0.5))(batch(new, old)).total
    assert top2.item() == pytest.approx(contrastive_reference(new, old, tau=0.5, topk=2), rel=1e-5)
    assert top2.item() < contrastive_reference(new, old, tau=0.5) - 0.1   # fewer negatives
    everything = RACTLoss(RACTParams(topk_negatives=50))(batch(new, old)).total
    assert everything.item() == pytest.approx(contrastive_reference(new, old), rel=1e-5)
    vanilla = ContrastiveLoss(ContrastiveParams(topk_negatives=1))(batch(new, old)).total
    assert vanilla.item() == pytest.approx(
        contrastive_reference(new, old, topk=1, new_to_new=False), rel=1e-5)


def test_split_form_eq13_and_separate_temperatures():
    new, old = randn(7, 4, seed=5), randn(7, 4, seed=6)
    params = RACTParams(n2n_weight=0.5, temperature_n2o=0.1, temperature_n2n=0.07)
    out = RACTLoss(params)(batch(new, old))
    assert out.total.item() == pytest.approx(contrastive_reference(
        new, old, tau_n2o=0.1, tau_n2n=0.07, eta=0.5), rel=1e-5)
    assert out.total.item() == pytest.approx(
        out.parts["n2o"].item() + 0.5 * out.parts["n2n"].item(), rel=1e-6)
    unified = RACTLoss(RACTParams(temperature_n2o=0.1, temperature_n2n=0.07))(batch(new, old))
    assert unified.total.item() == pytest.approx(
        contrastive_reference(new, old, tau_n2o=0.1, tau_n2n=0.07), rel=1e-5)


def test_dim_rule_truncates_wider_and_pads_narrower_new_features():
    old = randn(7, 4, seed=2)
    wide = randn(7, 6, seed=1, grad=True)
    out = RACTLoss()(batch(wide, old)).total
    assert out.item() == pytest.approx(RACTLoss()(batch(wide[:, :4], old)).total.item())
    out.backward()
    assert wide.grad[:, 4:].abs().sum() == 0 and wide.grad[:, :4].abs().sum() > 0
    narrow = randn(7, 3, seed=3)
    assert RACTLoss()(batch(narrow, old)).total.item() == pytest.approx(
        contrastive_reference(narrow, old), rel=1e-5)


# ----------------------------------------------------------------- triplet forms
@pytest.mark.parametrize("mining", ["hardest", "all"])
def test_triplet_forms_match_eqs_14_and_15(mining):
    labels = [0, 1, 0, 2, 1, 3, 0]
    new, old = randn(7, 4, seed=7, grad=True), randn(7, 4, seed=8)
    params = TripletParams(mining=mining)
    hardest = mining == "hardest"
    vanilla = TripletLoss(params)(batch(new, old, labels)).total
    assert vanilla.item() == pytest.approx(
        triplet_reference(new, old, labels, hardest=hardest), rel=1e-5)
    ra = RACTTripletLoss(params)(batch(new, old, labels)).total
    assert ra.item() == pytest.approx(
        triplet_reference(new, old, labels, hardest=hardest, new_to_new=True), rel=1e-5)
    ra.backward()
    assert new.grad.abs().sum() > 0


def test_triplet_averages_over_anchors_that_have_negatives():
    labels = [0, 0, 0, 1]
    new, old = randn(4, 4, seed=9), randn(4, 4, seed=10)
    out = TripletLoss(TripletParams(margin=2.5))(batch(new, old, labels)).total
    assert out.item() == pytest.approx(triplet_reference(new, old, labels, margin=2.5), rel=1e-5)
    alone = TripletLoss()(batch(new, old, [1, 1, 1, 1])).total
    assert alone.item() == 0.0


def opencompatible_triplet(new, old, labels, k, margin=0.8, new_to_new=False) -> torch.Tensor:
    """OpenCompatible's triplet forms written out: Euclidean distances of normalised
    features, same-class entries pushed out by +1e9, the k closest kept, and
    MarginRankingLoss(negative, positive, 1) averaged over every (anchor, kept) pair."""
    n, o = F.normalize(new.detach(), dim=1), F.normalize(old.detach(), dim=1)
    labels = torch.as_tensor(labels)
    masks = (labels[:, None] == labels[None, :]).float()
    criterion = torch.nn.MarginRankingLoss(margin=margin)

    def term(keys):
        distances = torch.cdist(n, keys)
        negatives = torch.topk(distances + masks * 1e9, k, dim=1, largest=False)[0]
        positive = torch.cdist(n, o).diagonal()[:, None].expand_as(negatives)
        return criterion(negatives.reshape(-1), positive.reshape(-1),
                         torch.ones(negatives.numel()))

    return term(o) + (term(n) if new_to_new else 0.0)


@pytest.mark.parametrize("k", [2, 5])
def test_topk_triplet_mining_matches_opencompatible(k):
    """Every anchor of this batch has at least one negative, so averaging over anchors
    with negatives (compatzoo) and over all anchors (OpenCompatible) agree; with k = 5
    some anchors have fewer than k negatives, which count as zero hinges out of k."""
    labels = [0, 1, 0, 2, 1, 3, 0]
    new, old = randn(7, 4, seed=11, grad=True), randn(7, 4, seed=12)
    params = TripletParams(mining="topk", topk_negatives=k, margin=0.8)
    vanilla = TripletLoss(params)(batch(new, old, labels)).total
    torch.testing.assert_close(vanilla, opencompatible_triplet(new, old, labels, k),
                               rtol=1e-5, atol=1e-6)
    ra = RACTTripletLoss(params)(batch(new, old, labels)).total
    torch.testing.assert_close(ra, opencompatible_triplet(new, old, labels, k, new_to_new=True),
                               rtol=1e-5, atol=1e-6)
    ra.backward()
    assert new.grad.abs().sum() > 0


def test_topk_mining_with_k_one_is_the_hardest_negative():
    labels = [0, 1, 0, 2, 1, 3, 0]
    new, old = randn(7, 4, seed=13), randn(7, 4, seed=14)
    one = TripletLoss(TripletParams(mining="topk", topk_negatives=1))(batch(new, old, labels))
    assert one.total.item() == pytest.approx(triplet_reference(new, old, labels), rel=1e-5)


@pytest.mark.parametrize("cls, params", [(RACTLoss, RACTParams), (ContrastiveLoss, ContrastiveParams),
                                         (RACTTripletLoss, TripletParams)])
def test_same_view_reads_the_old_features_of_the_new_models_view(cls, params):
    """``view: same`` (OpenCompatible) declares old_features instead of a second view and
    computes the same formula on them."""
    assert cls.inputs(params()) == {"old_features_view2"}
    assert cls.inputs(params(view="same")) == {"old_features"}
    new, old = randn(7, 4, seed=15), randn(7, 4, seed=16)
    labels = torch.as_tensor(LABELS)
    same = cls(params(view="same"))(LossInputs(
        new_features=new, labels=labels, indices=torch.arange(7), old_features=old)).total
    independent = cls(params())(batch(new, old)).total
    assert torch.equal(same, independent)


# ----------------------------------------------------------------- registration
@pytest.mark.parametrize("name, params, cls", [
    ("ract", {"topk_negatives": 10, "temperature": 0.01}, RACTLoss),
    ("contrastive", {"gather": False}, ContrastiveLoss),
    ("ract-triplet", {"margin": 0.5}, RACTTripletLoss),
    ("triplet", {"mining": "all"}, TripletLoss),
])
def test_losses_register_through_entry_points(name, params, cls):
    record = get_registry().get("loss", name)
    assert record.distribution == "compatzoo-ract"
    loss = record.component(record.params_model(**params))
    assert isinstance(loss, cls)
    assert loss.required_inputs == {"old_features_view2"} and loss.min_batch_classes == 2
    with pytest.raises(ValidationError, match="topk_negative"):
        record.params_model(**params, topk_negative=3)


def test_ract_params_are_validated():
    with pytest.raises(ValidationError):
        RACTParams(topk_negatives=0)
    with pytest.raises(ValidationError):
        RACTParams(temperature=0.0)


# ----------------------------------------------------------------- distributed
def test_helpers_work_without_a_process_group():
    t = torch.ones(2, 3)
    assert world_size() == 1 and rank() == 0 and all_gather_with_grad(t) is t


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_gathered_negatives_across_two_processes_equal_one_big_batch(tmp_path):
    import dist_ract_worker as worker

    tests = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tests / "dist_ract_worker.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    x, old, labels, encoder = worker.problem()
    for name, params in worker.CONFIGS.items():
        loss, feature_grad = worker.ract_step(encoder, x, old, labels, params)
        for r, result in enumerate(ranks):
            got = result[name]
            assert torch.allclose(got["loss"], loss, atol=1e-6), (name, r)
            assert torch.allclose(got["feature_grad"], feature_grad[4 * r:4 * (r + 1)],
                                  atol=1e-6), (name, r)
            for mine, single in zip(got["param_grads"], encoder.parameters()):
                assert torch.allclose(mine, single.grad, rtol=1e-5, atol=1e-5), (name, r)

    rows = torch.arange(8.0).reshape(8, 1).repeat(1, 2)
    assert torch.equal(ranks[0]["uneven"]["gathered"], rows)
    assert torch.equal(ranks[0]["uneven"]["grad"], 2 * rows[:3])   # summed over both ranks
    assert torch.equal(ranks[1]["uneven"]["grad"], 2 * rows[3:])
