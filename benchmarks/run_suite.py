"""Run every spec of a suite once and write its leaderboard (Markdown + JSON).

    python benchmarks/run_suite.py benchmarks/suites/quick [--only bct ract] [--out runs/suite]
    python benchmarks/run_suite.py --merge runs/a runs/b --leaderboard benchmarks/LEADERBOARD.md

Each spec runs end to end (its own old model: same seed, so the same old model) and the
leaderboard lists, per new model, o2o, n2o, n2u (upgraded gallery), n2n on the primary
metric, BCT's criterion and the backfill AUC / worst NFR@1 per scheduler; and, per chain
of model versions, the average compatibility and multi-model accuracy of its matrices.

The rows and the Markdown come from :mod:`compatzoo.leaderboard`, which `compatzoo bench`
and `compatzoo leaderboard` (several seeds per spec, mean ± std, claims) use as well.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from compatzoo.experiment import run_experiment
from compatzoo.leaderboard import chain_rows, leaderboard_rows, upgrade_rows, write_leaderboard
from compatzoo.report import format_table
from compatzoo.specs import load_spec


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
            for key in ("rows", "chains", "upgrades"):
                for spec in {r["spec"] for r in m.get(key, [])}:
                    by_spec.setdefault(spec, {})[key] = [
                        r for r in m[key] if r["spec"] == spec]
        rows = [r for spec in sorted(by_spec) for r in by_spec[spec].get("rows", [])]
        chains = [r for spec in sorted(by_spec) for r in by_spec[spec].get("chains", [])]
        upgrades = [r for spec in sorted(by_spec) for r in by_spec[spec].get("upgrades", [])]
        failures = {k: v for m in merged for k, v in m["failures"].items()}
        write_leaderboard(rows, chains, failures, "quick",
                          args.leaderboard or Path("LEADERBOARD.md"), upgrades)
        return
    if args.suite is None:
        parser.error("give a suite folder, or --merge")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    specs = sorted(p for p in args.suite.glob("*.yaml") if not args.only or p.stem in args.only)
    rows, chains, upgrades, failures = [], [], [], {}
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
        upgrades.extend(upgrade_rows(results))
        (args.out / "leaderboard.json").write_text(json.dumps(
            {"rows": rows, "chains": chains, "upgrades": upgrades, "failures": failures},
            indent=2))
    write_leaderboard(rows, chains, failures, args.suite.name,
                      args.leaderboard or args.out / "LEADERBOARD.md", upgrades)
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
