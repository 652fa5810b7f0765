"""Plots of an experiment's evaluation: compatibility bars and backfill curves (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_compatibility_bars(evaluation: dict[str, Any], metric: str, path: str | Path,
                            title: str = "") -> Path:
    """One bar per setting (o2o, n2o/<model>, n2n/<model>) of the primary metric."""
    table = evaluation["table"]
    names = list(table)
    values = [100 * table[n][metric] for n in names]
    colours = ["#7f7f7f" if n == "o2o" else "#1f77b4" if n.startswith("n2o") else "#2ca02c"
               for n in names]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 4))
    bars = ax.bar(range(len(names)), values, color=colours)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.axhline(values[0], color="#7f7f7f", linestyle="--", linewidth=1, label="o2o")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title or "compatibility")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_curves(evaluation: dict[str, Any], metric: str, directory: str | Path) -> list[Path]:
    """``backfill_<model>.png``: metric and NFR vs backfilled fraction per scheduler."""
    table = evaluation["table"]
    paths = []
    for model, by_scheduler in evaluation.get("backfill", {}).items():
        fig, (ax_metric, ax_nfr) = plt.subplots(1, 2, figsize=(10, 4))
        for scheduler, curve in by_scheduler.items():
            label = f"{scheduler} (AUC {100 * curve['auc'][metric]:.1f})"
            label += " [oracle]" if curve.get("oracle") else ""
            ax_metric.plot(curve["fractions"], [100 * v for v in curve["metrics"][metric]],
                           marker="o", markersize=3, label=label)
            for k, values in curve.get("nfr", {}).items():
                ax_nfr.plot(curve["fractions"], [100 * v for v in values], marker="o",
                            markersize=3, label=f"{scheduler} NFR@{k}")
        for key, style in (("o2o", ":"), (f"n2n/{model}", "--")):
            ax_metric.axhline(100 * table[key][metric], color="black", linestyle=style,
                              linewidth=1, label=key.split("/")[0])
        ax_metric.set(xlabel="fraction of gallery backfilled", ylabel=f"{metric} (%)",
                      title=f"backfill: {model}")
        ax_nfr.set(xlabel="fraction of gallery backfilled", ylabel="negative flip rate (%)",
                   title="negative flips vs o2o")
        ax_metric.legend(fontsize=8)
        ax_nfr.legend(fontsize=8)
        fig.tight_layout()
        path = Path(directory) / f"backfill_{model}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
