"""An experiment's evaluation as text (the table the CLI prints) and as plots (PNG):
compatibility bars, backfill curves and the matrices of model chains."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from compatzoo.specs import ExperimentSpec

#: Version of the layout of results.json; raised when a key changes meaning or moves.
RESULTS_SCHEMA_VERSION = 1


@dataclass
class Report:
    """Everything a run reports; :func:`write` turns it into results.json and plots."""

    spec: ExperimentSpec
    dataset: dict[str, Any]
    allocation: dict[str, Any]
    training: dict[str, list[dict[str, Any]]]
    evaluation: dict[str, Any]
    timing: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        import torch

        import compatzoo

        return {"schema_version": RESULTS_SCHEMA_VERSION,
                "compatzoo_version": compatzoo.__version__, "torch_version": torch.__version__,
                "python": platform.python_version(), "experiment": self.spec.name,
                "seed": self.spec.seed, "dataset": self.dataset, "allocation": self.allocation,
                "spec": self.spec.model_dump(mode="json"), "training": self.training,
                "evaluation": self.evaluation, "timing": self.timing}


def write(report: Report, directory: str | Path) -> Path:
    """``results.json``, ``compatibility.png``, ``backfill_<model>.png`` and
    ``chain_<leaf>.png`` into ``directory``; returns the results path."""
    out = Path(directory)
    path = out / "results.json"
    path.write_text(json.dumps(report.to_dict(), indent=2))
    evaluation = report.evaluation
    plot_compatibility_bars(evaluation, evaluation["primary"], out / "compatibility.png",
                            title=report.spec.name)
    if evaluation.get("backfill"):
        plot_curves(evaluation, evaluation["primary"], out)
    if evaluation.get("sequential"):
        plot_sequential(evaluation, out)
    return path


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _percent(values: list[float | None]) -> list[float]:
    """JSON null (undefined, e.g. NFR with no query right before) plots as a gap."""
    return [float("nan") if v is None else 100 * v for v in values]


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
    return _save(fig, path)


def plot_curves(evaluation: dict[str, Any], metric: str, directory: str | Path) -> list[Path]:
    """``backfill_<model>.png``: metric and NFR vs backfilled fraction per scheduler."""
    table = evaluation["table"]
    paths = []
    for model, by_scheduler in evaluation.get("backfill", {}).items():
        with_nfr = any(curve.get("nfr") for curve in by_scheduler.values())
        fig, axes = plt.subplots(1, 2 if with_nfr else 1, figsize=(10 if with_nfr else 5, 4),
                                 squeeze=False)
        ax_metric, ax_nfr = axes[0][0], axes[0][-1] if with_nfr else None
        for scheduler, curve in by_scheduler.items():
            label = f"{scheduler} (AUC {100 * curve['auc'][metric]:.1f})"
            label += " [oracle]" if curve.get("oracle") else ""
            ax_metric.plot(curve["fractions"], _percent(curve["metrics"][metric]),
                           marker="o", markersize=3, label=label)
            for k, values in curve.get("nfr", {}).items():
                ax_nfr.plot(curve["fractions"], _percent(values), marker="o",
                            markersize=3, label=f"{scheduler} NFR@{k}")
        for key, style in (("o2o", ":"), (f"n2n/{model}", "--")):
            ax_metric.axhline(100 * table[key][metric], color="black", linestyle=style,
                              linewidth=1, label=key.split("/")[0])
        ax_metric.set(xlabel="fraction of gallery backfilled", ylabel=f"{metric} (%)",
                      title=f"backfill: {model}")
        ax_metric.legend(fontsize=8)
        if with_nfr:         # no NFR where the protocol has no labels (revisitop)
            ax_nfr.set(xlabel="fraction of gallery backfilled",
                       ylabel="negative flip rate (%)", title="negative flips vs o2o")
            ax_nfr.legend(fontsize=8)
        paths.append(_save(fig, Path(directory) / f"backfill_{model}.png"))
    return paths


def plot_sequential(evaluation: dict[str, Any], directory: str | Path) -> list[Path]:
    """``chain_<leaf>.png``: one heat map per matrix of a chain (percent, blank where the
    query model is older than the gallery)."""
    import numpy as np

    paths = []
    for leaf, chain in evaluation.get("sequential", {}).items():
        keys = [k for k in ("backfilled", "upgraded", "carried") if k in chain]
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4), squeeze=False)
        for ax, key in zip(axes[0], keys):
            matrix = chain[key]
            names = matrix["names"]
            values = np.array([[np.nan if v is None else 100 * v for v in row]
                               for row in matrix["values"]])
            image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis")
            for (i, j), v in np.ndenumerate(values):
                if not np.isnan(v):  # dark text on the light end of the colour map
                    light = image.norm(v) > 0.6
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8,
                            color="black" if light else "white")
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set_yticks(range(len(names)), names, fontsize=8)
            ax.set(xlabel="gallery", ylabel="query",
                   title=f"{key} ({matrix['metric']})\nAC "
                   + ("-" if matrix["average_compatibility"] is None
                      else f"{100 * matrix['average_compatibility']:.0f}%")
                   + f", AMMA {100 * matrix['average_multi_model_accuracy']:.1f}")
        paths.append(_save(fig, Path(directory) / f"chain_{leaf}.png"))
    return paths


# --------------------------------------------------------------------------- text
def format_table(evaluation: dict[str, Any]) -> str:
    """A plain-text compatibility table: one row per (setting, model), one column per metric."""
    metrics = evaluation["metrics"]
    rows = [("setting", *metrics)]
    for key, values in evaluation["table"].items():
        rows.append((key, *(f"{100 * values[m]:.2f}" for m in metrics)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    primary = evaluation["primary"]
    for name, entry in evaluation["criterion"].items():
        gain = entry.get("update_gain")
        lines.append(f"{name}: n2o > o2o on {primary} (BCT criterion): "
                     f"{'yes' if entry['compatible'] else 'no'}"
                     + (f"; update gain {gain:.3f}" if gain is not None else ""))
    for name, cost in evaluation.get("upgrade_cost", {}).items():
        if "adapt_macs_per_query" in cost:
            lines.append(f"{name} query adapter per query: "
                         f"{cost['adapt_macs_per_query'] / 1e6:.3f} MMACs on top of "
                         f"{cost['embed_macs_per_query'] / 1e6:.3f} MMACs to embed it; the "
                         "old gallery stays as stored")
            continue
        lines.append(
            f"{name} upgrade per gallery item: {cost['upgrade_macs_per_item'] / 1e6:.3f} MMACs vs "
            f"{cost['reembed_macs_per_item'] / 1e6:.3f} MMACs to re-embed the image; stores "
            f"{cost['stored_bytes_per_item']} B (side info {cost['side_bytes_per_item']} B"
            + (f", previous copy {cost['previous_copy_bytes_per_item']} B"
               if cost.get("previous_copy_bytes_per_item") else "") + ")")
    for chain in evaluation.get("sequential", {}).values():
        lines.append(f"chain {' -> '.join(chain['models'])} ({primary}):")
        for key, caption in (("backfilled", "query model i vs gallery embedded by model j"),
                             ("upgraded", "query model i vs the old gallery carried to "
                                          "generation j (never re-embedded)"),
                             ("carried", "query model i vs gallery embedded by model j, "
                                         "carried to i")):
            if key in chain:
                lines += [f"  {key}: {caption}", *format_matrix(chain[key], indent=4)]
        if "upgrade_path" in chain:
            path = chain["upgrade_path"]
            steps = ", ".join(f"{100 * s['value']:.2f}" for s in path["steps"])
            lines.append(f"  upgrade path without re-embedding (BiCT eq. 2: must increase): "
                         f"{steps}: {'holds' if path['increasing'] else 'does not hold'}")
    for name, by_scheduler in evaluation.get("backfill", {}).items():
        for scheduler, curve in by_scheduler.items():
            nfr = curve.get("nfr", {})
            nfr_text = ", ".join(f"NFR@{k} max {_worst(v)}" for k, v in nfr.items())
            lines.append(f"backfill {name} ({scheduler}): AUC {primary} "
                         f"{_worst([curve['auc'][primary]])}"
                         + (f"; {nfr_text}" if nfr_text else ""))
            if "diagnostics" in curve:
                lines.append(f"  {name} ({scheduler}): {_diagnostics_text(curve['diagnostics'])}")
    for label, side in evaluation.get("side_information", {}).items():
        if side.get("side_knn_accuracy") is None:
            lines.append(f"side information of {label}: 1-NN accuracy undefined"
                         + (f" ({side['reason']})" if side.get("reason") else ""))
            continue
        lines.append(f"side information of {label}: leave-one-out 1-NN accuracy "
                     f"{_pct(side['side_knn_accuracy'])} (stored embeddings "
                     f"{_pct(side['stored_knn_accuracy'])}, new {_pct(side['new_knn_accuracy'])}"
                     f", chance {_pct(side['chance'])})")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "undefined" if value is None else f"{100 * value:.1f}%"


def _diagnostics_text(diag: dict[str, Any]) -> str:
    """One line: Spearman of the order with the true error and with flips, and the share
    of the oracle's AUC gain over random it captures (or why that is undefined)."""
    def rho(key: str) -> str:
        value = diag.get(key)
        return "undefined" if value is None else f"{value:.2f}"

    captured = diag.get("oracle_gain_captured")
    gain = (f"captures {100 * captured:.0f}% of the oracle's AUC gain" if captured is not None
            else "oracle gain share undefined: "
            + diag.get("reasons", {}).get("oracle_gain_captured", "no reference curves"))
    return (f"Spearman vs true error {rho('spearman_true_error')} (cosine "
            f"{rho('spearman_true_error_cosine')}), vs flips {rho('spearman_flips')}"
            + (f" ({diag['flips_at_start']} at 0%)" if diag.get("flips_at_start") is not None
               else "") + f"; {gain}")


def format_matrix(matrix: dict[str, Any], indent: int = 0) -> list[str]:
    """Rows of a compatibility matrix in percent, '-' where undefined, and its summaries."""
    names = matrix["names"]
    cells = [["query \\ gallery", *names]] + [
        [name, *("-" if v is None else f"{100 * v:.2f}" for v in row)]
        for name, row in zip(names, matrix["values"])]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    pad = " " * indent
    lines = [pad + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    average = matrix["average_compatibility"]
    lines.append(pad + "average compatibility "
                 + ("-" if average is None else f"{100 * average:.1f}%")
                 + f"; average multi-model accuracy "
                 f"{100 * matrix['average_multi_model_accuracy']:.2f}")
    return lines


def _worst(values: list[float | None]) -> str:
    """The largest defined value in percent (JSON null is undefined, e.g. NFR when no
    query was right before the upgrade)."""
    defined = [v for v in values if v is not None]
    return f"{100 * max(defined):.2f}" if defined else "undefined"
