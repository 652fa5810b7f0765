"""FastFill's backfill order: items whose transformed embedding h predicts least
confidently (largest sigma) are re-embedded first."""

from __future__ import annotations

import numpy as np

from compatzoo.plugin import (BackfillScheduler, BackfillState, check_backfill_state,
                              descending_order)


class SigmaScheduler(BackfillScheduler):
    """Order by the per-item signal ``sigma`` (published by the fastfill upgrader),
    largest first."""

    needs_signals = frozenset({"sigma"})

    def order(self, state: BackfillState, seed: int = 0) -> np.ndarray:
        check_backfill_state("fastfill-sigma", self, state)
        return descending_order(state.signals["sigma"])
