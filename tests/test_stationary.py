"""compatzoo-stationary: the d-Simplex head and the HOC loss (Biondi et al., CVPR 2024)
against direct computations, and a tiny upgrade that uses both."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file

import compatzoo
from compatzoo.errors import SpecError
from compatzoo.interfaces import LossInputs, WeightedLoss
from compatzoo.plugin import NoParams
from compatzoo.registry import get_registry
from compatzoo_stationary import DSimplexHead, HOCLoss, HOCParams, dsimplex_vertices

LABELS = [0, 1, 0, 2, 1, 3, 0]


# --------------------------------------------------------------------------- d-Simplex
@pytest.mark.parametrize("dim", [1, 2, 3, 7, 64, 511])
def test_simplex_vertices_are_unit_with_pairwise_cosine_minus_one_over_d(dim):
    w = dsimplex_vertices(dim).double()
    assert w.shape == (dim + 1, dim)
    assert torch.allclose(w.norm(dim=1), torch.ones(dim + 1, dtype=torch.float64), atol=1e-6)
    gram = w @ w.T
    off = gram[~torch.eye(dim + 1, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1.0 / dim), atol=1e-6)
    assert torch.allclose(w.sum(dim=0), torch.zeros(dim, dtype=torch.float64), atol=1e-5)


def test_every_pair_of_vertices_is_equally_far_apart():
    """Every pair of distinct vertices is equally far apart: sqrt(2 + 2/d)."""
    for d in (2, 3, 4):
        w = dsimplex_vertices(d)
        for a, b in itertools.combinations(range(d + 1), 2):
            assert (w[a] - w[b]).norm().item() == pytest.approx(math.sqrt(2 + 2 / d), abs=1e-6)


def test_simplex_follows_the_reference_construction():
    """e_1..e_d and ((1 - sqrt(d+1)) / d) * 1, centred, rows scaled to unit norm."""
    d = 5
    rows = [[1.0 if j == i else 0.0 for j in range(d)] for i in range(d)]
    rows.append([(1.0 - math.sqrt(d + 1)) / d] * d)
    centroid = [sum(r[j] for r in rows) / (d + 1) for j in range(d)]
    rows = [[r[j] - centroid[j] for j in range(d)] for r in rows]
    rows = [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in rows]
    assert torch.allclose(dsimplex_vertices(d), torch.tensor(rows), atol=1e-6)


def test_head_is_fixed_takes_the_first_vertices_and_does_not_normalise():
    head = compatzoo.create_head("dsimplex", embedding_dim=6, num_classes=4)
    assert isinstance(head, DSimplexHead)
    assert list(head.parameters()) == [] and head.temperature == 1.0
    assert torch.equal(head.weight, dsimplex_vertices(6)[:4])
    features = torch.randn(3, 6, requires_grad=True)
    logits = head(features, torch.tensor([0, 1, 3]))     # labels change nothing: no margin
    assert logits.shape == (3, 4)
    assert torch.allclose(logits, features @ dsimplex_vertices(6)[:4].T, atol=1e-6)
    assert torch.allclose(head(3 * features), 3 * logits, atol=1e-5)
    logits.sum().backward()
    assert features.grad is not None and head.weight.grad is None
    # every generation of one width gets the very same classifier: the compatibility
    other = compatzoo.create_head("dsimplex", embedding_dim=6, num_classes=4)
    assert torch.equal(other.weight, head.weight)
    # saved with the model, and loads strictly
    fresh = DSimplexHead(NoParams(), embedding_dim=6, num_classes=4)
    fresh.load_state_dict(head.state_dict(), strict=True)
    assert set(head.state_dict()) == {"weight"}


def test_head_with_all_vertices_in_use():
    head = DSimplexHead(NoParams(), embedding_dim=3, num_classes=4)
    assert torch.equal(head.weight, dsimplex_vertices(3))


@pytest.mark.parametrize(("dim", "classes"), [(8, 10), (1, 3), (0, 1)])
def test_head_refuses_too_few_dimensions(dim, classes):
    with pytest.raises(SpecError) as info:
        DSimplexHead(NoParams(), embedding_dim=dim, num_classes=classes)
    message = str(info.value)
    assert f"embedding_dim is {dim}" in message and f"{classes} classes" in message
    assert f"at least {max(1, classes - 1)}" in message


def test_plugin_registers_the_head_and_the_loss():
    registry = get_registry()
    assert registry.get("head", "dsimplex").component is DSimplexHead
    assert registry.get("loss", "hoc").component is HOCLoss


# --------------------------------------------------------------------------- HOC
def hoc_reference(new, old, labels, mu=10.0, masking="zero") -> float:
    """Eq. 4 as iamcl2r computes it, anchor by anchor in plain python: old anchors, the
    new feature of the same image as positive, same-class similarities zeroed (or left
    out, the positive kept, for ``exclude``)."""
    d = old.shape[1]
    new = torch.cat([new.detach()[:, :d], torch.zeros(len(new), max(0, d - new.shape[1]))], 1)
    n, o = F.normalize(new, dim=1).tolist(), F.normalize(old.detach(), dim=1).tolist()
    total = 0.0
    for i in range(len(labels)):
        s = [mu * sum(a * b for a, b in zip(o[i], n[j])) for j in range(len(labels))]
        if masking == "zero":
            terms = [s[j] if labels[j] != labels[i] else 0.0 for j in range(len(labels))]
        else:
            terms = [s[j] for j in range(len(labels)) if j == i or labels[j] != labels[i]]
        total += -s[i] + math.log(sum(math.exp(t) for t in terms))
    return total / len(labels)


def batch(new, old, labels=LABELS) -> LossInputs:
    labels = torch.as_tensor(labels)
    return LossInputs(new_features=new, labels=labels, indices=torch.arange(len(labels)),
                      old_features=old)


@pytest.mark.parametrize("masking", ["zero", "exclude"])
@pytest.mark.parametrize(("d_new", "d_old"), [(6, 6), (8, 6), (4, 6)])
def test_hoc_matches_the_written_out_formula(masking, d_new, d_old):
    g = torch.Generator().manual_seed(3)
    new = torch.randn(len(LABELS), d_new, generator=g, requires_grad=True)
    old = torch.randn(len(LABELS), d_old, generator=g, requires_grad=True)
    for mu in (10.0, 2.5):
        loss = HOCLoss(HOCParams(scale=mu, masking=masking))
        value = loss(batch(new, old)).total
        assert value.item() == pytest.approx(hoc_reference(new, old, LABELS, mu, masking),
                                             rel=1e-5, abs=1e-5)
    value.backward()
    assert new.grad is not None and new.grad.abs().sum() > 0
    assert old.grad is None                                   # only the new model learns


def test_hoc_zero_masking_keeps_a_unit_term_per_same_class_entry():
    """Old features orthogonal to every new one: every similarity is 0, so the zero-masked
    sum is B terms of exp(0) and the loss log(B); leaving same-class pairs out counts the
    other classes and the positive only."""
    basis = torch.eye(2 * len(LABELS))
    new, old = basis[:len(LABELS)], basis[len(LABELS):]
    zero = HOCLoss()(batch(new, old)).total
    assert zero.item() == pytest.approx(math.log(len(LABELS)), abs=1e-6)
    exclude = HOCLoss(HOCParams(masking="exclude"))(batch(new, old)).total
    counts = [1 + sum(b != a for b in LABELS) for a in LABELS]
    assert exclude.item() == pytest.approx(sum(map(math.log, counts)) / len(LABELS), abs=1e-6)


@pytest.mark.parametrize(("masking", "same", "other"), [
    ("zero", -10 + math.log(2), -10 + math.log(1 + math.exp(10))),
    ("exclude", 0.0, math.log(2))])
def test_hoc_same_class_pairs_are_never_negatives(masking, same, other):
    """Two images with identical features (every similarity mu = 10): of the same class,
    the other image's term is zeroed (exp(0) = 1) or left out; of another class it is a
    negative, exp(10)."""
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = HOCLoss(HOCParams(masking=masking))
    assert loss(batch(x, x, [0, 0])).total.item() == pytest.approx(same, abs=1e-5)
    assert loss(batch(x, x, [0, 1])).total.item() == pytest.approx(other, abs=1e-5)


def test_hoc_declares_old_features_and_paper_defaults():
    params = HOCParams()
    assert params.scale == 10.0 and params.masking == "zero"
    assert HOCLoss.inputs(params) == frozenset({"old_features"})
    assert HOCLoss.min_batch_classes == 2
    with pytest.raises(ValidationError):
        HOCParams(scale=0)
    with pytest.raises(ValidationError):
        HOCParams(temperature=0.1)


def test_paper_objective_is_the_weighted_sum():
    """lambda * CE + (1 - lambda) * HOC (eq. 3, lambda = 0.1) as two weighted terms."""
    from compatzoo.losses import ClassificationLoss

    g = torch.Generator().manual_seed(0)
    head = DSimplexHead(NoParams(), embedding_dim=4, num_classes=4)
    new = torch.randn(len(LABELS), 4, generator=g)
    old = torch.randn(len(LABELS), 4, generator=g)
    inputs = batch(new, old)
    inputs.new_head = head
    loss = WeightedLoss([("classification", 0.1, ClassificationLoss()),
                         ("hoc", 0.9, HOCLoss())])
    assert loss.required_inputs == {"new_head", "old_features"}
    expected = (0.1 * F.cross_entropy(new @ head.weight.T, inputs.labels)
                + 0.9 * hoc_reference(new, old, LABELS))
    assert loss(inputs).total.item() == pytest.approx(expected.item(), rel=1e-5)


# --------------------------------------------------------------------------- end to end
def test_tiny_stationary_upgrade_runs_end_to_end(tmp_path):
    from compatzoo.experiment import run_experiment
    from compatzoo.specs import load_spec
    from test_end_to_end import tiny_spec

    spec = tiny_spec()
    encoder = {"name": "tiny-cnn", "params": {"widths": [4, 8], "embedding_dim": 16}}
    spec["old"] = {**spec["old"], "encoder": encoder, "head": "dsimplex"}
    spec["new_defaults"] = {**spec["new_defaults"], "encoder": encoder, "head": "dsimplex"}
    spec["new"] = [{"name": "hoc", "losses": [{"name": "classification", "weight": 0.1},
                                              {"name": "hoc", "weight": 0.9}]}]
    results = run_experiment(load_spec(spec), tmp_path, progress=False)
    table = results["evaluation"]["table"]
    assert set(table) == {"o2o", "n2o/hoc", "n2n/hoc"}
    for row in table.values():
        assert all(0.0 <= v <= 1.0 for v in row.values())
    num_classes = spec["data"]["dataset"]["params"]["num_train_classes"]
    for name in ("old", "hoc"):      # the fixed classifier came out of training unchanged
        weights = load_file(str(tmp_path / "checkpoints" / name / "model.safetensors"))
        assert torch.equal(weights["head.weight"], dsimplex_vertices(16)[:num_classes])


def test_a_too_narrow_old_dsimplex_fails_before_training(tmp_path, monkeypatch):
    import compatzoo.experiment as experiment
    from compatzoo.specs import load_spec
    from test_end_to_end import tiny_spec

    spec = tiny_spec()
    spec["old"] = {**spec["old"], "head": "dsimplex"}       # 8 dims, 12 classes
    spec["new"] = [{"name": "independent"}]
    trained = []
    monkeypatch.setattr(experiment, "train_model", lambda *a, **k: trained.append(1))
    with pytest.raises(SpecError, match="embedding_dim is 8 and there are 12 classes.*at least 11"):
        experiment.run_experiment(load_spec(spec), tmp_path, progress=False)
    assert trained == []


def test_a_too_narrow_new_dsimplex_fails_before_the_old_model_trains(tmp_path, monkeypatch):
    import compatzoo.experiment as experiment
    from compatzoo.specs import load_spec
    from test_end_to_end import OLD_ENCODER, tiny_spec

    spec = tiny_spec()                        # old: cosface; new: dsimplex with 8 dims
    spec["new"] = [{"name": "narrow", "encoder": OLD_ENCODER, "head": "dsimplex"}]
    trained = []
    monkeypatch.setattr(experiment, "train_model", lambda *a, **k: trained.append(1))
    with pytest.raises(SpecError, match="new model 'narrow': its head cannot serve.*at least 11"):
        experiment.run_experiment(load_spec(spec), tmp_path, progress=False)
    assert trained == []
