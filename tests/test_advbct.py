"""compatzoo-advbct against direct computations of the public AdvBCT code (Ashespt/AdvBCT).

The reference functions below are the code's equations written out the way it computes
them: ``extract_feat.gen_class_meta`` (class centres and 1.5-IQR radii),
``trainer.LandmarkComTrainer`` (elastic radius, ``bct_limit`` loop, adversarial loss and
its weight, the reversal coefficient) and ``models.modules.ReverseLayerF``.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import compatzoo
from compatzoo.errors import DimensionMismatchError, SpecError
from compatzoo.interfaces import FeatureCache, LossInputs, TrainingContext
from compatzoo.registry import get_registry
from compatzoo_advbct import AdvBCTLoss, AdvBCTParams, class_boundaries

from losses_support import randn


# ----------------------------------------------------------------- reference formulas
def reference_meta(feat: np.ndarray, label: np.ndarray) -> dict[int, dict]:
    """``gen_class_meta``: per class the mean of L2-normalised features and the sorted
    distances to it that survive the 1.5-IQR rule (all of them below four)."""
    feat = feat.astype(np.float32).copy()
    by_class = defaultdict(list)
    for i in range(len(label)):
        feat[i] = feat[i] / np.linalg.norm(feat[i])
        by_class[int(label[i])].append(feat[i])
    meta = {}
    for k, rows in by_class.items():
        center = np.asarray(rows).mean(0)
        radius = sorted(np.linalg.norm(f - center).item() for f in rows)
        kept = []
        if len(radius) >= 4:
            nu = len(radius)
            q3, q1 = radius[int(3 * nu / 4)], radius[int(nu / 4)]
            iqr = q3 - q1
            for r in radius:
                if r < q1 - 1.5 * iqr or r > q3 + 1.5 * iqr:
                    continue
                kept.append(r)
        else:
            kept = list(radius)
        meta[k] = {"center": center.tolist(), "radius": kept or radius}
    return meta


def reference_boundary(feat, labels, meta, eb_weight, threshold, num_classes, elastic=True):
    """The trainer's ``radius_eb`` + ``ElasticBoundary`` + ``bct_limit`` loop."""
    radius_eb = torch.zeros(num_classes)
    for j in range(len(labels)):
        c = int(labels[j])
        radius_eb[c] = abs(meta[c]["radius"][-1] - threshold) if c in meta else 0
    radius_eb = radius_eb * torch.sigmoid(eb_weight)
    feat = F.normalize(feat)
    limit_loss, cnt = 0.0, 0
    for j in range(len(feat)):
        c = int(labels[j])
        if c not in meta:
            continue
        diff = feat[j] - torch.tensor(meta[c]["center"])[None, :]
        if elastic:
            if meta[c]["radius"][-1] < threshold:
                radius = meta[c]["radius"][-1] + radius_eb[c]
            else:
                radius = meta[c]["radius"][-1] - radius_eb[c]
        else:
            radius = meta[c]["radius"][0]
        if len(meta[c]["radius"]) <= 1:
            continue
        tmp = max(torch.norm(diff, p=2) - radius, 0)
        if tmp > 0.0:
            limit_loss += tmp
            cnt += 1
    if cnt:
        limit_loss /= cnt
    return limit_loss


class ReverseLayerF(torch.autograd.Function):
    """``models/modules.py``."""

    @staticmethod
    def forward(ctx, x, alpha):
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output.neg() * ctx.alpha, None


def reference_schedule(step: int, steps_per_epoch: int, n_epoch: int) -> tuple[float, float]:
    """``p``, ``alpha`` and the weight ``(n_epoch - epoch + 1) / n_epoch`` of the trainer."""
    epoch, batch_idx = divmod(step, steps_per_epoch)
    p = float(batch_idx + epoch * steps_per_epoch) / n_epoch / steps_per_epoch
    alpha = 2.0 / (1.0 + np.exp(-10 * p)) - 1
    return alpha, (n_epoch - epoch + 1) / n_epoch


def reference_adversarial(discriminator, feature, feat_old, alpha):
    """``CreateBaseModel.forward`` (adversarial branch) + the trainer's ``model_loss``."""
    out_new = discriminator(ReverseLayerF.apply(feature, alpha))
    out_old = discriminator(feat_old)
    nll = torch.nn.NLLLoss()
    return (nll(out_new, torch.zeros(len(feature)).long())
            + nll(out_old, torch.ones(len(feature)).long()))


# ----------------------------------------------------------------- fixtures
NUM_CLASSES, OLD_CLASSES, DIM = 6, [0, 1, 2, 3], 4


def old_cache() -> FeatureCache:
    """Class 0: nine close features and one opposite (cut by the IQR rule); class 1: three
    (kept whole); class 2: one (no boundary); class 3: five; classes 4, 5: new classes."""
    g = torch.Generator().manual_seed(1)
    e = torch.eye(DIM)
    blocks = [(0, e[0] + 0.15 * torch.randn(9, DIM, generator=g)), (0, -e[0][None] * 2.0),
              (1, e[1] + 0.4 * torch.randn(3, DIM, generator=g)),
              (2, e[2][None] * 3.0),
              (3, e[3] + 0.6 * torch.randn(5, DIM, generator=g)),
              (4, -e[1] + 0.3 * torch.randn(6, DIM, generator=g)),
              (5, -e[2] + 0.3 * torch.randn(4, DIM, generator=g))]
    features = torch.cat([b for _, b in blocks])
    labels = torch.cat([torch.full((len(b),), c) for c, b in blocks])
    return FeatureCache(features, labels)


def context(cache=None, old_dim=DIM, new_dim=DIM) -> TrainingContext:
    return TrainingContext(num_classes=NUM_CLASSES, new_embedding_dim=new_dim,
                           old_embedding_dim=old_dim, old_classes=torch.tensor(OLD_CLASSES),
                           old_feature_cache=old_cache() if cache is None else cache)


def prepared(**params) -> AdvBCTLoss:
    torch.manual_seed(0)
    loss = AdvBCTLoss(AdvBCTParams(**params))
    loss.prepare(context())
    return loss


def meta_of(cache: FeatureCache) -> dict[int, dict]:
    old = torch.isin(cache.labels, torch.tensor(OLD_CLASSES))
    return reference_meta(cache.features[old].numpy(), cache.labels[old].numpy())


LABELS = torch.tensor([0, 0, 1, 1, 2, 3, 3, 4, 0, 5, 1, 3])


def new_batch(seed=0, grad=True) -> torch.Tensor:
    """Random features, two of them placed next to their old class centre (inside)."""
    new = randn(len(LABELS), DIM, seed=seed)
    new[0] = torch.eye(DIM)[0] * 3.0
    new[5] = torch.eye(DIM)[3] * 2.0
    return new.requires_grad_(grad)


def inputs(new, old=None, labels=LABELS) -> LossInputs:
    return LossInputs(new_features=new, labels=labels, indices=torch.arange(len(labels)),
                      old_features=old)


# ----------------------------------------------------------------- class boundaries
def test_centres_and_radii_follow_gen_class_meta():
    cache = old_cache()
    meta = meta_of(cache)
    bounds = class_boundaries(cache.features, cache.labels, torch.tensor(OLD_CLASSES),
                              NUM_CLASSES)
    for c in range(NUM_CLASSES):
        if c not in meta:            # new classes get no boundary
            assert bounds.kept[c] == 0 and not bounds.usable[c]
            continue
        radius = meta[c]["radius"]
        torch.testing.assert_close(bounds.centres[c], torch.tensor(meta[c]["center"]))
        assert bounds.largest[c].item() == pytest.approx(radius[-1], rel=1e-5)
        assert bounds.smallest[c].item() == pytest.approx(radius[0], rel=1e-5, abs=1e-7)
        assert bounds.kept[c] == len(radius)
        assert bool(bounds.usable[c]) == (len(radius) > 1)
    assert bounds.kept[0] == 9 and bounds.kept[1] == 3 and not bounds.usable[2]  # cut, kept
    assert bounds.largest[0] < 1.0          # the opposite feature of class 0 is dropped


# ----------------------------------------------------------------- boundary term
@pytest.mark.parametrize("threshold", [1.0, 0.2])   # radii grow towards T / shrink to it
def test_elastic_boundary_term_and_its_gradients_match_the_reference_loop(threshold):
    loss = prepared(threshold=threshold, adversarial=False)
    cache = old_cache()
    weight = loss.elastic.detach().clone().requires_grad_(True)
    new = new_batch()
    out = loss(inputs(new))
    mine_new, mine_w = torch.autograd.grad(out.total, [new, loss.elastic])

    new_ref = new.detach().clone().requires_grad_(True)
    expected = reference_boundary(new_ref, LABELS, meta_of(cache), weight, threshold,
                                  NUM_CLASSES)
    torch.testing.assert_close(out.total, expected)
    torch.testing.assert_close(out.parts["boundary"], expected.detach())
    ref_new, ref_w = torch.autograd.grad(expected, [new_ref, weight])
    torch.testing.assert_close(mine_new, ref_new)
    torch.testing.assert_close(mine_w, ref_w)
    assert mine_w[[2, 4, 5]].abs().sum() == 0     # no boundary: no pull on these radii
    assert 0 < out.parts["outside_share"] < 1     # some inside, some outside


def test_fixed_radius_is_the_codes_branch_without_elastic_boundary():
    loss = prepared(boundary="smallest", adversarial=False)
    assert loss.elastic is None
    new = new_batch(seed=3, grad=False)
    expected = reference_boundary(new, LABELS, meta_of(old_cache()), torch.zeros(NUM_CLASSES),
                                  1.0, NUM_CLASSES, elastic=False)
    torch.testing.assert_close(loss(inputs(new)).total, expected)
    largest = prepared(boundary="largest", adversarial=False)       # = elastic, sigmoid 0
    expected = reference_boundary(new, LABELS, meta_of(old_cache()),
                                  torch.full((NUM_CLASSES,), -1e4), 1.0, NUM_CLASSES)
    torch.testing.assert_close(largest(inputs(new)).total, expected)


def test_no_sample_outside_any_boundary_gives_zero_with_the_graph_kept():
    loss = prepared(adversarial=False)
    labels = torch.tensor([4, 5, 2])          # new classes and a class without boundary
    new = randn(3, DIM, grad=True)
    out = loss(inputs(new, labels=labels))
    assert out.total.item() == 0.0
    out.total.backward()                      # the elastic weights stay in the graph (DDP)
    assert torch.equal(new.grad, torch.zeros_like(new))


# ----------------------------------------------------------------- adversarial term
def test_total_equals_boundary_plus_weighted_adversarial_of_the_reference():
    epochs, batch = 3, len(LABELS)
    loss = prepared(epochs=epochs)
    cache = old_cache()
    steps_per_epoch = len(cache.labels) // batch
    step = steps_per_epoch + 1                # second epoch
    loss.step.fill_(step)
    reference_d = copy.deepcopy(loss.discriminator)
    weight = loss.elastic.detach().clone()
    new, old = new_batch(), randn(len(LABELS), DIM, seed=7)
    out = loss(inputs(new, old))

    alpha, adv_weight = reference_schedule(step, steps_per_epoch, epochs)
    adversarial = reference_adversarial(reference_d, new.detach(), old, alpha)
    boundary = reference_boundary(new.detach(), LABELS, meta_of(cache), weight, 1.0,
                                  NUM_CLASSES)
    torch.testing.assert_close(out.parts["adversarial"], adversarial.detach())
    torch.testing.assert_close(out.total, boundary + adversarial * adv_weight)
    assert out.parts["grl_alpha"].item() == pytest.approx(alpha)
    assert out.parts["adversarial_weight"].item() == pytest.approx(1.0)   # (3 - 1 + 1) / 3
    assert loss.step.item() == step + 1


def test_encoder_gets_the_reversed_discriminator_gradient_and_the_discriminator_the_plain_one():
    loss = prepared(schedule="constant", alpha=0.7)
    labels = torch.tensor([4, 5, 4, 5, 4, 5])  # new classes: the boundary term is silent
    new, old = randn(6, DIM, seed=2, grad=True), randn(6, DIM, seed=5, grad=True)
    plain_d = copy.deepcopy(loss.discriminator)
    out = loss(inputs(new, old, labels))
    out.total.backward()

    new_ref = new.detach().clone().requires_grad_(True)
    plain = (F.nll_loss(plain_d(new_ref), torch.zeros(6, dtype=torch.long))
             + F.nll_loss(plain_d(old.detach()), torch.ones(6, dtype=torch.long)))
    plain.backward()
    torch.testing.assert_close(new.grad, -0.7 * new_ref.grad)        # reversed, scaled
    for mine, theirs in zip(loss.discriminator.parameters(), plain_d.parameters(),
                            strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad)            # not reversed
    assert old.grad is None                                           # old side is fixed


def test_schedule_follows_the_trainers_progress_and_epoch():
    epochs, batch = 4, len(LABELS)
    loss = prepared(epochs=epochs)
    steps_per_epoch = len(old_cache().labels) // batch
    old = randn(batch, DIM, seed=9)
    for step in range(epochs * steps_per_epoch):
        out = loss(inputs(new_batch(grad=False), old))
        alpha, weight = reference_schedule(step, steps_per_epoch, epochs)
        assert out.parts["grl_alpha"].item() == pytest.approx(alpha, abs=1e-7)
        assert out.parts["adversarial_weight"].item() == pytest.approx(weight)
    assert loss.step.item() == epochs * steps_per_epoch
    with torch.no_grad():                     # evaluation calls do not advance it
        loss(inputs(new_batch(grad=False), old))
    assert loss.step.item() == epochs * steps_per_epoch
    out = loss(inputs(new_batch(grad=False), old))      # past the end: the last values
    assert out.parts["adversarial_weight"].item() == pytest.approx(2 / epochs)
    assert out.parts["grl_alpha"].item() == pytest.approx(2 / (1 + math.exp(-10)) - 1)


def test_step_count_is_saved_with_the_loss_so_a_resume_continues_the_schedule():
    loss = prepared(epochs=2)
    loss.step.fill_(5)
    again = prepared(epochs=2)
    again.load_state_dict(loss.state_dict(), strict=True)
    assert again.step.item() == 5
    torch.testing.assert_close(again.elastic, loss.elastic)


def test_wider_new_model_is_read_in_the_old_space_by_bcts_rule():
    loss = AdvBCTLoss(AdvBCTParams(epochs=1))
    loss.prepare(context(new_dim=DIM + 3))
    new = torch.cat([new_batch(grad=False), randn(len(LABELS), 3, seed=4)], dim=1)
    narrow = prepared(epochs=1)
    narrow.load_state_dict(loss.state_dict())
    old = randn(len(LABELS), DIM, seed=9)
    torch.testing.assert_close(loss(inputs(new, old)).total,
                               narrow(inputs(new[:, :DIM], old)).total)


# ----------------------------------------------------------------- declarations, errors
def test_registered_through_its_own_distribution_with_declared_inputs():
    record = get_registry().get("loss", "advbct")
    assert record.distribution == "compatzoo-advbct"
    assert isinstance(compatzoo.get_loss("advbct", epochs=3), AdvBCTLoss)
    assert AdvBCTLoss.inputs(AdvBCTParams(epochs=3)) == {"old_features", "old_feature_cache"}
    assert AdvBCTLoss.inputs(AdvBCTParams(adversarial=False)) == {"old_feature_cache"}


def test_bad_params_and_inputs_fail_with_clear_errors_before_training():
    with pytest.raises(SpecError, match="needs `epochs`.*train.epochs"):
        compatzoo.get_loss("advbct")
    with pytest.raises(SpecError, match="threshold"):
        compatzoo.get_loss("advbct", epochs=2, threshold=3.0)
    from test_end_to_end import tiny_spec

    from compatzoo.specs import load_spec

    spec = tiny_spec()                         # a spec is refused when it is loaded
    spec["new"] = [{"name": "advbct", "losses": ["classification", "advbct"]}]
    with pytest.raises(SpecError, match="advbct.*needs `epochs`"):
        load_spec(spec)
    loss = AdvBCTLoss(AdvBCTParams(epochs=2))
    with pytest.raises(SpecError, match="old-feature cache"):
        loss.prepare(TrainingContext(num_classes=3, new_embedding_dim=DIM))
    singletons = FeatureCache(torch.randn(3, DIM), torch.tensor([0, 1, 4]))
    with pytest.raises(SpecError, match="two or more training items"):
        loss.prepare(context(singletons))
    with pytest.raises(DimensionMismatchError, match=r"\(items, 5\)"):
        loss.prepare(context(old_dim=5))
    loss = prepared(epochs=2)
    with pytest.raises(DimensionMismatchError, match="old_features must have shape"):
        loss(inputs(new_batch(), randn(len(LABELS), DIM + 1)))


# ----------------------------------------------------------------- end to end
def test_tiny_upgrade_with_advbct_reports_n2o_and_n2n(tmp_path):
    from test_end_to_end import tiny_spec

    from compatzoo.experiment import run_experiment
    from compatzoo.specs import load_spec

    spec = tiny_spec()                          # the new model is wider than the old one
    spec["new"] = [{"name": "advbct", "losses": [
        "classification", {"name": "advbct", "params": {"epochs": 2}}]}]
    results = run_experiment(load_spec(spec), tmp_path, progress=False)
    table = results["evaluation"]["table"]
    assert {"o2o", "n2o/advbct", "n2n/advbct"} <= set(table)
    for row in ("n2o/advbct", "n2n/advbct"):
        assert all(0.0 <= v <= 1.0 for v in table[row].values())
    history = results["training"]["advbct"]
    assert len(history) == 2
    assert {"advbct/boundary", "advbct/adversarial", "advbct/grl_alpha"} <= set(history[-1])
    assert history[-1]["advbct/grl_alpha"] > history[0]["advbct/grl_alpha"]
