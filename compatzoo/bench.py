"""``compatzoo bench``: every spec of a suite folder once per seed, resumably.

Run ``<spec stem>`` with seed ``s`` goes into ``<out>/<spec stem>/seed-<s>/`` (an ordinary
run folder, :mod:`compatzoo.run_folder`). A run whose folder says it finished is skipped
(its results.json is reused); an unfinished one is resumed from its last saved state; so
a suite completes across several sittings. Only the spec's ``seed`` changes between seeds
(it seeds the allocation, the models and the backfill orders); the data stays the same.
``<out>/bench.json`` records every run's last outcome, failures included, across sittings.
"""

from __future__ import annotations

import datetime as _dt
import json
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from compatzoo.errors import CompatzooError, SpecError

BENCH_FILE = "bench.json"
#: run_experiment's options for every bench run: checkpoints, so that an interrupted run
#: resumes mid-training; no bundles (a leaderboard does not need them)
RUN_OPTIONS = {"save_checkpoints": True, "save_bundles": False}


def first_line(text: str) -> str:
    """A message's first line (the rest, e.g. an expected layout, stays in bench.json)."""
    lines = text.strip().splitlines()
    return lines[0] + (" [...]" if len(lines) > 1 else "") if lines else ""


def suite_specs(suite: str | Path, only: list[str] | None = None) -> list[Path]:
    """The suite's spec files (``*.yaml``), sorted; ``only``: these stems."""
    suite = Path(suite)
    if not suite.is_dir():
        raise SpecError(f"the suite {suite} is not a folder; give a folder of spec files "
                        "(e.g. benchmarks/suites/quick)")
    specs = sorted(suite.glob("*.yaml"))
    if not specs:
        raise SpecError(f"the suite {suite} holds no *.yaml spec files")
    if only:
        unknown = sorted(set(only) - {p.stem for p in specs})
        if unknown:
            raise SpecError(f"--only names specs the suite {suite} lacks: "
                            f"{', '.join(unknown)}; it has {', '.join(p.stem for p in specs)}")
        specs = [p for p in specs if p.stem in only]
    return specs


def run_folder(out: str | Path, stem: str, seed: int) -> Path:
    return Path(out) / stem / f"seed-{seed}"


def load_seeded(path: str | Path, seed: int):
    """The spec in ``path`` with its ``seed`` replaced (validated as a whole)."""
    from compatzoo.specs import load_spec, read_yaml

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist")
    source = read_yaml(path)
    if not isinstance(source, dict):
        raise SpecError(f"{path} must contain a YAML mapping at the top level")
    try:
        return load_spec({**source, "seed": seed})
    except SpecError as exc:
        raise SpecError(f"{path} (seed {seed}): {exc}") from None


def run_state(folder: Path, spec) -> str:
    """``finished`` (results reusable), ``unfinished`` (to resume) or ``new``; a finished
    run of another spec is an error (its results would be stale)."""
    from compatzoo.run_folder import MANIFEST, RunFolderError, spec_fingerprint

    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "new"
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return "unfinished"               # run_experiment reports the damage
    if not data.get("finished"):
        return "unfinished"
    if data.get("spec_sha256") != spec_fingerprint(spec.model_dump(mode="json")):
        raise RunFolderError(f"{folder} holds a finished run of another version of the spec; "
                             "delete that folder to run the spec as it is now")
    if not (folder / "results.json").is_file():
        raise RunFolderError(f"{folder} says it finished but has no results.json; delete "
                             "that folder to run it again")
    return "finished"


def run_one(task: dict[str, Any]) -> dict[str, Any]:
    """One run of a spec with a seed, in this process (a pool worker's entry point).
    Never raises on a failed run: returns ``{"status": "failed", "error": ...}``."""
    import torch

    from compatzoo.experiment import run_experiment

    torch.set_num_threads(task["threads"])
    started = time.perf_counter()
    try:
        spec = load_seeded(task["spec_path"], task["seed"])
        run_experiment(spec, task["folder"], progress=False, mode="resume", **RUN_OPTIONS)
    except Exception as exc:             # one failing run must not stop the others
        record = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                  "seconds": time.perf_counter() - started}
        if not isinstance(exc, CompatzooError):
            record["traceback"] = traceback.format_exc()
        return record
    return {"status": "finished", "seconds": time.perf_counter() - started}


class BenchLog:
    """``<out>/bench.json``: every run's last outcome, kept across sittings."""

    def __init__(self, out: Path, suite: Path, seeds: list[int]):
        self.path = out / BENCH_FILE
        self.data = {"suite": str(suite), "seeds": seeds, "runs": {}}
        if self.path.is_file():
            try:
                earlier = json.loads(self.path.read_text())
                self.data["runs"] = dict(earlier.get("runs", {}))
            except (OSError, json.JSONDecodeError):
                pass                    # a damaged log is rewritten from this sitting

    def record(self, stem: str, seed: int, outcome: dict[str, Any]) -> None:
        from compatzoo.engine.checkpoints import atomic_write

        self.data["runs"][f"{stem}/seed-{seed}"] = {
            "spec": stem, "seed": seed, **outcome,
            "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        text = json.dumps(self.data, indent=2)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))


def bench(suite: str | Path, seeds: list[int], out: str | Path,
          only: list[str] | None = None, jobs: int = 1,
          echo: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run every spec of ``suite`` once per seed into ``out``; returns each run's outcome
    by ``<stem>/seed-<s>`` (status ``finished``, ``skipped`` or ``failed``)."""
    if jobs < 1:
        raise SpecError(f"--jobs must be 1 or more, not {jobs}")
    if not seeds:
        raise SpecError("give at least one seed")
    seeds = list(dict.fromkeys(seeds))
    specs = suite_specs(suite, only)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpecError(f"the output {out} is a file, not a folder; choose a folder with --out")
    out.mkdir(parents=True, exist_ok=True)
    log = BenchLog(out, Path(suite), seeds)
    outcomes: dict[str, dict[str, Any]] = {}

    def done(stem: str, seed: int, outcome: dict[str, Any]) -> None:
        outcomes[f"{stem}/seed-{seed}"] = outcome
        log.record(stem, seed, outcome)
        status = outcome["status"]
        text = (f"FAILED: {first_line(outcome['error'])}" if status == "failed" else
                "skipped (finished earlier)" if status == "skipped" else
                f"finished in {outcome['seconds']:.0f} s")
        echo(f"[{len(outcomes)}/{len(specs) * len(seeds)}] {stem} seed {seed}: {text}")

    tasks = []
    for path in specs:
        for seed in seeds:
            folder = run_folder(out, path.stem, seed)
            try:
                state = run_state(folder, load_seeded(path, seed))
            except CompatzooError as exc:
                done(path.stem, seed, {"status": "failed", "error": f"{type(exc).__name__}: "
                                       f"{exc}", "seconds": 0.0})
                continue
            if state == "finished":
                done(path.stem, seed, {"status": "skipped", "seconds": 0.0})
                continue
            tasks.append({"stem": path.stem, "spec_path": str(path), "seed": seed,
                          "folder": str(folder), "resumed": state != "new"})
    workers = min(jobs, len(tasks))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // max(1, workers))   # more threads than cores is slower
    for task in tasks:
        task["threads"] = threads
    if tasks:
        echo(f"running {len(tasks)} run(s), {workers} at a time, {threads} thread(s) each, "
             f"into {out}")
    if workers <= 1:
        for task in tasks:
            done(task["stem"], task["seed"], run_one(task))
    else:
        pool = ProcessPoolExecutor(max_workers=workers,
                                   mp_context=multiprocessing.get_context("spawn"))
        try:
            futures = {pool.submit(run_one, task): task for task in tasks}
            for future in as_completed(futures):
                task = futures[future]
                try:
                    outcome = future.result()
                except BrokenProcessPool:
                    outcome = {"status": "failed", "seconds": 0.0,
                               "error": "the worker process died (out of memory?); run the "
                               "bench again to resume it"}
                done(task["stem"], task["seed"], outcome)
        except BaseException:    # Ctrl-C: start no further run (the started ones resume later)
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    return outcomes


def finished_runs(out: str | Path) -> tuple[dict[str, dict[int, dict]], list[str]]:
    """The results of every finished run under ``out`` (``[stem][seed]``) and the names
    (``stem/seed-s``) of the unfinished ones."""
    from compatzoo.run_folder import MANIFEST

    runs: dict[str, dict[int, dict]] = {}
    unfinished = []
    for manifest in sorted(Path(out).glob(f"*/seed-*/{MANIFEST}")):
        folder = manifest.parent
        try:
            seed = int(folder.name.removeprefix("seed-"))
            finished = json.loads(manifest.read_text()).get("finished")
        except (ValueError, OSError, json.JSONDecodeError):
            continue
        name = f"{folder.parent.name}/{folder.name}"
        if not finished or not (folder / "results.json").is_file():
            unfinished.append(name)
            continue
        runs.setdefault(folder.parent.name, {})[seed] = json.loads(
            (folder / "results.json").read_text())
    return runs, unfinished


def failed_runs(out: str | Path) -> dict[str, str]:
    """Runs whose last outcome in ``<out>/bench.json`` was a failure, and the first line
    of each error."""
    path = Path(out) / BENCH_FILE
    try:
        runs = json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}
    return {name: first_line(r.get("error", "")) for name, r in runs.items()
            if r.get("status") == "failed"}


def suite_name(out: str | Path) -> str:
    """The suite's folder name as ``<out>/bench.json`` records it, else ``out``'s name."""
    path = Path(out) / BENCH_FILE
    try:
        return Path(json.loads(path.read_text())["suite"]).name
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return Path(out).resolve().name


def current_references(out: str | Path, runs: dict[str, dict[int, dict]]) -> None:
    """Each spec's ``references`` as its file in the suite folder gives them now, in place of
    those its runs recorded. They change nothing a run computes, so a finished run is not
    redone for them (see ``run_folder.NOT_FINGERPRINTED``), and a corrected paper figure
    must still reach the leaderboard. A spec whose file is gone or no longer validates
    keeps the recorded ones."""
    from compatzoo.specs import load_spec

    try:
        suite = Path(json.loads((Path(out) / BENCH_FILE).read_text())["suite"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return
    for stem, by_seed in runs.items():
        path = suite / f"{stem}.yaml"
        if not path.is_file():
            continue
        try:
            references = load_spec(path).model_dump(mode="json").get("references", [])
        except CompatzooError:
            continue
        for results in by_seed.values():
            results["spec"]["references"] = references
