"""``top_k``: the public search a platform runs on an upgraded gallery."""

import numpy as np
import pytest

from compatzoo.errors import DimensionMismatchError
from compatzoo.retrieval import InvalidArgumentError, top_k


def test_top_k_is_the_cosine_ranking_with_index_tie_break():
    gallery = np.array([[1, 0], [0, 1], [1, 0], [1, 1], [-1, 0]], np.float32)
    scores, index = top_k(np.array([[2, 0], [0, 3]], np.float32), gallery, k=3)
    assert index.tolist() == [[0, 2, 3], [1, 3, 0]]          # 0 and 2 tie: index order
    np.testing.assert_allclose(scores, [[1, 1, 2 ** -0.5], [1, 2 ** -0.5, 0]], atol=1e-6)


def test_top_k_rejects_other_widths_and_empty_k():
    with pytest.raises(DimensionMismatchError, match="3-d but the gallery is 2-d"):
        top_k(np.ones((1, 3), np.float32), np.ones((4, 2), np.float32))
    with pytest.raises(InvalidArgumentError, match="k must be at least 1"):
        top_k(np.ones((1, 2), np.float32), np.ones((4, 2), np.float32), k=0)
