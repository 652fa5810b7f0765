"""FastFill (Jaeckle et al., ICLR 2023) for compatzoo: FCT's transformation with a
learned per-item uncertainty sigma, and the backfill order by sigma."""

from compatzoo_fastfill.scheduler import SigmaScheduler
from compatzoo_fastfill.upgrader import FastFillParams, FastFillUpgrader, fastfill_loss

__all__ = ["FastFillParams", "FastFillUpgrader", "SigmaScheduler", "fastfill_loss"]
