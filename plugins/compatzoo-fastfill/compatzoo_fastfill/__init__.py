"""FastFill (Jaeckle et al., ICLR 2023) for compatzoo: FCT's transformation with a
learned per-item uncertainty sigma, and the backfill order by sigma."""

from compatzoo_fastfill.scheduler import SigmaParams, SigmaScheduler
from compatzoo_fastfill.upgrader import FastFillParams, FastFillUpgrader, fastfill_loss

__all__ = ["FastFillParams", "FastFillUpgrader", "SigmaParams", "SigmaScheduler", "fastfill_loss"]
