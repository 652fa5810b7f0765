"""Run every spec of a suite and write its leaderboard (Markdown + JSON).

    python benchmarks/run_suite.py benchmarks/suites/quick [--only bct ract] [--out runs/suite]
    python benchmarks/run_suite.py --merge runs/a runs/b --leaderboard benchmarks/LEADERBOARD.md

Each spec runs end to end (its own old model: same seed, so the same old model) and the
leaderboard lists, per new model, o2o, n2o, n2u (upgraded gallery), n2n on the primary
metric, BCT's criterion and the backfill AUC / worst NFR@1 per scheduler; and, per chain
of model versions, the average compatibility and multi-model accuracy of its matrices.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from compatzoo.experiment import run_experiment
from compatzoo.report import format_table
from compatzoo.specs import load_spec


def leaderboard_rows(results: dict) -> list[dict]:
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


def chain_rows(results: dict) -> list[dict]:
    """One row per chain of three or more generations: the matrices' summaries."""
    rows = []
    for leaf, chain in results["evaluation"].get("sequential", {}).items():
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


def chains_markdown(rows: list[dict]) -> str:
    lines = ["| spec | chain | matrix | average compatibility | average multi-model accuracy |",
             "|---|---|---|---|---|"]
    for r in rows:
        for key in ("backfilled", "upgraded", "carried"):
            if key in r:
                ac = r[key]["average_compatibility"]
                lines.append(f"| {r['spec']} | {r['chain']} | {key} | "
                             f"{'–' if ac is None else f'{100 * ac:.0f}%'} | "
                             f"{pct(r[key]['average_multi_model_accuracy'])} |")
        if "upgrade_path" in r:
            path = r["upgrade_path"]
            values = ", ".join(pct(step["value"]) for step in path["steps"])
            lines.append(f"| {r['spec']} | {r['chain']} | upgrade path (BiCT eq. 2) | "
                         f"{values} | {'increasing' if path['increasing'] else 'not increasing'} |")
    return "\n".join(lines)


def pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def to_markdown(rows: list[dict]) -> str:
    lines = ["| spec | model | o2o | n2o | n2u | n2n | n2o > o2o | update gain | backfill AUC (scheduler) | max NFR@1 | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        auc = ", ".join(f"{pct(v)} ({k}{' [oracle]' if k in r['oracle'] else ''})"
                        for k, v in r["auc"].items()) or "–"
        nfr = ", ".join(f"{pct(v)} ({k})" for k, v in r["max_nfr@1"].items()) or "–"
        gain = "–" if r["update_gain"] is None else f"{r['update_gain']:.3f}"
        lines.append(f"| {r['spec']} | {r['model']} | {pct(r['o2o'])} | {pct(r['n2o'])} | "
                     f"{pct(r['n2u'])} | {pct(r['n2n'])} | {'yes' if r['compatible'] else 'no'} | "
                     f"{gain} | {auc} | {nfr} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", type=Path, nargs="?")
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="combine the leaderboard.json of earlier runs instead of running; "
                        "a spec's rows come from the last run listed that has it")
    parser.add_argument("--only", nargs="*", help="spec file stems to run")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="keep the specs already "
                          "finished in --out and run the others")
    existing.add_argument("--overwrite", action="store_true", help="replace earlier runs "
                          "in --out")
    parser.add_argument("--out", type=Path, default=Path("runs/suite"))
    parser.add_argument("--leaderboard", type=Path, default=None,
                        help="Markdown file to write (default: <out>/LEADERBOARD.md)")
    args = parser.parse_args()
    if args.merge:
        merged = [json.loads((d / "leaderboard.json").read_text()) for d in args.merge]
        # a spec's rows come from the last run that has it (a re-run replaces older rows)
        by_spec: dict[str, dict[str, list]] = {}
        for m in merged:
            for key in ("rows", "chains"):
                for spec in {r["spec"] for r in m.get(key, [])}:
                    by_spec.setdefault(spec, {})[key] = [
                        r for r in m[key] if r["spec"] == spec]
        rows = [r for spec in sorted(by_spec) for r in by_spec[spec].get("rows", [])]
        chains = [r for spec in sorted(by_spec) for r in by_spec[spec].get("chains", [])]
        failures = {k: v for m in merged for k, v in m["failures"].items()}
        write_leaderboard(rows, chains, failures, "quick",
                          args.leaderboard or Path("LEADERBOARD.md"))
        return
    if args.suite is None:
        parser.error("give a suite folder, or --merge")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    specs = sorted(p for p in args.suite.glob("*.yaml") if not args.only or p.stem in args.only)
    rows, chains, failures = [], [], {}
    mode = "resume" if args.resume else "overwrite" if args.overwrite else "new"
    args.out.mkdir(parents=True, exist_ok=True)
    for path in specs:
        spec = load_spec(path)
        try:
            results = run_experiment(spec, args.out / path.stem, progress=False,
                                     save_checkpoints=False, mode=mode)
        except Exception as exc:  # one broken method must not hide the others' results
            failures[path.stem] = f"{type(exc).__name__}: {exc}"
            print(f"\n== {spec.name} FAILED: {failures[path.stem]}", flush=True)
            continue
        print(f"\n== {spec.name}\n{format_table(results['evaluation'])}", flush=True)
        rows.extend(leaderboard_rows(results))
        chains.extend(chain_rows(results))
        (args.out / "leaderboard.json").write_text(
            json.dumps({"rows": rows, "chains": chains, "failures": failures}, indent=2))
    write_leaderboard(rows, chains, failures, args.suite.name,
                      args.leaderboard or args.out / "LEADERBOARD.md")
    if failures:
        raise SystemExit(1)


def write_leaderboard(rows: list[dict], chains: list[dict], failures: dict[str, str],
                      suite: str, target: Path) -> None:
    markdown = to_markdown(rows)
    if chains:
        markdown += ("\n\nSequential upgrades (one row per matrix of each chain; "
                     "see the README's sequential section):\n\n" + chains_markdown(chains))
    failed = "".join(f"\n- {name}: {error}" for name, error in failures.items())
    target.write_text(f"# Leaderboard: {suite} suite (metric: "
                      f"{rows[0]['metric'] if rows else '-'}, in %)\n\n{markdown}\n"
                      + (f"\nFailed specs:{failed}\n" if failures else ""))
    print("\n" + markdown + (f"\nfailed:{failed}" if failures else ""))


if __name__ == "__main__":
    main()
