"""The leaderboard: rows from a run's results, their mean and standard deviation over
seeds, the Markdown and its plots, and the papers' claims decided from those figures.

``benchmarks/run_suite.py`` (one seed per spec) and ``compatzoo leaderboard`` (the runs of
``compatzoo bench``, several seeds per spec) build their tables with the same row
functions and the same Markdown writers; a figure aggregated over seeds is a :class:`Stat`
and prints as ``mean ± std``.

Claims are data: each :class:`Claim` compares two figures, each looked up as
``(spec, row, metric)`` in the aggregated rows (``spec``: the spec file's stem, the folder
``compatzoo bench`` runs it in; ``row``: the leaderboard row's model; ``metric``: a column,
``auc.<scheduler>`` or ``max_nfr@1.<scheduler>`` for one scheduler's figure; or
:class:`UpdateGain` computed with another spec's paragon, or a constant), and
:func:`decide` turns the per-seed values into "holds", "reversed", "inconclusive",
"inconclusive (1 seed)" or "not measured".
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from compatzoo.errors import SpecError

# --------------------------------------------------------------------------- rows of one run


def leaderboard_rows(results: dict) -> list[dict]:
    """One row per new model (and per other gallery of it): o2o, n2o, n2u, n2n on the
    primary metric, BCT's criterion and update gain, backfill AUC and worst NFR@1 per
    scheduler, the run's time."""
    evaluation = results["evaluation"]
    primary, table = evaluation["primary"], evaluation["table"]
    rows = []
    for model, criterion in evaluation["criterion"].items():
        curves = evaluation.get("backfill", {}).get(model, {})
        rows.append({
            "spec": results["experiment"], "model": model, "metric": primary,
            "o2o": table["o2o"][primary], "n2o": table[f"n2o/{model}"][primary],
            "n2u": table.get(f"n2u/{model}", {}).get(primary),
            "n2n": table[f"n2n/{model}"][primary], "compatible": criterion["compatible"],
            "update_gain": criterion.get("update_gain"),
            "auc": {name: c["auc"][primary] for name, c in curves.items()},
            "max_nfr@1": {name: max((v for v in c.get("nfr", {}).get("1", []) if v is not None),
                                    default=None)
                          for name, c in curves.items()},
            "oracle": [name for name, c in curves.items() if c.get("oracle")],
            "seconds": results["timing"]["total_s"],
        })
        # other galleries for the same model: chained from the previous version, direct
        # hops and alternative upgraders (n2u/<model>/<label>)
        for key in (k for k in table if k.startswith(f"n2u/{model}/")):
            rows.append({**rows[-1], "model": key.removeprefix("n2u/"),
                         "n2u": table[key][primary], "auc": {}, "max_nfr@1": {}, "oracle": []})
    return rows


def upgrade_rows(results: dict) -> list[dict]:
    """One row per upgrader of every model: the setting it serves (n2u: the upgraded old
    gallery; a2o: adapted new queries against the untouched old gallery), the share of
    full re-embedding (n2n) it recovers -- Drift-Adapter's figure -- and its cost per
    item (per gallery item for n2u, per query for a2o)."""
    evaluation = results["evaluation"]
    primary, table = evaluation["primary"], evaluation["table"]
    rows = []
    for label, cost in evaluation.get("upgrade_cost", {}).items():
        model = label.split("/")[0]
        setting = "a2o" if "adapt_macs_per_query" in cost else "n2u"
        if f"{setting}/{label}" not in table:
            continue
        value, n2n = table[f"{setting}/{label}"][primary], table[f"n2n/{model}"][primary]
        rows.append({
            "spec": results["experiment"], "upgrader": label, "setting": setting,
            "metric": primary, "value": value, "o2o": table["o2o"][primary],
            "n2o": table[f"n2o/{model}"][primary], "n2n": n2n,
            "recovered": None if not n2n else value / n2n,
            "macs_per_item": cost.get("adapt_macs_per_query",
                                      cost.get("upgrade_macs_per_item")),
            "encoder_macs_per_item": cost.get("embed_macs_per_query",
                                              cost.get("reembed_macs_per_item"))})
    return rows


def measured(results: dict, reference: dict) -> float | None:
    """What one run measured in a reference's row, column and metric (a fraction), or None
    where the run lacks it (a metric compatzoo runs do not compute, a curve not drawn)."""
    evaluation, model = results["evaluation"], reference["model"]
    column, metric = reference["column"], reference["metric"]
    if column.startswith("auc."):
        curves = evaluation.get("backfill", {}).get(model, {})
        return curves.get(column.removeprefix("auc."), {}).get("auc", {}).get(metric)
    setting = "o2o" if column == "o2o" else f"{column}/{model}"
    return evaluation["table"].get(setting, {}).get(metric)


def reference_rows(results: dict) -> list[dict]:
    """One row per figure a paper reports for the run's spec (its ``references``): the
    paper's value (in %, as printed) and the run's own figure beside it (``measured``)."""
    return [{"spec": results["experiment"], **reference, "measured": measured(results, reference)}
            for reference in results["spec"].get("references") or []]


def chain_rows(results: dict) -> list[dict]:
    """One row per chain of three or more generations: the matrices' summaries."""
    rows = []
    for chain in results["evaluation"].get("sequential", {}).values():
        row = {"spec": results["experiment"], "chain": " -> ".join(chain["models"])}
        for key in ("backfilled", "upgraded", "carried"):
            if key in chain:
                row[key] = {"average_compatibility": chain[key]["average_compatibility"],
                            "average_multi_model_accuracy":
                                chain[key]["average_multi_model_accuracy"]}
        if "upgrade_path" in chain:
            row["upgrade_path"] = chain["upgrade_path"]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- over seeds
@dataclass(frozen=True)
class Stat:
    """A figure over seeds: mean, sample standard deviation (n - 1; None for one seed),
    the number of seeds and the value of each."""

    mean: float
    std: float | None
    n: int
    values: dict[int, float]

    @classmethod
    def of(cls, values: dict[int, float]) -> Stat:
        xs = list(values.values())
        return cls(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None,
                   len(xs), dict(values))

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n,
                "values": {str(seed): v for seed, v in self.values.items()}}


@dataclass(frozen=True)
class Votes:
    """A yes/no figure over seeds: how many seeds said yes."""

    yes: int
    n: int

    def to_json(self) -> dict[str, int]:
        return {"yes": self.yes, "n": self.n}


def combine(by_seed: dict[int, Any]) -> Any:
    """One value per seed -> one aggregated value: numbers become a :class:`Stat`,
    booleans :class:`Votes`, dicts and equally long lists are combined entry by entry,
    and anything else (names) is taken from the first seed. Seeds whose value is None
    are left out; None when every seed's is."""
    present = {seed: v for seed, v in sorted(by_seed.items()) if v is not None}
    if not present:
        return None
    values = list(present.values())
    if all(isinstance(v, bool) for v in values):
        return Votes(sum(values), len(values))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return Stat.of({seed: float(v) for seed, v in present.items()})
    if all(isinstance(v, dict) for v in values):
        keys = dict.fromkeys(k for v in values for k in v)
        return {k: combine({seed: v.get(k) for seed, v in present.items()}) for k in keys}
    first = values[0]
    if (all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1
            and any(not isinstance(x, str) for x in first)):
        return [combine({seed: v[i] for seed, v in present.items()}) for i in range(len(first))]
    return first


def aggregate_rows(rows_by_seed: dict[int, list[dict]],
                   key: Callable[[dict], Any]) -> list[dict]:
    """Rows of several seeds -> one row per ``key``, in first-seen order, with ``seeds``
    (the seeds that have the row) and every figure combined over them."""
    groups: dict[Any, dict[int, dict]] = {}
    for seed, rows in sorted(rows_by_seed.items()):
        for row in rows:
            groups.setdefault(key(row), {})[seed] = row
    return [{**combine(by_seed), "seeds": sorted(by_seed)} for by_seed in groups.values()]


@dataclass
class Aggregate:
    """A suite's figures over seeds. ``rows``, ``chains`` and ``upgrades`` are the rows of
    :func:`leaderboard_rows`, :func:`chain_rows` and :func:`upgrade_rows` combined over
    seeds (with ``stem``, the spec's folder, and ``seeds``); ``curves[stem][model]
    [scheduler]`` and ``tables[stem][setting]`` (primary metric) likewise; ``specs[stem]``
    is the spec of the spec's first seed; ``references`` the rows of :func:`reference_rows`
    with the measured figure combined over seeds (the paper's value stays as printed)."""

    rows: list[dict]
    chains: list[dict]
    upgrades: list[dict]
    curves: dict[str, dict[str, dict[str, Any]]]
    tables: dict[str, dict[str, Any]]
    specs: dict[str, dict[str, Any]]
    metric: str | None
    seeds: dict[str, list[int]] = field(default_factory=dict)
    references: list[dict] = field(default_factory=list)


def aggregate(runs: dict[str, dict[int, dict]]) -> Aggregate:
    """``runs[stem][seed]`` is the results of one run (results.json)."""
    rows, chains, upgrades, curves, tables, specs, references = [], [], [], {}, {}, {}, []
    metric = None
    for stem in sorted(runs):
        by_seed = dict(sorted(runs[stem].items()))
        if not by_seed:
            continue
        first = next(iter(by_seed.values()))
        metric = metric or first["evaluation"]["primary"]
        specs[stem] = first["spec"]
        for rows_of, out, key in ((leaderboard_rows, rows, "model"), (chain_rows, chains, "chain"),
                                  (upgrade_rows, upgrades, "upgrader")):
            combined = aggregate_rows({s: rows_of(r) for s, r in by_seed.items()},
                                      lambda row, key=key: row[key])
            out.extend({"stem": stem, **row} for row in combined)
        primary = {s: r["evaluation"]["primary"] for s, r in by_seed.items()}
        curves[stem] = combine({s: {model: {name: {"fractions": c["fractions"],
                                                   "metric": c["metrics"][primary[s]],
                                                   "nfr@1": c.get("nfr", {}).get("1")}
                                            for name, c in by_scheduler.items()}
                                    for model, by_scheduler in
                                    r["evaluation"].get("backfill", {}).items()}
                                for s, r in by_seed.items()}) or {}
        tables[stem] = combine({s: {k: v[primary[s]] for k, v in r["evaluation"]["table"].items()}
                                for s, r in by_seed.items()})
        for reference in reference_rows(first):     # every seed's spec has the same ones
            references.append({"stem": stem, **reference, "seeds": sorted(by_seed),
                               "measured": combine({s: measured(r, reference)
                                                    for s, r in by_seed.items()})})
    return Aggregate(rows, chains, upgrades, curves, tables, specs, metric,
                     {stem: sorted(by_seed) for stem, by_seed in runs.items() if by_seed},
                     references)


def jsonable(value: Any) -> Any:
    """Stats and Votes as plain JSON objects, everything else as it is."""
    if isinstance(value, (Stat, Votes)):
        return value.to_json()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------- claims
Status = Literal["holds", "reversed", "inconclusive", "inconclusive (1 seed)", "not measured"]


@dataclass(frozen=True)
class Fig:
    """A figure of the aggregated leaderboard: row ``row`` of spec ``spec`` (the spec
    file's stem, or the spec's name), column ``metric`` (``n2o``, ``update_gain``,
    ``auc.random``, ``max_nfr@1.uncertainty``, ...)."""

    spec: str
    row: str
    metric: str

    def label(self) -> str:
        return f"{self.spec}: {self.row} {self.metric}"

    def resolve(self, rows: list[dict]) -> tuple[dict[int, float] | None, dict[str, Any]]:
        """The per-seed values and how the figure is named in claims.json."""
        return lookup(rows, self), {"spec": self.spec, "row": self.row, "metric": self.metric}


@dataclass(frozen=True)
class UpdateGain:
    """BCT's update gain (eq. 9) of ``spec``'s ``row`` per seed, ``(n2o - o2o) /
    (n2n of the paragon - o2o)``, with the paragon (an independently trained model) from
    another spec of the suite. A seed's runs of two specs share the old model (the same
    old recipe, seed and allocation), so the old model's o2o is ``spec``'s."""

    spec: str
    row: str
    paragon: Fig

    def resolve(self, rows: list[dict]) -> tuple[dict[int, float] | None, dict[str, Any]]:
        name = {"spec": self.spec, "row": self.row,
                "metric": f"update_gain (paragon: {self.paragon.label()})"}
        n2o, o2o = (lookup(rows, Fig(self.spec, self.row, m)) for m in ("n2o", "o2o"))
        paragon = lookup(rows, self.paragon)
        if n2o is None or o2o is None or paragon is None:
            return None, name
        seeds = [s for s in n2o if s in o2o and s in paragon and paragon[s] != o2o[s]]
        gains = {s: (n2o[s] - o2o[s]) / (paragon[s] - o2o[s]) for s in seeds}
        return gains or None, name


@dataclass(frozen=True)
class FirstOf:
    """The first of ``options`` the results have (e.g. a spec's own update gain, else
    one with the paragon of another spec)."""

    options: tuple[Fig | UpdateGain, ...]

    def resolve(self, rows: list[dict]) -> tuple[dict[int, float] | None, dict[str, Any]]:
        for option in self.options:
            values, name = option.resolve(rows)
            if values is not None:
                return values, name
        return None, self.options[0].resolve(rows)[1]


@dataclass(frozen=True)
class Constant:
    value: float

    def label(self) -> str:
        return f"{self.value:g}"


Lookup = Fig | UpdateGain | FirstOf


@dataclass(frozen=True)
class Claim:
    """``left direction right`` is what the paper claims."""

    name: str
    paper: str
    left: Lookup
    direction: Literal[">", "<"]
    right: Lookup | Constant
    note: str = ""


NO_SWEEP = "(no sweep)"


@dataclass(frozen=True)
class SweepClaim:
    """A claim along a sweep: specs that differ only at one spec field matching
    ``parameter`` (a regex whose first group is the index of the new model it belongs
    to, and whose other fields ``where`` pins, e.g. the upgrader's name). It compares
    ``metric`` at the sweep's largest value with that at its smallest; "not measured"
    when the suite has no such sweep."""

    name: str
    paper: str
    parameter: str
    metric: str
    direction: Literal[">", "<"]
    where: tuple[tuple[str, Any], ...] = ()
    note: str = ""

    def expand(self, specs: dict[str, dict]) -> list[Claim]:
        claims = []
        for sweep in find_sweeps(specs, self.parameter, self.where):
            (low, low_stem), (high, high_stem) = sweep.points[0], sweep.points[-1]
            row = specs[low_stem]["new"][sweep.model]["name"]
            high_row = specs[high_stem]["new"][sweep.model]["name"]
            claims.append(Claim(f"{self.name} ({sweep.path}: {high} vs {low})", self.paper,
                                Fig(high_stem, high_row, self.metric), self.direction,
                                Fig(low_stem, row, self.metric), self.note))
        return claims or [Claim(self.name, self.paper, Fig(NO_SWEEP, "-", self.metric),
                                self.direction, Fig(NO_SWEEP, "-", self.metric),
                                f"the suite has no specs that differ only in "
                                f"{self.parameter!r}; {self.note}".rstrip("; "))]


def load_claims(path: str | Path) -> list[Claim | SweepClaim]:
    """The claims of a YAML file (``benchmarks/claims.yaml`` holds the papers'): the rules
    are data of the benchmark, not of the core, which names no method."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
        papers = document.get("papers", {})
        return [_claim(entry, papers) for entry in document["claims"]]
    except OSError as exc:
        raise SpecError(f"cannot read the claims file {path} ({exc}); give an existing file "
                        "with --claims, e.g. benchmarks/claims.yaml") from None
    except (yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SpecError(f"{path} is not a claims file ({type(exc).__name__}: {exc}); see "
                        "benchmarks/claims.yaml for the format") from None


def _claim(entry: dict, papers: dict[str, str]) -> Claim | SweepClaim:
    paper = papers.get(entry["paper"], entry["paper"])
    direction = entry["direction"]
    if direction not in (">", "<"):
        raise ValueError(f"claim {entry['name']!r}: direction must be '>' or '<'")
    if "sweep" in entry:
        sweep = entry["sweep"]
        return SweepClaim(entry["name"], paper, sweep["parameter"], sweep["metric"], direction,
                          tuple(sweep.get("where", {}).items()), entry.get("note", ""))
    right = entry["right"]
    return Claim(entry["name"], paper, _lookup(entry["left"]), direction,
                 Constant(float(right["constant"])) if "constant" in right else _lookup(right),
                 entry.get("note", ""))


def _lookup(entry: dict) -> Lookup:
    if "first_of" in entry:
        return FirstOf(tuple(_lookup(option) for option in entry["first_of"]))
    if "update_gain" in entry:
        gain = entry["update_gain"]
        return UpdateGain(gain["spec"], gain["row"], Fig(**gain["paragon"]))
    return Fig(entry["spec"], entry["row"], entry["metric"])


def lookup(rows: Iterable[dict], figure: Fig) -> dict[int, float] | None:
    """The per-seed values of ``figure`` in aggregated rows, or None where the results
    lack it (no such spec, row or column, or undefined in every seed)."""
    for row in rows:
        if row.get("model") == figure.row and figure.spec in (row.get("stem"), row.get("spec")):
            value: Any = row
            for part in figure.metric.split(".", 1):
                value = value.get(part) if isinstance(value, dict) else None
            return value.values if isinstance(value, Stat) else None
    return None


def decide(left: dict[int, float] | None, right: dict[int, float] | float | None,
           direction: str) -> dict[str, Any]:
    """Whether ``left direction right`` holds over the seeds.

    The difference is ``mean(left) - mean(right)``. Its standard error: paired when both
    figures come from the same seeds (``sd(left_i - right_i) / sqrt(n)``; one seed's runs
    of two specs share the old model and the allocation), one-sample against a constant,
    and otherwise unpaired (``sqrt(s1^2/n1 + s2^2/n2)``, sample variances). The claim
    holds when the difference exceeds two standard errors in the claimed direction, is
    reversed when it exceeds two in the other, else is inconclusive; with one seed (on
    either side) it is "inconclusive (1 seed)"."""
    if left is None or right is None:
        return {"status": "not measured", "difference": None, "se": None, "se_kind": None,
                "n": 0}
    if isinstance(right, (int, float)):
        diffs, kind = [v - float(right) for v in left.values()], "one-sample"
    elif set(left) == set(right):
        diffs, kind = [left[s] - right[s] for s in sorted(left)], "paired"
    else:
        diffs, kind = None, "unpaired"
    if diffs is not None:
        n, difference = len(diffs), statistics.fmean(diffs)
        se = statistics.stdev(diffs) / math.sqrt(n) if n > 1 else None
    else:
        a, b = list(left.values()), list(right.values())
        n, difference = min(len(a), len(b)), statistics.fmean(a) - statistics.fmean(b)
        se = (math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
              if n > 1 else None)
    out = {"difference": difference, "se": se, "se_kind": kind, "n": n}
    if se is None:
        return {"status": "inconclusive (1 seed)", **out}
    margin = difference if direction == ">" else -difference
    status = ("holds" if margin > 2 * se else "reversed" if margin < -2 * se
              else "inconclusive")
    return {"status": status, **out}


def evaluate_claims(rows: list[dict], specs: dict[str, dict] | None = None,
                    claims: Iterable[Claim | SweepClaim] = ()) -> list[dict]:
    """Every claim decided from aggregated rows (sweeps found among ``specs``)."""
    expanded = [c for claim in claims
                for c in (claim.expand(specs or {}) if isinstance(claim, SweepClaim) else [claim])]
    out = []
    for claim in expanded:
        left, left_name = claim.left.resolve(rows)
        if isinstance(claim.right, Constant):
            right, right_json = claim.right.value, {"constant": claim.right.value}
        else:
            right, right_name = claim.right.resolve(rows)
            right_json = {**right_name, **_stat_json(right)}
        out.append({"claim": claim.name, "paper": claim.paper, "direction": claim.direction,
                    "left": {**left_name, **_stat_json(left)}, "right": right_json,
                    **decide(left, right, claim.direction), "note": claim.note})
    return out


def _stat_json(values: dict[int, float] | None) -> dict[str, Any]:
    return {"mean": None} if values is None else Stat.of(values).to_json()


# --------------------------------------------------------------------------- sweeps
@dataclass(frozen=True)
class Sweep:
    """Specs that differ only at ``path``; ``points``: (value, stem), smallest first;
    ``model``: the index of the new model the path belongs to."""

    path: str
    model: int
    points: list[tuple[Any, str]]


_IGNORED = re.compile(r"^(name|seed|new\.\d+\.name)$")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested spec as ``{"new.0.losses.1.weight": 2.0, ...}``."""
    if isinstance(value, dict):
        items: Iterable = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in items:
        out.update(flatten(item, f"{prefix}{key}."))
    if not out:
        out[prefix.rstrip(".")] = value
    return {k.rstrip("."): v for k, v in out.items()}


def find_sweeps(specs: dict[str, dict], parameter: str,
                where: tuple[tuple[str, Any], ...] = ()) -> list[Sweep]:
    """Groups of two or more specs identical but for one field matching ``parameter``
    (names and seeds aside)."""
    pattern = re.compile(parameter)
    groups: dict[tuple, list[tuple[Any, str]]] = {}
    for stem, spec in sorted(specs.items()):
        flat = flatten(spec)
        for path, value in flat.items():
            found = pattern.match(path)
            if not found or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            model = int(found.group(1)) if found.groups() else 0
            if any(flat.get(f"new.{model}.{k}") != v for k, v in where):
                continue
            rest = tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in flat.items()
                                if k != path and not _IGNORED.match(k)))
            groups.setdefault((path, model, rest), []).append((value, stem))
    return [Sweep(path, model, sorted(points))
            for (path, model, _), points in groups.items()
            if len({value for value, _ in points}) > 1]


LOSS_WEIGHT = r"^new\.(\d+)\.losses\.\d+\.weight$"
PSI_WIDTH = r"^new\.(\d+)\.upgrader\.params\.hidden_dim$"


# --------------------------------------------------------------------------- Markdown
def _mean(value: Any) -> float | None:
    return value.mean if isinstance(value, Stat) else value


def _times(value: Any, factor: float) -> Any:
    if isinstance(value, Stat):
        return Stat(factor * value.mean, None if value.std is None else factor * value.std,
                    value.n, {s: factor * v for s, v in value.values.items()})
    return None if value is None else factor * value


def pct(value: Any) -> str:
    """A fraction in percent; ``mean ± std`` over seeds; "–" when undefined."""
    if value is None:
        return "–"
    if isinstance(value, Stat):
        return f"{100 * value.mean:.2f}" + ("" if value.std is None
                                           else f" ± {100 * value.std:.2f}")
    return f"{100 * value:.2f}"


def _plain(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, Stat):
        return f"{value.mean:.{digits}f}" + ("" if value.std is None
                                            else f" ± {value.std:.{digits}f}")
    return f"{value:.{digits}f}"


def _yes(value: Any, yes: str = "yes", no: str = "no") -> str:
    if isinstance(value, Votes):
        word = yes if value.yes == value.n else no if value.yes == 0 else "mixed"
        return f"{word} ({value.yes}/{value.n})"
    return yes if value else no


def _seeds(row: dict) -> str:
    return f" {len(row['seeds'])} |" if "seeds" in row else ""


def to_markdown(rows: list[dict]) -> str:
    seeds = any("seeds" in r for r in rows)
    lines = ["| spec | model | o2o | n2o | n2u | n2n | n2o > o2o | update gain | backfill AUC "
             "(scheduler) | max NFR@1 | time (s) |" + (" seeds |" if seeds else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if seeds else "")]
    for r in rows:
        auc = ", ".join(f"{pct(v)} ({k}{' [oracle]' if k in r['oracle'] else ''})"
                        for k, v in r["auc"].items()) or "–"
        nfr = ", ".join(f"{pct(v)} ({k})" for k, v in r["max_nfr@1"].items()) or "–"
        lines.append(f"| {r['spec']} | {r['model']} | {pct(r['o2o'])} | {pct(r['n2o'])} | "
                     f"{pct(r['n2u'])} | {pct(r['n2n'])} | {_yes(r['compatible'])} | "
                     f"{_plain(r['update_gain'])} | {auc} | {nfr} | "
                     f"{_mean(r['seconds']):.0f} |" + _seeds(r))
    return "\n".join(lines)


def upgrades_markdown(rows: list[dict]) -> str:
    seeds = any("seeds" in r for r in rows)
    lines = ["| spec | upgrader | setting | value | o2o | n2o | n2n | % of n2n | "
             "MMACs per item (encoder) |" + (" seeds |" if seeds else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if seeds else "")]
    for r in rows:
        recovered = _plain(_times(r["recovered"], 100), 1)
        lines.append(f"| {r['spec']} | {r['upgrader']} | {r['setting']} | {pct(r['value'])} | "
                     f"{pct(r['o2o'])} | {pct(r['n2o'])} | {pct(r['n2n'])} | {recovered} | "
                     f"{_mean(r['macs_per_item']) / 1e6:.4f} "
                     f"({_mean(r['encoder_macs_per_item']) / 1e6:.2f}) |" + _seeds(r))
    return "\n".join(lines)


def chains_markdown(rows: list[dict]) -> str:
    lines = ["| spec | chain | matrix | average compatibility | average multi-model accuracy |",
             "|---|---|---|---|---|"]
    for r in rows:
        for key in ("backfilled", "upgraded", "carried"):
            if key in r:
                ac = r[key]["average_compatibility"]
                ac = "–" if ac is None else f"{_plain(_times(ac, 100), 0)}%"
                lines.append(f"| {r['spec']} | {r['chain']} | {key} | {ac} | "
                             f"{pct(r[key]['average_multi_model_accuracy'])} |")
        if "upgrade_path" in r:
            path = r["upgrade_path"]
            values = ", ".join(pct(step["value"]) for step in path["steps"])
            lines.append(f"| {r['spec']} | {r['chain']} | upgrade path (BiCT eq. 2) | "
                         f"{values} | {_yes(path['increasing'], 'increasing', 'not increasing')} |")
    return "\n".join(lines)


def references_markdown(rows: list[dict]) -> str:
    """The papers' figures, each beside what the suite measured in its row, column and
    metric, and their difference in points."""
    seeds = any("seeds" in r for r in rows)
    lines = ["| spec | model | column | metric | paper's figure | measured here | difference | "
             "source | note |" + (" seeds |" if seeds else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if seeds else "")]
    for r in rows:
        found = r["measured"]
        shown = "not measured" if found is None else pct(found)
        difference = "–" if found is None else f"{100 * _mean(found) - r['value']:+.2f}"
        lines.append(f"| {r['spec']} | {r['model']} | {r['column']} | {r['metric']} | "
                     f"**{r['value']:.2f}** (paper) | {shown} | {difference} | {r['source']} | "
                     f"{r.get('note') or ''} |" + _seeds(r))
    return "\n".join(lines)


REFERENCES_TEXT = (
    "The papers' figures: each row is a figure a paper reports for the setting a spec "
    "reproduces (the spec's `references`, with its source), beside what this suite measured "
    "in the same row, column and metric; the spec's header lists how its runs differ from the "
    "paper's. A figure compatzoo runs do not compute (e.g. IJB-C TAR@FAR) has none beside it.")


def leaderboard_markdown(rows: list[dict], chains: list[dict], suite: str,
                         upgrades: list[dict] = (),
                         references: list[dict] = ()) -> tuple[str, str]:
    """The leaderboard's title line and its tables (the one-seed layout of
    ``benchmarks/run_suite.py``; aggregated rows print ``mean ± std`` and their seeds)."""
    markdown = to_markdown(rows)
    if references:
        markdown += f"\n\n{REFERENCES_TEXT}\n\n" + references_markdown(references)
    if upgrades:
        markdown += ("\n\nEvery upgrader (n2u: new queries, upgraded old gallery; a2o: new "
                     "queries mapped into the old space, old gallery untouched; cost per "
                     "gallery item for n2u, per query for a2o, beside the encoder's):\n\n"
                     + upgrades_markdown(upgrades))
    if chains:
        markdown += ("\n\nSequential upgrades (one row per matrix of each chain; "
                     "see the README's sequential section):\n\n" + chains_markdown(chains))
    title = (f"# Leaderboard: {suite} suite (metric: "
             f"{rows[0]['metric'] if rows else '-'}, in %)")
    return title, markdown


def write_leaderboard(rows: list[dict], chains: list[dict], failures: dict[str, str],
                      suite: str, target: Path, upgrades: list[dict] = (),
                      references: list[dict] = ()) -> None:
    """The one-seed leaderboard of ``benchmarks/run_suite.py``."""
    title, markdown = leaderboard_markdown(rows, chains, suite, upgrades, references)
    failed = "".join(f"\n- {name}: {error}" for name, error in failures.items())
    Path(target).write_text(f"{title}\n\n{markdown}\n"
                            + (f"\nFailed specs:{failed}\n" if failures else ""))
    print("\n" + markdown + (f"\nfailed:{failed}" if failures else ""))


def _scale(metric: str) -> float:
    return 1.0 if metric.startswith("update_gain") else 100.0


def _show_figure(f: dict[str, Any], scale: float) -> str:
    if "constant" in f:
        return f"{f['constant']:g}"
    if f["mean"] is None:
        return "–"
    return f"{scale * f['mean']:.2f}" + ("" if f["std"] is None
                                         else f" ± {scale * f['std']:.2f}")


def claims_markdown(claims: list[dict]) -> str:
    lines = [("| claim | paper | compared | values (mean ± std) | difference | 2 SE (kind) | "
              "seeds | verdict |"), "|---|---|---|---|---|---|---|---|"]
    for c in claims:
        left, right = c["left"], c["right"]
        scale = _scale(left["metric"])
        compared = (f"{left['spec']}: {left['row']} {left['metric']} {c['direction']} "
                    + (f"{right['constant']:g}" if "constant" in right
                       else f"{right['spec']}: {right['row']} {right['metric']}"))
        if left.get("spec") == NO_SWEEP:
            compared = f"{left['metric']} along a sweep"
        difference = "–" if c["difference"] is None else f"{scale * c['difference']:+.2f}"
        se = "–" if c["se"] is None else f"{2 * scale * c['se']:.2f} ({c['se_kind']})"
        verdict = f"**{c['status']}**" + (f" ({c['note']})" if c["note"]
                                          and c["status"] == "not measured" else "")
        values = f"{_show_figure(left, scale)} vs {_show_figure(right, scale)}"
        lines.append(f"| {c['claim']} | {c['paper']} | {compared} | {values} | {difference} | "
                     f"{se} | {c['n'] or '–'} | {verdict} |")
    return "\n".join(lines)


CLAIMS_RULE = (
    "A claim **holds** when the difference of its two figures exceeds two standard errors "
    "over the seeds in the claimed direction, is **reversed** when it exceeds two in the "
    "other direction, and is **inconclusive** otherwise; with one seed it is "
    "\"inconclusive (1 seed)\", and \"not measured\" where the suite lacks a figure. The "
    "standard error is paired (sd of the per-seed differences / sqrt(n)) when both figures "
    "come from the same seeds (a seed's runs share the old model and the allocation), "
    "one-sample against a constant, and otherwise unpaired (sqrt(s1²/n1 + s2²/n2)). "
    "Differences and standard errors are in points (%), update gain as a ratio. A figure "
    "is named `spec: row metric`, the spec by its file's stem. The rules are the claims "
    "file given to `compatzoo leaderboard --claims` (`benchmarks/claims.yaml`).")

NOTES_START, NOTES_END = "<!-- notes:start -->", "<!-- notes:end -->"
PLOT_PREFIX = "leaderboard_"


def write_aggregate(agg: Aggregate, target: str | Path, suite: str,
                    failures: dict[str, str] | None = None,
                    unfinished: Iterable[str] = (),
                    claims: Iterable[Claim | SweepClaim] = ()) -> dict[str, Any]:
    """The leaderboard of runs over seeds: ``target`` (Markdown), ``claims.json``,
    ``leaderboard.json`` (every figure over seeds, per seed too) and the plots
    (``leaderboard_*.png``) beside it. Text between ``<!-- notes:start -->`` and
    ``<!-- notes:end -->`` in an earlier ``target`` is kept. Returns the paths and the
    decided claims."""
    target, unfinished = Path(target), sorted(unfinished)
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    notes = ""
    if target.is_file():
        found = re.search(re.escape(NOTES_START) + ".*?" + re.escape(NOTES_END),
                          target.read_text(), re.DOTALL)
        notes = found.group(0) if found else ""
    for stale in folder.glob(f"{PLOT_PREFIX}*.png"):
        stale.unlink()
    decided = evaluate_claims(agg.rows, agg.specs, claims)
    plots = plot_aggregate(agg, folder)
    title, tables = leaderboard_markdown(agg.rows, agg.chains, suite, agg.upgrades,
                                         agg.references)
    seed_sets = sorted({tuple(s) for s in agg.seeds.values()})
    runs = sum(len(s) for s in agg.seeds.values())
    seeds_text = "; ".join(", ".join(map(str, s)) for s in seed_sets)
    parts = [f"{title.removesuffix(')')}; mean ± sample std over seeds)", "",
             (f"Written by `compatzoo leaderboard` from {runs} finished runs of "
              f"{len(agg.seeds)} specs (seeds {seeds_text}); the `seeds` column is the number "
              "of seeds behind each row. `±` is the sample standard deviation (n - 1); a "
              "figure without it comes from one seed."), ""]
    if notes:
        parts += [notes, ""]
    claims_text = (claims_markdown(decided) if decided else
                   "No claims file was given (`compatzoo leaderboard DIR --claims FILE`; the "
                   "papers' claims are in `benchmarks/claims.yaml`).")
    parts += ["## Claims", "", CLAIMS_RULE, "", claims_text, "",
              "## Figures", "", tables, ""]
    plot_text = [f"![{name}]({path.name})" for name, path in plots.items()
                 if name == "compatibility"]
    plot_text += [f"- [{name}]({path.name})" for name, path in plots.items()
                  if name != "compatibility"]
    sweeps = [name for name in plots if name.startswith("loss-weight sweep")]
    parts += ["## Plots", "", ("Bars and bands are mean ± std over seeds; backfill curves "
                               "are the primary metric per scheduler, NFR@1 below."), "",
              *plot_text, ""]
    if not sweeps:
        parts += [("No loss-weight sweep: no two specs of this suite differ only in a loss "
                   "weight, so there is no lambda plot."), ""]
    if unfinished:
        parts += ["Runs not finished (left out): " + ", ".join(unfinished), ""]
    if failures:
        parts += ["Failed runs:", "", *(f"- {name}: {error}" for name, error in
                                        sorted(failures.items())), ""]
    target.write_text("\n".join(parts))
    claims_path = folder / "claims.json"
    claims_path.write_text(json.dumps({"rule": CLAIMS_RULE, "claims": decided}, indent=2))
    figures_path = folder / "leaderboard.json"
    figures_path.write_text(json.dumps(jsonable({
        "suite": suite, "metric": agg.metric, "seeds": agg.seeds, "rows": agg.rows,
        "chains": agg.chains, "upgrades": agg.upgrades, "references": agg.references,
        "failures": failures or {},
        "unfinished": unfinished}), indent=2))
    return {"markdown": target, "claims": claims_path, "figures": figures_path,
            "plots": plots, "decided": decided}


# --------------------------------------------------------------------------- plots
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, any backend

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def _band(values: list[Any] | None) -> tuple[list[float], list[float]]:
    """Per point: mean and std in percent (NaN where undefined, 0 std for one seed)."""
    means, stds = [], []
    for v in values or []:
        means.append(math.nan if v is None else 100 * _mean(v))
        stds.append(0.0 if not isinstance(v, Stat) or v.std is None else 100 * v.std)
    return means, stds


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


def plot_aggregate(agg: Aggregate, folder: Path) -> dict[str, Path]:
    """Compatibility bars, backfill bands per spec and sweep plots into ``folder``."""
    plots = {}
    if agg.rows:
        plots["compatibility"] = plot_compatibility(agg, folder / f"{PLOT_PREFIX}compatibility.png")
    for stem, by_model in agg.curves.items():
        if by_model:
            plots[f"backfill {stem}"] = plot_backfill(
                agg, stem, folder / f"{PLOT_PREFIX}backfill_{_safe(stem)}.png")
    for kind, parameter in (("loss-weight", LOSS_WEIGHT), ("psi-width", PSI_WIDTH)):
        for sweep in find_sweeps(agg.specs, parameter):
            stem = sweep.points[0][1]
            plots[f"{kind} sweep {stem} ({sweep.path})"] = plot_sweep(
                agg, sweep, folder / f"{PLOT_PREFIX}sweep_{_safe(stem)}_{_safe(sweep.path)}.png")
    return plots


def plot_compatibility(agg: Aggregate, path: Path) -> Path:
    """o2o, n2o, n2u and n2n of every leaderboard row, mean with std error bars."""
    settings = [("o2o", "#7f7f7f"), ("n2o", "#1f77b4"), ("n2u", "#ff7f0e"), ("n2n", "#2ca02c")]
    rows = agg.rows
    figure = _figure(min(40.0, 2.0 + 0.8 * len(rows)), 4.5)
    ax = figure.subplots()
    width = 0.2
    for i, (setting, colour) in enumerate(settings):
        if all(r.get(setting) is None for r in rows):
            continue
        means, stds = _band([r.get(setting) for r in rows])
        ax.bar([x + (i - 1.5) * width for x in range(len(rows))], means, width, yerr=stds,
               color=colour, label=setting, capsize=2, error_kw={"linewidth": 0.8})
    ax.set_xticks(range(len(rows)), [f"{r['stem']}: {r['model']}" for r in rows],
                  rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"{agg.metric} (%)")
    ax.set_title("compatibility (mean ± std over seeds)")
    ax.legend(fontsize=8)
    return _save(figure, path)


def plot_backfill(agg: Aggregate, stem: str, path: Path) -> Path:
    """One column per model: the metric along the backfill, a band of ± std over seeds
    per scheduler, o2o and n2n as lines; NFR@1 below when measured."""
    by_model = agg.curves[stem]
    with_nfr = any(c.get("nfr@1") for m in by_model.values() for c in m.values())
    rows = 2 if with_nfr else 1
    figure = _figure(5.0 * len(by_model), 3.8 * rows)
    axes = figure.subplots(rows, len(by_model), squeeze=False)
    table = agg.tables.get(stem) or {}
    for j, (model, by_scheduler) in enumerate(by_model.items()):
        ax = axes[0][j]
        for scheduler, curve in by_scheduler.items():
            x = [_mean(f) for f in curve["fractions"]]
            for ax_, values in ((ax, curve["metric"]),
                                (axes[-1][j] if with_nfr else None, curve.get("nfr@1"))):
                if ax_ is None or not values:
                    continue
                means, stds = _band(values)
                line, = ax_.plot(x, means, marker="o", markersize=3, label=scheduler)
                ax_.fill_between(x, [m - s for m, s in zip(means, stds)],
                                 [m + s for m, s in zip(means, stds)],
                                 color=line.get_color(), alpha=0.2, linewidth=0)
        for key, style in (("o2o", ":"), (f"n2n/{model}", "--")):
            if table.get(key) is not None:
                ax.axhline(100 * _mean(table[key]), color="black", linestyle=style,
                           linewidth=1, label=key.split("/")[0])
        ax.set(xlabel="fraction of gallery backfilled", ylabel=f"{agg.metric} (%)",
               title=f"{stem}: {model}")
        ax.legend(fontsize=7)
        if with_nfr:
            axes[1][j].set(xlabel="fraction of gallery backfilled", ylabel="NFR@1 (%)",
                           title="negative flips vs o2o")
            axes[1][j].legend(fontsize=7)
    return _save(figure, path)


def plot_sweep(agg: Aggregate, sweep: Sweep, path: Path) -> Path:
    """o2o, n2o, n2u and n2n against the swept value, mean with std error bars."""
    figure = _figure(5.5, 4.0)
    ax = figure.subplots()
    xs = [value for value, _ in sweep.points]
    for setting in ("o2o", "n2o", "n2u", "n2n"):
        values = []
        for _, stem in sweep.points:
            row = agg.specs[stem]["new"][sweep.model]["name"]
            found = next((r for r in agg.rows if r["stem"] == stem and r["model"] == row), {})
            values.append(found.get(setting))
        if all(v is None for v in values):
            continue
        means, stds = _band(values)
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=setting)
    ax.set(xlabel=sweep.path, ylabel=f"{agg.metric} (%)",
           title=", ".join(stem for _, stem in sweep.points))
    ax.legend(fontsize=8)
    return _save(figure, path)
