"""What every backfill scheduler shares: the up-front check of the state it reads, and
the descending order with index tie-break."""

from __future__ import annotations

import numpy as np
import torch

from compatzoo.errors import InvalidFeaturesError, SpecError
from compatzoo.interfaces import BackfillScheduler, BackfillState, check_features

_FIELDS = {
    "new_head": "the new model's classifier head (BackfillState.new_head)",
    "new_features": "the new model's embeddings of the gallery (BackfillState.new_features)",
    "upgraded": "the upgraded gallery embeddings (BackfillState.upgraded)",
    "side": "the side information stored with the gallery (BackfillState.side)",
}


def check_backfill_state(name: str, scheduler: BackfillScheduler, state: BackfillState,
                         optional: frozenset[str] = frozenset()) -> None:
    """Fail before any work when ``state`` lacks a field ``scheduler.requires`` or a signal
    ``scheduler.needs_signals`` names, or when an array it will read (required, or
    ``optional`` and present) is malformed or does not have one row per gallery item."""
    missing = [f for f in sorted(scheduler.requires) if getattr(state, f) is None]
    if missing:
        needs = "; ".join(_FIELDS[f] for f in missing)
        raise SpecError(f"the {name} scheduler needs {needs}, but the backfill state has none; "
                        "provide it or choose another scheduler (e.g. random)")
    absent = sorted(scheduler.needs_signals - set(state.signals))
    if absent:
        raise SpecError(f"the {name} scheduler orders by the per-item signal(s) {absent}, but "
                        f"the backfill state carries {sorted(state.signals) or 'none'}; "
                        "give the model an upgrader that publishes them, or choose another "
                        "scheduler (e.g. random)")
    check_features(state.old_features, None, "old gallery features")
    rows = state.old_features.shape[0]
    read = {f: getattr(state, f) for f in (scheduler.requires | optional) - {"new_head"}}
    read.update({f"signals['{s}']": state.signals[s] for s in scheduler.needs_signals})
    for what, value in sorted(read.items()):
        if value is None:
            continue
        if what.startswith("signals"):
            check_features(np.asarray(value).reshape(-1, 1), 1, f"BackfillState.{what}")
        else:
            check_features(value, None, f"BackfillState.{what}")
        if len(value) != rows:
            raise InvalidFeaturesError(f"BackfillState.{what} has {len(value)} rows but the "
                                       f"gallery has {rows} items; give one row per item")


def descending_order(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    """Indices by score, highest first; equal scores keep their index order."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    return np.argsort(-scores, kind="stable")
