"""TAR@FAR (1:1) and TPIR@FPIR (open-set 1:N) on hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest

from compatzoo.retrieval import tar_at_far, tpir_at_fpir
from compatzoo.retrieval.validation import InvalidArgumentError

# Items 0, 1 (label 0) are the same vector; 2, 3 (label 1) have cosine 0.6.
FEATURES = np.array([[1, 0], [1, 0], [0, 1], [0.8, 0.6]], dtype=np.float32)
LABELS = np.array([0, 0, 1, 1])
# Pairs i < j: genuine (0,1)=1.0, (2,3)=0.6; impostors (0,3)=(1,3)=0.8, (0,2)=(1,2)=0.


def test_tar_at_far_all_pairs():
    result = tar_at_far(FEATURES, LABELS, far_targets=(0.25, 0.5, 1.0))
    # FAR 0.25: 1 of 4 impostors may pass -> threshold = 2nd best impostor 0.8; only 1.0 > 0.8.
    # (The two impostors at 0.8 tie, so in fact none passes: FAR never exceeds the target.)
    # FAR 0.5: threshold = 3rd best impostor 0.0 -> both genuine pass. FAR 1: all pass.
    assert result == pytest.approx({0.25: 0.5, 0.5: 1.0, 1.0: 1.0})


def test_tar_at_far_cross_model_uses_ordered_pairs():
    # a_i vs b_j for all i != j: every pair above appears twice -> same rates at FAR 0.25
    # (2 of 8 impostors may pass: threshold = 3rd best = 0.8 -> genuine 1.0, 1.0 pass of 4).
    result = tar_at_far(FEATURES, LABELS, far_targets=(0.25,), features_b=FEATURES * 3)
    assert result == pytest.approx({0.25: 0.5})


def test_tar_at_far_given_pairs():
    pairs = [(0, 1, 1), (2, 3, 1), (0, 3, 0), (1, 2, 0)]  # impostor scores 0.8 and 0.0
    result = tar_at_far(FEATURES, None, far_targets=(0.49, 0.5), pairs=pairs)
    # FAR 0.49: no impostor may pass -> threshold 0.8 -> 1 of 2.  FAR 0.5: threshold 0.0.
    assert result == pytest.approx({0.49: 0.5, 0.5: 1.0})


GALLERY = np.array([[1, 0], [0, 1]], dtype=np.float32)
GALLERY_IDS = np.array([0, 1])
PROBES = np.array([
    [1, 0.2],        # id 0, mated: best item 0 at 0.98 -> rank 1
    [0.6, 0.8],      # id 1, mated: item 1 at 0.8 beats item 0 at 0.6 -> rank 1
    [0.8, 0.6],      # id 1, mated: item 0 at 0.8 first -> rank 2 with score 0.6
    [0.7071, 0.7071],  # id 5, non-mated: top score 0.7071
    [0.28, 0.96],    # id 6, non-mated: top score 0.96
], dtype=np.float32)
PROBE_IDS = np.array([0, 1, 1, 5, 6])


def test_tpir_at_fpir_hand_example():
    # FPIR 0.1: no non-mated probe may pass -> threshold 0.96: only probe 0 (0.98) -> 1/3.
    # FPIR 0.5: one may pass -> threshold 0.7071: probes 0 and 1 -> 2/3.
    # FPIR 1.0: no threshold: rank-1 hits 0 and 1 -> 2/3; at rank 2 also probe 2 -> 1.
    result = tpir_at_fpir(PROBES, PROBE_IDS, GALLERY, GALLERY_IDS, fpir_targets=(0.1, 0.5, 1.0))
    assert result == pytest.approx({0.1: 1 / 3, 0.5: 2 / 3, 1.0: 2 / 3})
    rank2 = tpir_at_fpir(PROBES, PROBE_IDS, GALLERY, GALLERY_IDS, fpir_targets=(0.5, 1.0), rank=2)
    assert rank2 == pytest.approx({0.5: 2 / 3, 1.0: 1.0})


def test_tpir_ranks_identities_not_items():
    # Identity 0 has two items above identity 1's item: identity 1 is rank 2, not 3.
    gallery = np.array([[1, 0], [0.9, 0.436], [0.8, 0.6]], dtype=np.float32)
    probes = np.array([[1, 0], [0, 1]], dtype=np.float32)
    result = tpir_at_fpir(probes, [1, 7], gallery, [0, 0, 1], fpir_targets=(1.0,), rank=2)
    assert result == {1.0: 1.0}
    assert tpir_at_fpir(probes, [1, 7], gallery, [0, 0, 1], fpir_targets=(1.0,)) == {1.0: 0.0}


def test_verification_argument_errors():
    with pytest.raises(InvalidArgumentError, match="mated and non-mated"):
        tpir_at_fpir(PROBES[:3], PROBE_IDS[:3], GALLERY, GALLERY_IDS)
    with pytest.raises(InvalidArgumentError, match="fpir_targets"):
        tpir_at_fpir(PROBES, PROBE_IDS, GALLERY, GALLERY_IDS, fpir_targets=(0.0,))
    with pytest.raises(InvalidArgumentError, match="genuine and impostor"):
        tar_at_far(FEATURES[:2], LABELS[:2])
    with pytest.raises(InvalidArgumentError, match="labels are needed"):
        tar_at_far(FEATURES, None)
