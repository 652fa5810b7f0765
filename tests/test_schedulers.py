"""Backfill orders on constructed galleries: RACT uncertainty (eqs. 9-11), FastFill sigma
and the oracle distance, plus the requirement checks every scheduler runs first."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import compatzoo
from compatzoo.errors import DimensionMismatchError, InvalidFeaturesError, SpecError
from compatzoo.components import OracleDistanceScheduler
from compatzoo.plugin import BackfillState, descending_order
from compatzoo.registry import get_registry
from compatzoo_fastfill import SigmaScheduler
from compatzoo_ract.schedulers import MEASURES, UncertaintyParams, UncertaintyScheduler


def identity_head(dim: int = 3, scale: float = 1.0):
    """A linear head whose logits are ``scale * features``."""
    head = compatzoo.create_head("linear", embedding_dim=dim, num_classes=dim)
    with torch.no_grad():
        head.fc.weight.copy_(scale * torch.eye(dim))
        head.fc.bias.zero_()
    return head


def uncertainty(measure: str) -> UncertaintyScheduler:
    return compatzoo.create_scheduler("uncertainty", measure=measure)


def test_measures_match_hand_values():
    probs = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    assert MEASURES["least-confidence"](probs).tolist() == pytest.approx([0.3, 2 / 3])
    assert MEASURES["margin"](probs).tolist() == pytest.approx([0.5, 1.0])
    entropy = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert MEASURES["entropy"](probs).tolist() == pytest.approx([entropy, math.log(3)], abs=1e-6)


@pytest.mark.parametrize("measure", ["least-confidence", "margin", "entropy"])
def test_the_maximally_uncertain_item_comes_first(measure):
    # logits = features: item 2 is uniform (maximally uncertain), item 0 the most confident
    features = np.array([[9.0, 0, 0], [2.0, 1.0, 0], [0.0, 0, 0], [0, 3.0, 0.5]], np.float32)
    state = BackfillState(old_features=features, new_head=identity_head())
    assert uncertainty(measure).order(state).tolist() == [2, 1, 3, 0]


def test_margin_and_least_confidence_can_disagree():
    # p = softmax(log p): item 0 [.5,.45,.05] has a small margin, item 1 [.4,.3,.3] low confidence
    probs = np.log(np.array([[0.5, 0.45, 0.05], [0.4, 0.3, 0.3]], np.float32))
    state = BackfillState(old_features=probs, new_head=identity_head())
    assert uncertainty("margin").order(state).tolist() == [0, 1]           # 0.95 vs 0.9
    assert uncertainty("least-confidence").order(state).tolist() == [1, 0]  # 0.6 vs 0.5


def test_ties_keep_the_gallery_order_and_chunks_do_not_matter(monkeypatch):
    import compatzoo_ract.schedulers as module

    features = np.tile(np.array([[1.0, 0.0, 0.0]], np.float32), (7, 1))
    features[4] = 0.0
    state = BackfillState(old_features=features, new_head=identity_head())
    expected = [4, 0, 1, 2, 3, 5, 6]
    assert uncertainty("entropy").order(state).tolist() == expected
    monkeypatch.setattr(module, "_LOGITS_PER_CHUNK", 6)                     # 2 rows per chunk
    assert uncertainty("entropy").order(state).tolist() == expected


def test_features_wider_than_the_head_are_cut_to_its_width():
    head = identity_head()
    wide = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    orders = [uncertainty("margin").order(BackfillState(old_features=f, new_head=head))
              for f in (wide, wide[:, :3])]
    assert np.array_equal(*orders)


def test_default_measure_is_the_papers_main_choice():
    assert UncertaintyParams().measure == "margin"                 # Alg. 2's default


def test_uncertainty_needs_the_new_head_before_any_work():
    with pytest.raises(SpecError, match="uncertainty scheduler needs the new model's classifier"):
        uncertainty("margin").order(BackfillState(old_features=np.zeros((3, 3), np.float32)))
    one_class = compatzoo.create_head("linear", embedding_dim=3, num_classes=1)
    with pytest.raises(SpecError, match="one class"):
        uncertainty("margin").order(BackfillState(np.zeros((3, 3), np.float32), new_head=one_class))
    bad = np.zeros((3, 3), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(InvalidFeaturesError, match="NaN"):
        uncertainty("margin").order(BackfillState(bad, new_head=identity_head()))


def test_sigma_order_is_descending_with_stable_ties():
    sigma = np.array([0.1, 2.0, -1.0, 2.0, 0.5], np.float32)
    state = BackfillState(old_features=np.zeros((5, 2), np.float32), signals={"sigma": sigma})
    assert compatzoo.create_scheduler("fastfill-sigma").order(state).tolist() == [1, 3, 4, 0, 2]


def test_sigma_order_checks_the_signal_it_reads():
    scheduler = SigmaScheduler()
    with pytest.raises(SpecError, match=r"per-item signal\(s\) \['sigma'\].*carries none"):
        scheduler.order(BackfillState(old_features=np.zeros((3, 2), np.float32)))
    with pytest.raises(InvalidFeaturesError, match="2 rows but the gallery has 3"):
        scheduler.order(BackfillState(np.zeros((3, 2), np.float32),
                                      signals={"sigma": np.zeros(2)}))
    with pytest.raises(InvalidFeaturesError, match="NaN"):
        scheduler.order(BackfillState(np.zeros((2, 2), np.float32),
                                      signals={"sigma": np.array([0, np.nan])}))


def test_oracle_distance_orders_by_distance_to_the_new_embedding():
    new = np.array([[0.0, 0], [0, 0], [0, 0], [0, 0]], np.float32)
    old = np.array([[1.0, 0], [3, 4], [0, 0], [0, 2]], np.float32)       # distances 1, 5, 0, 2
    upgraded = np.array([[0.0, 9], [0, 0], [0, 1], [0, 0]], np.float32)  # distances 9, 0, 1, 0
    oracle = OracleDistanceScheduler()                                # FastFill: raw distance
    assert oracle.is_oracle and not compatzoo.create_scheduler("random").is_oracle
    assert oracle.order(BackfillState(old, new_features=new)).tolist() == [1, 3, 0, 2]
    with_upgraded = BackfillState(old, new_features=new, upgraded=upgraded)
    assert oracle.order(with_upgraded).tolist() == [0, 2, 1, 3]


def test_oracle_distance_can_measure_the_angle_cosine_retrieval_sees():
    new = np.array([[1.0, 0], [1, 0], [1, 0]], np.float32)
    stored = np.array([[10.0, 0], [0, 0.5], [1, 1]], np.float32)  # raw: 9, 1.1, 1; angle: 0, 90, 45
    state = BackfillState(stored, new_features=new)
    assert OracleDistanceScheduler().order(state).tolist() == [0, 1, 2]
    angular = compatzoo.create_scheduler("oracle-distance", normalize=True)
    assert angular.order(state).tolist() == [1, 2, 0]


def test_oracle_distance_needs_comparable_embeddings():
    oracle = OracleDistanceScheduler()
    with pytest.raises(SpecError, match="new model's embeddings of the gallery"):
        oracle.order(BackfillState(old_features=np.zeros((2, 2), np.float32)))
    with pytest.raises(DimensionMismatchError, match="BackfillState.upgraded"):
        oracle.order(BackfillState(np.zeros((2, 2), np.float32), new_features=np.zeros((2, 3))))
    with pytest.raises(InvalidFeaturesError, match="upgraded has 1 rows"):
        oracle.order(BackfillState(np.zeros((2, 3), np.float32), new_features=np.zeros((2, 3)),
                                  upgraded=np.zeros((1, 3))))


def test_descending_order_is_stable():
    assert descending_order(torch.tensor([1.0, 3.0, 1.0, 3.0])).tolist() == [1, 3, 0, 2]


def test_schedulers_are_registered_through_their_entry_points():
    registry = get_registry()
    assert registry.get("scheduler", "uncertainty").distribution == "compatzoo-ract"
    assert registry.get("scheduler", "fastfill-sigma").distribution == "compatzoo-fastfill"
    assert isinstance(compatzoo.create_scheduler("uncertainty"), UncertaintyScheduler)
    with pytest.raises(SpecError, match="measure"):
        compatzoo.create_scheduler("uncertainty", measure="variance")
    with pytest.raises(SpecError, match="unknown parameter"):
        compatzoo.create_scheduler("fastfill-sigma", descending=False)
