"""RACT's uncertainty-based backfilling (Zhang et al., ICLR 2022, sec. 4.3, eqs. 9-11,
Alg. 2): old gallery features go through the new classifier, and the items it is least
sure about -- "the poor" -- are re-embedded first."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from compatzoo.plugin import (BackfillScheduler, BackfillState, SpecError, check_backfill_state,
                              descending_order, match_dim)

_LOGITS_PER_CHUNK = 2**24  # bounds the (rows x classes) probabilities held at once


def _least_confidence(probs: torch.Tensor) -> torch.Tensor:
    """Eq. 9: ``1 - p_(1)``."""
    return 1.0 - probs.max(dim=1).values


def _margin(probs: torch.Tensor) -> torch.Tensor:
    """Eq. 10: ``1 - (p_(1) - p_(2))``."""
    top = probs.topk(2, dim=1).values
    return 1.0 - (top[:, 0] - top[:, 1])


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """Eq. 11, with Alg. 2's 1e-9 inside the log."""
    return -(probs * torch.log(probs + 1e-9)).sum(dim=1)


MEASURES = {"least-confidence": _least_confidence, "margin": _margin, "entropy": _entropy}


class UncertaintyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    measure: Literal["least-confidence", "margin", "entropy"] = Field(
        "margin", description="uncertainty score: eq. 9, 10 or 11. Margin is Alg. 2's default "
        "and the measure of the paper's further analysis (fig. 12); sec. 5.3 finds "
        "least-confidence and margin better than entropy")


class UncertaintyScheduler(BackfillScheduler):
    """Scores ``softmax(w_new(phi_old(g)))`` of every gallery item and backfills the highest
    score first; equal scores keep the gallery order. Old features wider or narrower than
    the head are cut or zero-padded (BCT's rule, :func:`match_dim`)."""

    Params = UncertaintyParams
    requires = frozenset({"new_head"})

    @torch.no_grad()
    def order(self, state: BackfillState, seed: int = 0) -> np.ndarray:
        check_backfill_state("uncertainty", self, state)
        head = state.new_head
        classes = getattr(head, "num_classes", None)
        if self.params.measure == "margin" and classes is not None and classes < 2:
            raise SpecError("the margin measure compares the two most likely classes, but the "
                            "new head has one class; use least-confidence or entropy")
        parameter = next(head.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        dim = getattr(head, "embedding_dim", state.old_features.shape[1])
        score = MEASURES[self.params.measure]
        rows = max(1, _LOGITS_PER_CHUNK // max(1, classes or 1))
        was_training = head.training
        head.eval()
        scores = []
        for start in range(0, len(state.old_features), rows):
            features = torch.as_tensor(np.asarray(state.old_features[start:start + rows]),
                                       dtype=torch.float32, device=device)
            probs = torch.softmax(head(match_dim(features, dim)).float(), dim=1)
            scores.append(score(probs).cpu())
        head.train(was_training)
        return descending_order(torch.cat(scores))
